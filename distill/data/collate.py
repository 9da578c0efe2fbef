"""Right-padded collation (docs/INTERFACES.md "Data")."""

from __future__ import annotations

import torch

from distill.attention.visual import key_len_of

from .encode import IGNORE_INDEX, Encoded


def collate(samples: list[Encoded], pad_token_id: int, image_token_id: int) -> dict:
    """Stack encoded samples into a right-padded batch.

    Returns ``input_ids [B,T] long`` (pad = ``pad_token_id``), ``attention_mask [B,T] long``,
    ``labels [B,T] long`` (-100 on padding), ``pixel_values [N_img,3,H,W]`` for the samples with an
    image, in batch order (None when none has one), ``has_image [B] bool`` and ``vis_pos [B,n] long``:
    the increasing positions where ``input_ids == image_token_id`` (``n`` image tokens per image, 0
    when no sample has an image; rows of text-only samples hold ``arange(n)``) and ``num_targets``,
    a Python int: the shifted labelled positions ``(labels[:, 1:] != -100).sum()``, so the
    objective can gather those rows without a host sync, and ``vis_key_len``, a Python int:
    ``max(vis_pos) + 1`` (0 without visual tokens), the last key any visual row can see, which
    bounds the capture op's key loops (``visual_attention_probs(key_len=...)``).
    """
    if not samples:
        raise ValueError("collate: empty sample list")
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
