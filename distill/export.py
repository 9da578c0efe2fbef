"""Export a student checkpoint as a Hugging Face folder of its family (LLaVA, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL).

``python -m distill.export --checkpoint DIR --out DIR [--dtype fp32|bf16|fp16]``
``python -m distill.export --stock --checkpoint DIR --out DIR (--fit-shards PATH... | --fit-images DIR)``

The fetched projector (frozen teacher projector ``V -> Ht -> Ht`` + trainable adapter
``Ht -> Hs``) is folded exactly (:func:`distill.models.projector.fold_projector_exact`) into one
projector ``linear_2(act(linear_1(x)))`` with ``linear_1: V -> Ht`` and ``linear_2: Ht -> Hs``.
Which folder comes out depends on the widths (teacher text hidden ``Ht``, student ``Hs``):

* ``Ht <= Hs``: **stock, exact**. The fold is zero-padded to transformers'
  ``LlavaMultiModalProjector`` (inner width ``Hs``); the folder loads with
  ``LlavaForConditionalGeneration`` / ``AutoModelForImageTextToText`` and needs nothing from
  this project. ``--stock`` changes nothing.
* ``Ht > Hs`` (every real pair), default: **custom, exact**. The projector keeps its true inner
  width ``Ht`` (``config.projector_intermediate_size``); the folder ships
  ``modeling_distill_llava.py`` (a copy of :mod:`distill.models.modeling_distill_llava`:
  ``LlavaForConditionalGeneration`` with that projector, importing only torch/transformers)
  registered in ``config.json``'s ``auto_map``, so
  ``AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)`` loads it (and
  :func:`distill.models.load_vlm` loads it with this package's copy, no remote code).
* ``Ht > Hs`` with ``--stock``: **stock, fitted** (approximate). A stock-shaped projector
  ``Linear(V,Hs) -> act -> Linear(Hs,Hs)`` is fitted to the exact one on vision features of
  images from training shards (``--fit-shards``) or an image folder (``--fit-images``)
  (:func:`distill.models.projector.fit_stock_projector`); the report gives the relative error
  of the projector outputs and the change in logits on held-out images.

Other families (the student's own transformers class, found from its config):

* Qwen2.5-VL / Qwen3-VL with the teacher's merger fetched: the adapter folds into the merger's
  last Linear (``hidden -> out_hidden_size``, whose width is not tied to the text width), so the
  export is **stock and exact** for any widths (Qwen3-VL: the deepstack mergers alike).
* LLaVA-OneVision: the projector has LLaVA's layout, so the paths above apply; ``Ht > Hs`` gives
  the exact custom folder (``DistillLlavaOnevisionForConditionalGeneration``, same model file,
  ``trust_remote_code=True``); ``--stock`` (the fit) is LLaVA-only and says so. ``image_newline``
  is a plain student parameter and is exported as is.
* InternVL (no fetch) and any student trained with ``adapter_fetch: false``: stock, exact.

Every export writes ``distill_export.json`` into the folder (which path, exactness, fit numbers),
and the CLI prints it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import torch

from distill.models.build import projector_home, load_student_checkpoint
from distill.models.loading import (
    ModelConfigError,
    as_torch_dtype,
    model_folder,
    has_wide_projector,
    is_student_checkpoint,
    load_processor,
    load_vlm_config,
    load_vlm,
)

EXPORT_INFO = "distill_export.json"
"""Report file written into every exported folder."""
REMOTE_CODE_FILE = "modeling_distill_llava.py"
REMOTE_CLASS = "DistillLlavaForConditionalGeneration"
AUTO_MAP = {"AutoModelForImageTextToText": f"{REMOTE_CODE_FILE[:-3]}.{REMOTE_CLASS}"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
FIT_PROMPT = "Describe the image."


def _stored_dtype(path: Path) -> torch.dtype:
    cfg = load_vlm_config(path, "checkpoint")
    d = getattr(cfg, "dtype", None) or getattr(cfg.text_config, "dtype", None)
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and isinstance(getattr(torch, d, None), torch.dtype):
        return getattr(torch, d)
    return torch.float32


def template_source() -> str:
    """Text of the model file shipped with custom exports (this package's own module)."""
    from distill.models import modeling_distill_llava

    return Path(modeling_distill_llava.__file__).read_text()


# ----------------------------------------------------------------------------- fit data


def _open_image(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def images_from_folder(folder: str | os.PathLike, limit: int) -> list:
    """Up to ``limit`` RGB images from ``folder`` (recursive, sorted by path)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ModelConfigError(f"export --fit-images: {str(root)!r} is not a folder.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    out = []
    for f in files:
        if len(out) >= limit:
            break
        try:
            out.append(_open_image(f.read_bytes()))
        except Exception:  # unreadable image: skip it, the fit only needs enough of them
            continue
    return out


def _shard_files(paths) -> list[Path]:
    files: list[Path] = []
    for p in map(lambda s: Path(s).expanduser(), paths):
        if p.is_dir():
            files += sorted(p.glob("*.tar"))
        elif p.is_file():
            files.append(p)
        else:
            raise ModelConfigError(f"export --fit-shards: {str(p)!r} is neither a shard (.tar) nor a folder of shards.")
    return files


def images_from_shards(paths, limit: int) -> list:
    """Up to ``limit`` RGB images from WebDataset shards (``data_prep`` layout: ``<key>.<ext>`` members)."""
    out = []
    for shard in _shard_files(paths):
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if len(out) >= limit:
                        return out
                    if not m.isfile() or Path(m.name).suffix.lower() not in IMAGE_EXTS:
                        continue
                    try:
                        out.append(_open_image(tar.extractfile(m).read()))
                    except Exception:
                        continue
        except (OSError, tarfile.TarError) as exc:
            raise ModelConfigError(f"export --fit-shards: cannot read {str(shard)!r} ({exc}).") from exc
    return out


def _split(n: int) -> tuple[list[int], list[int]]:
    """Image indices for fitting / held out (every 5th image held out; all of them when n < 5)."""
    val = [i for i in range(n) if i % 5 == 4]
    fit = [i for i in range(n) if i % 5 != 4]
    return (fit, val) if val else (list(range(n)), list(range(n)))


@torch.no_grad()
def vision_features(model, processor, images: list, device, batch: int = 8) -> list[torch.Tensor]:
    """Per image, the projector's input rows ``[P, V]`` (fp32, CPU), via a hook on the projector."""
    proj = projector_home(model).multi_modal_projector
    got: list[torch.Tensor] = []

    def hook(_m, inputs, _out):
        x = inputs[0].detach().float().cpu()
        got.extend(x.unbind(0) if x.dim() == 3 else [x])

    handle = proj.register_forward_hook(hook)
    dtype = next(model.parameters()).dtype
    try:
        for i in range(0, len(images), batch):
            pv = processor.image_processor(images[i:i + batch], return_tensors="pt")["pixel_values"]
            model.model.get_image_features(pixel_values=pv.to(device=device, dtype=dtype))
    finally:
        handle.remove()
    return [g.reshape(-1, g.shape[-1]) for g in got]


def _projector_tensors(proj) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in proj.state_dict().items()}


@torch.no_grad()
def compare_logits(model, exact_proj, fit_proj, processor, images: list, device, new_tokens: int = 8) -> dict:
    """Change in logits (fitted vs exact projector) on ``images`` with a fixed prompt.

    Over the text positions (image tokens excluded): max / mean absolute logit difference, the
    mean absolute logit, mean KL(exact || fitted), top-1 agreement; plus the share of images whose
    greedy ``new_tokens``-token answer is identical.
    """
    home = projector_home(model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FIT_PROMPT}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    image_id = int(model.config.image_token_id)
    pad = processor.tokenizer.pad_token_id
    stats = {"max_abs": 0.0, "sum_abs": 0.0, "sum_ref": 0.0, "kl": 0.0, "agree": 0, "n": 0, "same_answer": 0}
    for img in images:
        batch = processor(images=[img], text=[prompt], return_tensors="pt").to(device)
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        outs = {}
        for name, proj in (("exact", exact_proj), ("fit", fit_proj)):
            home.multi_modal_projector = proj
            logits = model(**batch).logits[0].float()
            gen = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            outs[name] = (logits, gen[0, batch["input_ids"].shape[1]:].tolist())
        keep = batch["input_ids"][0] != image_id
        a, b = outs["exact"][0][keep], outs["fit"][0][keep]
        diff = (a - b).abs()
        stats["max_abs"] = max(stats["max_abs"], float(diff.max()))
        stats["sum_abs"] += float(diff.mean(-1).sum())
        stats["sum_ref"] += float(a.abs().mean(-1).sum())
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        stats["kl"] += float((la.exp() * (la - lb)).sum(-1).sum())
        stats["agree"] += int((a.argmax(-1) == b.argmax(-1)).sum())
        stats["n"] += int(keep.sum())
        stats["same_answer"] += int(outs["exact"][1] == outs["fit"][1])
    home.multi_modal_projector = exact_proj
    n = max(stats["n"], 1)
    return {
        "images": len(images),
        "positions": stats["n"],
        "max_abs_diff": stats["max_abs"],
        "mean_abs_diff": stats["sum_abs"] / n,
        "mean_abs_logit": stats["sum_ref"] / n,
        "mean_kl": stats["kl"] / n,
        "top1_agreement": stats["agree"] / n,
        "greedy_answer_match": stats["same_answer"] / max(len(images), 1),
    }


def _fit_stock(model, processor, images: list, device, steps: int, lr: float, seed: int) -> dict:
    """Replace the wide (exact) projector of ``model`` by a fitted stock one; returns the report."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from distill.models.projector import fit_stock_projector

    if len(images) < 2:
        raise ModelConfigError(
            f"export --stock: the fit needs images; found {len(images)} in --fit-shards/--fit-images. Point "
            "it to training shards (data_prep output) or a folder of images."
        )
    cfg = model.config
    home = projector_home(model)
    exact_proj = home.multi_modal_projector
    exact = _projector_tensors(exact_proj)
    feats = vision_features(model, processor, images, device)
    fit_idx, val_idx = _split(len(feats))
    x_fit = torch.cat([feats[i] for i in fit_idx]).to(device)
    x_val = torch.cat([feats[i] for i in val_idx]).to(device)
    fitted, report = fit_stock_projector(exact, cfg.projector_hidden_act, x_fit, x_val, steps=steps, lr=lr, seed=seed)
    del cfg.projector_intermediate_size
    stock = LlavaMultiModalProjector(cfg).to(device=device, dtype=next(model.parameters()).dtype)
    stock.load_state_dict({k: v.to(stock.linear_1.weight.dtype) for k, v in fitted.items()})
    stock.eval()
    report["fit_images"] = len(fit_idx)
    report["val_images"] = len(val_idx) if val_idx != fit_idx else 0
    report["logits_val"] = compare_logits(model, exact_proj, stock, processor, [images[i] for i in val_idx[:16]], device)
    home.multi_modal_projector = stock
    return report


# ----------------------------------------------------------------------------- export


def export_student(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype=None,
    stock: bool = False,
    fit_shards=None,
    fit_images: str | os.PathLike | None = None,
    fit_max_images: int = 256,
    fit_steps: int = 300,
    fit_lr: float = 1e-2,
    fit_seed: int = 0,
    device: str | None = None,
) -> Path:
    """Write a HF LLaVA folder (config, safetensors, generation config, processor files, report).

    Args:
        checkpoint_dir: a folder from ``save_student_checkpoint`` (or a HF LLaVA folder, which is
            re-saved, e.g. to change dtype; a custom export can be re-exported ``stock``).
        out_dir: output folder (created; must differ from ``checkpoint_dir``).
        dtype: output dtype (``torch.dtype`` or "fp32"/"bf16"/"fp16"); default: the checkpoint's.
        stock: always write a plain ``LlavaForConditionalGeneration`` folder; when the fold has no
            stock form (``Ht > Hs``) fit one on images from ``fit_shards`` (shard files / folders
            of ``*.tar``) or ``fit_images`` (a folder), at most ``fit_max_images`` of them
            (every 5th held out for the report), ``fit_steps`` Adam steps at relative ``fit_lr``.
        device: where the fit runs (default: CUDA when available, else CPU).

    The fold is computed in fp32 and cast to ``dtype`` once. ``out/distill_export.json`` records
    ``export`` ("stock" | "custom" | "stock-fit"), ``exact`` and, for a fit, its numbers.
    Returns ``Path(out_dir)``.
    """
    src = model_folder(checkpoint_dir, "checkpoint")
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise ModelConfigError(f"export: --out {str(out)!r} is the checkpoint folder itself; choose a new folder.")
    if is_student_checkpoint(out):
        raise ModelConfigError(f"export: {str(out)!r} holds a student checkpoint; refusing to overwrite it. Choose a new folder.")
    target = as_torch_dtype(dtype) if dtype is not None else _stored_dtype(src)
    processor = load_processor(src, "checkpoint")
    if is_student_checkpoint(src):
        model = load_student_checkpoint(src, dtype=torch.float32, adapter_fetch=False)
    else:
        model = load_vlm(src, dtype=torch.float32, role="checkpoint")
    model.eval()
    cfg = model.config
    wide = has_wide_projector(cfg)
    hs = int(cfg.get_text_config().hidden_size)
    info: dict = {"source": str(src), "family": cfg.model_type, "student_hidden": hs, "dtype": str(target).replace("torch.", "")}
    if wide:
        info["teacher_hidden"] = int(cfg.projector_intermediate_size)
    if wide and stock and cfg.model_type != "llava":
        raise ModelConfigError(
            f"export --stock: the fitted stock projector is implemented for LLaVA only; this {cfg.model_type} student's "
            f"fetched projector is {cfg.projector_intermediate_size} wide inside, more than the family's stock projector "
            f"({hs}). Export without --stock: exact, with a small custom model file (load with trust_remote_code=True), "
            "or train with `model.adapter_fetch: false` (or a student at least as wide as the teacher) for a stock folder."
        )
    if wide and stock:
        if not fit_shards and fit_images is None:
            raise ModelConfigError(
                f"export --stock: the teacher projector is {cfg.projector_intermediate_size} wide inside but a stock "
                f"LLaVA projector of this student is {hs} wide, so it has to be fitted on vision features: pass "
                "--fit-shards (training shards) or --fit-images (a folder of images). Without --stock the "
                "export is exact (custom projector, trust_remote_code=True)."
            )
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(dev)
        imgs = images_from_shards(fit_shards, fit_max_images) if fit_shards else []
        if fit_images is not None:
            imgs += images_from_folder(fit_images, fit_max_images - len(imgs))
        info.update(export="stock-fit", exact=False, fit=_fit_stock(model, processor, imgs, dev, fit_steps, fit_lr, fit_seed))
        model.to("cpu")
        wide = False
    elif wide:
        info.update(export="custom", exact=True, trust_remote_code=True, remote_code=REMOTE_CODE_FILE)
    else:
        info.update(export="stock", exact=True)
    for key in ("auto_map", "projector_intermediate_size") if not wide else ():
        if hasattr(cfg, key):
            delattr(cfg, key)
    family = cfg.model_type
    from distill.models.modeling_distill_llava import WIDE_CLASSES

    remote_class = WIDE_CLASSES[family].__name__ if family in WIDE_CLASSES else REMOTE_CLASS
    stock_class = type(model).__name__ if not type(model).__name__.startswith("Distill") else (
        WIDE_CLASSES[family].__mro__[1].__name__)
    if wide:
        cfg.auto_map = {"AutoModelForImageTextToText": f"{REMOTE_CODE_FILE[:-3]}.{remote_class}"}
    model = model.to(target)
    out.mkdir(parents=True, exist_ok=True)
    # A custom class gets none of transformers' LLaVA key renames on load, so a custom export is
    # saved in the model's native key layout (which stock classes read as well).
    model.save_pretrained(out, save_original_format=not wide)
    processor.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    raw["architectures"] = [remote_class if wide else stock_class]
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    code = out / REMOTE_CODE_FILE
    if wide:
        code.write_text(template_source())
    elif code.exists():
        code.unlink()
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def describe(info: dict) -> str:
    """One line saying which export path a folder took (for the CLI and the demo report)."""
    kind = info.get("export")
    if kind == "custom":
        return (f"exact export with a custom projector (inner width {info.get('teacher_hidden')} > student hidden "
                f"{info.get('student_hidden')}): load with trust_remote_code=True")
    if kind == "stock-fit":
        fit = info.get("fit", {})
        lg = fit.get("logits_val", {})
        return (f"stock export with a fitted projector: held-out relative projector error {fit.get('rel_error_val', float('nan')):.4f}, "
                f"logits max |diff| {lg.get('max_abs_diff', float('nan')):.4f}, top-1 agreement {lg.get('top1_agreement', float('nan')):.4f}")
    fam = info.get("family", "llava")
    return ("stock export, exact (plain LlavaForConditionalGeneration)" if fam == "llava"
            else f"stock export, exact (the {fam} family's own transformers class)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill.export",
        description="Fold the teacher-adapter projector of a student checkpoint and write a Hugging Face LLaVA "
        "folder. Exact always: stock when the teacher is not wider than the student, else with a small "
        "custom model file (trust_remote_code=True). --stock: plain LlavaForConditionalGeneration for any "
        "widths (a fitted projector when the teacher is wider).",
    )
    parser.add_argument("--checkpoint", required=True, help="student checkpoint folder (save_student_checkpoint)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="output dtype (default: the checkpoint's)")
    parser.add_argument("--stock", action="store_true", help="plain LlavaForConditionalGeneration folder (no custom code) "
                        "for any widths; fits the projector when the teacher is wider than the student")
    parser.add_argument("--fit-shards", nargs="+", default=None, metavar="PATH",
                        help="--stock fit data: training shards (.tar files or folders of them)")
    parser.add_argument("--fit-images", default=None, metavar="DIR", help="--stock fit data: a folder of images")
    parser.add_argument("--fit-max-images", type=int, default=256, help="images used by the fit (every 5th held out)")
    parser.add_argument("--fit-steps", type=int, default=300, help="Adam steps after the least-squares init")
    parser.add_argument("--fit-lr", type=float, default=1e-2, help="Adam learning rate, relative to each tensor's RMS")
    parser.add_argument("--max-fit-error", type=float, default=None,
                        help="fail (exit 3) when the held-out relative projector error is above this")
    parser.add_argument("--device", default=None, help="device for the fit (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        out = export_student(args.checkpoint, args.out, dtype=args.dtype, stock=args.stock, fit_shards=args.fit_shards,
                             fit_images=args.fit_images, fit_max_images=args.fit_max_images, fit_steps=args.fit_steps,
                             fit_lr=args.fit_lr, device=args.device)
    except ModelConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = json.loads((out / EXPORT_INFO).read_text())
    print(f"exported {args.checkpoint} -> {out}: {describe(info)}")
    if info.get("fit"):
        print(json.dumps(info["fit"], indent=2, sort_keys=True))
        if args.max_fit_error is not None and info["fit"]["rel_error_val"] > args.max_fit_error:
            print(f"error: fit error {info['fit']['rel_error_val']:.4f} > --max-fit-error {args.max_fit_error}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
