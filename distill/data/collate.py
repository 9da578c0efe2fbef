"""Right-padded collation (docs/INTERFACES.md "Data")."""

from __future__ import annotations

import torch

from distill.attention.visual import key_len_of

from . import families as fam
from .encode import IGNORE_INDEX, Encoded

MODEL_INPUTS_KEY = "model_inputs"


def collate(samples: list[Encoded], pad_token_id: int, image_token_id: int, family: str | None = None) -> dict:
    """Stack encoded samples into a right-padded batch.

    ``family`` None (LLaVA): the layout below. A family name (``distill.data.families``): see
    :func:`collate_family`.

    Returns ``input_ids [B,T] long`` (pad = ``pad_token_id``), ``attention_mask [B,T] long``,
    ``labels [B,T] long`` (-100 on padding), ``pixel_values [N_img,3,H,W]`` for the samples with an
    image, in batch order (None when none has one), ``has_image [B] bool`` and ``vis_pos [B,n] long``:
    the increasing positions where ``input_ids == image_token_id`` (``n`` image tokens per image, 0
    when no sample has an image; rows of text-only samples hold ``arange(n)``) and ``num_targets``,
    a Python int: the shifted labelled positions ``(labels[:, 1:] != -100).sum()``, so the
    objective can gather those rows without a host sync, and ``vis_key_len``, a Python int:
    ``max(vis_pos) + 1`` (0 without visual tokens), the last key any visual row can see, which
    bounds the capture op's key loops (``visual_attention_probs(key_len=...)``).

    A LLaVA batch has no ``model_inputs`` key: its model inputs are ``input_ids``,
    ``attention_mask`` and ``pixel_values`` (when not None), as for a family batch whose
    ``model_inputs`` is ``["pixel_values"]``. The objective passes, in both cases,
    ``{k: batch[k] for k in batch.get("model_inputs", ["pixel_values"]) if batch.get(k) is not None}``.
    """
    if not samples:
        raise ValueError("collate: empty sample list")
    if family is not None:
        return collate_family(samples, pad_token_id, image_token_id, family)
    B = len(samples)
    input_ids, attention_mask, labels = _pad_rows(samples, pad_token_id)
    has_image = torch.tensor([s.pixel_values is not None for s in samples], dtype=torch.bool)
    pos = [(input_ids[b, : samples[b].input_ids.numel()] == image_token_id).nonzero().flatten() for b in range(B)]
    counts = {int(pos[b].numel()) for b in range(B) if has_image[b]}
    if len(counts) > 1:
        raise ValueError(
            f"collate: image samples in one batch have different image-token counts {sorted(counts)}; "
            "vis_pos needs a fixed count per image (use a processor with a fixed image size)"
        )
    n = counts.pop() if counts else 0
    vis_pos = torch.arange(n, dtype=torch.long).repeat(B, 1)  # (B, n)
    for b in range(B):
        if has_image[b]:
            vis_pos[b] = pos[b]
    pixel_values = None
    if bool(has_image.any()):
        pixel_values = torch.stack([s.pixel_values for s in samples if s.pixel_values is not None])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "has_image": has_image,
        "vis_pos": vis_pos,
        "num_targets": sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples),
        "vis_key_len": key_len_of(vis_pos) or 0,  # host tensor: no device sync
    }


def _pad_rows(samples: list[Encoded], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = len(samples)
    T = max(s.input_ids.numel() for s in samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        L = s.input_ids.numel()
        input_ids[b, :L] = s.input_ids
        attention_mask[b, :L] = 1
        labels[b, :L] = s.labels
    return input_ids, attention_mask, labels


def ragged_vis_pos(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``[B, n_max] long``: each row's increasing positions of ``image_token_id`` (real tokens only), the
    tail padded with -1 (``n_max`` = the largest count, 0 when there is none)."""
    hit = (input_ids == image_token_id) & attention_mask.bool()
    counts = hit.sum(1)
    n = int(counts.max()) if hit.numel() else 0
    vis_pos = torch.full((input_ids.shape[0], n), -1, dtype=torch.long)
    for b in range(input_ids.shape[0]):
        pos = hit[b].nonzero().flatten()
        vis_pos[b, : pos.numel()] = pos
    return vis_pos


def collate_family(samples: list[Encoded], pad_token_id: int, image_token_id: int, family: str) -> dict:
    """Right-padded batch of a family whose images give different visual-token counts.

    Common keys (as the LLaVA batch): ``input_ids/attention_mask/labels [B,T] long`` (right padding:
    pad id / 0 / -100), ``has_image [B] bool``, ``num_targets`` and ``vis_key_len`` (host ints), and
    ``vis_pos [B, n_max] long``: each sample's positions of ``input_ids == image_token_id``,
    increasing, the tail padded with -1 (DESIGN.md; rows of text-only samples are all -1).

    Model inputs: ``batch["model_inputs"]`` (list of names, ``families.MODEL_INPUTS[family]``) are the
    keys the model forward takes besides ``input_ids`` and ``attention_mask``; pass each one whose
    value is not None. Layouts (``N`` = images in the batch, batch order; see ``families.LAYOUT``):

    - qwen2_5_vl / qwen3_vl: ``pixel_values [sum patches, C*t*p*p] float`` (concatenated),
      ``image_grid_thw [N, 3] long``, ``mm_token_type_ids [B,T] long`` (1 at image tokens, 0 pad);
    - llava_onevision: ``pixel_values [N, max_tiles, 3, H, W] float`` (zero tiles pad),
      ``image_sizes [N, 2] long``, ``batch_num_images [N] long`` (ones);
    - internvl: ``pixel_values [sum tiles, 3, H, W] float``.

    Image keys are None when no sample has an image. This is what the processor itself returns
    for the same texts and images with right padding (tests/test_loader_families.py).
    """
    input_ids, attention_mask, labels = _pad_rows(samples, pad_token_id)
    B, T = input_ids.shape
    names = list(fam.MODEL_INPUTS[family])
    layout = fam.LAYOUT[family]
    has_image = torch.tensor([s.pixel_values is not None for s in samples], dtype=torch.bool)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    imgs = [s for s in samples if s.pixel_values is not None]
    for name in names:
        if layout[name] == "seq":
            seq = torch.zeros((B, T), dtype=torch.long)
            for b, s in enumerate(samples):
                v = s.extras[name]
                seq[b, : v.numel()] = v
            out[name] = seq
        elif name == "pixel_values":
            out[name] = fam.collate_key(family, name, [s.pixel_values for s in imgs])
        else:
            out[name] = fam.collate_key(family, name, [s.extras[name] for s in imgs])
    vis_pos = ragged_vis_pos(input_ids, attention_mask, image_token_id)
    out.update({
        "has_image": has_image,
        "vis_pos": vis_pos,
        "num_targets": sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples),
        "vis_key_len": key_len_of(vis_pos) or 0,
        MODEL_INPUTS_KEY: names,
    })
    return out
