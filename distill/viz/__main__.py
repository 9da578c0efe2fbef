"""``python -m distill.viz {attention,curves}``.

attention: teacher and student visual attention of the matched layers (``distill.losses.match_layers``
defaults, or ``--layers`` student layers) as heat maps over the image patch grid, next to the image.
curves: every numeric key of a metrics JSONL file over ``step``, one panel each.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m distill.viz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attention", help="teacher vs student visual-attention heat maps")
    a.add_argument("--teacher", required=True, help="teacher HF LLaVA folder")
    a.add_argument("--student", required=True, help="student HF LLaVA folder (stock, exported or checkpoint)")
    a.add_argument("--image", required=True)
    a.add_argument("--prompt", required=True, help="user text that follows the image")
    a.add_argument("--out", required=True, help="output PNG")
    a.add_argument("--layers", type=int, nargs="+", default=None, help="student layers (default: match_layers)")
    a.add_argument("--window", type=int, default=None, help="teacher window size per student layer")
    a.add_argument("--visible-rows", action="store_true",
                   help="average each image token's column over the query rows that can see it (no causal bias)")
    a.add_argument("--backend", default="auto", help="attention backend for the capture (distill.attention)")
    a.add_argument("--dtype", default="float32")
    a.add_argument("--device", default=None)
    c = sub.add_parser("curves", help="loss curves from a metrics JSONL")
    c.add_argument("metrics", help="JSONL with a 'step' key per line")
    c.add_argument("--out", required=True, help="output PNG")
    c.add_argument("--keys", nargs="+", default=None, help="metrics to plot (default: every numeric key)")
    c.add_argument("--x", default="step", help="x-axis key")
    return ap


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    from distill.eval.common import EvalDataError

    try:
        if args.cmd == "curves":
            from distill.viz.curves import plot_curves

            out = plot_curves(args.metrics, args.out, keys=args.keys, x=args.x)
        else:
            from distill.eval.common import ImageRef, load_model_and_processor, parse_dtype
            from distill.viz.attention_maps import attention_figure

            image = ImageRef(path=args.image, name=args.image).load()
            dtype = parse_dtype(args.dtype)
            teacher, t_proc = load_model_and_processor(args.teacher, dtype, args.device)
            student, s_proc = load_model_and_processor(args.student, dtype, args.device)
            out = attention_figure(teacher, student, t_proc, s_proc, image, args.prompt, args.out,
                                   student_layers=args.layers, window=args.window, backend=args.backend,
                                   visible_rows=args.visible_rows)
    except (EvalDataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
