"""Compositional evaluation as an A/B question (the reference's SugarCrepe protocol).

For each (image, positive, negative) pair the model is asked, through its own chat template, a
two-option multiple-choice question (`DEFAULT_AB_PROMPT`, the image first)::

    Which caption describes the image?
    A. <caption 1>
    B. <caption 2>
    Answer with the letter.

and the answer is read off the next-token distribution right after the assistant turn opens
(``add_generation_prompt=True``): the log-probabilities of the letter tokens ``A`` and ``B``. Their
ids are looked up from the tokenizer in that very context (`letter_token_ids`), never hard-coded.
Nothing is generated.

Every pair is asked twice, the positive as A and then as B (the order swap removes a fixed letter
bias). One ordering scores 1 when the correct letter's log-probability is strictly higher, 0 when
it is lower and 0.5 on an exact tie; the pair's score is the mean of its two orderings (0, 0.25,
0.5, 0.75 or 1). A model that always answers "A" scores exactly 0.5.

Accounting (`ab_accuracy`, the same shape as `compositional_accuracy`):

- per category: a sample counts once for each category among its negatives, with the mean score of
  its pairs of that category;
- overall: a sample scores the minimum of its pair scores (the A/B counterpart of "the positive
  beats every negative").

With one negative per sample (SugarCrepe) both are the mean pair score, the number the reference
reports. ``hits`` are therefore sums of fractional scores.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

import torch

from distill.eval.common import EvalDataError, model_device, render_chat, user_turn

DEFAULT_AB_PROMPT = "Which caption describes the image?\nA. {A}\nB. {B}\nAnswer with the letter."
LETTERS = ("A", "B")
_SLOT = re.compile(r"\{([AB])\}")


def check_ab_prompt(template: str) -> str:
    """The template must hold ``{A}`` and ``{B}`` once each (the two captions' places)."""
    if not isinstance(template, str):
        raise EvalDataError(f"A/B prompt must be a string, got {template!r}")
    for slot in ("{A}", "{B}"):
        if template.count(slot) != 1:
            raise EvalDataError(f"A/B prompt {template!r} must hold {slot} exactly once "
                                "(where caption A and caption B go)")
    return template


def ab_question(template: str, caption_a: str, caption_b: str) -> str:
    """`template` with its ``{A}`` / ``{B}`` slots filled in one pass (captions may hold braces)."""
    caps = {"A": caption_a.strip(), "B": caption_b.strip()}
    for k, c in caps.items():
        if not c:
            raise EvalDataError(f"empty caption for option {k}")
    return _SLOT.sub(lambda m: caps[m.group(1)], check_ab_prompt(template))


def letter_token_ids(processor, template: str = DEFAULT_AB_PROMPT) -> tuple[int, int]:
    """Token ids of the answers ``A`` and ``B`` as the first assistant token.

    The generation prompt of a question is tokenised alone and followed by each letter; the letter
    must add exactly one token and leave the prompt's tokens unchanged (otherwise the answer cannot
    be read from one next-token distribution, and this raises).
    """
    tok = processor.tokenizer
    prefix = render_chat(processor, [user_turn(ab_question(template, "x", "y"))], add_generation_prompt=True)
    base = tok(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for letter in LETTERS:
        ids = tok(prefix + letter, add_special_tokens=False)["input_ids"]
        if len(ids) != len(base) + 1 or ids[:len(base)] != base:
            raise EvalDataError(
                f"the answer {letter!r} is not one token after the generation prompt "
                f"(tokens {ids[len(base) - 1:]} vs prompt end {base[-1:]}); the A/B protocol needs single-token letters"
            )
        out.append(int(ids[-1]))
    if out[0] == out[1]:
        raise EvalDataError(f"letters A and B map to the same token id {out[0]}")
    return out[0], out[1]


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def score_letters(model, processor, images: Sequence, questions: Sequence[str],
                  letter_ids: tuple[int, int], *, batch_size: int = 8) -> torch.Tensor:
    """Next-token log-probabilities of the two letters after each question's generation prompt.

    Args:
        images: N PIL images; questions: N user texts (pair i = images[i], questions[i]).
        letter_ids: (id of "A", id of "B"), from `letter_token_ids`.
    Returns:
        [N, 2] fp32 CPU tensor: log p(A), log p(B).

    Batches are right padded and the prediction is read at each row's last real position, so the
    result does not depend on the batch (causal attention never sees the pad keys). Only those
    positions are projected to the vocabulary when the model takes ``logits_to_keep``.
    """
    if len(images) != len(questions):
        raise EvalDataError(f"{len(images)} images but {len(questions)} questions; pass one image per question")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    letters = torch.tensor(letter_ids, device=device)
    keep_ok = _accepts_logits_to_keep(model)
    out = []
    for s in range(0, len(questions), batch_size):
        texts = [render_chat(processor, [user_turn(q)], add_generation_prompt=True) for q in questions[s:s + batch_size]]
        batch = processor(images=list(images[s:s + batch_size]), text=texts, padding=True, padding_side="right",
                          add_special_tokens=False, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        last = batch["attention_mask"].sum(1) - 1  # (B,) last real position of each row
        rows = torch.arange(last.numel(), device=device)
        if keep_ok:
            keep = last.unique()  # (P,) sorted
            logits = model(**batch, logits_to_keep=keep).logits  # (B, P, V)
            sel = logits[rows, torch.searchsorted(keep, last)]
        else:
            sel = model(**batch).logits[rows, last]  # (B, V)
        out.append(sel.float().log_softmax(-1)[:, letters])  # (B, 2)
    if not out:
        return torch.zeros(0, 2)
    return torch.cat(out).cpu()


def ab_outcome(correct: float, other: float) -> float:
    """One ordering: 1 if the correct letter scores strictly higher, 0.5 on a tie, else 0."""
    return 1.0 if correct > other else 0.5 if correct == other else 0.0


def pair_score(pos_first: Sequence[float], neg_first: Sequence[float]) -> float:
    """Score of one (positive, negative) pair from its two orderings' letter scores (A, B):
    ``pos_first`` with the positive as A, ``neg_first`` with the positive as B."""
    return 0.5 * (ab_outcome(pos_first[0], pos_first[1]) + ab_outcome(neg_first[1], neg_first[0]))


def ab_accuracy(samples, letter_scores) -> dict:
    """A/B accuracy overall and per category (see module doc).

    Args:
        samples: S `CompoSample`s.
        letter_scores: S entries; entry s has shape [K_s, 2, 2] (K_s = len(samples[s].negatives)):
            [k, 0] = (A, B) letter scores with the positive as A and negative k as B,
            [k, 1] = (A, B) letter scores with negative k as A and the positive as B.
    Returns:
        {"overall": {"hits", "total", "accuracy"}, "per_category": {cat: {...}}}; ``hits`` is the
        sum of (fractional) sample scores, accuracy in [0, 1].
    """
    if len(samples) != len(letter_scores):
        raise ValueError(f"{len(samples)} samples but {len(letter_scores)} letter-score entries")
    hits, total = 0.0, 0
    cat_hits: dict[str, float] = defaultdict(float)
    cat_total: dict[str, int] = defaultdict(int)
    for smp, sc in zip(samples, letter_scores):
        sc = torch.as_tensor(sc, dtype=torch.float64)
        if sc.shape != (len(smp.negatives), 2, 2):
            raise ValueError(f"sample {smp.id!r}: letter scores of shape {tuple(sc.shape)}, "
                             f"expected ({len(smp.negatives)}, 2, 2)")
        if not bool(torch.isfinite(sc).all()):
            raise ValueError(f"sample {smp.id!r}: non-finite letter score {sc.tolist()}")
        pairs = [pair_score(sc[k, 0].tolist(), sc[k, 1].tolist()) for k in range(len(smp.negatives))]
        total += 1
        hits += min(pairs)
        by_cat: dict[str, list[float]] = defaultdict(list)
        for (_, cat), p in zip(smp.negatives, pairs):
            by_cat[cat].append(p)
        for cat, ps in by_cat.items():
            cat_total[cat] += 1
            cat_hits[cat] += sum(ps) / len(ps)

    def entry(h, t):
        return {"hits": h, "total": t, "accuracy": h / t if t else 0.0}

    return {"overall": entry(hits, total),
            "per_category": {c: entry(cat_hits[c], cat_total[c]) for c in sorted(cat_total)}}


def evaluate_compositional_ab(model, processor, samples, *, batch_size: int = 8, prompt: str = DEFAULT_AB_PROMPT,
                              progress: bool = True) -> tuple[dict, list[dict]]:
    """Ask every (positive, negative) pair of every sample twice (order swapped); `ab_accuracy`.

    Images are opened once per sample, batch by batch; questions of several samples share a batch
    of `batch_size` prompts.

    Returns:
        (results, per_sample): results as `ab_accuracy` plus ``"answered_a"`` (share of questions
        whose "A" log-probability is strictly higher: the letter bias), ``"ab_prompt"`` and
        ``"letter_token_ids"``; per_sample[s] = {"id", "categories", "score", "pairs": [{"negative",
        "category", "pos_first": [logp A, logp B], "neg_first": [logp A, logp B], "score"}]}.
    """
    check_ab_prompt(prompt)
    ids = letter_token_ids(processor, prompt)

    def questions(smp):
        return [q for neg, _ in smp.negatives
                for q in (ab_question(prompt, smp.positive, neg), ab_question(prompt, neg, smp.positive))]

    def score(imgs, qs):
        return score_letters(model, processor, imgs, qs, ids, batch_size=batch_size)

    from distill.eval.compositional import batched_scores

    got = batched_scores(  # per sample: its (A, B) rows, pos-first then neg-first per negative
        samples, questions, score, batch_size, progress, "compositional (A/B)")
    letter_scores = [torch.tensor(rows, dtype=torch.float64).reshape(len(smp.negatives), 2, 2)
                     for smp, rows in zip(samples, got)]
    results = ab_accuracy(samples, letter_scores)
    orderings = torch.cat([sc.reshape(-1, 2) for sc in letter_scores]) if letter_scores else torch.zeros(0, 2)
    # letter bias: the share of questions answered "A" (1.0 or 0.0 = one letter whatever the captions)
    results["answered_a"] = float((orderings[:, 0] > orderings[:, 1]).double().mean()) if len(orderings) else 0.0
    results["ab_prompt"] = prompt
    results["letter_token_ids"] = {"A": ids[0], "B": ids[1]}
    per_sample = []
    for smp, sc in zip(samples, letter_scores):
        pairs = [{"negative": neg, "category": cat, "pos_first": sc[k, 0].tolist(), "neg_first": sc[k, 1].tolist(),
                  "score": pair_score(sc[k, 0].tolist(), sc[k, 1].tolist())}
                 for k, (neg, cat) in enumerate(smp.negatives)]
        per_sample.append({"id": smp.id, "categories": [c for _, c in smp.negatives],
                           "score": min(p["score"] for p in pairs), "pairs": pairs})
    return results, per_sample
