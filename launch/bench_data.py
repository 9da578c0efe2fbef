"""Data pipeline throughput on the synthetic set: prep (records/s) and loader (samples/s).

    python launch/bench_data.py [--num 2000] [--workers 1 2] [--processor DIR] [--out DIR]

Renders ``--num`` synthetic scenes per split (``data_prep synth``), times sharding of the caption and
instruct JSON with ``--workers`` prep processes, then times the loader (one DataLoader worker and
in-process) over the instruct shards with the processor from ``--processor`` (default: a tiny
LLaVA built offline with ``distill.models.tiny``). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2000, help="scenes per split (default 2000)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prep worker counts to time")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--processor", default=None, help="model folder with a processor (default: tiny LLaVA)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args(argv)

    from data_prep.shards import prepare_llava
    from data_prep.synth import write_split_json

    work = args.out or tempfile.mkdtemp(prefix="bench_data_")
    rows = []
    try:
        t0 = time.perf_counter()
        jsons = {s: write_split_json(work, s, args.num, seed=0, size=96) for s in ("caption", "instruct")}
        render_s = time.perf_counter() - t0
        rows.append(("synth render (PIL, 96px)", 2 * args.num, render_s, "records"))
        for w in args.workers:
            for split, js in jsons.items():
                out = os.path.join(work, split, f"shards-w{w}")
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                res = prepare_llava(js, os.path.join(work, split, "images"), out, shard_size=args.shard_size,
                                    workers=w, progress=False)
                rows.append((f"prep llava {split}, {w} worker(s)", res.num_records, time.perf_counter() - t0, "records"))

        if args.processor is None:
            from distill.models.tiny import build_tiny_pair

            args.processor = str(build_tiny_pair(os.path.join(work, "tiny"), seed=0).student)
        from transformers import AutoProcessor

        from distill.data import DataConfig, build_loader

        processor = AutoProcessor.from_pretrained(args.processor)
        shards = os.path.join(work, "instruct", f"shards-w{args.workers[0]}")
        for nw in (0, 1):
            cfg = DataConfig(shards=[shards], batch_size=args.batch_size, max_length=512, shuffle_buffer=256,
                             num_workers=nw)
            loader = build_loader(cfg, processor, rank=0, world_size=1, seed=0)
            t0 = time.perf_counter()
            n = sum(int(b["input_ids"].shape[0]) for b in loader)
            label = "in-process" if nw == 0 else f"{nw} worker"
            rows.append((f"loader instruct ({label}, bs {args.batch_size})", n, time.perf_counter() - t0, "samples"))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'stage':44s} {'items':>8s} {'seconds':>9s} {'rate':>12s}")
    for name, n, sec, unit in rows:
        print(f"{name:44s} {n:8d} {sec:9.2f} {n / sec:9.0f} {unit}/s")
    print(f"(cpu count {os.cpu_count()}, python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
