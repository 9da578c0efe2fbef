"""Attention capture on fused kernels: kernel seam, exact visual-block op, model capture."""

from distill.attention.kernels import BACKENDS, attention_with_lse, resolve_backend
from distill.attention.visual import IMPLS as VISUAL_IMPLS, resolve_impl, visual_attention_probs
from distill.attention.capture import AttentionCapture, Recording, install, right_padded, text_decoder_layers

__all__ = [
    "BACKENDS",
    "AttentionCapture",
    "Recording",
    "attention_with_lse",
    "install",
    "resolve_backend",
    "right_padded",
    "VISUAL_IMPLS",
    "resolve_impl",
    "text_decoder_layers",
    "visual_attention_probs",
]
