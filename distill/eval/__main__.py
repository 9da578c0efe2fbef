"""``python -m distill.eval {compositional,vqa,attn_similarity}``: evaluate a LLaVA-style model folder.

Results are printed as a markdown table and, with ``--out DIR``, written to
``DIR/<stem>.json`` (accuracies), ``DIR/<stem>.md`` (the table) and ``DIR/<stem>_samples.jsonl``
(per-sample scores or answers); the stem is the task (``compositional``, ``vqa``), and
``compositional_ab`` for ``compositional --protocol ab``, so both protocols can share one folder.

Compositional protocols (``--protocol``):
  likelihood (default)  rank the captions by mean token log-likelihood given the image
  ab                    the reference's protocol: an A/B question asked twice with the two
                        captions' order swapped, scored by the letters' next-token
                        log-probabilities; a tie counts 0.5 for that ordering (distill/eval/ab.py)

attn_similarity: student vs teacher visual attention on the compositional images (caption prompt),
per matched layer the cosine of the loss's (filtered) column profiles, written to
``DIR/attn_similarity.json`` / ``.md`` / ``_samples.jsonl`` (distill/eval/attn_similarity.py).
"""

from __future__ import annotations

import argparse
import sys

from distill.eval.ab import DEFAULT_AB_PROMPT
from distill.eval.common import DEFAULT_CAPTION_PROMPT, EvalDataError, parse_dtype, write_results


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF LLaVA folder (stock or exported student)")
    p.add_argument("--data", required=True, nargs="+", help="data files, folders, globs or {a..b} shard ranges")
    p.add_argument("--images", "--image-root", dest="images", default=None,
                   help="image root (default: the data file's folder)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--out", default=None, help="folder for <stem>.json, <stem>.md, <stem>_samples.jsonl "
                   "(stem: the task; compositional_ab for --protocol ab)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distill.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    c = sub.add_parser("compositional", help="caption ranking: positive vs hard negatives (SugarCrepe / synthetic)")
    _common(c)
    c.add_argument("--protocol", choices=("likelihood", "ab"), default="likelihood",
                   help="likelihood: caption ranking by mean token log-likelihood (default); "
                        "ab: A/B question asked twice, order swapped (the reference's protocol)")
    c.add_argument("--prompt", default=None,
                   help=f"user-turn text; likelihood: the instruction (default {DEFAULT_CAPTION_PROMPT!r}); "
                        f"ab: a template holding {{A}} and {{B}} once each (default {DEFAULT_AB_PROMPT!r})")
    v = sub.add_parser("vqa", help="greedy answers, normalised exact match")
    _common(v)
    v.add_argument("--answers", default=None, help="reference answers for a LLaVA question file (JSONL or JSON)")
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--suffix", default="", help="text appended to every question, e.g. "
                   "' Answer the question using a single word or phrase.'")
    a = sub.add_parser("attn_similarity", help="student vs teacher visual-attention cosine per matched layer")
    a.add_argument("--teacher", required=True, help="teacher HF LLaVA folder")
    a.add_argument("--student", required=True, help="student HF LLaVA folder (stock, exported or checkpoint)")
    a.add_argument("--data", required=True, nargs="+", help="compositional data files, folders, globs or shards")
    a.add_argument("--images", "--image-root", dest="images", default=None,
                   help="image root (default: the data file's folder)")
    a.add_argument("--limit", type=int, default=None, help="use only the first N images")
    a.add_argument("--out", default=None, help="folder for attn_similarity.json, .md, _samples.jsonl")
    a.add_argument("--student-layers", type=int, nargs="+", default=None,
                   help="student layers (default: distill.losses.match_layers)")
    a.add_argument("--window", type=int, default=None, help="teacher window size per student layer")
    a.add_argument("--kind", choices=("filtered_cosine", "cosine"), default="filtered_cosine",
                   help="filtered_cosine: the CompoDistill loss's filtered profiles (default); cosine: unfiltered")
    a.add_argument("--prompt", default=None, help=f"user-turn text (default {DEFAULT_CAPTION_PROMPT!r})")
    a.add_argument("--backend", default="auto", help="attention backend for the capture (distill.attention)")
    a.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    a.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return ap


def _attn_similarity(args) -> tuple[dict, list[dict]]:
    from distill.eval.attn_similarity import evaluate_attn_similarity
    from distill.eval.common import load_model_and_processor
    from distill.eval.compositional import load_compositional

    samples = load_compositional(args.data, args.images, limit=args.limit)
    dtype = parse_dtype(args.dtype)
    teacher, t_proc = load_model_and_processor(args.teacher, dtype, args.device)
    student, s_proc = load_model_and_processor(args.student, dtype, args.device)
    return evaluate_attn_similarity(teacher, student, t_proc, s_proc, samples, prompt=args.prompt,
                                    student_layers=args.student_layers, window=args.window, kind=args.kind,
                                    backend=args.backend, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be >= 1 (got {args.limit})")
    if args.task != "attn_similarity" and args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1 (got {args.batch_size})")
    try:
        from distill.eval.common import load_model_and_processor

        if args.task == "attn_similarity":
            results, per_sample = _attn_similarity(args)
        elif args.task == "compositional":
            from distill.eval.ab import check_ab_prompt, evaluate_compositional_ab
            from distill.eval.compositional import evaluate_compositional, load_compositional

            ab = args.protocol == "ab"
            prompt = args.prompt if args.prompt is not None else (DEFAULT_AB_PROMPT if ab else DEFAULT_CAPTION_PROMPT)
            if ab:
                check_ab_prompt(prompt)
            samples = load_compositional(args.data, args.images, limit=args.limit)
            model, processor = load_model_and_processor(args.model, parse_dtype(args.dtype), args.device)
            evaluate = evaluate_compositional_ab if ab else evaluate_compositional
            results, per_sample = evaluate(model, processor, samples, batch_size=args.batch_size,
                                           prompt=prompt, progress=not args.no_progress)
            results = {"protocol": args.protocol, "prompt": prompt, **results,
                       "evaluated": len(samples), "skipped_missing_images": len(getattr(samples, "skipped", ()))}
        else:
            from distill.eval.vqa import evaluate_vqa, load_vqa

            samples = load_vqa(args.data, args.images, answers=args.answers, limit=args.limit)
            model, processor = load_model_and_processor(args.model, parse_dtype(args.dtype), args.device)
            results, per_sample = evaluate_vqa(model, processor, samples, batch_size=args.batch_size,
                                               max_new_tokens=args.max_new_tokens, suffix=args.suffix,
                                               progress=not args.no_progress)
    except (EvalDataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    data = [str(d) for d in args.data]
    if args.task == "attn_similarity":
        from distill.eval.attn_similarity import markdown_table as similarity_table

        results = {"task": args.task, "teacher": str(args.teacher), "student": str(args.student), "data": data,
                   **results}
        stem, table = "attn_similarity", similarity_table(results)
    else:
        from distill.eval.compositional import markdown_table

        results = {"task": args.task, "model": str(args.model), "data": data, **results}
        if args.task == "compositional":
            title = "A/B accuracy (%)" if args.protocol == "ab" else "accuracy (%)"
            stem = "compositional_ab" if args.protocol == "ab" else "compositional"
        else:
            title, stem = "exact match (%)", "vqa"
        table = markdown_table(results, title)
    print(table)
    write_results(args.out, stem, results, table, per_sample)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
