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

The "every visible key" part is done on n x T strips of query rows, chunked so that at most
``chunk_size`` visual rows (per batch element and head) are materialised against the keys at a
time; keys past the last visual position of a chunk are skipped (causality).  Nothing of size
T x T is ever formed; forward keeps only n x n.  Accumulation is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["visual_attention_probs"]

# fp32 elements of one score strip when chunk_size is automatic: cache-sized on CPU (1 MiB),
# large on accelerators (16 MiB) where bigger batched matmuls are cheaper than more launches
_STRIP_BUDGET = {"cpu": 1 << 18}
_STRIP_BUDGET_DEFAULT = 1 << 22


def _gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], pos [B, n] -> [B, H, n, D]."""
    b, h, _, d = x.shape
    idx = pos[:, None, :, None].expand(b, h, pos.shape[1], d)
    return x.gather(2, idx)


def _visual_block(q, k, lse, vis_pos, scale):
    """Visual block P [B, Hq, n, n] fp32 (exp(scale q.k - lse), causal zeros)."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    n = vis_pos.shape[1]
    qv = _gather_rows(q, vis_pos).float().reshape(b * hk, g * n, d)  # (B*Hk, G*n, D)
    kv = _gather_rows(k, vis_pos).float().reshape(b * hk, n, d)  # (B*Hk, n, D)
    neg_lse = -lse.float().gather(2, vis_pos[:, None, :].expand(b, hq, n)).reshape(b * hk, g * n, 1)
    p = torch.baddbmm(neg_lse, qv, kv.transpose(1, 2), alpha=scale).exp_()  # (B*Hk, G*n, n)
    p = p.view(b, hq, n, n)
    blocked = vis_pos[:, None, :] > vis_pos[:, :, None]  # (B, n_i, n_j): key after query
    return p.masked_fill_(blocked[:, None], 0.0)


class _VisualAttentionProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lse, vis_pos, scale, chunk_size):
        ctx.save_for_backward(q, k, lse, vis_pos)  # P is recomputed in backward: no per-head maps kept
        ctx.scale = scale
        ctx.chunk_size = chunk_size
        return _visual_block(q, k, lse, vis_pos, scale)

    @staticmethod
    def backward(ctx, grad_p):
        q, k, lse, vis_pos = ctx.saved_tensors
        scale = ctx.scale
        b, hq, t, d = q.shape
        hk = k.shape[1]
        g = hq // hk
        n = vis_pos.shape[1]
        if n == 0 or grad_p is None:
            return (torch.zeros(b, hq, t, d, dtype=q.dtype, device=q.device),
                    torch.zeros(b, hk, t, d, dtype=k.dtype, device=k.device), None, None, None, None)

        chunk = ctx.chunk_size
        if chunk is None:
            budget = _STRIP_BUDGET.get(q.device.type, _STRIP_BUDGET_DEFAULT)
            chunk = max(1, budget // max(1, b * hq * t))
        chunk = max(1, min(int(chunk), n))
        # one host sync per path: each sample's first / last visual position ...
        starts, ends = torch.stack([vis_pos[:, 0], vis_pos[:, -1]]).tolist()
        if all(e - s0 == n - 1 for s0, e in zip(starts, ends)):  # increasing + span n-1: contiguous image
            return _backward_contiguous(q, k, lse, grad_p, starts, scale, chunk)
        # ... and, off the contiguous path, per visual row the largest / smallest position over the batch
        row_max, row_min = torch.stack([vis_pos.amax(0), vis_pos.amin(0)]).tolist()

        dq = torch.zeros(b, hq, t, d, dtype=torch.float32, device=q.device)
        dk = torch.zeros(b * hk, t, d, dtype=torch.float32, device=k.device)
        qv = _gather_rows(q, vis_pos).float().view(b, hk, g, n, d)  # (B, Hk, G, n, D)
        kv = _gather_rows(k, vis_pos).float().reshape(b * hk, n, d)  # (B*Hk, n, D)
        kf = k.float().reshape(b * hk, t, d)  # (B*Hk, T, D); no copy for fp32 input
        neg_lse = -lse.float().gather(2, vis_pos[:, None, :].expand(b, hq, n)).view(b, hk, g, n)

        # Visual-key part of dS: P * G (the -P * D part of visual keys is in the strips below).
        pg = _visual_block(q, k, lse, vis_pos, scale).mul_(grad_p.float()).view(b * hk, g * n, n)
        dvec = pg.sum(-1).view(b, hk, g, n, 1)  # D_i
        dq_v = torch.bmm(pg, kv).mul_(scale).view(b, hk, g, n, d)  # (B, Hk, G, n, D)
        dk_v = torch.bmm(pg.view(b * hk, g, n, n).permute(0, 3, 1, 2).reshape(b * hk, n, g * n),
                         qv.view(b * hk, g * n, d)).mul_(scale)  # (B*Hk, n, D)
        del pg

        # Strip part: -P_ij D_i over every visible key j, chunked over visual query rows.
        key_pos = torch.arange(t, device=q.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            c = r1 - r0
            klen = int(max(row_max[r0:r1])) + 1  # keys past the chunk's last visual row are masked anyway
            lo = int(min(row_min[r0:r1])) + 1  # keys before this are visible to every row of the chunk
            qc = qv[:, :, :, r0:r1].reshape(b * hk, g * c, d)
            kc = kf[:, :klen]  # (B*Hk, L, D)
            # -D_i * exp(scale q.k - lse): the strip of dS over every key
            pc = torch.baddbmm(neg_lse[:, :, :, r0:r1].reshape(b * hk, g * c, 1), qc, kc.transpose(1, 2), alpha=scale)
            pc = pc.exp_().view(b, hk, g, c, klen)
            if lo < klen:
                blocked = key_pos[lo:klen][None, None, :] > vis_pos[:, r0:r1, None]  # (B, c, L - lo)
                pc[..., lo:].masked_fill_(blocked[:, None, None], 0.0)
            ds = pc.mul_(dvec[:, :, :, r0:r1].neg()).view(b * hk, g * c, klen)
            # dq_i += scale * sum_j dS_ij k_j (attention with V = K); dk_j += scale * sum_i dS_ij q_i
            dq_v[:, :, :, r0:r1].add_(torch.bmm(ds, kc).view(b, hk, g, c, d), alpha=scale)
            dk[:, :klen].baddbmm_(ds.transpose(1, 2), qc, alpha=scale)
            del pc, ds

        dk.view(b, hk, t, d).scatter_add_(2, vis_pos[:, None, :, None].expand(b, hk, n, d), dk_v.view(b, hk, n, d))
        dq.scatter_(2, vis_pos[:, None, :, None].expand(b, hq, n, d), dq_v.view(b, hq, n, d))
        return dq.to(q.dtype), dk.view(b, hk, t, d).to(k.dtype), None, None, None, None


class _VisualAttentionMean(torch.autograd.Function):
    """Head-averaged visual block [B, n, n]; only one KV group's [B, G, n, n] exists at a time."""

    @staticmethod
    def forward(ctx, q, k, lse, vis_pos, scale, chunk_size):
        ctx.save_for_backward(q, k, lse, vis_pos)
        ctx.scale = scale
        ctx.chunk_size = chunk_size
        b, hq = q.shape[:2]
        ctx.batch_heads = (b, hq)  # backward must read ctx.saved_tensors only once (checkpointing)
        hk = k.shape[1]
        g = hq // hk
        n = vis_pos.shape[1]
        acc = torch.zeros(b, n, n, dtype=torch.float32, device=q.device)
        for h in range(hk):
            hs = slice(h * g, (h + 1) * g)
            acc += _visual_block(q[:, hs], k[:, h : h + 1], lse[:, hs], vis_pos, scale).sum(1)
        return acc.div_(hq)

    @staticmethod
    def backward(ctx, grad_mean):
        b, hq = ctx.batch_heads
        n = grad_mean.shape[-1]
        grad_p = (grad_mean.float() / hq)[:, None].expand(b, hq, n, n)  # d mean / d P_h = 1 / Hq
        return _VisualAttentionProbs.backward(ctx, grad_p)


def _backward_contiguous(q, k, lse, grad_p, starts, scale, chunk):
    """Backward when each sample's visual tokens are one contiguous run ``start_b + arange(n)``.

    The visual keys are then a slice of every strip, so dS = -P D on the strip plus P G on that
    slice comes out of one pass per chunk (no separate visual-block recompute or gathers).
    """
    b, hq, t, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    n = grad_p.shape[-1]
    dq = torch.zeros(b, hq, t, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, hk, t, d, dtype=torch.float32, device=k.device)
    grad_p = grad_p.float().reshape(b, hk, g, n, n)  # a view, also for head-broadcast gradients
    rows = torch.arange(n, device=q.device)
    for bi, s0 in enumerate(starts):
        qb = q[bi, :, s0 : s0 + n].float().reshape(hk, g, n, d)  # (Hk, G, n, D)
        kb = k[bi].float()  # (Hk, T, D)
        neg_lse = -lse[bi, :, s0 : s0 + n].float().reshape(hk, g, n)
        dq_b = dq[bi, :, s0 : s0 + n].view(hk, g, n, d)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            c = r1 - r0
            klen = s0 + r1  # the chunk's last row sits at position s0 + r1 - 1
            qc = qb[:, :, r0:r1].reshape(hk, g * c, d)
            kc = kb[:, :klen]
            pc = torch.baddbmm(neg_lse[:, :, r0:r1].reshape(hk, g * c, 1), qc, kc.transpose(1, 2), alpha=scale)
            pc = pc.exp_().view(hk, g, c, klen)
            # causal zeros: row r0+i sees visual keys 0..r0+i, i.e. columns < s0 + r0 + i + 1
            tail = pc[..., s0 + r0 + 1 :]  # (Hk, G, c, c - 1)
            tail.masked_fill_(rows[: c - 1][None, :] >= rows[:c, None], 0.0)
            pv = pc[..., s0 : s0 + r1]  # visual keys that can be visible to these rows
            pg = pv * grad_p[bi, :, :, r0:r1, :r1]  # P G
            dvec = pg.sum(-1, keepdim=True)  # D_i
            ds = pc.mul_(dvec.neg_())
            ds[..., s0 : s0 + r1] += pg  # dS = -P D everywhere, + P G on visual keys
            ds = ds.view(hk, g * c, klen)
            dq_b[:, :, r0:r1] = torch.bmm(ds, kc).view(hk, g, c, d).mul_(scale)
            dk[bi, :, :klen].baddbmm_(ds.transpose(1, 2), qc, alpha=scale)
            del pc, ds, pg
    return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None


def visual_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    vis_pos: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
    head_mean: bool = False,
) -> torch.Tensor:
    """Visual-block attention probabilities with exact gradients in q and k.

    Args:
        q: [B, Hq, T, D] queries (any float dtype; accumulation is fp32).
        k: [B, Hk, T, D] keys, Hk dividing Hq (GQA: query head h uses key head h // (Hq/Hk)).
        lse: [B, Hq, T] fp32 log-sum-exp of ``scale * q.k`` over every key visible to each row
            (natural log, +inf for rows seeing no key).  It receives no gradient: it is treated as
            a function of q and k and the normaliser's gradient is included analytically.
        vis_pos: [B, n] long, increasing positions of the visual tokens of each sample.
        scale: softmax scale used by the kernel that produced ``lse``.
        chunk_size: visual query rows per backward strip (memory ~ B*Hq*chunk*T fp32);
            ``None`` picks one for a ~1 MiB strip on CPU, ~16 MiB on accelerators.

        head_mean: return the mean over query heads, [B, n, n], without ever holding all heads'
            maps (the capture path uses this; same values and gradients as ``.mean(1)``).

    Returns:
        [B, Hq, n, n] (or [B, n, n] with ``head_mean``) fp32 probabilities ``P[b,h,i,j]`` (rows: visual queries, cols: visual keys),
        zero above the causal diagonal.
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
    fn = _VisualAttentionMean if head_mean else _VisualAttentionProbs
    return fn.apply(q, k, lse.detach(), vis_pos.to(q.device), float(scale), chunk_size)
