"""Exact visual-block attention probabilities from fused-kernel outputs (q, k, lse).

For visual query rows i and visual key columns j (positions ``vis_pos``)::

    P[i, j] = exp(scale * q_i . k_j - lse_i)      (0 where pos_j > pos_i: causal)

``lse`` is the kernel's log-sum-exp over *every* visible key (text tokens too), so P is exactly
the slice of the full softmax.  The backward treats ``lse`` as the function of q, k that it is and
adds the normaliser's gradient analytically.  With G the upstream gradient of P and
``D_i = sum_{j in V} G_ij P_ij``::

    dS_ij = P_ij (G_ij - D_i)   for visual keys j
    dS_ij = -P_ij D_i           for every other visible key j
    dq_i  = scale * sum_j dS_ij k_j        dk_j = scale * sum_i dS_ij q_i

Two implementations (``impl=``):

``"torch"``: loop-free batched matmuls over all samples and heads at once (GQA by folding each
KV head's query group into the matmul rows).  The forward forms the ``[B, Hq, n, n]`` block; the
backward forms one ``n x T`` strip per sample and head (keys are *all* T positions: the last
visible key is data-dependent and reading it would sync the host; a caller that knows it from the
collate step passes ``key_len`` and the strips stop there), splits dS into its visual part
``P G`` (``[n, n]``, scattered into dk rows) and the strip part ``-P D``, and needs no scatter into
the strip.  Causality and padding are comparisons against ``vis_pos`` on the device.  Rows are
chunked only when a strip (backward) or block (head-averaged forward) would exceed
``MEMORY_BUDGET_BYTES`` of fp32, or when ``chunk_size`` is given; the chunk count comes from
shapes, so there are no host syncs either way.  Operands: fp32 (exact) everywhere except CUDA
fp16/bf16 inputs, whose matmuls run on the input dtype with fp32 output (``torch.bmm(...,
out_dtype=torch.float32)``, tensor cores with fp32 accumulation); there the backward's dS and
P*G are rounded to the input dtype before their matmuls, as flash-attention's backward does.
For backward the forward saves the gathered visual rows of q and k (``B*Hq*n*D`` and ``B*Hk*n*D``
in the compute dtype), k and the visual rows of lse; q itself is not kept.

``"triton"``: the kernels of :mod:`distill.attention.triton_visual` (CUDA, or CPU under
``TRITON_INTERPRET=1``).  ``"auto"``: triton for CUDA tensors when triton imports, else torch.

Padding: ``vis_pos`` may end in ``-1`` entries (samples with fewer visual tokens); their rows and
columns of P are zero and they receive no gradient.  Rows whose ``lse`` is ``+inf`` (rows that see
no key) give zeros.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["IMPLS", "MEMORY_BUDGET_BYTES", "key_len_of", "resolve_impl", "triton_available", "visual_attention_probs"]

IMPLS = ("auto", "triton", "torch")

# fp32 bytes of one backward strip [B, Hq, rows, T] (or head-averaged forward block [B, Hq, rows, n])
# above which the torch path splits visual rows into chunks.  At the real layer shape (16 heads,
# T = 2048, n = 729, batch 1) the strip is 91 MiB: one chunk.
MEMORY_BUDGET_BYTES = 256 << 20


# ----------------------------------------------------------------------------- implementation choice


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    """``None`` when the triton kernels import, else the reason (cached: triton reads
    ``TRITON_INTERPRET`` when the kernels are defined, i.e. on this first import)."""
    try:
        importlib.import_module("distill.attention.triton_visual")
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(e).__name__}: {e}"
    return None


def triton_available() -> bool:
    """Whether :mod:`distill.attention.triton_visual` (and so triton) imports."""
    return _triton_import_error() is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Concrete implementation (``"triton"`` or ``"torch"``) for tensors on ``device``.

    ``"auto"``: ``"triton"`` on CUDA when triton imports, else ``"torch"``.  ``"triton"`` needs CUDA,
    or any device with ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests).  Raises
    ``ValueError`` for unknown names and for ``"triton"`` where it cannot run, so a config value
    can be validated up front.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown visual attention impl {impl!r}; choose one of {IMPLS}")
    device = torch.device(device)
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"visual attention impl 'triton' needs CUDA tensors (got device {device}); "
                "set TRITON_INTERPRET=1 before import to run it on CPU, or use impl='torch' / 'auto'"
            )
        err = _triton_import_error()
        if err is not None:
            raise ValueError(f"visual attention impl 'triton' requested but the triton kernels do not import ({err})")
        return "triton"
    return "triton" if device.type == "cuda" and triton_available() else "torch"


# ----------------------------------------------------------------------------- torch path helpers


def _half_matmul_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether matmuls can run on ``dtype`` operands with fp32 output on ``device``."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (str(device), dtype)
    if key not in _HALF_OK:
        try:
            a = torch.zeros(1, 2, 2, dtype=dtype, device=device)
            _HALF_OK[key] = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _HALF_OK[key] = False
    return _HALF_OK[key]


_HALF_OK: dict = {}


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` with fp32 output; ``a`` is cast to ``b``'s dtype (half operands: fp32 accumulation)."""
    if b.dtype == torch.float32:
        return torch.bmm(a.float(), b)
    return torch.bmm(a.to(b.dtype), b, out_dtype=torch.float32)


def _scores(qc, kt, lse_c, scale):
    """``exp(scale * qc @ kt - lse_c)`` fp32; qc [N, M, D], kt [N, D, L], lse_c [N, M, 1]."""
    if kt.dtype == torch.float32:
        return torch.baddbmm(lse_c, qc, kt, beta=-1.0, alpha=scale).exp_()
    return _bmm(qc, kt).mul_(scale).sub_(lse_c).exp_()


def _rows_per_chunk(n: int, per_row_bytes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n))
    return max(1, min(n, MEMORY_BUDGET_BYTES // max(1, per_row_bytes)))


def _prepare(q, k, lse, vis_pos):
    """Gathered visual rows and the masks every pass needs (all on device, no host reads)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    n = vis_pos.shape[1]
    cdt = q.dtype if _half_matmul_ok(q.device, q.dtype) else torch.float32
    pad = vis_pos < 0  # (B, n)
    idx = vis_pos.clamp(min=0)  # gather index; padded entries read position 0 and are masked
    col_pos = vis_pos.masked_fill(pad, t)  # padded keys sit "after every query"
    qv = q.gather(2, idx[:, None, :, None].expand(b, hq, n, d)).to(cdt)  # (B, Hq, n, D)
    kv = k.gather(2, idx[:, None, :, None].expand(b, hk, n, d)).to(cdt)  # (B, Hk, n, D)
    lse_v = lse.gather(2, idx[:, None, :].expand(b, hq, n))  # (B, Hq, n) fp32
    return qv, kv, lse_v, idx, pad, col_pos, cdt


def _block(qv, kv, lse_v, vis_pos, col_pos, scale, r0, r1):
    """Visual block rows r0:r1 -> [B, Hq, c, n] fp32 with causal / padding zeros."""
    b, hq, n, d = qv.shape
    hk = kv.shape[1]
    g = hq // hk
    c = r1 - r0
    qc = qv[:, :, r0:r1].reshape(b * hk, g * c, d)  # a view when r0:r1 is every row
    lc = lse_v[:, :, r0:r1].reshape(b * hk, g * c, 1)
    p = _scores(qc, kv.reshape(b * hk, n, d).transpose(1, 2), lc, scale).view(b, hq, c, n)
    blocked = col_pos[:, None, :] > vis_pos[:, r0:r1, None]  # (B, c, n): key after query, or padding
    return p.masked_fill_(blocked[:, None], 0.0)


class _TorchVisual(torch.autograd.Function):
    """Loop-free torch path; ``head_mean`` selects ``[B, n, n]`` (mean over heads) output."""

    @staticmethod
    def forward(ctx, q, k, lse, vis_pos, scale, chunk_size, head_mean, key_len):
        b, hq, t, d = q.shape
        n = vis_pos.shape[1]
        qv, kv, lse_v, idx, pad, col_pos, cdt = _prepare(q, k, lse, vis_pos)
        ctx.save_for_backward(qv, kv, k, lse_v, idx, pad, vis_pos)
        ctx.meta = (scale, chunk_size, head_mean, key_len, q.shape, q.dtype, cdt)
        if not head_mean:
            return _block(qv, kv, lse_v, vis_pos, col_pos, scale, 0, n)
        rows = _rows_per_chunk(n, b * hq * n * 4, None)  # chunk_size is a backward knob
        if rows >= n:
            return _block(qv, kv, lse_v, vis_pos, col_pos, scale, 0, n).mean(1)
        out = torch.empty(b, n, n, dtype=torch.float32, device=q.device)
        for r0 in range(0, n, rows):  # only above the memory budget: [B, Hq, rows, n] at a time
            r1 = min(n, r0 + rows)
            out[:, r0:r1] = _block(qv, kv, lse_v, vis_pos, col_pos, scale, r0, r1).mean(1)
        return out

    @staticmethod
    def backward(ctx, grad):
        qv, kv, k, lse_v, idx, pad, vis_pos = ctx.saved_tensors  # read once (checkpoint recompute)
        scale, chunk_size, head_mean, key_len, q_shape, q_dtype, cdt = ctx.meta
        b, hq, t, d = q_shape
        hk = k.shape[1]
        g = hq // hk
        n = vis_pos.shape[1]
        if n == 0 or grad is None:
            return (torch.zeros(q_shape, dtype=q_dtype, device=k.device), torch.zeros_like(k)) + (None,) * 6
        # G on padded columns is ignored (P there is zero; the strip gather below reads a real column)
        if head_mean:
            gm = grad.float().masked_fill(pad[:, None, :], 0.0)[:, None]  # (B, 1, n, n); 1/Hq folded in s
            s = scale / hq
        else:
            gm = grad.float().masked_fill(pad[:, None, None, :], 0.0)  # (B, Hq, n, n)
            s = scale
        tl = key_len  # keys >= tl are invisible to every visual row (caller's bound; default T)
        # (B*Hk, tl, D): one contiguous copy for HF's transposed layout, none for contiguous fp32
        kf = k[:, :, :tl].to(cdt).contiguous().view(b * hk, tl, d)
        kvf = kv.reshape(b * hk, n, d)
        key_pos = torch.arange(tl, device=k.device)
        dk = torch.zeros(b * hk, t, d, dtype=torch.float32, device=k.device)
        rows = _rows_per_chunk(n, b * hq * tl * 4, chunk_size)
        dq_v = None if rows >= n else torch.empty(b, hk, g, n, d, dtype=torch.float32, device=k.device)
        for r0 in range(0, n, rows):  # one pass unless a strip would exceed the memory budget
            r1 = min(n, r0 + rows)
            c = r1 - r0
            qc = qv[:, :, r0:r1].reshape(b * hk, g * c, d)
            lc = lse_v[:, :, r0:r1].reshape(b * hk, g * c, 1)
            strip = _scores(qc, kf.transpose(1, 2), lc, scale).view(b, hk, g * c, tl)  # P over every key
            blocked = key_pos > vis_pos[:, r0:r1, None]  # (B, c, tl); padded rows (-1) see nothing
            strip.view(b, hq, c, tl).masked_fill_(blocked[:, None], 0.0)
            pv = strip.gather(3, idx[:, None, None, :].expand(b, hk, g * c, n))  # P on visual keys
            pg = pv.view(b, hq, c, n).mul_(gm[:, :, r0:r1]).view(b * hk, g * c, n)  # P G (G/Hq: in s)
            dvec = pg.sum(-1, keepdim=True)  # D_i
            pd = strip.view(b * hk, g * c, tl).mul_(dvec)  # P D on every key (= -dS off the visual keys)
            # dq_i = s (sum_{j in V} P G k_j - sum_j P D k_j)
            dq_c = _bmm(pd, kf)
            if cdt == torch.float32:
                dq_c.baddbmm_(pg, kvf, beta=-s, alpha=s)
            else:
                dq_c.sub_(_bmm(pg, kvf)).mul_(-s)
            if dq_v is None:
                dq_v = dq_c  # the single pass: (B*Hk, G*n, D)
            else:
                dq_v[:, :, :, r0:r1] = dq_c.view(b, hk, g, c, d)
            # dk_j = s (sum_i (P G)_ij q_i  [visual keys: scattered below]  -  sum_i (P D)_ij q_i)
            dk_vis = _bmm(pg.transpose(1, 2), qc)  # (B*Hk, n, D), rows = visual keys
            if cdt == torch.float32:
                dk[:, :tl].baddbmm_(pd.transpose(1, 2), qc, alpha=-1.0)
            else:
                dk[:, :tl].sub_(_bmm(pd.transpose(1, 2), qc))
            # padded columns add exact zeros (their G was zeroed) to position 0: deterministic
            dk.view(b, hk, t, d).scatter_add_(2, idx[:, None, :, None].expand(b, hk, n, d), dk_vis.view(b, hk, n, d))
            del strip, pv, pg, pd, dq_c, dk_vis
        dk.mul_(s)
        dq = torch.zeros(b, hq, t, d, dtype=torch.float32, device=k.device)
        # padded rows have dq = 0 (their strip rows are zero) and add it to position 0: deterministic
        dq.scatter_add_(2, idx[:, None, :, None].expand(b, hq, n, d), dq_v.view(b, hq, n, d))
        return (dq.to(q_dtype), dk.view(b, hk, t, d).to(k.dtype)) + (None,) * 6


def key_len_of(vis_pos: torch.Tensor) -> int | None:
    """``max(vis_pos) + 1`` of a host (CPU) ``vis_pos``, for ``visual_attention_probs(key_len=)``.

    Meant for the collate step / the start of a step, where ``vis_pos`` still lives on the CPU and
    reading it costs no device sync.  Returns ``None`` (no bound) for an empty ``vis_pos`` and
    raises for device tensors, whose read would be exactly the host sync the op avoids.
    """
    if vis_pos.device.type != "cpu":
        raise ValueError(f"key_len_of reads vis_pos on the host; got a {vis_pos.device} tensor (would sync)")
    if vis_pos.numel() == 0:
        return None
    return max(1, int(vis_pos.max()) + 1)


# ----------------------------------------------------------------------------- public op


def visual_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    vis_pos: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
    head_mean: bool = False,
    impl: str = "auto",
    key_len: int | None = None,
) -> torch.Tensor:
    """Visual-block attention probabilities with exact gradients in q and k.

    Args:
        q: [B, Hq, T, D] queries (any float dtype; accumulation is fp32).
        k: [B, Hk, T, D] keys, Hk dividing Hq (GQA: query head h uses key head h // (Hq/Hk)).
        lse: [B, Hq, T] fp32 log-sum-exp of ``scale * q.k`` over every key visible to each row
            (natural log, +inf for rows seeing no key).  It receives no gradient: it is treated as
            a function of q and k and the normaliser's gradient is included analytically.
        vis_pos: [B, n] long, increasing positions of the visual tokens of each sample; samples
            with fewer visual tokens pad the tail with -1.
        scale: softmax scale used by the kernel that produced ``lse``.
        chunk_size: torch path only: visual query rows per backward strip (memory ~
            B*Hq*chunk*T fp32).  ``None``: one strip unless it would exceed
            ``MEMORY_BUDGET_BYTES``.  Ignored by the triton path (its memory is O(tile)).
        head_mean: return the mean over query heads, [B, n, n] (the capture path uses this; same
            values and gradients as ``.mean(1)``).
        impl: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`resolve_impl`).
        key_len: optional Python int >= max(vis_pos) + 1 over the batch (known at collate time,
            e.g. the end of the last image span).  Torch path: backward strips stop at this key
            (keys after it are invisible to every visual row), which saves the strip's tail when
            images sit early in long sequences.  ``None``: strips span all T keys (the op never
            reads ``vis_pos`` on the host).  A value that is too small gives wrong gradients.
            The triton path bounds its key loops on the device and ignores it.

    Returns:
        [B, Hq, n, n] (or [B, n, n] with ``head_mean``) fp32 probabilities ``P[b,h,i,j]`` (rows:
        visual queries, cols: visual keys), zero above the causal diagonal and on padding rows /
        columns.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B,H,T,D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} incompatible with q {tuple(q.shape)} (need [B,Hk,T,D], Hk | Hq)")
    if lse.shape != (b, hq, t):
        raise ValueError(f"lse must be [B,Hq,T] = {(b, hq, t)}, got {tuple(lse.shape)}")
    if vis_pos.dim() != 2 or vis_pos.shape[0] != b or vis_pos.dtype != torch.long:
        raise ValueError(f"vis_pos must be a [B,n] long tensor with B={b}; got {tuple(vis_pos.shape)} {vis_pos.dtype}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if key_len is not None and not 1 <= int(key_len) <= t:
        raise ValueError(f"key_len must be in [1, T={t}], got {key_len}")
    name = resolve_impl(impl, q.device)
    if vis_pos.device != q.device:
        vis_pos = vis_pos.to(q.device, non_blocking=True)
    lse = lse.detach().float()
    if name == "triton":
        from distill.attention import triton_visual

        return triton_visual.visual_attention_probs_triton(q, k, lse, vis_pos, float(scale), head_mean=head_mean)
    key_len = t if key_len is None else int(key_len)
    return _TorchVisual.apply(q, k, lse, vis_pos, float(scale), chunk_size, bool(head_mean), key_len)
