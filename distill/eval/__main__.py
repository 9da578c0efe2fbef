"""``python -m distill.eval {compositional,vqa}``: evaluate a LLaVA-style model folder.

Results are printed as a markdown table and, with ``--out DIR``, written to
``DIR/<task>.json`` (accuracies), ``DIR/<task>.md`` (the table) and ``DIR/<task>_samples.jsonl``
(per-sample scores or answers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.eval.common import DEFAULT_CAPTION_PROMPT, EvalDataError, parse_dtype, write_results


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF LLaVA folder (stock or exported student)")
    p.add_argument("--data", required=True, nargs="+", help="data files, folders, globs or {a..b} shard ranges")
    p.add_argument("--images", default=None, help="image root (default: the data file's folder)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--out", default=None, help="folder for <task>.json, <task>.md, <task>_samples.jsonl")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distill.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    c = sub.add_parser("compositional", help="caption ranking: positive vs hard negatives (SugarCrepe / synthetic)")
    _common(c)
    c.add_argument("--prompt", default=DEFAULT_CAPTION_PROMPT, help="instruction in the user turn")
    v = sub.add_parser("vqa", help="greedy answers, normalised exact match")
    _common(v)
    v.add_argument("--answers", default=None, help="reference answers for a LLaVA question file (JSONL or JSON)")
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--suffix", default="", help="text appended to every question, e.g. "
                   "' Answer the question using a single word or phrase.'")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1 (got {args.batch_size})")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be >= 1 (got {args.limit})")
    try:
        from distill.eval.common import load_model_and_processor
        from distill.eval.compositional import markdown_table

        if args.task == "compositional":
            from distill.eval.compositional import evaluate_compositional, load_compositional

            samples = load_compositional(args.data, args.images, limit=args.limit)
            model, processor = load_model_and_processor(args.model, parse_dtype(args.dtype), args.device)
            results, per_sample = evaluate_compositional(model, processor, samples, batch_size=args.batch_size,
                                                         prompt=args.prompt, progress=not args.no_progress)
        else:
            from distill.eval.vqa import evaluate_vqa, load_vqa

            samples = load_vqa(args.data, args.images, answers=args.answers, limit=args.limit)
            model, processor = load_model_and_processor(args.model, parse_dtype(args.dtype), args.device)
            results, per_sample = evaluate_vqa(model, processor, samples, batch_size=args.batch_size,
                                               max_new_tokens=args.max_new_tokens, suffix=args.suffix,
                                               progress=not args.no_progress)
    except (EvalDataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    results = {"task": args.task, "model": str(args.model), "data": [str(d) for d in args.data], **results}
    table = markdown_table(results, "accuracy (%)" if args.task == "compositional" else "exact match (%)")
    print(table)
    write_results(args.out, args.task, results, table)
    if args.out is not None:
        with open(Path(args.out) / f"{args.task}_samples.jsonl", "w") as f:
            for row in per_sample:
                f.write(json.dumps(row) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
