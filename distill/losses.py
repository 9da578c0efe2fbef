"""Distillation losses: pure functions, fp32 inside, shapes in the docstrings.

- :func:`logit_kd_loss`          token-level logit distillation (forward KL, reverse KL, JSD)
- :func:`attention_alignment_loss`  visual-attention alignment (CompoDistill filtered cosine, cosine, KL)
- :func:`match_layers`           which student layer learns from which window of teacher layers
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["KD_KINDS", "ATTN_KINDS", "logit_kd_loss", "attention_alignment_loss", "match_layers"]

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
ATTN_KINDS = ("filtered_cosine", "cosine", "kl")


# ----------------------------------------------------------------------------- logit KD


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities [..., V] -> [...]; 0 * log 0 counts as 0."""
    p = logp.exp()
    term = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return term.sum(-1)


def _divergence(s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float, beta: float) -> torch.Tensor:
    """Per-position divergence: s, t [N, V] logits (any dtype) -> [N] fp32, times T^2."""
    logp_s = F.log_softmax(s.float() / temperature, dim=-1)
    logp_t = F.log_softmax(t.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = _kl(logp_t, logp_s)
    elif kind == "reverse_kl":
        d = _kl(logp_s, logp_t)
    else:  # generalised JSD: M = (1-beta) P_s + beta P_t;  (1-beta) KL(P_t||M) + beta KL(P_s||M)
        if beta == 0.0:
            d = _kl(logp_t, logp_s)
        elif beta == 1.0:
            d = _kl(logp_s, logp_t)
        else:
            logm = torch.logaddexp(logp_s + math.log(1.0 - beta), logp_t + math.log(beta))
            d = (1.0 - beta) * _kl(logp_t, logm) + beta * _kl(logp_s, logm)
    return d * (temperature**2)


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    beta: float = 0.5,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token-level logit distillation.

    Args:
        student_logits: [B, T, V_s].
        teacher_logits: [B, T, V_t] with V_t >= V_s.  Extra teacher columns are vocabulary padding
            rows (embedding tables rounded up) and are sliced off; V_t < V_s is an error.
        labels: [B, T], aligned with the logits as given (the caller shifts); position t counts
            iff ``labels[b, t] != ignore_index``.
        kind: ``forward_kl`` = KL(teacher || student), ``reverse_kl`` = KL(student || teacher),
            ``jsd`` = generalised Jensen-Shannon with mixture M = (1-beta) P_s + beta P_t and
            value (1-beta) KL(P_t||M) + beta KL(P_s||M): beta -> 0 gives forward KL,
            beta -> 1 reverse KL, beta = 0.5 the symmetric JSD.
        temperature: both distributions are softened by T and the divergence is multiplied by
            T^2 (Hinton et al.) so gradient magnitudes stay comparable across temperatures.
        beta: JSD interpolation in [0, 1].
        chunk_size: positions per chunk; each chunk's fp32 [chunk, V] intermediates are
            recomputed in backward (activation checkpointing), so peak memory is
            O(chunk * V) instead of O(B * T * V).  ``None``: one pass.
        reduction: ``mean`` over counted positions (0 when none counts) or ``sum``.

    Returns:
        scalar fp32 tensor.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(
            f"logits must be [B, T, V]; got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != teacher_logits.shape[:2] or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"batch/time mismatch: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if v_t < v_s:
        raise ValueError(
            f"teacher vocabulary ({v_t}) is smaller than the student's ({v_s}); only extra padding rows on the "
            "teacher side can be handled - the two models must share a tokenizer"
        )
    if v_t > v_s:
        teacher_logits = teacher_logits[..., :v_s]  # padding rows beyond the shared vocabulary

    s = student_logits.reshape(-1, v_s)
    t = teacher_logits.reshape(-1, v_s)
    keep = (labels.reshape(-1) != ignore_index).float()  # (N,)
    n = s.shape[0]
    if chunk_size is None or chunk_size >= n:
        total = (_divergence(s, t, kind, temperature, beta) * keep).sum()
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

        def piece(s_, t_, k_):
            return (_divergence(s_, t_, kind, temperature, beta) * k_).sum()

        total = s.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk_size):
            sl = slice(i, i + chunk_size)
            if torch.is_grad_enabled() and s.requires_grad:
                total = total + checkpoint(piece, s[sl], t[sl], keep[sl], use_reentrant=False)
            else:
                total = total + piece(s[sl], t[sl], keep[sl])
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- attention alignment


def _profiles(s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column profiles: mean over the query axis of kept entries. [L,B,n,n] -> [L,B,n] (0 if none kept)."""
    denom = keep.sum(-2).clamp(min=1).float()  # (L, B, n) kept entries per key column
    zero = s.new_zeros(())
    # torch.where keeps only the bool mask for backward (not a float copy of it)
    return torch.where(keep, s, zero).sum(-2) / denom, torch.where(keep, t, zero).sum(-2) / denom


def attention_alignment_loss(
    student_maps: torch.Tensor,
    teacher_maps: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    kind: str = "filtered_cosine",
    reduction: str = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Visual-attention alignment between layer-matched, head-averaged maps.

    Args:
        student_maps, teacher_maps: [L, B, n, n] visual attention (rows: visual queries,
            cols: visual keys; zeros above the causal diagonal).
        valid: [B] bool; samples without an image are dropped from the sum and the count.
        kind:
            ``filtered_cosine`` (CompoDistill, default): per (layer, sample) map, m = mean and
            s = unbiased std over all n*n entries (the causal zeros included); keep entry (i, j)
            iff student <= m_s + s_s and teacher <= m_t + s_t and teacher != 0; the profile of key
            column j is the mean of its kept entries over i (0 if none); loss term
            1 - cos(student profile, teacher profile).
            ``cosine``: the same profiles over every causal entry (i >= j), no filter.
            ``kl``: each query row renormalised over the visual keys, KL(teacher row || student
            row) averaged over rows that have mass.
        reduction: ``mean`` = sum over layers and valid samples / number of valid samples
            (0 if none); ``sum`` = the numerator only (the caller divides by a global count).

    Returns:
        scalar fp32 tensor.
    """
    if kind not in ATTN_KINDS:
        raise ValueError(f"attention loss kind must be one of {ATTN_KINDS}, got {kind!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if student_maps.dim() != 4 or student_maps.shape != teacher_maps.shape or student_maps.shape[-1] != student_maps.shape[-2]:
        raise ValueError(
            f"maps must both be [L, B, n, n]; got student {tuple(student_maps.shape)}, "
            f"teacher {tuple(teacher_maps.shape)}"
        )
    num_l, b, n, _ = student_maps.shape
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=student_maps.device)
    if valid.shape != (b,):
        raise ValueError(f"valid must be [B]={b} bool, got shape {tuple(valid.shape)}")
    w = valid.to(device=student_maps.device, dtype=torch.float32)
    if n == 0 or num_l == 0:
        return student_maps.float().sum() * 0.0

    s = student_maps.float()
    t = teacher_maps.float()
    if kind == "kl":
        ps = s / s.sum(-1, keepdim=True).clamp(min=eps)
        pt = t / t.sum(-1, keepdim=True).clamp(min=eps)
        rows = (pt * (torch.log(pt.clamp(min=eps)) - torch.log(ps.clamp(min=eps)))).sum(-1)  # (L, B, n)
        has = (t.sum(-1) > 0).float()
        per = (rows * has).sum(-1) / has.sum(-1).clamp(min=1.0)  # (L, B)
    else:
        if kind == "filtered_cosine":
            flat_s, flat_t = s.flatten(2), t.flatten(2)
            thr_s = (flat_s.mean(-1) + flat_s.std(-1, unbiased=True))[..., None, None]
            thr_t = (flat_t.mean(-1) + flat_t.std(-1, unbiased=True))[..., None, None]
            keep = (s <= thr_s) & (t <= thr_t) & (t != 0)  # a bool mask: no gradient through it
        else:
            keep = torch.ones(n, n, dtype=torch.bool, device=s.device).tril().expand_as(s)
        prof_s, prof_t = _profiles(s, t, keep)
        per = 1.0 - F.cosine_similarity(prof_s, prof_t, dim=-1, eps=eps)  # (L, B)
    total = (per * w).sum()
    if reduction == "sum":
        return total
    return total / w.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- layer matching


def _check_layers(name: str, layers, depth: int) -> list[int]:
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{name}: layer indices must be ints, got {i!r}")
        if not 0 <= i < depth:
            raise ValueError(f"{name}: layer {i} out of range for a model with {depth} layers (valid 0..{depth - 1})")
        out.append(i)
    return out


def match_layers(
    student_depth: int,
    teacher_depth: int,
    student_layers: list[int] | None = None,
    teacher_layers: list[int] | list[list[int]] | None = None,
    num_layers: int | None = None,
    window: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Pick the student layers to align and the teacher layer window each one learns from.

    Defaults (derived from depths, no per-model tables):
      * student layers: ``num_layers`` (default ``max(1, student_depth // 4)``) consecutive layers
        starting at ``student_depth // 3`` (shifted down if they would run past the end);
      * teacher window of student layer s: ``window`` (default
        ``max(1, round(teacher_depth / student_depth))``) consecutive teacher layers centred on the
        proportional depth ``(s + 0.5) * teacher_depth / student_depth - 0.5``, clamped into range.
    The teacher target is the mean of the window's maps.

    Args:
        student_layers: explicit student layers (overrides ``num_layers``).
        teacher_layers: explicit teacher targets, one per student layer: an int (a window of one)
            or a list of ints (overrides ``window``).

    Returns:
        ``(student_layers, teacher_windows)`` with ``len(teacher_windows) == len(student_layers)``.
    """
    for name, v in (("student_depth", student_depth), ("teacher_depth", teacher_depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if student_layers is not None:
        s_layers = _check_layers("student_layers", list(student_layers), student_depth)
        if not s_layers or len(set(s_layers)) != len(s_layers):
            raise ValueError(f"student_layers must be non-empty and distinct, got {student_layers}")
    else:
        num = max(1, student_depth // 4) if num_layers is None else num_layers
        if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= student_depth:
            raise ValueError(f"num_layers must be an int in [1, {student_depth}], got {num_layers!r}")
        start = min(student_depth // 3, student_depth - num)
        s_layers = list(range(start, start + num))

    if teacher_layers is not None:
        teacher_layers = list(teacher_layers)
        if len(teacher_layers) != len(s_layers):
            raise ValueError(
                f"teacher_layers has {len(teacher_layers)} entries but there are {len(s_layers)} student layers "
                f"{s_layers}; give one teacher layer (or window list) per student layer"
            )
        windows = []
        for entry in teacher_layers:
            win = [entry] if isinstance(entry, int) and not isinstance(entry, bool) else list(entry)
            if not win:
                raise ValueError("teacher_layers: empty window")
            windows.append(_check_layers("teacher_layers", win, teacher_depth))
    else:
        w = max(1, round(teacher_depth / student_depth)) if window is None else window
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= teacher_depth:
            raise ValueError(f"window must be an int in [1, {teacher_depth}], got {window!r}")
        windows = []
        for s in s_layers:
            centre = (s + 0.5) * teacher_depth / student_depth - 0.5
            start = int(math.floor(centre - (w - 1) / 2 + 0.5))
            start = min(max(start, 0), teacher_depth - w)
            windows.append(list(range(start, start + w)))
    return s_layers, windows
