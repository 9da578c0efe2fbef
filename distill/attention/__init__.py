"""Attention capture on fused kernels: kernel seam, exact visual-block op, model capture."""

from distill.attention.kernels import BACKENDS, attention_with_lse, resolve_backend
from distill.attention.visual import visual_attention_probs

__all__ = ["BACKENDS", "attention_with_lse", "resolve_backend", "visual_attention_probs"]
