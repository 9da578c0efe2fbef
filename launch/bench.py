"""Stage-3 step benchmark: reference eager capture vs fused capture vs no attention term.

One stage-3 training step = student forward + backward, teacher forward (no grad), the captured
layers of both, LM + logit-KD (+ attention alignment) losses. Three variants:

  (a) reference  eager attention with ``output_attentions=True`` on both models (every layer's
                 full [B,H,T,T] map is materialised), visual block sliced out, same losses;
  (b) fused      our path: fused kernels + ``visual_attention_probs`` on the matched layers;
  (c) none       fused kernels, no attention term (LM + KD only);
  (d) full_logits  like (c) with the LM + KD terms computed the way the objective did before the
                 fused logits path (commit 4d847d3): both models return [B, T, V] logits for every
                 position, fp32 copies for cross-entropy and ``logit_kd_loss`` (for before/after
                 comparisons; (c) runs today's objective: labelled rows only, chunked fused loss).

Every (T, variant) point runs in a fresh subprocess so peak memory is clean: on CUDA the
allocator's peak (``max_memory_allocated``), on CPU the process's peak RSS (VmHWM, reset after
warm-up via /proc/self/clear_refs) taken from a second run in which glibc maps every large
allocation on its own (``MALLOC_MMAP_THRESHOLD_``), so RSS follows live tensors; times on CPU
come from the first, plain run because that setting slows allocation. Models are built from configs with random weights (no
download): ``--preset tiny`` (CPU-sized but real architectures) or ``--preset real`` (a ~1.8B
Qwen1.5-class student, a ~4B-class teacher, SigLIP-so400m tower at 384 px = 729 image tokens).

``--mode kernel`` times one attention layer instead: fused kernel + ``visual_attention_probs``
forward+backward vs eager softmax attention with the visual block sliced, on the same q, k, v.

``--preset realvocab`` is the logits-memory measurement (measurements/README.md, 2026-12-01): a
tiny LLaVA pair (hidden 64/96, 2 layers) with a real vocabulary (V = 151,936), 729 image tokens;
run it with ``--batch-size 2 --seq 1024 --labelled 512 --variants full_logits none``.

Usage::

    python launch/bench.py --preset tiny --seq 1024 2048 --json runs/bench/step_cpu.json
    python launch/bench.py --preset real --device cuda --seq 1024 2048 4096
    python launch/bench.py --mode kernel --device cuda --seq 1024 2048 4096 8192
    python launch/bench.py --preset realvocab --batch-size 2 --seq 1024 --labelled 512 \
        --variants full_logits none --steps 3 --warmup 1 --threads 1

Prints a markdown table per mode and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distill.models.tiny import REAL

PRESETS = {
    # CPU-sized: a few layers of realistic width ratios; 729 image tokens like a 384-px SigLIP.
    "tiny": dict(
        student=dict(family="llama", hidden=256, layers=4, heads=4, kv_heads=2, inter=704),
        teacher=dict(family="qwen2", hidden=384, layers=6, heads=6, kv_heads=6, inter=1024),
        vision=dict(hidden=64, layers=1, heads=2, inter=128, image=54, patch=2),
        vocab=4096,
    ),
    # Logits memory at a real vocabulary: tiny widths, Qwen's V = 151,936, 729 image tokens.
    "realvocab": dict(
        student=dict(family="llama", hidden=64, layers=2, heads=4, kv_heads=2, inter=176),
        teacher=dict(family="qwen2", hidden=96, layers=2, heads=6, kv_heads=6, inter=256),
        vision=dict(hidden=64, layers=1, heads=2, inter=128, image=54, patch=2),
        vocab=151936,
    ),
    # Qwen1.5-1.8B-class student, Qwen1.5-4B-class teacher, SigLIP-so400m/14 at 384 px: the shapes
    # of ``python -m distill.models.tiny --preset real`` (one definition, in distill.models.tiny).
    "real": REAL,
}
VARIANTS = ("reference", "fused", "none")  # "full_logits" on request (--variants)


# ----------------------------------------------------------------------------- model building

def _text_config(spec: dict, vocab: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec["family"]]
    return cls(
        vocab_size=vocab, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        intermediate_size=spec["inter"], max_position_embeddings=16384, tie_word_embeddings=False,
    )


def build_models(preset: str, dtype, device, attn_impl: str):
    """(student, teacher, image_token_id, num_image_tokens, image_size) with random weights."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    p = PRESETS[preset]
    v = p["vision"]
    vision = SiglipVisionConfig(
        hidden_size=v["hidden"], num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
        intermediate_size=v["inter"], image_size=v["image"], patch_size=v["patch"],
    )
    n_img = (v["image"] // v["patch"]) ** 2
    image_token_id = p["vocab"] - 1
    models = []
    for role in ("student", "teacher"):
        cfg = LlavaConfig(
            vision_config=vision, text_config=_text_config(p[role], p["vocab"]),
            image_token_id=image_token_id, image_seq_length=n_img,
            vision_feature_select_strategy="full", vision_feature_layer=-1,
        )
        torch.manual_seed(0 if role == "student" else 1)
        with torch.device(device):
            m = LlavaForConditionalGeneration(cfg).to(dtype)
        m.config._attn_implementation = attn_impl
        m.config.text_config._attn_implementation = attn_impl
        m.config.vision_config._attn_implementation = "sdpa"
        models.append(m)
    student, teacher = models
    teacher.eval().requires_grad_(False)
    student.model.vision_tower.requires_grad_(False)
    return student, teacher, image_token_id, n_img, v["image"]


def make_batch(batch_size: int, seq: int, n_img: int, image_size: int, image_token_id: int, vocab: int,
               dtype, device, labelled: int | None = None):
    """Right-padded-free batch: a text prefix of varying length, the image tokens, then text.

    Labels: every text token, or with ``labelled`` only the last ``labelled // batch_size`` tokens
    of each sample (an answer after the prompt), ``labelled`` shifted label positions in all."""
    import torch

    if seq <= n_img + 16:
        raise SystemExit(f"--seq {seq} must exceed the {n_img} image tokens by at least 16")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, image_token_id, (batch_size, seq), generator=g)
    for b in range(batch_size):
        start = 5 + 3 * b
        ids[b, start:start + n_img] = image_token_id
    labels = ids.clone()
    labels[ids == image_token_id] = -100
    if labelled is not None:
        per = labelled // batch_size
        if not 0 <= per < seq - n_img - 8:
            raise SystemExit(f"--labelled {labelled}: at most {batch_size * (seq - n_img - 9)} at this T")
        labels[:, : seq - per] = -100
    vis_pos = torch.stack([(row == image_token_id).nonzero().squeeze(1) for row in ids])
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device, dtype),
        "has_image": torch.ones(batch_size, dtype=torch.bool, device=device),
        "vis_pos": vis_pos.to(device),
        "num_targets": int((labels[:, 1:] != -100).sum()),
        "vis_key_len": int(vis_pos.max()) + 1,  # host int, as collate gives it
    }


# ----------------------------------------------------------------------------- one variant

def _reference_step(student, teacher, batch, s_layers, t_windows, cfg):
    """CompoDistill's reference recipe: eager attention, every layer's full map, slice, losses."""
    import torch
    import torch.nn.functional as F

    from distill.losses import attention_alignment_loss, logit_kd_loss

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    vis = batch["vis_pos"]

    def visual_maps(attentions, layers):
        out = []
        for layer in layers:
            a = attentions[layer].float().mean(1)  # (B, T, T) head mean
            rows = torch.gather(a, 1, vis[:, :, None].expand(-1, -1, a.shape[-1]))  # (B, n, T)
            out.append(torch.gather(rows, 2, vis[:, None, :].expand(-1, vis.shape[1], -1)))  # (B, n, n)
        return torch.stack(out)
    s_out = student(**inputs, output_attentions=True)
    with torch.no_grad():
        t_out = teacher(**inputs, output_attentions=True)
    s_maps = visual_maps(s_out.attentions, s_layers)
    t_maps = torch.stack([visual_maps(t_out.attentions, w).mean(0) for w in t_windows])
    logits = s_out.logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    lm = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
    kd = logit_kd_loss(logits, t_out.logits[:, :-1], tgt, cfg.kd_kind, cfg.kd_temperature)
    attn = attention_alignment_loss(s_maps, t_maps, batch["has_image"])
    return lm + cfg.kd_weight * kd + cfg.attn_weight * attn


def _full_logits_step(student, teacher, batch, cfg):
    """LM + KD as the objective computed them before the fused logits path (commit 4d847d3)."""
    import torch
    import torch.nn.functional as F

    from distill.losses import logit_kd_loss

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    s_logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    n = (tgt != -100).sum().clamp(min=1)
    v = s_logits.shape[-1]
    lm = F.cross_entropy(s_logits.float().reshape(-1, v), tgt.reshape(-1), ignore_index=-100, reduction="sum") / n
    kd = logit_kd_loss(s_logits, t_logits, tgt, cfg.kd_kind, cfg.kd_temperature, beta=cfg.kd_beta,
                       reduction="sum") / n
    return cfg.lm_weight * lm + cfg.kd_weight * kd


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(one, device, steps: int, warmup: int) -> tuple[float, int, int, object]:
    """Run ``one()`` ``warmup`` times, then time ``steps`` calls.

    Returns (median seconds, peak bytes, baseline bytes, last return value). Peak is the CUDA
    allocator's peak, or on CPU the process's peak RSS after resetting the high-water mark.
    """
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        one()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        base = _rss_kib("VmRSS") * 1024
    times, last = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        last = one()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return statistics.median(times), peak, base, last


def run_variant(args) -> dict:
    """Child process: build, warm up, time ``--steps`` steps of one variant at one T."""
    import torch

    from distill.losses import match_layers
    from distill.objective import DistillObjective, LossConfig

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.set_num_threads(args.threads) if args.threads else None
    attn_impl = "eager" if args.variant == "reference" else "sdpa"
    student, teacher, image_token_id, n_img, image_size = build_models(args.preset, dtype, device, attn_impl)
    vocab = PRESETS[args.preset]["vocab"]
    batch = make_batch(args.batch_size, args.seq, n_img, image_size, image_token_id, vocab, dtype, device,
                       labelled=args.labelled)
    cfg = LossConfig(lm_weight=1.0, kd_weight=1.0, backend=args.backend,
                     attn_weight=0.0 if args.variant in ("none", "full_logits") else 1.0)
    s_depth, t_depth = student.config.text_config.num_hidden_layers, teacher.config.text_config.num_hidden_layers
    s_layers, t_windows = match_layers(s_depth, t_depth)
    if args.variant == "reference":
        def step():
            return _reference_step(student, teacher, batch, s_layers, t_windows, cfg)
    elif args.variant == "full_logits":
        from distill.attention import install

        install(student, cfg.backend)  # the same attention kernels as (c)
        install(teacher, cfg.backend)

        def step():
            return _full_logits_step(student, teacher, batch, cfg)
    else:
        objective = DistillObjective(cfg, student, teacher)

        def step():
            return objective(student, teacher, batch)["loss"]

    def one():
        student.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        return loss

    step_s, peak, base, loss = measure(one, device, args.steps, args.warmup)
    tokens = args.batch_size * args.seq
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    # 6N per trained token for the student, 2N for the teacher forward, plus causal attention
    # (QK^T and PV: 2*2*T^2*d/2 per layer forward; x3 with backward for the student).
    st, tt = student.config.text_config, teacher.config.text_config
    attn_s = 3 * 2 * args.seq * args.seq * st.hidden_size * st.num_hidden_layers * args.batch_size
    attn_t = 2 * args.seq * args.seq * tt.hidden_size * tt.num_hidden_layers * args.batch_size
    flops = 6 * n_s * tokens + 2 * n_t * tokens + attn_s + attn_t
    return {
        "variant": args.variant, "seq": args.seq, "batch_size": args.batch_size, "image_tokens": n_img,
        "labelled": int((batch["labels"][:, 1:] != -100).sum()), "vocab": vocab,
        "step_s": step_s, "peak_bytes": peak, "step_extra_bytes": max(peak - base, 0), "base_bytes": base,
        "tokens_per_s": tokens / step_s, "model_tflops_per_s": flops / step_s / 1e12,
        "loss": float(loss.detach().float()), "student_params": n_s, "teacher_params": n_t,
        "mfu": _mfu(flops / step_s, device),
    }


def _mfu(flops_per_s: float, device) -> float | None:
    """Model FLOP utilisation against the device's dense bf16 peak (CUDA devices we know)."""
    import torch

    if device.type != "cuda":
        return None
    from distill.metrics import peak_bf16_tflops

    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else flops_per_s / (peak * 1e12)


# ----------------------------------------------------------------------------- kernel mode

def run_kernel(args) -> dict:
    """Child process: one attention layer, fused+capture vs eager+slice, forward+backward."""
    import torch

    from distill.attention import attention_with_lse, visual_attention_probs

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    spec = PRESETS[args.preset]["student"]
    n_img = (PRESETS[args.preset]["vision"]["image"] // PRESETS[args.preset]["vision"]["patch"]) ** 2
    hq, hk, d = spec["heads"], spec["kv_heads"], spec["hidden"] // spec["heads"]
    b, t = args.batch_size, args.seq
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, hq, t, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(b, hk, t, d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(b, hk, t, d, generator=g).to(device, dtype).requires_grad_()
    vis = (torch.arange(n_img) + 7)[None].expand(b, -1).to(device)
    scale = d ** -0.5
    go = torch.randn(b, hq, t, d, generator=g).to(device, dtype)
    gp = torch.randn(b, hq, n_img, n_img, generator=g).to(device)

    def fused():
        out, lse = attention_with_lse(q, k, v, scale=scale, causal=True, backend=args.backend)
        p = visual_attention_probs(q, k, lse, vis, scale)
        return out.transpose(1, 2), p  # (B, Hq, T, D) like eager

    def eager():
        kk = k.repeat_interleave(hq // hk, 1)
        vv = v.repeat_interleave(hq // hk, 1)
        s = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scale
        mask = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
        a = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        out = torch.matmul(a.to(dtype), vv)
        p = a[:, :, vis[0]][:, :, :, vis[0]]
        return out, p

    fn = fused if args.variant == "fused" else eager

    def one():
        for x in (q, k, v):
            x.grad = None
        out, p = fn()
        loss = (out.float() * go.float()).sum() + (p.float() * gp).sum()
        loss.backward()

    step_s, peak, base, _ = measure(one, device, args.steps, args.warmup)
    return {"variant": args.variant, "seq": t, "image_tokens": n_img, "heads": hq, "head_dim": d,
            "step_s": step_s, "step_extra_bytes": max(peak - base, 0), "peak_bytes": peak}


# ----------------------------------------------------------------------------- driver

def _child(args, variant: str, seq: int, rss_exact: bool = False) -> dict:
    """One (variant, T) point in a fresh process.

    ``rss_exact`` (CPU memory runs): every allocation of 64 KiB or more becomes its own mmap that
    is returned on free, so RSS follows live tensor memory. That makes allocations slower, so
    such a run measures memory only (one warm-up, one step) and times come from a plain run.
    """
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--seq", str(seq)]
    for key in ("preset", "device", "dtype", "batch_size", "steps", "warmup", "mode", "threads", "backend", "labelled"):
        if getattr(args, key) is None:
            continue
        value = {"steps": 1, "warmup": 1}.get(key, getattr(args, key)) if rss_exact else getattr(args, key)
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if rss_exact:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = any("out of memory" in ln.lower() for ln in tail) or proc.returncode in (-9, 137)
        return {"variant": variant, "seq": seq, "error": "OOM" if oom else " | ".join(tail)}
    return json.loads(lines[-1])


def _fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("step", "kernel"), default="step")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths T")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--labelled", type=int, default=None,
                    help="shifted label positions per batch (default: every text token)")
    ap.add_argument("--backend", default="auto", help="attention backend (loss.backend; the kernel of --mode kernel)")
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.child:
        args.seq = args.seq[0] if isinstance(args.seq, list) else args.seq
        print(json.dumps(run_variant(args) if args.mode == "step" else run_kernel(args)), flush=True)
        return
    seqs = args.seq or ([1024, 2048] if args.device == "cpu" else [1024, 2048, 4096])
    variants = args.variants or (VARIANTS if args.mode == "step" else ("reference", "fused"))
    variants = ["reference" if v == "eager" else v for v in variants]
    rows = []
    for seq in seqs:
        for variant in variants:
            print(f"[bench] mode={args.mode} T={seq} variant={variant} ...", file=sys.stderr, flush=True)
            row = _child(args, variant, seq)
            if args.device == "cpu" and "error" not in row:
                mem = _child(args, variant, seq, rss_exact=True)
                for key in ("peak_bytes", "step_extra_bytes", "base_bytes"):
                    row[key] = mem.get(key)
            rows.append(row)
    meta = {
        "mode": args.mode, "preset": args.preset, "device": _device_name(args.device), "dtype": args.dtype,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    try:
        import torch
        import transformers

        meta["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()}
    except ImportError:
        pass
    print(render_table(rows, meta))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def render_table(rows: list[dict], meta: dict) -> str:
    """Markdown table with the ratios against the fused variant at the same T."""
    head = f"{meta['mode']} benchmark, preset={meta['preset']}, {meta['device']}, {meta['dtype']}, B={meta['batch_size']}"
    by = {(r["seq"], r["variant"]): r for r in rows}
    out = [f"### {head}", "",
           "| T | variant | step time | peak memory | step extra memory | tokens/s | model TFLOP/s | MFU | time / fused | extra mem / fused |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['seq']} | {r['variant']} | {r['error']} | | | | | | | |")
            continue
        f = by.get((r["seq"], "fused"))
        tr = f"{r['step_s'] / f['step_s']:.2f}x" if f and "error" not in f else "-"
        mr = (f"{r['step_extra_bytes'] / f['step_extra_bytes']:.2f}x"
              if f and "error" not in f and f["step_extra_bytes"] else "-")
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        tf = f"{r['model_tflops_per_s']:.2f}" if "model_tflops_per_s" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        out.append(f"| {r['seq']} | {r['variant']} | {r['step_s'] * 1e3:,.1f} ms | {_fmt_bytes(r.get('peak_bytes'))} | "
                   f"{_fmt_bytes(r['step_extra_bytes'])} | {tps} | {tf} | {mfu} | {tr} | {mr} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
