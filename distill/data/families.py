"""Per-family batch layouts for VLMs whose processor expands each image to a size-dependent number
of tokens (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL).

The family is recognised from the processor's class (``type(processor).__mro__`` names), so a real
checkpoint's processor and the tiny ones of :mod:`distill.models.tiny_families` take the same path.
A LLaVA processor (``LlavaProcessor``) is no family here: it keeps the fixed-count LLaVA path of
:func:`distill.data.collate.collate` unchanged.

:data:`MODEL_INPUTS` is the one list of the extra model-input keys per family (the same as
``batch_keys`` in the tiny folders' ``distill_family.json``; a test checks that). Every family batch
carries it as ``batch["model_inputs"]`` (a list of key names): the model forward is called with
``input_ids``, ``attention_mask`` and ``batch[k]`` for each ``k`` in ``batch["model_inputs"]`` whose
value is not None. :data:`LAYOUT` says how each key is collated:

- ``"cat"``: per image, concatenated over the batch's images in batch order along dim 0
  (Qwen ``pixel_values [sum patches, C*T*p*p]``, ``image_grid_thw [N_img, 3]``, InternVL
  ``pixel_values [sum tiles, 3, H, W]``, OneVision ``image_sizes [N_img, 2]`` and
  ``batch_num_images [N_img]`` (ones: one image per sample, so AnyRes tiling applies));
- ``"tiles"``: per image ``[tiles, 3, H, W]``, zero tiles pad to the batch's max: ``[N_img, max_tiles,
  3, H, W]`` (OneVision ``pixel_values``; the model reads only each image's first tiles);
- ``"seq"``: per sample ``[L]``, right-padded with 0 like ``input_ids`` (Qwen ``mm_token_type_ids``,
  1 at image tokens; without it Qwen silently falls back to 1-D positions).

All of these are None in a batch without any image, except ``"seq"`` keys (zeros ``[B, T]``).
"""

from __future__ import annotations

from typing import Any

import torch

_QWEN = ("pixel_values", "image_grid_thw", "mm_token_type_ids")

MODEL_INPUTS: dict[str, tuple[str, ...]] = {
    "qwen2_5_vl": _QWEN,
    "qwen2_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "llava_onevision": ("pixel_values", "image_sizes", "batch_num_images"),
    "internvl": ("pixel_values",),
}
"""family -> the model-forward keys of a batch besides ``input_ids`` / ``attention_mask``."""

PROCESSOR_FAMILY = {
    "Qwen2_5_VLProcessor": "qwen2_5_vl",
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen3VLProcessor": "qwen3_vl",
    "LlavaOnevisionProcessor": "llava_onevision",
    "InternVLProcessor": "internvl",
}

LAYOUT: dict[str, dict[str, str]] = {
    "qwen2_5_vl": {"pixel_values": "cat", "image_grid_thw": "cat", "mm_token_type_ids": "seq"},
    "qwen2_vl": {"pixel_values": "cat", "image_grid_thw": "cat", "mm_token_type_ids": "seq"},
    "qwen3_vl": {"pixel_values": "cat", "image_grid_thw": "cat", "mm_token_type_ids": "seq"},
    "llava_onevision": {"pixel_values": "tiles", "image_sizes": "cat", "batch_num_images": "cat"},
    "internvl": {"pixel_values": "cat"},
}

# Tokens that close an image block (truncation keeps them with the image): Qwen's vision end; InternVL's
# </img> is inside the processor's expansion anyway.
END_MARKERS = ("<|vision_end|>", "</img>")


def family_of(processor: Any) -> str | None:
    """The family name of a processor (by class name along its MRO), or None (LLaVA / unknown)."""
    for cls in type(processor).__mro__:
        fam = PROCESSOR_FAMILY.get(cls.__name__)
        if fam is not None:
            return fam
    return None


def image_text(family: str, processor: Any) -> str:
    """What the family's chat template writes for one image item (the processor expands it)."""
    if family.startswith("qwen"):
        start = getattr(processor, "vision_start_token", None) or "<|vision_start|>"
        end = getattr(processor, "vision_end_token", None) or "<|vision_end|>"
        return start + processor.image_token + end
    return processor.image_token


def end_marker_ids(processor: Any) -> set[int]:
    tok = processor.tokenizer
    names = set(END_MARKERS)
    for holder in (processor, tok):
        for attr in ("vision_end_token", "end_image_token"):
            v = getattr(holder, attr, None)
            if isinstance(v, str):
                names.add(v)
    vocab = tok.get_vocab()
    return {vocab[n] for n in names if n in vocab}


def split_per_image(family: str, key: str, value: torch.Tensor) -> torch.Tensor:
    """A one-image processor output for ``key`` in its per-image collation form (see :data:`LAYOUT`)."""
    kind = LAYOUT[family][key]
    if kind == "tiles":
        return value[0]  # [1, tiles, 3, H, W] -> [tiles, 3, H, W]
    if kind == "seq":
        return value[0]
    return value  # "cat": already [n, ...] for the one image


def collate_key(family: str, key: str, parts: list[torch.Tensor]) -> torch.Tensor | None:
    """Per-image parts (batch order) of one ``"cat"``/``"tiles"`` key -> the batch tensor (None if none)."""
    if not parts:
        return None
    kind = LAYOUT[family][key]
    if kind == "tiles":
        most = max(p.shape[0] for p in parts)
        out = parts[0].new_zeros((len(parts), most, *parts[0].shape[1:]))
        for i, p in enumerate(parts):
            out[i, : p.shape[0]] = p
        return out
    return torch.cat(parts, dim=0)
