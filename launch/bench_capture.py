"""Benchmark visual-attention capture: eager output_attentions vs fused capture vs no capture.

    python launch/bench_capture.py [--seq 512 1024 2048] [--steps 5] [--json OUT]

Model: a CPU-sized LLaMA (4 layers, hidden 256, 8 query / 4 KV heads, vocab 1024), batch 1,
``min(576, T - 128)`` image tokens starting at position 64, two captured layers.  Each variant
runs forward + backward of a loss:

  (a) eager  -- ``attn_implementation="eager"``, ``output_attentions=True``, slice the visual
                block of the captured layers, average heads; loss = LM + alignment
  (b) fused  -- :func:`distill.attention.install` (``cpu_flash`` here) + ``AttentionCapture``;
                loss = LM + alignment
  (c) none   -- fused kernels, no capture; loss = LM

Step time: median of ``--steps`` steps after ``--warmup`` steps, as process CPU time
(``time.process_time``; with ``--threads 1`` it is the compute time and does not move when other
jobs share the machine) and as wall-clock time.  Peak memory: each (variant, T) runs
again (one warm-up, one step) in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (so
every tensor-sized allocation is an mmap that is returned on free and RSS follows live tensor
memory; this slows allocation, so the times come from the first, plain run); we report the
peak RSS over the timed step (``VmHWM``, reset after warm-up) minus the RSS just before it, i.e. the extra
memory of the training step (activations, gradients, temporaries) over the built model, and
the whole process's peak RSS (model, gradients, runtime included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("eager", "fused", "none")
LABEL = {"eager": "(a) eager output_attentions", "fused": "(b) fused capture", "none": "(c) no capture"}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: current RSS, VmHWM: its peak) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))


def worker(variant: str, seq: int, steps: int, warmup: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.attention import AttentionCapture, install
    from distill.losses import attention_alignment_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=max(4096, seq), attention_dropout=0.0,
    )
    model = LlamaForCausalLM(cfg)
    layers = [1, 2]
    n = min(576, seq - 128)
    vis = torch.arange(64, 64 + n)[None]
    ids = torch.randint(0, 1024, (1, seq))
    labels = ids.clone()
    labels[:, 64 : 64 + n] = -100
    target = torch.rand(len(layers), 1, n, n).tril()
    target = target / target.sum(-1, keepdim=True)
    cap = None
    if variant == "eager":
        model.config._attn_implementation = "eager"
    else:
        install(model, "auto")
        if variant == "fused":
            cap = AttentionCapture(model, layers)

    def lm_loss(logits):
        return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)

    def step():
        if variant == "eager":
            out = model(input_ids=ids, output_attentions=True)
            maps = []
            for i in layers:
                a = out.attentions[i].mean(1)  # (1, T, T)
                maps.append(a[:, vis[0]][:, :, vis[0]])
            loss = lm_loss(out.logits) + attention_alignment_loss(torch.stack(maps), target)
        elif variant == "fused":
            with cap.record(vis) as rec:
                out = model(input_ids=ids)
            loss = lm_loss(out.logits) + attention_alignment_loss(rec.maps, target)
        else:
            loss = lm_loss(model(input_ids=ids).logits)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep grad buffers allocated: same baseline for all variants

    # allocate grad buffers before the baseline so they are not counted as step memory
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    times, walls = [], []
    for i in range(warmup + steps):
        if i == warmup:  # steady state: one-time allocations of the first steps are not step memory
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak (VmHWM) to the current RSS
            base = _status_bytes("VmRSS")
        t0, w0 = time.process_time(), time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.process_time() - t0)
            walls.append(time.perf_counter() - w0)
    total = _status_bytes("VmHWM")
    return {"variant": variant, "seq": seq, "n_image": n, "time_s": statistics.median(times),
            "wall_s": statistics.median(walls), "peak_bytes": total - base, "peak_total_bytes": total}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    ap.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(args.worker, args.seq[0], args.steps, args.warmup, args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("DS_ACCELERATOR", "cpu")

    def run_worker(variant, seq, steps, warmup, extra_env):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--seq", str(seq),
               "--steps", str(steps), "--warmup", str(warmup), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=dict(env, **extra_env), capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"benchmark worker {variant} T={seq} failed:\n{proc.stderr[-3000:]}")
        return json.loads(line[-1][len("RESULT ") :])

    results = []
    for seq in args.seq:
        for variant in VARIANTS:
            res = run_worker(variant, seq, args.steps, args.warmup, {})  # times
            mem = run_worker(variant, seq, 1, 1, {"MALLOC_MMAP_THRESHOLD_": "65536"})  # memory
            res.update(peak_bytes=mem["peak_bytes"], peak_total_bytes=mem["peak_total_bytes"])
            results.append(res)
            print(f"  T={seq} {variant}: {results[-1]['time_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)

    by = {(r["seq"], r["variant"]): r for r in results}
    print("| T | n img | variant | CPU time (ms) | wall (ms) | peak step mem (MiB) | peak RSS (MiB) | time / (c) | "
          "step mem / (c) | peak RSS / (c) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in args.seq:
        base = by[(seq, "none")]
        for v in VARIANTS:
            r = by[(seq, v)]
            print(
                f"| {seq} | {r['n_image']} | {LABEL[v]} | {r['time_s'] * 1e3:.1f} | {r['wall_s'] * 1e3:.1f} | "
                f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_total_bytes'] / 2**20:.1f} | "
                f"{r['time_s'] / base['time_s']:.2f}x | {r['peak_bytes'] / max(1, base['peak_bytes']):.2f}x | "
                f"{r['peak_total_bytes'] / base['peak_total_bytes']:.2f}x |"
            )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"results": results, "threads": args.threads, "steps": args.steps}, f, indent=2)


if __name__ == "__main__":
    main()
