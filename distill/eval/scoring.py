"""Caption scoring: the model's log-likelihood of a caption given an image.

The prompt is the model's own chat template: a user turn holding the image and an instruction
(``"Describe the image."`` by default) and an assistant turn holding the caption. Only the caption's
tokens are scored. They are found from character offsets in the rendered conversation (no token
offsets are assumed), then carried over to the processor's output, where each image placeholder has
been expanded to the image's tokens: everything after the last image placeholder is identical in
both tokenisations, which is checked for every sample.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distill.eval.common import DEFAULT_CAPTION_PROMPT, EvalDataError, image_token_id, model_device, render_chat, user_turn


def _caption_text(caption: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise EvalDataError(f"empty caption {caption!r}: every caption to score needs text")
    return caption.strip()


_SENTINEL = "\u2063caption\u2063"


def _caption_prefix(processor, prompt: str) -> str | None:
    """The rendered text before the assistant text for `prompt` (None when it cannot be found).

    The conversation is rendered with a sentinel as the assistant text; templates do not depend on
    the assistant text, so this prefix serves every caption of the prompt."""
    probe = render_chat(processor, _conversation(prompt, _SENTINEL))
    cut = probe.find(_SENTINEL)
    return probe[:cut] if cut >= 0 else None


def _caption_start(prefix: str | None, rendered: str, caption: str) -> int:
    """Character offset of the caption in the rendered conversation: right after `prefix`
    (`_caption_prefix`), so a caption that also occurs elsewhere in the conversation cannot be
    confused with it; else its last occurrence."""
    cut = len(prefix) if prefix is not None else -1
    if cut >= 0 and rendered.startswith(prefix) and rendered[cut:cut + len(caption)] == caption:
        return cut
    start = rendered.rfind(caption)
    if start < 0:
        raise EvalDataError(
            f"the chat template changed the caption {caption!r} while rendering it; cannot locate its tokens"
        )
    return start


def _conversation(prompt: str, caption: str) -> list[dict]:
    return [user_turn(prompt), {"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def _caption_token_indices(tokenizer, rendered: str, start: int, caption: str,
                           image_id: int) -> tuple[list[int], list[int], int]:
    """Token ids of `rendered` (placeholders not expanded), the indices of the caption's tokens
    (those overlapping characters [start, start + len(caption))), and the index of the last image
    placeholder (-1 when none)."""
    end = start + len(caption)
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise EvalDataError("caption scoring needs a fast tokenizer (character offsets); "
                            "save the model with its tokenizer.json") from None
    ids = list(enc["input_ids"])
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end]
    last_img = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
    if not idx:
        raise EvalDataError(f"caption {caption!r} maps to no tokens")
    if idx[0] <= last_img:
        raise EvalDataError(f"caption {caption!r} contains the image placeholder token")
    return ids, idx, last_img


def build_caption_batch(processor, images: Sequence, captions: Sequence[str], image_id: int,
                        prompt: str = DEFAULT_CAPTION_PROMPT) -> tuple[dict, torch.Tensor]:
    """Processor batch for (image, caption) pairs plus the mask of caption tokens.

    Args:
        images: N PIL images; captions: N strings (pair i = images[i], captions[i]).
        image_id: the model's image token id.
    Returns:
        batch: dict with input_ids [N,T], attention_mask [N,T] (right padded), pixel_values [N,3,H,W];
        caption_mask: [N,T] bool, True on the caption's tokens (the targets to score).
    """
    if len(images) != len(captions):
        raise EvalDataError(f"{len(images)} images but {len(captions)} captions; pass one image per caption")
    tok = processor.tokenizer
    prefix = _caption_prefix(processor, prompt)
    texts, metas = [], []
    for cap in captions:
        cap = _caption_text(cap)
        rendered = render_chat(processor, _conversation(prompt, cap))
        texts.append(rendered)
        metas.append(_caption_token_indices(tok, rendered, _caption_start(prefix, rendered, cap), cap, image_id))
    batch = processor(images=list(images), text=texts, padding=True, padding_side="right",
                      add_special_tokens=False, return_tensors="pt")
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (u_ids, cap_idx, last_img) in enumerate(metas):
        length = int(am[b].sum())
        if not bool(am[b, :length].all()):
            raise EvalDataError("processor did not right-pad the batch")
        shift = length - len(u_ids)
        tail = torch.tensor(u_ids[last_img + 1:], dtype=ids.dtype)
        if shift < 0 or not torch.equal(ids[b, shift + last_img + 1:length], tail):
            raise EvalDataError(
                "the processor's tokenisation of the text after the image differs from the tokenizer's; "
                f"cannot align caption tokens of {captions[b]!r}"
            )
        mask[b, torch.tensor(cap_idx) + shift] = True
    return dict(batch), mask


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each masked target token under next-token prediction.

    Args:
        logits: [B,T,V] (any float dtype; upcast to fp32 here), position t predicts token t+1; or,
            with `positions`, [B,P,V] holding only the prediction positions `positions`.
        input_ids: [B,T] long; mask: [B,T] bool, targets to score (mask[:,0] must be False).
        positions: [P] sorted long positions the logits were kept for (a model's ``logits_to_keep``);
            must hold t - 1 for every masked t.
    Returns:
        [B,T] fp32, log p(input_ids[b,t] | prefix) where mask[b,t], 0 elsewhere.
    """
    if bool(mask[:, 0].any()):
        raise ValueError("the first token has no prefix and cannot be scored")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    b, t = mask.nonzero(as_tuple=True)
    if b.numel():
        col = t - 1 if positions is None else torch.searchsorted(positions, t - 1)
        sel = logits[b, col].float()  # (K, V)
        lp = sel.log_softmax(-1).gather(1, input_ids[b, t].unsqueeze(1)).squeeze(1)  # (K,)
        out[b, t] = lp
    return out


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def caption_logprobs(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """Run the model and return `token_logprobs` for the masked tokens.

    Only the positions that predict a masked token are projected to the vocabulary (the model's
    ``logits_to_keep`` with the union of those positions over the batch), so no [B, T, V] tensor is
    formed for long image prompts; models without ``logits_to_keep`` fall back to full logits.

    Args:
        batch: model inputs with input_ids [B,T]; mask: [B,T] bool targets (mask[:, 0] False).
    Returns:
        [B,T] fp32 log-probabilities (0 off the mask).
    """
    ids = batch["input_ids"]
    if not _accepts_logits_to_keep(model):
        return token_logprobs(model(**batch).logits, ids, mask)
    keep = (mask.nonzero(as_tuple=True)[1] - 1).unique()  # (P,) sorted prediction positions
    logits = model(**batch, logits_to_keep=keep).logits  # (B, P, V)
    return token_logprobs(logits, ids, mask, positions=keep)


@torch.no_grad()
def score_captions(model, processor, images: Sequence, captions: Sequence[str], *,
                   prompt: str = DEFAULT_CAPTION_PROMPT, batch_size: int = 8, reduction: str = "mean",
                   progress: bool = False) -> torch.Tensor:
    """Score each (image, caption) pair by the model's log-likelihood of the caption tokens.

    Args:
        model: a LLaVA-style `...ForConditionalGeneration` (eval mode).
        processor: its processor (image processor + tokenizer + chat template).
        images: N PIL images; captions: N strings; pair i is (images[i], captions[i]).
        reduction: "mean" (mean token log-likelihood, the default) or "sum".
    Returns:
        [N] fp32 CPU tensor of scores (higher = the model prefers the caption).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) != len(captions):
        raise EvalDataError(f"{len(images)} images but {len(captions)} captions; pass one image per caption")
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    img_id = image_token_id(model)
    scores = []
    starts = range(0, len(captions), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="score", unit="batch")
    for s in starts:
        batch, mask = build_caption_batch(processor, images[s:s + batch_size], captions[s:s + batch_size], img_id, prompt)
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        mask = mask.to(device)
        lp = caption_logprobs(model, batch, mask)  # (B, T)
        total = lp.sum(1)
        scores.append((total / mask.sum(1)) if reduction == "mean" else total)
    if not scores:
        return torch.zeros(0)
    return torch.cat(scores).float().cpu()
