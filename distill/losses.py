"""Distillation losses: pure functions, fp32 inside, shapes in the docstrings.

- :func:`logit_kd_loss`          token-level logit distillation (forward KL, reverse KL, JSD)
- :func:`fused_lm_kd_loss`       LM cross-entropy + logit KD from hidden states, chunked (no [N, V] logits)
- :func:`attention_alignment_loss`  visual-attention alignment (CompoDistill filtered cosine, cosine, KL)
- :func:`match_layers`           which student layer learns from which window of teacher layers
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["KD_KINDS", "ATTN_KINDS", "logit_kd_loss", "fused_lm_kd_loss", "attention_alignment_loss", "match_layers"]

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


def _check_kd_args(kind: str, temperature: float, beta: float) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


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
    _check_kd_args(kind, temperature, beta)
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


# ----------------------------------------------------------------------------- fused LM + KD over hidden states


def _linear_params(head, name: str):
    """(weight [V, H], bias [V] or None) of an lm_head (``nn.Linear``-like: ``.weight``, ``.bias``)."""
    w = getattr(head, "weight", None)
    shape = getattr(w, "ds_shape", None) or getattr(w, "shape", ())  # ZeRO-3: the unpartitioned shape
    if not isinstance(w, torch.Tensor) or len(shape) != 2:
        raise TypeError(f"{name}: expected an nn.Linear-like lm_head with a 2-D .weight, got {type(head).__name__}")
    b = getattr(head, "bias", None)
    return w, (b if isinstance(b, torch.Tensor) else None)


def _gathered(params):
    """ZeRO-3: gather the partitioned parameters among ``params`` for the block (one all-gather
    each, the same on every rank); a no-op for plain parameters."""
    ds = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not ds:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(ds, modifier_rank=None)


def _release_after_grad(p):
    """Post-accumulate-grad hook (after DeepSpeed's reduce-scatter hook): re-partition a ZeRO-3
    parameter that :func:`_gather_for_grad` gathered."""
    if getattr(p, "_fused_loss_gathered", False):
        p._fused_loss_gathered = False
        p.partition()


def _gather_for_grad(p):
    """ZeRO-3: a full-shape gradient can only be accumulated into a gathered parameter (autograd
    clones it to the parameter's layout), so gather it for its AccumulateGrad (one all-gather,
    the same on every rank) and re-partition right after DeepSpeed has reduced the gradient."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return
    if not getattr(p, "_fused_loss_hook", False):
        p.register_post_accumulate_grad_hook(_release_after_grad)  # runs after DeepSpeed's own
        p._fused_loss_hook = True
    p.all_gather()
    p._fused_loss_gathered = True


def _row_dot_(a: torch.Tensor, tmp: torch.Tensor, zero_where: torch.Tensor | None) -> torch.Tensor:
    """sum_v a*tmp per row, 0 where ``zero_where`` (0 * log 0 = 0); overwrites ``tmp``. [c, V] -> [c]."""
    tmp.mul_(a)
    if zero_where is not None:
        tmp.masked_fill_(zero_where, 0.0)
    return tmp.sum(-1)


def _chunk_terms(s, t, tgt, kind, temperature, beta, lm_w, kd_w, ignore_index):
    """One chunk: s [c, V] and t [c, V] (or None) logits -> (lm [c], kd [c], dloss/ds [c, V]) in fp32.

    Closed-form gradients of ``lm_w * CE(s, tgt) + kd_w * T^2 * D(s/T, t/T)`` with respect to the
    student logits (rows with ``tgt == ignore_index`` get 0 everywhere); ``D`` is the divergence of
    :func:`_divergence` with the same conventions (0 * log 0 = 0). ``s`` and ``t`` are temporaries
    of the caller and are overwritten (about 6 fp32 [c, V] buffers live at the peak).
    """
    s = s.float()
    temp = float(temperature)
    keep = tgt != ignore_index
    keep_f = keep.float()[:, None]
    tgt0 = tgt.clamp(min=0)[:, None]
    lse = torch.logsumexp(s, -1, keepdim=True)  # (c, 1)
    lm = (lse[:, 0] - s.gather(1, tgt0)[:, 0]) * keep_f[:, 0]
    if t is None:
        grad = s.sub_(lse).exp_()  # softmax(s)
        logp_s = None
    elif temp == 1.0:
        logp_s = s.sub_(lse)  # in place: s is not needed any more
        grad = logp_s.exp()  # softmax(s) = p_s
    else:
        logp_s = s / temp
        logp_s -= torch.logsumexp(logp_s, -1, keepdim=True)
        grad = s.sub_(lse).exp_()  # softmax(s), in place
    del s
    # d CE / ds = softmax(s) - onehot(tgt)
    if lm_w != 1.0:
        grad.mul_(lm_w)
    grad.scatter_add_(1, tgt0, torch.full(tgt0.shape, -lm_w, dtype=grad.dtype, device=grad.device))
    kd = torch.zeros_like(lm)
    if t is not None:
        logp_t = t.float()
        del t
        if temp != 1.0:
            logp_t = logp_t.div_(temp)
        logp_t = logp_t.sub_(torch.logsumexp(logp_t, -1, keepdim=True))  # in place: the teacher's temporary
        p_t = logp_t.exp()
        if kind == "jsd" and beta == 0.0:
            kind = "forward_kl"
        elif kind == "jsd" and beta == 1.0:
            kind = "reverse_kl"
        if kind == "forward_kl":  # KL(P_t || P_s); d/dz = p_s - p_t
            d = _row_dot_(p_t, logp_t - logp_s, p_t == 0)
            del logp_t
            dz = logp_s.exp_().sub_(p_t)
        elif kind == "reverse_kl":  # KL(P_s || P_t); d/dz = p_s * (logp_s - logp_t - KL)
            del p_t
            p_s = logp_s.exp()
            zero_s = p_s == 0
            diff = logp_s.sub_(logp_t)
            del logp_t
            d = _row_dot_(p_s, diff.clone(), zero_s)
            dz = diff.sub_(d[:, None]).mul_(p_s).masked_fill_(zero_s, 0.0)
        else:  # (1-b) KL(P_t||M) + b KL(P_s||M), M = (1-b) P_s + b P_t
            b = float(beta)
            p_s = logp_s.exp()
            zero_s = p_s == 0
            logm = torch.logaddexp(logp_s + math.log(1.0 - b), logp_t + math.log(b))
            d = (1.0 - b) * _row_dot_(p_t, logp_t - logm, p_t == 0) + b * _row_dot_(p_s, logp_s - logm, zero_s)
            del logp_t
            # df/dp_s = b (log p_s - log m) + b - (1-b) ((1-b) p_t + b p_s) / m ; dz = p_s (u - <p_s, u>)
            u = logp_s.sub_(logm).mul_(b)
            u.sub_(p_t.mul_(1.0 - b).add_(p_s, alpha=b).mul_(1.0 - b).div_(logm.exp_()))
            del logm
            u.masked_fill_(zero_s, 0.0)
            u.sub_((u * p_s).sum(-1, keepdim=True)).mul_(p_s)
            dz = u
        kd = d * (temp**2) * keep_f[:, 0]
        grad.add_(dz, alpha=kd_w * temp)  # d/ds = (1/T) d/dz, times T^2
    grad.mul_(keep_f)
    return lm, kd, grad


class _FusedLMKD(torch.autograd.Function):
    """Chunked LM + KD from hidden states; gradients are computed in forward, chunk by chunk.

    Inputs: h_s [N, H_s], w_s [V_s, H_s], b_s [V_s] or None, h_t [N, H_t] or None, w_t, b_t,
    tgt [N], and the options. Output: the weighted sum (differentiable) and the two unweighted
    sums (not differentiable).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, tgt, kind, temperature, beta, lm_w, kd_w, chunk, ignore_index):
        n, v_s = h_s.shape[0], w_s.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b_s is not None and ctx.needs_input_grad[2]
        gh = torch.empty_like(h_s) if need_h else None
        gw = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_w else None
        gb = torch.zeros(v_s, dtype=torch.float32, device=w_s.device) if need_b else None
        lm_total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for i in range(0, n, chunk):
            hs = h_s[i:i + chunk]
            # the logits are passed as temporaries (no other reference): _chunk_terms reuses them
            lm, kd, g = _chunk_terms(
                F.linear(hs, w_s, b_s), None if h_t is None else F.linear(h_t[i:i + chunk], w_t, b_t)[:, :v_s],
                tgt[i:i + chunk], kind, temperature, beta, lm_w, kd_w, ignore_index,
            )
            lm_total += lm.sum()
            kd_total += kd.sum()
            g = g.to(w_s.dtype)
            if need_h:
                gh[i:i + chunk] = (g @ w_s).to(h_s.dtype)
            if need_w:
                if g.dtype == torch.float32 and hs.dtype == torch.float32:
                    gw.addmm_(g.t(), hs)
                else:
                    gw += (g.t() @ hs.to(g.dtype)).float()
            if need_b:
                gb += g.float().sum(0)
            del g
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (w_s.dtype, b_s.dtype if b_s is not None else None)
        ctx.params = (w_s, b_s)  # the parameters themselves (ZeRO-3: gathered again in backward)
        ctx.mark_non_differentiable(lm_total, kd_total)
        return lm_w * lm_total + kd_w * kd_total, lm_total, kd_total

    @staticmethod
    def backward(ctx, g_loss, _g_lm, _g_kd):
        gh, gw, gb = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        out_h = None if gh is None else gh * g_loss.to(gh.dtype)
        out_w = None if gw is None else (gw * g_loss).to(w_dtype)
        out_b = None if gb is None else (gb * g_loss).to(b_dtype)
        for p, g in zip(ctx.params, (out_w, out_b)):
            if g is not None and hasattr(p, "ds_id"):
                _gather_for_grad(p)
        return (out_h, out_w, out_b) + (None,) * 11


def _check_fused_args(student_hidden, targets, teacher_hidden, teacher_head, chunk_size) -> None:
    """Shapes and chunk size of a :func:`fused_lm_kd_loss` call (ValueError naming the argument)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if student_hidden.dim() != 2 or targets.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"student_hidden must be [N, H] and targets [N]; got {tuple(student_hidden.shape)}, {tuple(targets.shape)}"
        )
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("give both teacher_hidden and teacher_head, or neither")
    if teacher_hidden is not None and (teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != student_hidden.shape[0]):
        raise ValueError(
            f"teacher_hidden must be [N, H_t] with the student's N; got {tuple(teacher_hidden.shape)} "
            f"vs {tuple(student_hidden.shape)}"
        )


def fused_lm_kd_loss(
    student_hidden: torch.Tensor,
    student_head,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head=None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    lm_weight: float = 1.0,
    kd_weight: float = 1.0,
    chunk_size: int = 256,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM cross-entropy + logit KD from the final hidden states, in chunks of rows; no [N, V] tensor.

    Per chunk of ``chunk_size`` rows both lm_heads are applied (``h @ W.T + b``), the terms and the
    gradient with respect to the student logits are computed in fp32 in closed form, and the
    chunk's contribution to the gradients of the student hidden states, lm_head weight (and bias)
    is accumulated right away; the chunk's logits (student and teacher) are freed before the next
    chunk. Backward only scales the stored gradients, so nothing is recomputed and the teacher head
    runs once. Peak memory is about 6 fp32 [chunk, V] buffers (256 rows at V = 151,936: ~0.9 GiB),
    plus an fp32 [V, H] gradient accumulator for a trainable student head.

    Values equal ``F.cross_entropy(..., reduction="sum")`` and :func:`logit_kd_loss` with
    ``reduction="sum"`` on the full logits ``h @ W.T`` (same divergence conventions, temperature
    scaling by T^2, JSD beta, teacher vocabulary padding columns sliced off).

    ZeRO-3: partitioned head weights (``ds_id``) are gathered once per call
    (``deepspeed.zero.GatheredParameters``: one all-gather per head, the same number on every
    rank whatever its row count, so ranks with different label counts cannot deadlock). In
    backward the student head weight is gathered once more for its gradient accumulator (autograd
    needs the full shape there), DeepSpeed's hook reduce-scatters the full-shape gradient as after
    the module's own backward, and a hook registered after DeepSpeed's re-partitions the weight.
    Tied embeddings share the parameter, so their gradients add up in the same accumulator
    (not covered by the 2-rank tests: the tiny models do not tie).

    Why not liger-kernel's ``LigerFusedLinearJSDLoss``: it is not a dependency, its JSD has no
    reverse/forward-KL kinds with this module's conventions or a combined CE term with our
    normalisation, and it takes a plain weight tensor (no ZeRO-3 gathering, no gradient delivery to
    a partitioned parameter). The approach (gradients in forward, chunk by chunk) is the same.

    Args:
        student_hidden: [N, H_s] hidden states the student's lm_head consumes (after the final norm),
            one row per target position.
        student_head: the student's lm_head (``nn.Linear``-like: ``.weight [V_s, H_s]``, ``.bias``).
        targets: [N] long; rows with ``ignore_index`` contribute 0 (padding rows of a fixed-size gather).
        teacher_hidden / teacher_head: [N, H_t] and the teacher's lm_head with V_t >= V_s; ``None``:
            no KD term (kd sum 0).
        kind / temperature / beta: as in :func:`logit_kd_loss`.
        lm_weight / kd_weight: weights of the differentiable sum.
        chunk_size: rows per chunk.

    Returns:
        ``(loss, lm, kd)`` fp32 scalars: ``loss = lm_weight * lm + kd_weight * kd`` is differentiable
        (w.r.t. ``student_hidden`` and the student head's parameters); ``lm`` (cross-entropy sum)
        and ``kd`` (divergence sum, times T^2) are sums over the counted rows, not differentiable.
        Zero counted rows give zeros (and zero gradients).
    """
    _check_kd_args(kind, temperature, beta)
    _check_fused_args(student_hidden, targets, teacher_hidden, teacher_head, chunk_size)
    w_s, b_s = _linear_params(student_head, "student_head")
    w_t, b_t = _linear_params(teacher_head, "teacher_head") if teacher_head is not None else (None, None)
    with _gathered([w_s, b_s, w_t, b_t]):
        v_s, v_t = w_s.shape[0], (w_t.shape[0] if w_t is not None else None)
        if v_t is not None and v_t < v_s:
            raise ValueError(
                f"teacher vocabulary ({v_t}) is smaller than the student's ({v_s}); only extra padding rows on the "
                "teacher side can be handled - the two models must share a tokenizer"
            )
        if not torch.is_grad_enabled():  # no graph: skip the gradient work done in forward
            student_hidden, w_s = student_hidden.detach(), w_s.detach()
            b_s = None if b_s is None else b_s.detach()
        th = None
        if teacher_hidden is not None:
            th = teacher_hidden.detach()
            w_t, b_t = w_t.detach(), (b_t.detach() if b_t is not None else None)
        return _FusedLMKD.apply(
            student_hidden, w_s, b_s, th, w_t, b_t, targets.to(student_hidden.device), kind, float(temperature),
            float(beta), float(lm_weight), float(kd_weight), chunk_size, ignore_index,
        )


# ----------------------------------------------------------------------------- attention alignment


def _profiles(s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column profiles: mean over the query axis of kept entries. [L,B,n,n] -> [L,B,n] (0 if none kept)."""
    denom = keep.sum(-2).clamp(min=1).float()  # (L, B, n) kept entries per key column
    zero = s.new_zeros(())
    # torch.where keeps only the bool mask for backward (not a float copy of it)
    return torch.where(keep, s, zero).sum(-2) / denom, torch.where(keep, t, zero).sum(-2) / denom


def _block_ids(b: int, n: int, device, counts, vis_mask, image_ids) -> tuple[torch.Tensor | None, bool]:
    """([B, n] long block id of each visual token (-1: padding), single): ``single`` when each
    sample's real tokens form one block; ``(None, True)``: every map is one full block."""
    if sum(x is not None for x in (counts, vis_mask, image_ids)) > 1:
        raise ValueError("give at most one of counts, vis_mask, image_ids")
    if counts is not None:
        if counts.shape != (b,):
            raise ValueError(f"counts must be [B]={b} long, got shape {tuple(counts.shape)}")
        pos = torch.arange(n, device=device)
        return torch.where(pos[None, :] < counts.to(device)[:, None], 0, -1), True
    if vis_mask is not None:
        if vis_mask.shape != (b, n):
            raise ValueError(f"vis_mask must be [B, n]=({b}, {n}) bool, got shape {tuple(vis_mask.shape)}")
        return torch.where(vis_mask.to(device=device, dtype=torch.bool), 0, -1), True
    if image_ids is not None:
        if image_ids.shape != (b, n):
            raise ValueError(f"image_ids must be [B, n]=({b}, {n}) long, got shape {tuple(image_ids.shape)}")
        return image_ids.to(device=device, dtype=torch.long), False
    return None, True


def _block_sum(x: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """For each token i, the sum of ``x`` over the tokens of i's block: [L,B,n] -> [L,B,n]
    (0 for padding tokens). ``same`` [B,n,n] bool: tokens i and j are in one (real) block.
    A masked sum, not a matmul, so TF32 settings never touch it and it is deterministic."""
    return torch.where(same, x[..., None, :], x.new_zeros(())).sum(-1)


def _block_kl_rows(s: torch.Tensor, t: torch.Tensor, same: torch.Tensor, eps: float):
    """Row i renormalised over the keys j with ``same[b, i, j]`` (its block): (KL(teacher row ||
    student row) [L, B, n], teacher row has mass [L, B, n])."""
    zero = s.new_zeros(())
    s_in, t_in = torch.where(same, s, zero), torch.where(same, t, zero)
    ps = s_in / s_in.sum(-1, keepdim=True).clamp(min=eps)
    pt = t_in / t_in.sum(-1, keepdim=True).clamp(min=eps)
    term = pt * (torch.log(pt.clamp(min=eps)) - torch.log(ps.clamp(min=eps)))
    return torch.where(same, term, zero).sum(-1), t_in.sum(-1) > 0


def _single_block_per(s: torch.Tensor, t: torch.Tensor, real: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Per (layer, sample) loss when each sample's real tokens (``real`` [B, n] bool) are one block:
    masked reductions over the n x n map, no per-token expansion. [L, B] fp32."""
    n = s.shape[-1]
    same = real[:, :, None] & real[:, None, :]  # (B, n, n)
    zero = s.new_zeros(())
    if kind == "kl":
        rows, has = _block_kl_rows(s, t, same, eps)
        has = has & real
        return torch.where(has, rows, zero).sum(-1) / has.sum(-1).clamp(min=1).float()
    if kind == "filtered_cosine":
        ent = real.sum(-1).float().square()[:, None, None]  # (B, 1, 1): n_b^2 entries
        thr = []
        for x in (s.detach(), t.detach()):
            mean = torch.where(same, x, zero).sum((-1, -2), keepdim=True) / ent  # (L, B, 1, 1)
            var = torch.where(same, (x - mean).square(), zero).sum((-1, -2), keepdim=True) / (ent - 1.0)
            thr.append(mean + var.sqrt())  # unbiased; NaN for a 1-token block (as torch.std): nothing kept
        keep = same & (s <= thr[0]) & (t <= thr[1]) & (t != 0)
    else:
        keep = (same & torch.ones(n, n, dtype=torch.bool, device=s.device).tril()).expand_as(s)
    prof_s, prof_t = _profiles(s, t, keep)  # zero outside the block: the cosine is the block's
    return 1.0 - F.cosine_similarity(prof_s, prof_t, dim=-1, eps=eps)


def _ragged_per(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, kind: str, eps: float):
    """Per (layer, sample) loss over the blocks given by ``ids`` [B, n] (see
    :func:`attention_alignment_loss`): (per [L, B] fp32, has_block [B] bool)."""
    n = s.shape[-1]
    real = ids >= 0  # (B, n)
    same = (ids[:, :, None] == ids[:, None, :]) & real[:, :, None]  # (B, n, n), symmetric
    tri = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    # first token of each block: no earlier token (j < i) of the same block
    first = real & ~(same & tri.tril(-1)).any(-1)  # (B, n)
    zero = s.new_zeros(())
    if kind == "kl":
        rows, has = _block_kl_rows(s, t, same, eps)  # (L, B, n): KL of row i over its block's keys
        has = has & real  # (L, B, n)
        num = _block_sum(torch.where(has, rows, zero), same)
        den = _block_sum(has.float(), same)
        val = num / den.clamp(min=1.0)  # (L, B, n): the block's mean over rows with mass
    else:
        if kind == "filtered_cosine":
            ent = same.sum(-1).float().square()  # (B, n): n_k^2 entries of token i's block
            thr = []
            for x in (s.detach(), t.detach()):
                tot = _block_sum(torch.where(same, x, zero).sum(-1), same)  # (L, B, n) block totals
                mean = tot / ent  # row i: the mean of its block (NaN on padding rows: never used)
                dev = torch.where(same, (x - mean[..., None]).square(), zero).sum(-1)
                var = _block_sum(dev, same) / (ent - 1.0)  # unbiased; 0/0 = NaN for a 1-token block, as torch.std
                thr.append((mean + var.sqrt())[..., None])  # (L, B, n, 1): row i's block threshold
            keep = same & (s <= thr[0]) & (t <= thr[1]) & (t != 0)
        else:
            keep = (same & tri).expand_as(s)
        prof_s, prof_t = _profiles(s, t, keep)  # (L, B, n); column j only sees rows of its block
        # token j: cosine of its block's profiles (zeros outside the block), torch's own cosine
        cos = F.cosine_similarity(torch.where(same, prof_s[..., None, :], zero),
                                  torch.where(same, prof_t[..., None, :], zero), dim=-1, eps=eps)
        val = 1.0 - cos  # (L, B, n)
    nblk = first.sum(-1)  # (B,) images (blocks) per sample
    per = torch.where(first, val, zero).sum(-1) / nblk.clamp(min=1).float()  # mean over the sample's blocks
    return per, nblk > 0


def _full_map_per(s: torch.Tensor, t: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Per (layer, sample) loss when every map is one full n x n block (the original single-image
    computation). [L, B] fp32."""
    if kind == "kl":
        ps = s / s.sum(-1, keepdim=True).clamp(min=eps)
        pt = t / t.sum(-1, keepdim=True).clamp(min=eps)
        rows = (pt * (torch.log(pt.clamp(min=eps)) - torch.log(ps.clamp(min=eps)))).sum(-1)  # (L, B, n)
        has = (t.sum(-1) > 0).float()
        return (rows * has).sum(-1) / has.sum(-1).clamp(min=1.0)  # (L, B)
    if kind == "filtered_cosine":
        flat_s, flat_t = s.flatten(2), t.flatten(2)
        thr_s = (flat_s.mean(-1) + flat_s.std(-1, unbiased=True))[..., None, None]
        thr_t = (flat_t.mean(-1) + flat_t.std(-1, unbiased=True))[..., None, None]
        keep = (s <= thr_s) & (t <= thr_t) & (t != 0)  # a bool mask: no gradient through it
    else:
        n = s.shape[-1]
        keep = torch.ones(n, n, dtype=torch.bool, device=s.device).tril().expand_as(s)
    prof_s, prof_t = _profiles(s, t, keep)
    return 1.0 - F.cosine_similarity(prof_s, prof_t, dim=-1, eps=eps)  # (L, B)


def attention_alignment_loss(
    student_maps: torch.Tensor,
    teacher_maps: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    counts: torch.Tensor | None = None,
    vis_mask: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    kind: str = "filtered_cosine",
    reduction: str = "mean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Visual-attention alignment between layer-matched, head-averaged maps.

    Args:
        student_maps, teacher_maps: [L, B, n, n] visual attention (rows: visual queries,
            cols: visual keys; zeros above the causal diagonal). With ragged samples ``n`` is
            ``n_max`` and padding rows / columns hold anything (zeros from the capture op): they
            never enter.
        valid: [B] bool; samples without an image are dropped from the sum and the count.
        counts: optional [B] long, sample b's real visual tokens are indices ``0 .. counts[b]-1``
            (the rest is padding); its block is ``[:n_b, :n_b]``. Same as ``image_ids`` with
            ``0`` on real tokens and ``-1`` on padding.
        vis_mask: optional [B, n] bool, True on sample b's real visual tokens (any indices, e.g.
            ``vis_pos >= 0``); they form one block. Same as ``image_ids = where(vis_mask, 0, -1)``
            (computed by cheaper masked reductions, no per-token expansion).
        image_ids: optional [B, n] long block id of each visual token, ``-1`` for padding: the
            image a token belongs to (``0, 1, ...`` within the sample). Tokens of one image need
            not be contiguous, but each image's tokens must be in causal (position) order, as
            ``vis_pos`` is. ``None`` and ``counts=None``: every map is one full n x n block
            (the original single-image computation, unchanged bit for bit). At most one of
            ``counts``, ``vis_mask``, ``image_ids``; with every token real they give the original
            values up to fp32 rounding (masked sums instead of ``mean`` / ``std``).
        kind: per block (one image, n_k tokens, the n_k x n_k sub-map of its own rows and
            columns; attention to keys of other images or text never enters except through the
            softmax normaliser the capture already applied):
            ``filtered_cosine`` (CompoDistill, default): m = mean and s = unbiased std over the
            block's n_k*n_k entries (the causal zeros included); keep entry (i, j) iff
            student <= m_s + s_s and teacher <= m_t + s_t and teacher != 0; the profile of key
            column j is the mean of its kept entries over the block's rows i (0 if none); term
            1 - cos(student profile, teacher profile) over the block's n_k columns.
            A 1-token block has a NaN std (as ``torch.std``): nothing is kept and the term is 1.
            ``cosine``: the same profiles over every causal entry (i >= j) of the block, no filter.
            ``kl``: each query row renormalised over its block's keys, KL(teacher row || student
            row) averaged over the block's rows that have mass.
            A sample's term is the mean of its blocks' terms (each image counts as one
            single-image sample of the reference would, and a multi-image sample weighs one).
        reduction: ``mean`` = sum over layers and counted samples / number of counted samples
            (0 if none), a sample counts when it is valid and has at least one real visual token;
            ``sum`` = the numerator only (the caller divides by a global count).

    Returns:
        scalar fp32 tensor. No host sync and no Python loop over samples.
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
    ids, single = _block_ids(b, n, student_maps.device, counts, vis_mask, image_ids)
    valid = valid.to(device=student_maps.device, dtype=torch.bool)
    if n == 0 or num_l == 0:
        return student_maps.float().sum() * 0.0

    s = student_maps.float()
    t = teacher_maps.float()
    if ids is not None and single:
        real = ids >= 0
        per = _single_block_per(s, t, real, kind, eps)
        valid = valid & real.any(-1)
    elif ids is not None:
        per, has_block = _ragged_per(s, t, ids, kind, eps)
        valid = valid & has_block
    else:
        per = _full_map_per(s, t, kind, eps)
    w = valid.float()
    # torch.where, not a product: a dropped sample's value never reaches the sum (even if NaN)
    total = torch.where(valid, per, per.new_zeros(())).sum()
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
