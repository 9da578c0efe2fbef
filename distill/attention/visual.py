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

_STRIP_BUDGET = 1 << 22  # fp32 elements of one score strip when chunk_size is automatic (~16 MiB)


def _gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], pos [B, n] -> [B, H, n, D]."""
    b, h, _, d = x.shape
    idx = pos[:, None, :, None].expand(b, h, pos.shape[1], d)
    return x.gather(2, idx)


def _visual_block(q, k, lse, vis_pos, scale):
    """Recompute the visual block. Returns (P [B,Hk,G,n,n] fp32, qv [B,Hk,G,n,D] fp32, kv [B,Hk,n,D] fp32)."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    n = vis_pos.shape[1]
    qv = _gather_rows(q, vis_pos).float().view(b, hk, g, n, d)  # (B, Hk, G, n, D)
    kv = _gather_rows(k, vis_pos).float()  # (B, Hk, n, D)
    s = torch.matmul(qv, kv[:, :, None].transpose(-1, -2)) * scale  # (B, Hk, G, n, n)
    lse_v = lse.float().gather(2, vis_pos[:, None, :].expand(b, hq, n)).view(b, hk, g, n, 1)
    blocked = vis_pos[:, None, :] > vis_pos[:, :, None]  # (B, n_i, n_j) key after query
    p = torch.exp(s - lse_v).masked_fill(blocked[:, None, None], 0.0)
    return p, qv, kv


class _VisualAttentionProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lse, vis_pos, scale, chunk_size):
        p, _, _ = _visual_block(q, k, lse, vis_pos, scale)
        ctx.save_for_backward(q, k, lse, vis_pos)
        ctx.scale = scale
        ctx.chunk_size = chunk_size
        b, hq, n = q.shape[0], q.shape[1], vis_pos.shape[1]
        return p.reshape(b, hq, n, n)

    @staticmethod
    def backward(ctx, grad_p):
        q, k, lse, vis_pos = ctx.saved_tensors
        scale = ctx.scale
        b, hq, t, d = q.shape
        hk = k.shape[1]
        g = hq // hk
        n = vis_pos.shape[1]
        dq = torch.zeros(b, hq, t, d, dtype=torch.float32, device=q.device)
        dk = torch.zeros(b, hk, t, d, dtype=torch.float32, device=k.device)
        if n == 0 or grad_p is None:
            return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None

        p, qv, kv = _visual_block(q, k, lse, vis_pos, scale)  # (B,Hk,G,n,n), (B,Hk,G,n,D), (B,Hk,n,D)
        pg = p * grad_p.float().view(b, hk, g, n, n)
        dvec = pg.sum(-1)  # D_i: (B, Hk, G, n)

        # Visual-block part: the P*G term of dS (the -P*D part is covered by the strips below).
        dq_v = torch.matmul(pg, kv[:, :, None]) * scale  # (B, Hk, G, n, D)
        dk_v = torch.einsum("bhgij,bhgid->bhjd", pg, qv) * scale  # (B, Hk, n, D)

        # Strip part: -P_ij D_i over every visible key j, chunked over visual query rows.
        chunk = ctx.chunk_size
        if chunk is None:
            chunk = max(1, _STRIP_BUDGET // max(1, b * hq * t))
        chunk = max(1, min(int(chunk), n))
        row_limit = vis_pos.amax(0).tolist()  # one host sync per backward: causal key limit per row
        lse_v = lse.float().gather(2, vis_pos[:, None, :].expand(b, hq, n)).view(b, hk, g, n)
        kf = k.float()
        key_pos = torch.arange(t, device=q.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            c = r1 - r0
            klen = int(max(row_limit[r0:r1])) + 1
            qc = qv[:, :, :, r0:r1]  # (B, Hk, G, c, D)
            kc = kf[:, :, :klen]  # (B, Hk, L, D)
            sc = torch.matmul(qc.reshape(b, hk, g * c, d), kc.transpose(-1, -2)) * scale  # (B, Hk, G*c, L)
            sc = sc.view(b, hk, g, c, klen) - lse_v[:, :, :, r0:r1, None]
            blocked = key_pos[:klen][None, None, :] > vis_pos[:, r0:r1, None]  # (B, c, L)
            pc = torch.exp(sc).masked_fill(blocked[:, None, None], 0.0)  # (B, Hk, G, c, L)
            del sc
            dc = dvec[:, :, :, r0:r1, None]  # (B, Hk, G, c, 1)
            # dq_i -= scale * D_i * sum_j P_ij k_j   (an attention product with V = K)
            dq_v[:, :, :, r0:r1] -= torch.matmul(pc, kc[:, :, None]) * (dc * scale)
            # dk_j += scale * sum_i P_ij X_i with X_i = -D_i q_i   (a dV-style product)
            x = (-dc * qc).reshape(b, hk, g * c, d)
            dk[:, :, :klen] += torch.matmul(pc.reshape(b, hk, g * c, klen).transpose(-1, -2), x) * scale
            del pc

        dq.scatter_add_(2, vis_pos[:, None, :, None].expand(b, hq, n, d), dq_v.reshape(b, hq, n, d))
        dk.scatter_add_(2, vis_pos[:, None, :, None].expand(b, hk, n, d), dk_v)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None


def visual_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    vis_pos: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
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
            ``None`` picks one for a ~16 MiB strip.

    Returns:
        [B, Hq, n, n] fp32 probabilities ``P[b,h,i,j]`` (rows: visual queries, cols: visual keys),
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
    return _VisualAttentionProbs.apply(q, k, lse.detach(), vis_pos.to(q.device), float(scale), chunk_size)
