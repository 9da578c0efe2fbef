"""One seam over fused attention kernels that also return the per-row log-sum-exp.

Every backend takes HF layout tensors and returns the same thing::

    q [B, Hq, T, D], k/v [B, Hk, T, D]  (Hk divides Hq)
    -> out [B, T, Hq, D]  (the layout HF attention functions return)
       lse [B, Hq, T] fp32, natural log, softmax scale included:
           lse[b, h, i] = log sum_{j visible from i} exp(scale * q_i . k_j)

Convention for rows that see no key at all (only possible with an explicit mask):
``lse = +inf`` so that ``exp(s - lse) = 0`` downstream (FA2 already uses +inf, FA3 uses -inf and
is normalised here).  Causal attention uses the top-left alignment (query i sees keys j <= i),
which is what training without a KV cache needs.  With right padding, valid rows never see pad
keys, so a dense causal kernel is exact for them; pad rows are garbage-but-finite and every
loss masks them out.

All paths are differentiable in q, k, v through their own autograd formulas (``out`` only; the
returned ``lse`` is detached: :func:`distill.attention.visual_attention_probs` treats it as a
function of q, k and adds that gradient analytically).

Backends (``backend=`` string):
  ``flash_attn``     flash-attn 3 (``flash_attn_interface``) or 2 (``flash_attn``), CUDA, fp16/bf16
  ``sdpa_flash``     ``torch.ops.aten._scaled_dot_product_flash_attention``, CUDA, fp16/bf16
  ``sdpa_efficient`` ``torch.ops.aten._scaled_dot_product_efficient_attention``, CUDA
  ``cpu_flash``      ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``
  ``eager``          plain softmax reference (forms T x T; tests only)
  ``auto``           flash_attn > sdpa_flash > sdpa_efficient on CUDA, cpu_flash on CPU
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache

import torch

BACKENDS = ("flash_attn", "sdpa_flash", "sdpa_efficient", "cpu_flash", "eager")

__all__ = ["BACKENDS", "attention_with_lse", "resolve_backend", "varlen_attention_with_lse"]


@lru_cache(maxsize=None)
def _flash_attn_module():
    """Return ``(module, major_version)`` of an importable flash-attn, or ``(None, 0)``."""
    for name, version in (("flash_attn_interface", 3), ("flash_attn", 2)):
        try:
            return importlib.import_module(name), version
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            continue
    return None, 0


def _check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {('auto',) + BACKENDS}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick a concrete backend name for tensors on ``device`` with ``dtype``."""
    _check_backend(backend)
    if backend != "auto":
        if backend == "cpu_flash" and device.type != "cpu":
            raise ValueError(f"backend 'cpu_flash' needs CPU tensors, got device {device}")
        if backend in ("flash_attn", "sdpa_flash", "sdpa_efficient") and device.type != "cuda":
            raise ValueError(f"backend {backend!r} needs CUDA tensors, got device {device}; use 'cpu_flash' or 'auto'")
        if backend == "flash_attn" and _flash_attn_module()[0] is None:
            raise ValueError("backend 'flash_attn' requested but neither flash_attn_interface nor flash_attn imports")
        return backend
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        if half and _flash_attn_module()[0] is not None:
            return "flash_attn"
        if half:
            return "sdpa_flash"
        return "sdpa_efficient"
    if device.type == "cpu":
        return "cpu_flash"
    return "eager"


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hk, T, D] -> [B, Hk*groups, T, D] (each KV head repeated for its query group)."""
    if groups == 1:
        return x
    b, hk, t, d = x.shape
    return x[:, :, None].expand(b, hk, groups, t, d).reshape(b, hk * groups, t, d)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B,H,T,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    return q.shape[1] // k.shape[1]


def _eager(q, k, v, scale, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        tq, tk = s.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq)
    p = torch.exp(s - lse[..., None])
    out = torch.matmul(p, v.float()).to(q.dtype)  # (B, H, T, D)
    return out.transpose(1, 2), lse


def _cpu_flash(q, k, v, scale, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse  # lse (B, H, T), non-contiguous: caller makes it contiguous


def _sdpa_flash(q, k, v, scale, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0].transpose(1, 2), res[1]


def _sdpa_efficient(q, k, v, scale, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    t = q.shape[2]
    return res[0].transpose(1, 2), res[1][..., :t]  # LSE is padded to a multiple of 32


def _flash_attn(q, k, v, scale, causal):
    mod, version = _flash_attn_module()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn wants (B, T, H, D); GQA is native
    if version == 3:
        res = mod.flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=causal, return_attn_probs=True)
    else:
        res = mod.flash_attn_func(qt, kt, vt, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True)
    if not isinstance(res, (tuple, list)) or len(res) < 2:
        raise RuntimeError("this flash-attn version does not return the softmax LSE; use backend='sdpa_flash'")
    return res[0], res[1]


_IMPLS = {
    "eager": _eager,
    "cpu_flash": _cpu_flash,
    "sdpa_flash": _sdpa_flash,
    "sdpa_efficient": _sdpa_efficient,
    "flash_attn": _flash_attn,
}


def _normalise_lse(lse: torch.Tensor) -> torch.Tensor:
    """fp32, contiguous, detached; fully-masked rows (-inf in FA3, NaN anywhere) become +inf."""
    lse = lse.detach().float().contiguous()
    return torch.where(torch.isneginf(lse) | torch.isnan(lse), torch.full_like(lse, float("inf")), lse)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning the output and the per-row log-sum-exp.

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hk, T, D] with Hk dividing Hq.
        scale: softmax scale (default ``1/sqrt(D)``).
        causal: top-left causal mask (query i sees keys j <= i).
        backend: see module docstring.

    Returns:
        out [B, T, Hq, D] in q's dtype, lse [B, Hq, T] fp32 (detached, +inf for rows seeing no key).
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = resolve_backend(backend, q.device, q.dtype)
    out, lse = _IMPLS[name](q, k, v, float(scale), causal)
    return out, _normalise_lse(lse)


def varlen_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (varlen) attention with LSE via flash-attn (CUDA only).

    Args:
        q: [total, Hq, D]; k, v: [total, Hk, D]; cu_seqlens: [S+1] int32 cumulative lengths.

    Returns:
        out [total, Hq, D], lse [Hq, total] fp32 (flash-attn's varlen layout, +inf for empty rows).
    """
    mod, version = _flash_attn_module()
    if mod is None or q.device.type != "cuda":
        raise ValueError("packed (varlen) attention needs flash-attn on CUDA; pad the batch instead")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    cu = cu_seqlens.to(torch.int32)
    kwargs = dict(softmax_scale=scale, causal=causal, return_attn_probs=True)
    if version == 2:
        kwargs["dropout_p"] = 0.0
    res = mod.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)
    return res[0], _normalise_lse(res[1])
