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
  ``flash_attn``     flash-attn 3 (``flash_attn_interface``), 4 (``flash_attn.cute``) or 2
                     (``flash_attn``), CUDA, fp16/bf16; see :func:`flash_attn_variants`
  ``sdpa_flash``     ``torch.ops.aten._scaled_dot_product_flash_attention``, CUDA, fp16/bf16
  ``sdpa_efficient`` ``torch.ops.aten._scaled_dot_product_efficient_attention``, CUDA
  ``cpu_flash``      ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``
  ``eager``          plain softmax reference (forms T x T; tests only)
  ``auto``           flash_attn (when a variant supports the call) > sdpa_flash > sdpa_efficient
                     on CUDA, cpu_flash on CPU

flash-attn is detected by capability, not by import: a variant counts only if the function we call
exists with the arguments we pass (an installed FA4 leaves a namespace package ``flash_attn``
with nothing callable at its top, which is *not* FA2), and ``auto`` picks it only for a call it
supports (fp16/bf16 on CUDA, the device's compute capability, the head dim).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = ("flash_attn", "sdpa_flash", "sdpa_efficient", "cpu_flash", "eager")

__all__ = ["BACKENDS", "attention_with_lse", "check_backend", "expand_kv", "flash_attn_variants", "resolve_backend"]


@dataclass(frozen=True)
class FlashVariant:
    """One usable flash-attn installation: where its function lives and what it supports."""

    version: int  # 2, 3 or 4
    module: str  # import path of the module holding ``flash_attn_func``
    fn: object  # the callable
    archs: tuple[int, ...]  # compute capability majors it runs on
    max_head_dim: dict  # arch major -> largest head dim

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
        """None when this variant can run the call, else why not (for messages)."""
        if device.type != "cuda":
            return f"needs CUDA tensors, got {device}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16, got {dtype}"
        major = torch.cuda.get_device_capability(device)[0]
        if major not in self.archs:
            return f"does not run on compute capability {major}.x (supports {sorted(self.archs)})"
        limit = self.max_head_dim.get(major, 0)
        if head_dim is not None and (head_dim > limit or head_dim % 8):
            return f"head dim {head_dim} unsupported on {major}.x (multiple of 8, at most {limit})"
        return None


# (version, module, capability majors, head-dim limit per major, argument the call needs)
_FLASH_CANDIDATES = (
    (3, "flash_attn_interface", (9,), {9: 256}, "softmax_scale"),
    (4, "flash_attn.cute", (9, 10, 11), {9: 256, 10: 128, 11: 128}, "return_lse"),
    (2, "flash_attn", (8, 9), {8: 256, 9: 256}, "return_attn_probs"),
)


def _accepts(fn, arg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trust the name
        return True
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@lru_cache(maxsize=None)
def flash_attn_variants() -> tuple[FlashVariant, ...]:
    """The flash-attn variants whose ``flash_attn_func`` is importable and takes what we pass, in
    order of preference (FA3, FA4, FA2). Import failures of any kind mean "not available"."""
    found = []
    for version, name, archs, hdim, needed in _FLASH_CANDIDATES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001
            continue
        fn = getattr(mod, "flash_attn_func", None)
        if callable(fn) and _accepts(fn, needed):
            found.append(FlashVariant(version, name, fn, archs, hdim))
    return tuple(found)


@lru_cache(maxsize=None)
def _flash_variant(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> tuple[FlashVariant | None, str]:
    """The preferred variant that supports this call, or (None, why none does)."""
    variants = flash_attn_variants()
    if not variants:
        return None, ("no usable flash-attn: none of flash_attn_interface.flash_attn_func (FA3), "
                      "flash_attn.cute.flash_attn_func with return_lse (FA4) or flash_attn.flash_attn_func (FA2) "
                      "imports; install one (pip install flash-attn-4, or build flash-attn 2/3) or use "
                      "loss.backend=sdpa_flash")
    why = []
    for v in variants:
        reason = v.supports(device, dtype, head_dim)
        if reason is None:
            return v, ""
        why.append(f"FA{v.version} ({v.module}) {reason}")
    return None, "; ".join(why) + "; use loss.backend=sdpa_flash or auto"


def check_backend(backend: str) -> None:
    """Raise ValueError unless ``backend`` is ``auto`` or one of :data:`BACKENDS`."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {('auto',) + BACKENDS}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """Pick a concrete backend name for tensors on ``device`` with ``dtype`` (and ``head_dim``,
    when known: flash-attn's limits depend on it)."""
    check_backend(backend)
    if backend != "auto":
        if backend == "cpu_flash" and device.type != "cpu":
            raise ValueError(f"backend 'cpu_flash' needs CPU tensors, got device {device}")
        if backend in ("flash_attn", "sdpa_flash", "sdpa_efficient") and device.type != "cuda":
            raise ValueError(f"backend {backend!r} needs CUDA tensors, got device {device}; use 'cpu_flash' or 'auto'")
        if backend == "flash_attn":
            variant, why = _flash_variant(device, dtype, head_dim)
            if variant is None:
                raise ValueError(f"backend 'flash_attn' cannot run this call: {why}")
        return backend
    if device.type == "cuda":
        if _flash_variant(device, dtype, head_dim)[0] is not None:
            return "flash_attn"
        if dtype in (torch.float16, torch.bfloat16):
            return "sdpa_flash"
        return "sdpa_efficient"
    if device.type == "cpu":
        return "cpu_flash"
    return "eager"


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hk, T, D] -> [B, Hk*groups, T, D] (each KV head repeated for its query group)."""
    if groups == 1:
        return x
    b, hk, t, d = x.shape
    return x[:, :, None].expand(b, hk, groups, t, d).reshape(b, hk * groups, t, d)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q [B,Hq,T,D], k/v [B,Hk,T,D] with Hk dividing Hq."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B,H,T,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")


def _query_heads(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v expanded to q's heads, for the backends without native GQA (all but flash_attn)."""
    groups = q.shape[1] // k.shape[1]
    return expand_kv(k, groups), expand_kv(v, groups)


def _eager(q, k, v, scale, causal):
    k, v = _query_heads(q, k, v)
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
    k, v = _query_heads(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse  # lse (B, H, T), non-contiguous: caller makes it contiguous


def _sdpa_flash(q, k, v, scale, causal):
    k, v = _query_heads(q, k, v)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0].transpose(1, 2), res[1]


def _sdpa_efficient(q, k, v, scale, causal):
    k, v = _query_heads(q, k, v)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    t = q.shape[2]
    return res[0].transpose(1, 2), res[1][..., :t]  # LSE is padded to a multiple of 32


def _flash_attn(q, k, v, scale, causal):
    variant, why = _flash_variant(q.device, q.dtype, q.shape[-1])
    if variant is None:
        raise ValueError(f"backend 'flash_attn' cannot run this call: {why}")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn wants (B, T, H, D); GQA is native
    if variant.version == 4:
        # FA4: (out, lse) with lse [B, H, T] fp32 in natural log, like FA2
        res = variant.fn(qt, kt, vt, softmax_scale=scale, causal=causal, return_lse=True)
    elif variant.version == 3:
        res = variant.fn(qt, kt, vt, softmax_scale=scale, causal=causal, return_attn_probs=True)
    else:
        res = variant.fn(qt, kt, vt, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True)
    if not isinstance(res, (tuple, list)) or len(res) < 2 or res[1] is None:
        raise RuntimeError(f"flash-attn {variant.version} ({variant.module}) returned no softmax LSE; "
                           "use loss.backend=sdpa_flash")
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
    name = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    out, lse = _IMPLS[name](q, k, v, float(scale), causal)
    return out, _normalise_lse(lse)
