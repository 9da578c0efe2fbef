"""Triton kernels for the visual attention block (``impl="triton"`` of ``visual_attention_probs``).

Same math and contract as :mod:`distill.attention.visual`::

    P[b, h, i, j] = exp(scale * q[b, h, pos_i] . k[b, h // G, pos_j] - lse[b, h, pos_i])
                    (0 where pos_j > pos_i, or where row i / column j is -1 padding)

with ``pos = vis_pos[b]`` (increasing on its valid prefix, ``-1`` padding at the tail), G = Hq/Hk.

Kernels (all fp32 accumulation; fp16/bf16 operands go to the tensor cores as they are, fp32
operands use ``tl.dot(..., input_precision="ieee")`` so fp32 results are not TF32-rounded; in the
backward, dS is rounded to the operand dtype before its matmuls, as flash-attention does):

``_fwd_kernel``: one program per (visual row block, visual column block, batch element) for the
    head-averaged block (it loops over every query head inside and writes ``[B, n, n]`` once), or
    per (row block, column block, batch * head) for per-head output.  Tiles whose first column
    index is past the tile's last row index lie above the causal diagonal (vis_pos increases) and
    store zeros without any loads.

``_bwd_dq_kernel``: one program per (visual row block, query head, batch element).  First
    ``D_i = sum_{j in V} G_ij P_ij`` over the visual keys (written to a ``[B, Hq, n]`` buffer),
    then ``dq_i = scale * sum_t P_it (G~_it - D_i) k_t`` over every key t up to the block's last
    visual position, where ``G~_it`` is ``G[i, inv[t]]`` on visual keys and 0 elsewhere, read
    through the inverse position map ``inv [B, T]`` (column index or -1).

``_bwd_dk_kernel``: one program per (key block, KV head, batch element): loops over the group's
    query heads and over the visual row blocks that can see the key block (from a per-block first
    row computed on the device with ``searchsorted``), ``dk_t = scale * sum_i dS_it q_i``.

Every output element is written by exactly one program: the backward has no atomics and reruns
are bitwise identical.  No host syncs: loop bounds that depend on ``vis_pos`` are read inside the
kernels; the host only uses shapes.

Assumes what the contract says: each sample's valid ``vis_pos`` entries increase (the causal tile
skip and the dk kernel's first-row search rely on it).  Status: verified on CPU under the
interpreter (tests/test_visual_triton.py); compiled-GPU correctness and speed are measured by
launch/gpu_check.py and were still pending when this was written.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``tl.dot`` on bf16 is not computed correctly by the
interpreter, so bf16 inputs are upcast to fp32 there (and only there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["visual_attention_probs_triton"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _fwd_kernel(
    Q, K, LSE, POS, OUT,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    slb, slh, slt,
    spb, spn,
    sob, soh, soi, soj,
    n, HQ, G, scale, out_scale,
    HEAD_MEAN: tl.constexpr, D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    if HEAD_MEAN:
        b = pid_z
        h_lo = 0
        h_hi = HQ
        h_out = 0
    else:
        b = pid_z // HQ
        h_lo = pid_z % HQ
        h_hi = h_lo + 1
        h_out = h_lo
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rd = tl.arange(0, BD)
    out_ptrs = OUT + b * sob + h_out * soh + rm[:, None] * soi + rn[None, :] * soj
    out_mask = (rm < n)[:, None] & (rn < n)[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if pid_n * BN <= pid_m * BM + BM - 1:  # else the tile lies above the causal diagonal: zeros
        pos_m = tl.load(POS + b * spb + rm * spn, mask=rm < n, other=-1)
        pos_n = tl.load(POS + b * spb + rn * spn, mask=rn < n, other=-1)
        row_ok = pos_m >= 0
        col_ok = pos_n >= 0
        vis = (pos_n[None, :] <= pos_m[:, None]) & col_ok[None, :]
        pm = tl.maximum(pos_m, 0)
        pn = tl.maximum(pos_n, 0)
        d_ok = rd < D
        for h in range(h_lo, h_hi):
            kh = h // G
            qi = tl.load(Q + b * sqb + h * sqh + pm[:, None] * sqt + rd[None, :] * sqd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kj = tl.load(K + b * skb + kh * skh + pn[:, None] * skt + rd[None, :] * skd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + b * slb + h * slh + pm * slt, mask=row_ok, other=float("inf"))
            s = tl.dot(qi, tl.trans(kj), input_precision=PREC)
            p = tl.exp(s * scale - lse[:, None])
            acc += tl.where(vis, p, 0.0)
        acc = acc * out_scale
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, LSE, POS, INV, GRAD, DQ, DBUF,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    slb, slh, slt,
    spb, spn,
    sib, sit,
    sgb, sgh, sgi, sgj,
    sdb, sdh, sdt, sdd,
    n, T, HQ, G, scale, g_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kh = h // G
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    d_ok = rd < D
    m_ok = rm < n
    pos_m = tl.load(POS + b * spb + rm * spn, mask=m_ok, other=-1)
    row_ok = pos_m >= 0
    pm = tl.maximum(pos_m, 0)
    qi = tl.load(Q + b * sqb + h * sqh + pm[:, None] * sqt + rd[None, :] * sqd,
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + pm * slt, mask=row_ok, other=float("inf"))
    g_base = GRAD + b * sgb + h * sgh

    # D_i = sum over visual keys j of P_ij G~_ij (columns past the block's last row are causal zeros)
    dvec = tl.zeros((BM,), dtype=tl.float32)
    n_hi = tl.minimum(n, pid_m * BM + BM)
    for j0 in range(0, n_hi, BN):
        rn = j0 + tl.arange(0, BN)
        pos_n = tl.load(POS + b * spb + rn * spn, mask=rn < n, other=-1)
        col_ok = pos_n >= 0
        pn = tl.maximum(pos_n, 0)
        kj = tl.load(K + b * skb + kh * skh + pn[:, None] * skt + rd[None, :] * skd,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qi, tl.trans(kj), input_precision=PREC)
        vis = (pos_n[None, :] <= pos_m[:, None]) & col_ok[None, :]
        p = tl.where(vis, tl.exp(s * scale - lse[:, None]), 0.0)
        gt = tl.load(g_base + rm[:, None] * sgi + rn[None, :] * sgj,
                     mask=m_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        dvec += tl.sum(p * gt, axis=1)
    dvec = dvec * g_scale
    tl.store(DBUF + b * (HQ * n) + h * n + rm, dvec, mask=m_ok)

    # dq_i = scale * sum_t P_it (G~_it - D_i) k_t over every key t <= pos_i
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    t_hi = (tl.max(pos_m, axis=0) + 1).to(tl.int32)  # 0 when every row of the block is padding
    for t0 in range(0, t_hi, BN):
        rt = t0 + tl.arange(0, BN)
        t_ok = rt < T
        kt = tl.load(K + b * skb + kh * skh + rt[:, None] * skt + rd[None, :] * skd,
                     mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qi, tl.trans(kt), input_precision=PREC)
        vis = rt[None, :] <= pos_m[:, None]  # padded rows (-1) see nothing
        p = tl.where(vis, tl.exp(s * scale - lse[:, None]), 0.0)
        col = tl.load(INV + b * sib + rt * sit, mask=t_ok, other=-1)
        gt = tl.load(g_base + rm[:, None] * sgi + tl.maximum(col, 0)[None, :] * sgj,
                     mask=m_ok[:, None] & (col >= 0)[None, :], other=0.0).to(tl.float32)
        ds = p * (gt * g_scale - dvec[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + b * sdb + h * sdh + pm[:, None] * sdt + rd[None, :] * sdd, dq,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dk_kernel(
    Q, K, LSE, POS, INV, GRAD, DBUF, ROW0, NVALID, DK,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    slb, slh, slt,
    spb, spn,
    sib, sit,
    sgb, sgh, sgi, sgj,
    srb, srk,
    sdb, sdh, sdt, sdd,
    n, T, HQ, G, scale, g_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    kh = tl.program_id(1)
    b = tl.program_id(2)
    rt = pid_t * BN + tl.arange(0, BN)
    rd = tl.arange(0, BD)
    d_ok = rd < D
    t_ok = rt < T
    kt = tl.load(K + b * skb + kh * skh + rt[:, None] * skt + rd[None, :] * skd,
                 mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    col = tl.load(INV + b * sib + rt * sit, mask=t_ok, other=-1)  # visual column of key t, or -1
    col_ok = col >= 0
    colc = tl.maximum(col, 0)
    row0 = tl.load(ROW0 + b * srb + pid_t * srk)  # first visual row with pos >= this block's first key
    n_valid = tl.load(NVALID + b)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    for gg in range(0, G):
        h = kh * G + gg
        g_base = GRAD + b * sgb + h * sgh
        for i0 in range(row0, n_valid, BM):
            rm = i0 + tl.arange(0, BM)
            m_ok = rm < n_valid
            pos_m = tl.load(POS + b * spb + rm * spn, mask=m_ok, other=-1)
            pm = tl.maximum(pos_m, 0)
            row_ok = pos_m >= 0
            qi = tl.load(Q + b * sqb + h * sqh + pm[:, None] * sqt + rd[None, :] * sqd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + b * slb + h * slh + pm * slt, mask=row_ok, other=float("inf"))
            dvec = tl.load(DBUF + b * (HQ * n) + h * n + rm, mask=m_ok, other=0.0)
            s = tl.dot(kt, tl.trans(qi), input_precision=PREC)  # (BN keys, BM rows)
            vis = rt[:, None] <= pos_m[None, :]
            p = tl.where(vis, tl.exp(s * scale - lse[None, :]), 0.0)
            gt = tl.load(g_base + rm[None, :] * sgi + colc[:, None] * sgj,
                         mask=m_ok[None, :] & col_ok[:, None], other=0.0).to(tl.float32)
            ds = p * (gt * g_scale - dvec[None, :])
            dk += tl.dot(ds.to(qi.dtype), qi, input_precision=PREC)
    dk = dk * scale
    tl.store(DK + b * sdb + kh * sdh + rt[:, None] * sdt + rd[None, :] * sdd, dk,
             mask=t_ok[:, None] & d_ok[None, :])


def _blocks(d: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BM, BN, BD, num_warps).  The interpreter gets 16 x 16 tiles (cheap on CPU, and small test
    shapes still cover several tiles); GPUs get 64 x 64."""
    bd = max(16, triton.next_power_of_2(d))
    if interpret:
        return 16, 16, bd, 1
    return 64, 64, bd, 4 if bd <= 64 else 8


class _TritonVisual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lse, vis_pos, scale, head_mean, blocks):
        ctx.save_for_backward(q, k, lse, vis_pos)
        ctx.scale = scale
        ctx.head_mean = head_mean
        ctx.blocks = blocks
        b, hq, t, d = q.shape
        hk = k.shape[1]
        n = vis_pos.shape[1]
        if head_mean:
            out = torch.empty(b, n, n, dtype=torch.float32, device=q.device)
            so = (out.stride(0), 0, out.stride(1), out.stride(2))
            grid_z = b
        else:
            out = torch.empty(b, hq, n, n, dtype=torch.float32, device=q.device)
            so = out.stride()
            grid_z = b * hq
        if n == 0 or b == 0:
            return out
        bm, bn, bd, warps = blocks
        qc, kc = _operands(q, k)
        grid = (triton.cdiv(n, bm), triton.cdiv(n, bn), grid_z)
        _fwd_kernel[grid](
            qc, kc, lse, vis_pos, out,
            *qc.stride(), *kc.stride(), *lse.stride(), *vis_pos.stride(), *so,
            n, hq, hq // hk, scale, 1.0 / hq if head_mean else 1.0,
            HEAD_MEAN=head_mean, D=d, BM=bm, BN=bn, BD=bd, PREC=_precision(qc), num_warps=warps,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, lse, vis_pos = ctx.saved_tensors  # read once (checkpoint recompute)
        b, hq, t, d = q.shape
        hk = k.shape[1]
        n = vis_pos.shape[1]
        if grad is None or n == 0 or b == 0:
            return torch.zeros_like(q), torch.zeros_like(k), None, None, None, None, None
        bm, bn, bd, warps = ctx.blocks
        qc, kc = _operands(q, k)
        head_mean = ctx.head_mean
        if head_mean:
            sg = (grad.stride(0), 0, grad.stride(1), grad.stride(2))
            g_scale = 1.0 / hq
        else:
            sg = grad.stride()
            g_scale = 1.0
        dev = q.device
        pad = vis_pos < 0
        # inverse position map: inv[b, t] = visual column of position t, or -1 (padding -> column T, dropped)
        inv = torch.full((b, t + 1), -1, dtype=torch.int32, device=dev)
        inv.scatter_(1, vis_pos.masked_fill(pad, t), torch.arange(n, dtype=torch.int32, device=dev).expand(b, n))
        inv = inv[:, :t]
        # per key block: first visual row whose position is >= the block's first key (searchsorted
        # on the valid prefix; padding sorts last), and each sample's number of visual rows
        sorted_pos = vis_pos.masked_fill(pad, t).contiguous()
        starts = torch.arange(0, t, bn, device=dev).expand(b, -1).contiguous()
        row0 = torch.searchsorted(sorted_pos, starts).to(torch.int32)
        n_valid = (~pad).sum(1, dtype=torch.int32)
        dbuf = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
        dq = torch.zeros_like(qc)
        dk = torch.empty_like(kc)
        common = (*qc.stride(), *kc.stride(), *lse.stride(), *vis_pos.stride(), *inv.stride(), *sg)
        _bwd_dq_kernel[(triton.cdiv(n, bm), hq, b)](
            qc, kc, lse, vis_pos, inv, grad, dq, dbuf,
            *common, *dq.stride(),
            n, t, hq, hq // hk, ctx.scale, g_scale,
            D=d, BM=bm, BN=bn, BD=bd, PREC=_precision(qc), num_warps=warps,
        )
        _bwd_dk_kernel[(triton.cdiv(t, bn), hk, b)](
            qc, kc, lse, vis_pos, inv, grad, dbuf, row0, n_valid, dk,
            *common, *row0.stride(), *dk.stride(),
            n, t, hq, hq // hk, ctx.scale, g_scale,
            D=d, BM=bm, BN=bn, BD=bd, PREC=_precision(qc), num_warps=warps,
        )
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None, None


def _precision(x) -> str:
    """``tl.dot`` input precision: IEEE fp32 for fp32 operands (no TF32 rounding), the default
    (tensor-core MMA; the setting only concerns fp32) for fp16 / bf16."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _operands(q, k):
    """The tensors the kernels read: as given, except bf16 under the interpreter (upcast to fp32)."""
    if _interpreting() and q.dtype == torch.bfloat16:
        return q.float(), k.float()
    return q, k


def visual_attention_probs_triton(q, k, lse, vis_pos, scale, head_mean=False, blocks=None):
    """Triton implementation behind ``visual_attention_probs(..., impl="triton")``.

    Same arguments and result as :func:`distill.attention.visual.visual_attention_probs`
    (validation happens there); ``lse`` must be fp32.  ``blocks`` overrides the
    ``(BM, BN, BD, num_warps)`` tiling (tests).
    """
    if blocks is None:
        blocks = _blocks(q.shape[-1], _interpreting() or q.device.type != "cuda")
    if q.device.type == "cuda":  # launch on q's device (backward runs with the device autograd sets)
        with torch.cuda.device(q.device):
            return _TritonVisual.apply(q, k, lse, vis_pos.contiguous(), float(scale), bool(head_mean), tuple(blocks))
    return _TritonVisual.apply(q, k, lse, vis_pos.contiguous(), float(scale), bool(head_mean), tuple(blocks))
