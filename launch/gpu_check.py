"""Every GPU check of the visual attention op and the capture step, in one call (issue 12).

Run on one H100 / H200 (about 6-7 minutes with the default budgets; the whole run stops starting
new work after ``--total-budget`` seconds, 450 by default)::

    python launch/gpu_check.py --out runs/gpu_check

CPU dry run of every section at tiny shapes (what tests/test_gpu_check.py runs; the triton path
runs under ``TRITON_INTERPRET=1``, which this script sets itself before importing triton)::

    python launch/gpu_check.py --out /tmp/gpu_check --dry-run

Sections, in order (``--sections`` picks a subset); each is wrapped so that a failure is recorded
in the JSON (status ``error`` with the traceback) and the script goes on, and each has a time
budget (in-process sections stop starting new cases when it is spent; subprocesses are killed):

``versions``   torch / CUDA / triton / transformers / deepspeed versions, device name, the impl
               that ``impl="auto"`` resolves to.
``parity``     ``visual_attention_probs`` forward (head-averaged and per-head) and dq / dk, both
               impls, fp32 / bf16 / fp16, with the LSE of the SDPA flash and memory-efficient
               kernels (``distill.attention.kernels.attention_with_lse``), GQA 16/4 and MHA 16/16,
               one image / two images with text between / ragged -1 padding, against an fp64 eager
               reference (full softmax, then the visual block) on the same rounded inputs.
``op_timing``  fwd+bwd time of the head-averaged op per layer (16 heads, D = 128, batch 1, bf16,
               ``torch.cuda.Event`` timing, median of ``--iters``) for both impls (and the torch
               path with the collate-time ``key_len`` bound) at (T, n) = (2048, 729),
               (8192, 2916), (16384, 7290 contiguous) and (16384, 7290 over ten images), next to
               the layer's own flash forward+backward; peak extra memory of each.
``sync_debug`` the op (both impls) under ``torch.cuda.set_sync_debug_mode("error")``, then one
               fused-capture objective step of the bench's tiny preset under ``"warn"`` (every
               host sync listed with its location) and under ``"error"`` (the first one raises).
``bench``      ``launch/bench.py --preset real --device cuda`` stage-3 step (reference / fused /
               none) at T = 1024, 2048, 4096, 8192: one bench call per T (so a time-out loses only
               the remaining T), rows merged into ``OUT/bench_step.json`` in bench.py's format.
``pytest``     tests/test_attention_op.py, test_capture.py and test_objective.py with CUDA visible.

Outputs under ``--out``: ``gpu_check.json`` (everything), ``gpu_check.md`` (tables),
``bench_step.json`` and ``bench_T*.json`` / ``*.log`` of the subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:  # the triton path runs on CPU under the interpreter; must precede the import
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SECTIONS = ("versions", "parity", "op_timing", "sync_debug", "bench", "max_batch", "pytest")
# seconds per section on the GPU; their sum exceeds --total-budget on purpose: a section gets at most
# what is left of the total, so an early overrun shortens the later (lower-priority) sections
BUDGETS = {"versions": 20, "parity": 50, "op_timing": 60, "sync_debug": 30, "bench": 240, "max_batch": 60,
           "pytest": 70}
# dry run: budgets are only a safety net (a loaded 2-core CI machine must not turn a slow case into a failure)
DRY_BUDGETS = {"versions": 120, "parity": 300, "op_timing": 300, "sync_debug": 300, "bench": 600, "max_batch": 300,
               "pytest": 300}


# ----------------------------------------------------------------------------- helpers


class Clock:
    """Section budget: ``left()`` seconds, ``over()`` once spent."""

    def __init__(self, budget: float):
        self.t0 = time.perf_counter()
        self.budget = budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def over(self) -> bool:
        return self.left() <= 0


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _layout(kind: str, t: int, n_img: int, images: int = 1, batch: int = 1) -> torch.Tensor:
    """vis_pos [B, n]: ``contiguous`` (one run from position 5), ``images`` (``images`` equal images
    with text gaps spread over T), ``ragged`` (sample 0 one image with its tail padded by -1,
    sample 1 two images)."""
    if kind == "contiguous":
        row = torch.arange(5, 5 + n_img)
        return row.expand(batch, n_img).contiguous()
    if kind == "images":
        per = n_img // images
        gap = (t - 10 - per * images) // images
        assert gap >= 1, (t, n_img, images)
        row = torch.cat([torch.arange(5 + i * (per + gap), 5 + i * (per + gap) + per) for i in range(images)])
        return row.expand(batch, row.numel()).contiguous()
    if kind == "ragged":
        n0 = (2 * n_img) // 3
        vis = torch.full((batch, n_img), -1, dtype=torch.long)
        half = n_img // 2
        for b in range(batch):
            if b % 2 == 0:
                vis[b, :n0] = torch.arange(3, 3 + n0)
            else:
                vis[b, :half] = torch.arange(2, 2 + half)
                vis[b, half:] = torch.arange(t // 2, t // 2 + n_img - half)
        return vis
    raise ValueError(kind)


def _reference(q, k, vis_pos, scale):
    """fp64 eager: full causal softmax, visual block sliced, -1 padding zeroed; (P [B,Hq,n,n], lse)."""
    b, hq, t, _ = q.shape
    ke = k.repeat_interleave(hq // k.shape[1], dim=1)
    s = (q @ ke.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse[..., None])
    n = vis_pos.shape[1]
    idx = vis_pos.clamp(min=0)
    rows = p.gather(2, idx[:, None, :, None].expand(b, hq, n, t))
    blk = rows.gather(3, idx[:, None, None, :].expand(b, hq, n, n))
    ok = vis_pos >= 0
    return blk * (ok[:, None, :, None] & ok[:, None, None, :]), lse


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ----------------------------------------------------------------------------- sections


def sec_versions(args, clock, out_dir):
    from distill.attention import resolve_impl

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(args.device)}
    for mod in ("triton", "transformers", "deepspeed", "flash_attn"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({type(e).__name__}: {e})"
    if args.device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    else:
        info["device_name"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    try:
        info["impl_auto"] = resolve_impl("auto", args.device)
        info["impl_triton"] = resolve_impl("triton", args.device)
    except ValueError as e:
        info["impl_triton"] = f"unavailable: {e}"
    return info


def _impls(args):
    from distill.attention import resolve_impl

    out = ["torch"]
    try:
        resolve_impl("triton", args.device)
        out.append("triton")
    except ValueError:
        pass
    return out


def sec_parity(args, clock, out_dir):
    from distill.attention import attention_with_lse, visual_attention_probs

    dev = args.device
    if args.dry_run:
        b, hq_list, t, d, n = 2, [(4, 2)], 48, 16, 20
        backends = ["cpu_flash"]
        dtypes = [torch.float32]
        layouts = [("contiguous", 1), ("ragged", 1)]
    else:
        b, hq_list, t, d, n = 2, [(16, 4), (16, 16)], 1024, 128, 300
        backends = ["sdpa_flash", "sdpa_efficient"]
        from distill.attention.kernels import flash_attn_variants

        if flash_attn_variants():  # FA4 carried in (launch/gpu/README.md), or FA2/FA3 where built
            backends.append("flash_attn")
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        layouts = [("contiguous", 1), ("images", 2), ("ragged", 1)]
    tol = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (1e-3, 3e-2), torch.float16: (1e-3, 5e-3)}
    impls = _impls(args)
    cases, skipped = [], []
    scale = d ** -0.5
    for dtype in dtypes:
        for hq, hk in hq_list:
            for kind, images in layouts:
                if clock.over():
                    skipped.append(f"{dtype} {hq}/{hk} {kind}: budget")
                    continue
                g = torch.Generator().manual_seed(0)
                q = torch.randn(b, t, hq, d, generator=g).to(dev, dtype).transpose(1, 2)  # HF layout
                k = torch.randn(b, t, hk, d, generator=g).to(dev, dtype).transpose(1, 2)
                v = torch.randn(b, t, hk, d, generator=g).to(dev, dtype).transpose(1, 2)
                vis = _layout(kind, t, n, images, b).to(dev)
                rq, rk = q.double().requires_grad_(), k.double().requires_grad_()
                ref, ref_lse = _reference(rq, rk, vis, scale)
                w = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dev)
                ref_mean = ref.mean(1)
                wm = w[:, 0]
                gq_ref, gk_ref = torch.autograd.grad((ref_mean * wm).sum(), (rq, rk), retain_graph=True)
                gq_ph, gk_ph = torch.autograd.grad((ref * w).sum(), (rq, rk))
                for backend in backends:
                    if backend in ("sdpa_flash", "flash_attn") and dtype == torch.float32:
                        continue  # the flash kernels have no fp32
                    try:
                        _, lse = attention_with_lse(q, k, v, scale=scale, backend=backend)
                    except Exception as e:  # noqa: BLE001
                        cases.append({"case": f"{backend} {str(dtype)[6:]} {hq}/{hk} {kind}", "ok": False,
                                      "error": f"{type(e).__name__}: {e}"})
                        continue
                    ok_rows = (vis >= 0)
                    lse_v = lse.gather(2, vis.clamp(min=0)[:, None].expand(b, hq, n))
                    ref_lse_v = ref_lse.detach().gather(2, vis.clamp(min=0)[:, None].expand(b, hq, n))
                    lse_abs = float((lse_v.double() - ref_lse_v).abs()[ok_rows[:, None].expand_as(lse_v)].max())
                    for impl in impls:
                        for head_mean in (True, False):
                            if not head_mean and kind != "contiguous":
                                continue
                            name = f"{backend} {str(dtype)[6:]} Hq{hq}/Hk{hk} {kind} {impl} {'mean' if head_mean else 'per-head'}"
                            try:
                                qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
                                p = visual_attention_probs(qq, kk, lse, vis, scale, head_mean=head_mean, impl=impl)
                                rp, ww, grq, grk = (ref_mean, wm, gq_ref, gk_ref) if head_mean else (ref, w, gq_ph, gk_ph)
                                gq, gk = torch.autograd.grad((p.double() * ww).sum(), (qq, kk))
                                fwd, dq, dk = _rel(p, rp), _rel(gq, grq), _rel(gk, grk)
                                tf, tg = tol[dtype]
                                finite = bool(torch.isfinite(gq).all() and torch.isfinite(gk).all())
                                cases.append({"case": name, "fwd_rel": fwd, "dq_rel": dq, "dk_rel": dk,
                                              "lse_abs": lse_abs, "finite": finite,
                                              "ok": finite and fwd <= tf and dq <= tg and dk <= tg})
                            except Exception as e:  # noqa: BLE001
                                cases.append({"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
                del rq, rk, ref, ref_lse, gq_ref, gk_ref, gq_ph, gk_ph
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    n_bad = sum(not c["ok"] for c in cases)
    return {"status": "ok" if n_bad == 0 and not skipped else "failed", "cases": cases, "skipped": skipped,
            "tolerances": {str(k)[6:]: {"fwd_rel": v[0], "grad_rel": v[1]} for k, v in tol.items()},
            "summary": f"{len(cases) - n_bad}/{len(cases)} cases within tolerance" + (f", {len(skipped)} skipped" if skipped else "")}


def _time_fn(fn, dev, iters, warmup):
    """Median seconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU) and peak extra bytes."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            times.append((s, e))
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) / 1e3 for s, e in times)
        return ts[len(ts) // 2], torch.cuda.max_memory_allocated() - base
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2], None


def sec_op_timing(args, clock, out_dir):
    from distill.attention import attention_with_lse, visual_attention_probs

    dev = args.device
    if args.dry_run:
        hq, d, dtype = 4, 16, torch.float32
        shapes = [(64, 20, "contiguous", 1), (96, 30, "images", 3)]
        iters, warmup = 1, 0
    else:
        hq, d, dtype = 16, 128, torch.bfloat16
        shapes = [(2048, 729, "contiguous", 1), (8192, 2916, "contiguous", 1),
                  (16384, 7290, "contiguous", 1), (16384, 7290, "images", 10)]
        iters, warmup = args.iters, 3
    impls = _impls(args)
    rows, skipped = [], []
    scale = d ** -0.5
    for t, n, kind, images in shapes:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, t, hq, d, generator=g).to(dev, dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(1, t, hq, d, generator=g).to(dev, dtype).transpose(1, 2).requires_grad_()
        v = torch.randn(1, t, hq, d, generator=g).to(dev, dtype).transpose(1, 2).requires_grad_()
        vis = _layout(kind, t, n, images).to(dev)
        key_len = int(vis.max()) + 1  # what the collate step knows; read here, outside the timed op
        backend = "auto"
        out, lse = attention_with_lse(q, k, v, scale=scale, backend=backend)
        go = torch.randn_like(out)
        w = torch.randn(1, n, n, generator=g).to(dev)
        label = f"T={t} n={n} {kind if images == 1 else f'{images} images'}"

        def layer():
            o, _ = attention_with_lse(q, k, v, scale=scale, backend=backend)
            torch.autograd.grad(o, (q, k, v), go)

        try:
            sec, mem = _time_fn(layer, dev, iters, warmup)
            rows.append({"shape": label, "impl": "layer flash fwd+bwd", "ms": sec * 1e3, "peak_extra_bytes": mem})
        except Exception as e:  # noqa: BLE001
            rows.append({"shape": label, "impl": "layer flash fwd+bwd", "error": f"{type(e).__name__}: {e}"})
        variants = [(impl, {}) for impl in impls] + [("torch", {"key_len": key_len})]
        results = {}
        for impl, kw in variants:
            name = impl + (" +key_len" if kw else "")
            if clock.over():
                skipped.append(f"{label} {name}: budget")
                continue

            def op():
                m = visual_attention_probs(q, k, lse, vis, scale, head_mean=True, impl=impl, **kw)
                return (m,) + torch.autograd.grad(m, (q, k), w)

            try:
                res = op()
                results[name] = [x.float() for x in res]
                del res
                sec, mem = _time_fn(op, dev, iters, warmup)
                rows.append({"shape": label, "impl": name, "ms": sec * 1e3, "peak_extra_bytes": mem})
            except Exception as e:  # noqa: BLE001
                rows.append({"shape": label, "impl": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if "torch" in results and "triton" in results:  # the two impls agree at this shape
            agree = [_rel(a, b) for a, b in zip(results["triton"], results["torch"])]
            rows.append({"shape": label, "impl": "triton vs torch (rel: P, dq, dk)", "agreement": agree})
        del q, k, v, out, lse, go, results
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "skipped": skipped, "dtype": str(dtype)[6:], "heads": hq, "head_dim": d,
            "status": "ok" if not any("error" in r for r in rows) and not skipped else "failed"}


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_bench", ROOT / "launch" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sec_sync_debug(args, clock, out_dir):
    import warnings

    from distill.attention import visual_attention_probs

    dev = args.device
    res = {}
    has_mode = dev.type == "cuda"
    # 1. the op alone, both impls, under "error": any host sync raises
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    t, n, hq, d = (64, 20, 4, 16) if args.dry_run else (2048, 729, 16, 128)
    q = torch.randn(2, hq, t, d, generator=g).to(dev, dtype).requires_grad_()
    k = torch.randn(2, hq // 4, t, d, generator=g).to(dev, dtype).requires_grad_()
    lse = (torch.randn(2, hq, t, generator=g) + 8).to(dev)
    vis = _layout("ragged", t, n, 1, 2).to(dev)
    w = torch.randn(2, n, n, generator=g).to(dev)
    for impl in _impls(args):
        visual_attention_probs(q, k, lse, vis, d ** -0.5, head_mean=True, impl=impl)  # compile outside the check
        _sync(dev)
        try:
            if has_mode:
                torch.cuda.set_sync_debug_mode("error")
            m = visual_attention_probs(q, k, lse, vis, d ** -0.5, head_mean=True, impl=impl)
            torch.autograd.grad(m, (q, k), w)
            res[f"op {impl}"] = {"ok": True, "mode": "error" if has_mode else "n/a (CPU)"}
        except Exception as e:  # noqa: BLE001
            res[f"op {impl}"] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                 "where": traceback.format_exc(limit=-4)}
        finally:
            if has_mode:
                torch.cuda.set_sync_debug_mode(0)
            _sync(dev)
    # 2. one fused-capture objective step (bench tiny preset), "warn" (list every sync), then "error"
    bench = _load_bench()
    from distill.objective import DistillObjective, LossConfig

    seq = 768 if args.dry_run else 1024
    mdtype = torch.float32 if args.dry_run else torch.bfloat16
    student, teacher, image_token_id, n_img, image_size = bench.build_models("tiny", mdtype, dev, "sdpa")
    batch = bench.make_batch(1, seq, n_img, image_size, image_token_id, bench.PRESETS["tiny"]["vocab"], mdtype, dev)
    objective = DistillObjective(LossConfig(lm_weight=1.0, kd_weight=1.0, attn_weight=1.0), student, teacher)

    def step():
        student.zero_grad(set_to_none=True)
        out = objective(student, teacher, batch)
        out["loss"].backward()

    step()  # warm-up outside the check
    _sync(dev)
    if has_mode:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [f"{c.filename}:{c.lineno}: {str(c.message)[:160]}" for c in caught
                 if "synchroniz" in str(c.message).lower()]
        res["step warn"] = {"syncs": len(syncs), "where": syncs[:20]}
        try:
            torch.cuda.set_sync_debug_mode("error")
            step()
            res["step error"] = {"ok": True}
        except Exception as e:  # noqa: BLE001
            res["step error"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}",
                                 "where": traceback.format_exc(limit=-6)}
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        step()
        res["step"] = {"ok": True, "mode": "n/a (CPU): step ran without sync checks"}
    ok = all(v.get("ok", True) for key, v in res.items() if key.startswith("op"))
    return {"status": "ok" if ok else "failed", "results": res}


def _run(cmd, log_path, timeout, env=None):
    """(exit status or "timeout", seconds); the child's whole process group is killed on timeout."""
    from distill.subproc import run_logged

    r = run_logged(cmd, log_path, timeout, env=env, cwd=ROOT)
    return r["rc"], r["seconds"]


def sec_bench(args, clock, out_dir):
    bench = _load_bench()
    if args.dry_run:
        seqs = [768]
        extra = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--variants", "fused",
                 "--threads", "1"]
    else:
        seqs = [1024, 2048, 4096, 8192]
        extra = ["--preset", "real", "--device", "cuda", "--steps", "4", "--warmup", "2"]
    rows, runs, meta = [], [], None
    for seq in seqs:
        if clock.over():
            runs.append({"seq": seq, "rc": "skipped: budget"})
            continue
        js = out_dir / f"bench_T{seq}.json"
        variants = []
        if not args.dry_run and seq >= 8192:
            # the reference's T x T maps of 64 layers need ~0.5 TB at T = 8192 (it ran out of memory at
            # 4096 on an H100): not started, so the budget goes to fused vs none
            variants = ["--variants", "fused", "none"]
            rows.append({"variant": "reference", "seq": seq, "error": "not run (T x T maps exceed GPU memory)"})
        cmd = [sys.executable, str(ROOT / "launch" / "bench.py"), *extra, *variants, "--seq", str(seq), "--json", str(js)]
        rc, sec = _run(cmd, out_dir / f"bench_T{seq}.log", clock.left())
        runs.append({"seq": seq, "rc": rc, "seconds": round(sec, 1), "command": " ".join(cmd[1:])})
        if js.exists():
            data = json.loads(js.read_text())
            rows += data["rows"]
            meta = meta or data["meta"]
    from distill.attention.kernels import flash_attn_variants

    if not args.dry_run and flash_attn_variants() and not clock.over():
        # auto picked flash-attn above: one SDPA-flash point beside it (T = 2048, fused and none)
        js = out_dir / "bench_T2048_sdpa.json"
        cmd = [sys.executable, str(ROOT / "launch" / "bench.py"), *extra, "--variants", "fused", "none",
               "--backend", "sdpa_flash", "--seq", "2048", "--json", str(js)]
        rc, sec = _run(cmd, out_dir / "bench_T2048_sdpa.log", clock.left())
        runs.append({"seq": 2048, "backend": "sdpa_flash", "rc": rc, "seconds": round(sec, 1),
                     "command": " ".join(cmd[1:])})
        if js.exists():
            rows += [dict(r, variant=f"{r['variant']} (sdpa_flash)") for r in json.loads(js.read_text())["rows"]]
    if meta is not None:
        meta = dict(meta, command="gpu_check.py: " + " ; ".join(r.get("command", "") for r in runs if "command" in r))
        (out_dir / "bench_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    ratios = {}
    by = {(r["seq"], r["variant"]): r for r in rows if "error" not in r}
    for seq in seqs:
        f, n, ref = by.get((seq, "fused")), by.get((seq, "none")), by.get((seq, "reference"))
        if f and n:
            ratios[seq] = {"fused/none time": f["step_s"] / n["step_s"],
                           "fused/none peak": f["peak_bytes"] / n["peak_bytes"] if n.get("peak_bytes") else None,
                           "reference/fused time": ref["step_s"] / f["step_s"] if ref else None}
    table = bench.render_table(rows, meta) if meta else ""
    ok = all(r["rc"] == 0 for r in runs)
    return {"status": "ok" if ok else "failed", "runs": runs, "ratios": ratios, "table": table, "rows": rows}


def sec_max_batch(args, clock, out_dir):
    """Largest batch of the real preset's fused step that fits at T = 2048 (doubling until OOM)."""
    if args.dry_run:
        seq, batches = 768, [1]
        extra = ["--preset", "tiny", "--device", "cpu", "--threads", "1"]
    else:
        seq, batches = 2048, [2, 4, 8, 16, 32]
        extra = ["--preset", "real", "--device", "cuda"]
    fits, runs = None, []
    for bs in batches:
        if clock.over():
            runs.append({"batch": bs, "rc": "skipped: budget"})
            break
        js = out_dir / f"max_batch_B{bs}.json"
        cmd = [sys.executable, str(ROOT / "launch" / "bench.py"), *extra, "--variants", "fused", "--steps", "1",
               "--warmup", "1", "--batch-size", str(bs), "--seq", str(seq), "--json", str(js)]
        rc, sec = _run(cmd, out_dir / f"max_batch_B{bs}.log", clock.left())
        row = json.loads(js.read_text())["rows"][0] if js.exists() else {}
        runs.append({"batch": bs, "rc": rc, "seconds": round(sec, 1), "error": row.get("error"),
                     "peak_bytes": row.get("peak_bytes")})
        if rc != 0 or "error" in row:
            break
        fits = bs
    return {"status": "ok" if fits is not None else "failed", "seq": seq, "largest_batch": fits, "runs": runs}


def sec_pytest(args, clock, out_dir):
    if args.dry_run:
        tests = ["tests/test_attention_op.py::test_unknown_backend"]
    else:
        tests = ["tests/test_attention_op.py", "tests/test_capture.py", "tests/test_objective.py",
                 "tests/test_flash_detect.py", "tests/test_fused_loss.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    rc, sec = _run(cmd, out_dir / "pytest.log", clock.left(), env=env)
    lines = (out_dir / "pytest.log").read_text(errors="replace").splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln), "")
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": round(sec, 1), "summary": summary.strip("= "),
            "failed": failed[:30], "command": " ".join(cmd[1:])}


def targets(report: dict) -> list[dict]:
    """Issue 12's GPU targets, evaluated on what this run measured (missing -> not listed)."""
    out = []
    t = report["sections"].get("op_timing", {}).get("result")
    for r in (t or {}).get("rows", []):
        if r["shape"].startswith("T=2048 n=729") and r["impl"] in ("triton", "torch") and "ms" in r:
            out.append({"target": f"op per layer fwd+bwd <= 0.2 ms ({r['impl']}, T=2048, n=729)",
                        "value": round(r["ms"], 3), "met": r["ms"] <= 0.2})
    b = report["sections"].get("bench", {}).get("result")
    for seq, r in ((b or {}).get("ratios") or {}).items():
        out.append({"target": f"T={seq}: step fused/none <= 1.03", "value": round(r["fused/none time"], 3),
                    "met": r["fused/none time"] <= 1.03})
        if r["fused/none peak"] is not None:
            out.append({"target": f"T={seq}: peak memory fused/none <= 1.01", "value": round(r["fused/none peak"], 3),
                        "met": r["fused/none peak"] <= 1.01})
        fused = next((x for x in (b or {}).get("rows", []) if x.get("seq") == seq and x.get("variant") == "fused"), None)
        if int(seq) == 4096 and fused and fused.get("peak_bytes"):
            gb = fused["peak_bytes"] / 1e9  # H100 baseline at commit 4d847d3: 45.0 GB
            out.append({"target": "T=4096: real-preset peak <= 0.6 x 45.0 GB", "value": round(gb, 1), "met": gb <= 27.0})
        if r["reference/fused time"] is not None:
            out.append({"target": f"T={seq}: fused faster than reference", "value": round(r["reference/fused time"], 2),
                        "met": r["reference/fused time"] > 1.0})
    return out


FUNCS = {"versions": sec_versions, "parity": sec_parity, "op_timing": sec_op_timing,
         "sync_debug": sec_sync_debug, "bench": sec_bench, "max_batch": sec_max_batch, "pytest": sec_pytest}


# ----------------------------------------------------------------------------- report


def _fmt(x, spec=".1e"):
    return "-" if x is None else format(x, spec)


def render_markdown(report: dict) -> str:
    meta, secs = report["meta"], report["sections"]
    out = [f"# GPU check ({meta['date']})", "", f"Command: `{meta['command']}`", ""]
    out += ["| section | status | seconds | budget s |", "|---|---|---|---|"]
    for name, s in secs.items():
        out.append(f"| {name} | {s['status']} | {s.get('seconds', '-')} | {s.get('budget_s', '-')} |")
    if report.get("targets"):
        out += ["", "## Targets (issue 12)", "", "| target | value | met |", "|---|---|---|"]
        out += [f"| {t['target']} | {t['value']} | {t['met']} |" for t in report["targets"]]
    v = secs.get("versions", {}).get("result")
    if v:
        out += ["", "## Versions", "", "| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in v.items()]
    p = secs.get("parity", {}).get("result")
    if p:
        out += ["", "## Parity vs fp64 eager reference", "", p["summary"], "",
                "| case | ok | fwd rel | dq rel | dk rel | lse abs | note |", "|---|---|---|---|---|---|---|"]
        for c in p["cases"]:
            out.append(f"| {c['case']} | {c['ok']} | {_fmt(c.get('fwd_rel'))} | {_fmt(c.get('dq_rel'))} | "
                       f"{_fmt(c.get('dk_rel'))} | {_fmt(c.get('lse_abs'))} | {c.get('error', '')} |")
    t = secs.get("op_timing", {}).get("result")
    if t:
        out += ["", f"## Op time per layer (head-averaged, fwd+bwd, {t['heads']} heads, D={t['head_dim']}, "
                f"{t['dtype']}, batch 1)", "", "| shape | impl | ms | peak extra MiB | note |", "|---|---|---|---|---|"]
        for r in t["rows"]:
            mem = r.get("peak_extra_bytes")
            note = r.get("error", "") or (", ".join(f"{a:.1e}" for a in r["agreement"]) if "agreement" in r else "")
            out.append(f"| {r['shape']} | {r['impl']} | {_fmt(r.get('ms'), '.3f')} | "
                       f"{'-' if mem is None else f'{mem / 2**20:,.0f}'} | {note} |")
    s = secs.get("sync_debug", {}).get("result")
    if s:
        out += ["", "## Host syncs", "", "```", json.dumps(s["results"], indent=1)[:4000], "```"]
    b = secs.get("bench", {}).get("result")
    if b:
        out += ["", "## Stage-3 step (launch/bench.py)", "", b["table"], "", "| T | fused/none time | fused/none peak | reference/fused time |",
                "|---|---|---|---|"]
        for seq, r in b["ratios"].items():
            out.append(f"| {seq} | {_fmt(r['fused/none time'], '.3f')} | {_fmt(r['fused/none peak'], '.3f')} | "
                       f"{_fmt(r['reference/fused time'], '.2f')} |")
        out += [""] + [f"- T={r['seq']}: rc {r['rc']}, {r.get('seconds', '-')} s" for r in b["runs"]]
    mb = secs.get("max_batch", {}).get("result")
    if mb:
        out += ["", f"## Largest batch of the fused step at T={mb['seq']}: {mb['largest_batch']}", ""]
        out += [f"- B={r['batch']}: rc {r['rc']}" + (f", {r['error']}" if r.get("error") else "")
                + (f", peak {r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "") for r in mb["runs"]]
    pt = secs.get("pytest", {}).get("result")
    if pt:
        out += ["", "## Tests on CUDA", "", f"`{pt['command']}`: rc {pt['rc']}, {pt['summary']}", ""]
        out += [f"- {ln}" for ln in pt["failed"]]
    for name, sec in secs.items():
        if sec["status"] == "error":
            out += ["", f"## {name}: error", "", "```", sec["error"][-3000:], "```"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (JSON, markdown, logs)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, triton under the interpreter")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--total-budget", type=float, default=None,
                    help="seconds; sections get at most what is left of it, none starts after it "
                         "(default 450 on GPU, 1800 for --dry-run)")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per op-timing point")
    args = ap.parse_args(argv)
    if args.total_budget is None:
        args.total_budget = 1800.0 if args.dry_run else 450.0
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --dry-run")
    args.device = torch.device("cpu" if args.dry_run else "cuda")
    torch.set_num_threads(1) if args.dry_run else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
                       "command": " ".join(["gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
                       "total_budget_s": args.total_budget}, "sections": {}}
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    for name in args.sections:
        left = args.total_budget - (time.perf_counter() - t_start)
        budget = min(budgets[name], left)
        entry = {"budget_s": round(budget, 1)}
        print(f"[gpu_check] {name} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
        if budget <= 0:
            entry.update(status="skipped", reason="total budget spent")
        else:
            t0 = time.perf_counter()
            try:
                res = FUNCS[name](args, Clock(budget), out_dir)
                entry.update(status=res.get("status", "ok") if isinstance(res, dict) else "ok", result=res)
            except Exception:  # noqa: BLE001 - record and go on
                entry.update(status="error", error=traceback.format_exc())
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        report["sections"][name] = entry
        report["targets"] = targets(report)
        # write after every section: a run killed later still leaves everything before it
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / "gpu_check.md").write_text(render_markdown(report))
    report["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "gpu_check.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
