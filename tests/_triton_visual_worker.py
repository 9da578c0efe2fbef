"""Runs the Triton visual-block kernels on CPU under ``TRITON_INTERPRET=1`` (spawned by
tests/test_visual_triton.py in a subprocess, so the interpreter setting never leaks into other
test files).  Prints one JSON line: case name -> {"ok": bool, "msg": str, "seconds": float}.

Usage: TRITON_INTERPRET=1 python tests/_triton_visual_worker.py [case ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.attention import visual_attention_probs  # noqa: E402


def reference(q, k, vis_pos, scale, inf_rows=None):
    """fp64 eager: full causal softmax, then the visual block; -1 padding and +inf-lse rows zeroed."""
    b, hq, t, _ = q.shape
    ke = k.repeat_interleave(hq // k.shape[1], dim=1)
    s = (q @ ke.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    n = vis_pos.shape[1]
    idx = vis_pos.clamp(min=0)
    rows = p.gather(2, idx[:, None, :, None].expand(b, hq, n, t))
    blk = rows.gather(3, idx[:, None, None, :].expand(b, hq, n, n))
    ok = vis_pos >= 0
    keep = (ok[:, None, :, None] & ok[:, None, None, :]).expand(b, hq, n, n)
    if inf_rows is not None:  # [B, Hq, n] bool: rows given lse = +inf
        keep = keep & ~inf_rows[..., None]
    return blk * keep


def lse_of(q, k, scale):
    t = q.shape[2]
    ke = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ ke.transpose(-1, -2)) * scale
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)


def vis_rows(spans_per_sample, n):
    """[[(start, length), ...], ...] -> [B, n] long, tails padded with -1."""
    out = torch.full((len(spans_per_sample), n), -1, dtype=torch.long)
    for i, spans in enumerate(spans_per_sample):
        pos = torch.cat([torch.arange(s, s + ln) for s, ln in spans])
        out[i, : len(pos)] = pos
    return out


LAYOUTS = {
    # one image of 24 tokens per sample, at different offsets
    "contiguous": (48, [[(5, 24)], [(20, 24)]]),
    # two images with text between (and different gaps per sample)
    "two_images": (56, [[(3, 12), (25, 12)], [(8, 12), (40, 12)]]),
    # ragged: 37 and 50 visual tokens; sample 0 padded with 13 x -1
    "ragged": (72, [[(4, 37)], [(2, 20), (30, 30)]]),
    # an image that ends at the last position T-1
    "last_token": (40, [[(20, 20)], [(0, 20)]]),
}


def run_case(name, heads, layout, dtype, head_mean, inf_rows=False, seed=0):
    hq, hk = heads
    t, spans = LAYOUTS[layout]
    n = max(sum(ln for _, ln in s) for s in spans)
    vis = vis_rows(spans, n)
    b, d, scale = len(spans), 16, 0.35
    g = torch.Generator().manual_seed(seed)
    q64 = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    k64 = torch.randn(b, hk, t, d, generator=g, dtype=torch.float64)
    # round to the test dtype first so the fp64 reference sees the same inputs
    q64, k64 = q64.to(dtype).double(), k64.to(dtype).double()
    lse = lse_of(q64, k64, scale).float()
    inf_mask = None
    if inf_rows:  # rows 1 and 3 of sample 0, every head: lse = +inf (rows that see no key)
        inf_mask = torch.zeros(b, hq, n, dtype=torch.bool)
        inf_mask[0, :, [1, 3]] = True
        lse[0, :, vis[0, [1, 3]]] = float("inf")
    ref_q, ref_k = q64.clone().requires_grad_(), k64.clone().requires_grad_()
    ref = reference(ref_q, ref_k, vis, scale, inf_mask)
    if head_mean:
        ref = ref.mean(1)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    rq, rk = torch.autograd.grad((ref * w).sum(), (ref_q, ref_k))

    res = {}
    for impl in ("triton", "torch"):
        q = q64.to(dtype).requires_grad_()
        k = k64.to(dtype).requires_grad_()
        p = visual_attention_probs(q, k, lse, vis, scale, head_mean=head_mean, impl=impl)
        gq, gk = torch.autograd.grad((p.double() * w).sum(), (q, k))
        res[impl] = (p.double(), gq.double(), gk.double())
    tol_p = 1e-5 if dtype == torch.float32 else 2e-3
    # half: the gradients are returned in the input dtype (bf16 rounding alone is ~2e-3 relative)
    tol_g = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}[dtype]
    msgs = []
    for impl, (p, gq, gk) in res.items():
        ep = (p - ref).abs().max().item()
        eq = ((gq - rq).abs().max() / rq.abs().max().clamp(min=1e-12)).item()
        ek = ((gk - rk).abs().max() / rk.abs().max().clamp(min=1e-12)).item()
        msgs.append(f"{impl}: P err {ep:.2e}, dq rel {eq:.2e}, dk rel {ek:.2e}")
        if not (ep <= tol_p and eq <= tol_g and ek <= tol_g):
            raise AssertionError(f"{name}: {impl} outside tolerance (P {tol_p}, grads {tol_g}): " + "; ".join(msgs))
        # padding rows / columns and rows with lse = +inf are exactly zero, no gradient at padding
        ok = vis >= 0
        pp = p if not head_mean else p[:, None]
        assert (pp[~ok[:, None, :, None].expand_as(pp)] == 0).all(), f"{impl}: padding rows not zero"
        assert (pp[~ok[:, None, None, :].expand_as(pp)] == 0).all(), f"{impl}: padding columns not zero"
        if inf_mask is not None:
            assert (pp[0, :, [1, 3]] == 0).all(), f"{impl}: +inf lse rows not zero"
    # the two implementations against each other
    (p1, q1, k1), (p2, q2, k2) = res["triton"], res["torch"]
    d_p = (p1 - p2).abs().max().item()
    d_g = max(((q1 - q2).abs().max() / rq.abs().max()).item(), ((k1 - k2).abs().max() / rk.abs().max()).item())
    msgs.append(f"triton vs torch: P {d_p:.2e}, grads rel {d_g:.2e}")
    assert d_p <= tol_p and d_g <= 2 * tol_g, "; ".join(msgs)
    return "; ".join(msgs)


def case_n0():
    q = torch.randn(2, 4, 12, 16, requires_grad=True)
    k = torch.randn(2, 2, 12, 16, requires_grad=True)
    lse = torch.randn(2, 4, 12)
    vis = torch.zeros(2, 0, dtype=torch.long)
    for hm in (True, False):
        p = visual_attention_probs(q, k, lse, vis, 0.3, head_mean=hm, impl="triton")
        assert p.shape == ((2, 0, 0) if hm else (2, 4, 0, 0)), p.shape
        gq, gk = torch.autograd.grad(p.sum(), (q, k), allow_unused=True)
        assert gq is None or (gq == 0).all()
        assert gk is None or (gk == 0).all()
    return "n=0: empty block, zero gradients"


def case_deterministic():
    t, spans = LAYOUTS["two_images"]
    vis = vis_rows(spans, 24)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, t, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, t, 16, generator=g, requires_grad=True)
    lse = lse_of(q.detach().double(), k.detach().double(), 0.35).float()
    w = torch.randn(2, 24, 24, generator=g)
    outs = []
    for _ in range(2):
        p = visual_attention_probs(q, k, lse, vis, 0.35, head_mean=True, impl="triton")
        outs.append((p,) + torch.autograd.grad(p, (q, k), w))
    for a, b in zip(*outs):
        assert torch.equal(a, b), "rerun differs"
    return "forward, dq, dk bitwise equal over two runs"


CASES = {
    "fp32_gqa42_contiguous_mean": lambda: run_case("c1", (4, 2), "contiguous", torch.float32, True),
    "fp32_gqa61_two_images_mean": lambda: run_case("c2", (6, 1), "two_images", torch.float32, True),
    "fp32_mha44_ragged_mean": lambda: run_case("c3", (4, 4), "ragged", torch.float32, True),
    "fp32_gqa42_ragged_perhead": lambda: run_case("c4", (4, 2), "ragged", torch.float32, False),
    "fp32_gqa42_last_token_perhead": lambda: run_case("c5", (4, 2), "last_token", torch.float32, False),
    "fp32_gqa42_two_images_inf_lse_mean": lambda: run_case("c6", (4, 2), "two_images", torch.float32, True, True),
    "fp16_gqa42_two_images_mean": lambda: run_case("c7", (4, 2), "two_images", torch.float16, True),
    "fp16_mha44_contiguous_perhead": lambda: run_case("c8", (4, 4), "contiguous", torch.float16, False),
    "bf16_gqa42_two_images_mean": lambda: run_case("c9", (4, 2), "two_images", torch.bfloat16, True),
    "n0": case_n0,
    "deterministic_rerun": case_deterministic,
}


def main(argv):
    torch.set_num_threads(1)
    names = argv or list(CASES)
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            msg = CASES[name]()
            out[name] = {"ok": True, "msg": msg}
        except Exception:  # noqa: BLE001 - report every case
            out[name] = {"ok": False, "msg": traceback.format_exc(limit=6)}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
