"""Export a student checkpoint as a stock Hugging Face LLaVA folder.

``python -m distill.export --checkpoint DIR --out DIR [--dtype fp32|bf16|fp16]``

The fetched projector (frozen teacher projector + trainable adapter) is folded into one
``LlavaMultiModalProjector`` (see :func:`distill.models.fold_projector`), so the result loads with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` and
needs nothing from this project. Folding requires the student's text hidden size to be at
least the teacher's; otherwise a clear error explains the options.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from distill.models.build import load_student_checkpoint
from distill.models.loading import (
    ModelConfigError,
    _dtype,
    _folder,
    is_student_checkpoint,
    load_llava_config,
    load_processor,
    load_vlm,
)


def _stored_dtype(path: Path) -> torch.dtype:
    cfg = load_llava_config(path, "checkpoint")
    d = getattr(cfg, "dtype", None) or getattr(cfg.text_config, "dtype", None)
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype):
        return getattr(torch, d)
    return torch.float32


def export_student(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype=None) -> Path:
    """Write a stock HF LLaVA folder (config, safetensors, generation config, processor files).

    Args:
        checkpoint_dir: a folder from ``save_student_checkpoint`` (or a stock LLaVA folder, which
            is simply re-saved, e.g. to change dtype).
        out_dir: output folder (created; must differ from ``checkpoint_dir``).
        dtype: output dtype (``torch.dtype`` or "fp32"/"bf16"/"fp16"); default: the checkpoint's.

    The fold is computed in fp32 and cast to ``dtype`` once. Returns ``Path(out_dir)``.
    """
    src = _folder(checkpoint_dir, "checkpoint")
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise ModelConfigError(f"export: --out {str(out)!r} is the checkpoint folder itself; choose a new folder.")
    if is_student_checkpoint(out):
        raise ModelConfigError(f"export: {str(out)!r} holds a student checkpoint; refusing to overwrite it. Choose a new folder.")
    target = _dtype(dtype) if dtype is not None else _stored_dtype(src)
    processor = load_processor(src, "checkpoint")
    if is_student_checkpoint(src):
        model = load_student_checkpoint(src, dtype=torch.float32, adapter_fetch=False)
    else:
        model = load_vlm(src, dtype=torch.float32, role="checkpoint")
    model = model.to(target).eval()
    model.config.architectures = ["LlavaForConditionalGeneration"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill.export",
        description="Fold the teacher-adapter projector of a student checkpoint and write a stock "
        "Hugging Face LLaVA folder (loads with LlavaForConditionalGeneration / AutoProcessor).",
    )
    parser.add_argument("--checkpoint", required=True, help="student checkpoint folder (save_student_checkpoint)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="output dtype (default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        out = export_student(args.checkpoint, args.out, dtype=args.dtype)
    except ModelConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
