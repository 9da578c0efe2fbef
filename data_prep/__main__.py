"""``python -m data_prep {llava,synth,verify}`` — see ``data_prep/FORMAT.md``."""

from __future__ import annotations

import argparse
import sys


def _llava(args: argparse.Namespace) -> int:
    from .jsonstream import JSONStreamError
    from .shards import PrepError, prepare_llava

    try:
        result = prepare_llava(args.json, args.images, args.out, shard_size=args.shard_size,
                               workers=args.workers, progress=not args.quiet)
    except (PrepError, JSONStreamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable --json, unwritable --out, disk full, ...
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.strict and result.num_rejects:
        print(f"error: --strict and {result.num_rejects} record(s) were rejected", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_dir

    problems, counts = verify_dir(args.dir)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.dir}:")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"OK: {counts['shards']} shards, {counts['samples']} samples, {counts['bytes']} bytes in {args.dir}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .shards import PrepError
    from .synth import make_synthetic

    sizes = None
    if args.sizes is not None:
        if args.size is not None:
            print("error: give --size or --sizes, not both", file=sys.stderr)
            return 2
        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError:
            print(f"error: --sizes must be comma-separated integers, got {args.sizes!r}", file=sys.stderr)
            return 2
    try:
        results = make_synthetic(args.out, num=args.num, seed=args.seed, num_test=args.num_test,
                                 size=96 if args.size is None else args.size, shard_size=args.shard_size,
                                 workers=args.workers, progress=not args.quiet, sizes=sizes,
                                 cell_words=args.cell_words, all_relations=args.all_relations,
                                 choice_questions=args.choice_questions)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, result in results.items():
        print(f"[{split}] {result.summary()}")
    bad = sum(r.num_rejects for r in results.values())
    if bad:  # our own generator must never produce a bad record
        print(f"error: {bad} synthetic records were rejected", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description="Dataset preparation: LLaVA JSON -> WebDataset shards.")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("llava", help="convert LLaVA JSON + images into WebDataset shards + manifest.json")
    q.add_argument("--json", required=True, help="LLaVA JSON array (or JSON Lines) of {id, image, conversations}; UTF-8/16/32, "
                   "optionally gzip/bzip2/xz-compressed")
    q.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    q.add_argument("--out", required=True, help="output folder (rerun with the same arguments to resume)")
    q.add_argument("--shard-size", type=int, default=1000, help="input records per shard (default 1000)")
    q.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    q.add_argument("--strict", action="store_true", help="exit 1 if any record is rejected")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(fn=_llava)

    v = sub.add_parser("verify", help="re-read every shard and check it against manifest.json")
    v.add_argument("dir")
    v.set_defaults(fn=_verify)

    s = sub.add_parser("synth", help="render the synthetic compositional dataset (caption/instruct/compositional)")
    s.add_argument("--out", required=True)
    s.add_argument("--num", type=int, required=True, help="scenes in each of the caption and instruct splits")
    s.add_argument("--num-test", type=int, default=None, help="compositional test scenes (default max(1, num // 4))")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=None, help="rendered image side in pixels (default 96)")
    s.add_argument("--sizes", default=None, metavar="N,N,...",
                   help="comma-separated image sides (e.g. 56,84,112): each image's side is drawn from the list "
                        "(seeded, per image), so visual-token counts differ inside a batch; replaces --size")
    s.add_argument("--cell-words", action="store_true",
                   help="name each shape's grid cell (\"in the top left\") in the caption listings and in "
                        "\"Where is\" Q/A")
    s.add_argument("--all-relations", action="store_true",
                   help="captions state one true relation for every ordered pair of shapes, a sentence each")
    s.add_argument("--choice-questions", action="store_true",
                   help="instruct gains two-option caption questions (\"Which caption describes the image? A. ... "
                        "B. ...\" -> A or B), the form of distill.eval compositional --protocol ab")
    s.add_argument("--shard-size", type=int, default=1000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_synth)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
