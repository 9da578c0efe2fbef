"""Host-side helpers on collated batches: target counts, device transfer, the placeholder image row.

A collated batch (:func:`distill.data.collate.collate`) holds ``input_ids/attention_mask/labels
[B,T]``, ``pixel_values [N,3,H,W]`` or None, ``has_image [B]``, ``vis_pos [B,n]`` and the host ints
``num_targets`` and ``vis_key_len``. A family batch (:func:`distill.data.collate.collate_family`)
also holds ``model_inputs`` (names of the extra model-forward keys) and those keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distill.attention.visual import key_len_of

from . import families as fam
from .collate import MODEL_INPUTS_KEY
from .encode import FAMILY_PROBE_SIZE, IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "PlaceholderImage", "add_placeholder_image", "count_targets", "to_device"]


def count_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid shifted label positions, samples with an image) of one micro-batch, as tensors."""
    labels = batch["labels"]
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    images = batch["has_image"].sum() if batch.get("has_image") is not None else torch.zeros((), dtype=torch.long)
    return tokens, images


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Every tensor of ``batch`` on ``device`` (non-blocking), floating ones cast to ``dtype``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


@dataclass
class PlaceholderImage:
    """One image-only row (``input_ids [1,n]``, ``pixel_values [1,3,H,W]``) made by the processor.

    For a family processor (``distill.data.families``) the row is the family's image text (Qwen:
    vision start + image pad + vision end) expanded by the processor for a tiny image
    (``FAMILY_PROBE_SIZE``), ``pixel_values`` and ``extras`` in their per-image collation form and
    ``family`` set."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_token_id: int
    pad_token_id: int
    family: str | None = None
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_processor(cls, processor, image_token_id: int) -> "PlaceholderImage":
        from PIL import Image

        pad = processor.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        family = fam.family_of(processor)
        if family is not None:
            w, h = FAMILY_PROBE_SIZE
            enc = processor(images=[Image.new("RGB", (w, h))], text=[fam.image_text(family, processor)],
                            add_special_tokens=False, return_tensors="pt")
            extras = {k: fam.split_per_image(family, k, enc[k]) for k in fam.MODEL_INPUTS[family] if k != "pixel_values"}
            return cls(enc["input_ids"][:1], fam.split_per_image(family, "pixel_values", enc["pixel_values"]),
                       image_token_id, pad, family, extras)
        size = getattr(processor.image_processor, "size", None) or {}
        get = size.get if hasattr(size, "get") else (lambda k: getattr(size, k, None))
        h = get("height") or get("shortest_edge") or 224
        w = get("width") or get("shortest_edge") or h
        token = getattr(processor, "image_token", None) or processor.tokenizer.convert_ids_to_tokens(image_token_id)
        enc = processor(images=[Image.new("RGB", (int(w), int(h)))], text=[token], return_tensors="pt")
        return cls(enc["input_ids"][:1], enc["pixel_values"][:1], image_token_id, pad)


def add_placeholder_image(batch: dict, ph: PlaceholderImage) -> dict:
    """Give an image-less micro-batch one extra image-only row.

    ZeRO-3 gathers parameters collectively, so every rank must run the same modules in the same
    order: a rank whose micro-batch has no image would skip the vision tower and projector while
    another rank runs them (a hang or a collective mismatch). The extra row has labels -100 and
    ``has_image`` False, so no loss term changes (its targets are empty and the attention term
    drops it); it only makes the vision path run forward and backward on this rank too.

    Shapes: ``input_ids/attention_mask/labels [B,T] -> [B+1,max(T,n)]``, ``pixel_values
    [1,3,H,W]``, ``has_image [B+1]``, ``vis_pos [B+1,n]``, ``vis_key_len`` for the new positions.
    Called on the host batch (before ``to_device``).

    Family batches (``batch["model_inputs"]``, ``distill.data.families``): the row is the family's own
    image-only row (``PlaceholderImage.from_processor``); its ``pixel_values`` and per-image keys
    become the batch's (one image), per-token keys (``mm_token_type_ids``) are padded and appended
    like ``input_ids``, ``vis_pos [B+1, n]`` is -1 on the old rows and the row's image positions on
    the new one. A placeholder of another family than the batch's raises ``ValueError``.
    """
    if batch.get("pixel_values") is not None:
        return batch
    names = batch.get(MODEL_INPUTS_KEY)
    want = list(fam.MODEL_INPUTS[ph.family]) if ph.family else None
    if (None if names is None else list(names)) != want:
        raise ValueError(
            f"add_placeholder_image: the batch's model inputs {names!r} do not match the placeholder row's "
            f"({want!r}, {ph.family or 'llava'} processor); build PlaceholderImage.from_processor with the batch's processor"
        )
    if ph.family is not None:
        return _add_family_placeholder(batch, ph, ph.family)
    out, row = _append_text_row(batch, ph)
    ids, b = batch["input_ids"], batch["input_ids"].shape[0]
    out["pixel_values"] = ph.pixel_values.to(ids.device)
    has = batch.get("has_image")
    has = torch.zeros(b, dtype=torch.bool, device=ids.device) if has is None else has.to(torch.bool)
    out["has_image"] = torch.cat([has, torch.zeros(1, dtype=torch.bool, device=ids.device)])
    pos = (row[0] == ph.image_token_id).nonzero().flatten()  # (n,) increasing; host batch: no device sync
    out["vis_pos"] = pos.unsqueeze(0).expand(b + 1, -1).contiguous()
    out["vis_key_len"] = key_len_of(pos) or 0
    return out


def _append_text_row(batch: dict, ph: PlaceholderImage) -> tuple[dict, torch.Tensor]:
    """A copy of ``batch`` with the placeholder's text row appended (input_ids, attention_mask, no
    labels; every row right-padded to the longer length) and that row [1, T_row]."""
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    row = ph.input_ids.to(ids.device)
    length = max(ids.shape[1], row.shape[1])

    def pad_to(x, value):
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    out = dict(batch)
    out["input_ids"] = torch.cat([pad_to(ids, ph.pad_token_id), pad_to(row, ph.pad_token_id)])
    out["attention_mask"] = torch.cat([pad_to(am, 0), pad_to(torch.ones_like(row), 0).to(am.dtype)])
    out["labels"] = torch.cat([pad_to(labels, IGNORE_INDEX),
                               torch.full((1, length), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)])
    return out, row


def _add_family_placeholder(batch: dict, ph: PlaceholderImage, family: str) -> dict:
    out, row = _append_text_row(batch, ph)
    ids, b = batch["input_ids"], batch["input_ids"].shape[0]
    length = out["input_ids"].shape[1]

    def pad_to(x, value):
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    layout = fam.LAYOUT[family]
    for name in batch[MODEL_INPUTS_KEY]:
        if layout[name] == "seq":
            mine = ph.extras[name].to(ids.device).reshape(1, -1)
            out[name] = torch.cat([pad_to(batch[name], 0), pad_to(mine, 0)])
        else:
            part = ph.pixel_values if name == "pixel_values" else ph.extras[name]
            out[name] = fam.collate_key(family, name, [part.to(ids.device)])
    has = batch.get("has_image")
    has = torch.zeros(b, dtype=torch.bool, device=ids.device) if has is None else has.to(torch.bool)
    out["has_image"] = torch.cat([has, torch.zeros(1, dtype=torch.bool, device=ids.device)])
    pos = (row[0] == ph.image_token_id).nonzero().flatten()  # host batch: no device sync
    vis_pos = torch.full((b + 1, pos.numel()), -1, dtype=torch.long, device=ids.device)
    vis_pos[b] = pos
    out["vis_pos"] = vis_pos
    out["vis_key_len"] = key_len_of(pos) or 0
    return out
