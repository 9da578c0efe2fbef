"""Shared helpers of the evaluation tools: errors, images, data files and shards, models, prompts, output.

Nothing here knows about a particular benchmark; `compositional.py` and `vqa.py` build on it.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from data_prep.images import to_rgb
from data_prep.shards import IMAGE_EXTS, MANIFEST, REJECTS

DEFAULT_CAPTION_PROMPT = "Describe the image."


class EvalDataError(ValueError):
    """Bad evaluation input (missing file, malformed record, unknown layout); the message names
    the file, the record and the fix."""


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """Where the image of a record comes from: a file path, or encoded bytes (from a shard)."""

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    name: str = ""  # for error messages

    def load(self):
        """Open as an RGB PIL image; raises `EvalDataError` naming the file when it cannot."""
        from PIL import Image, UnidentifiedImageError
        import io

        try:
            if self.data is not None:
                img = Image.open(io.BytesIO(self.data))
            elif self.path is not None:
                img = Image.open(self.path)
            else:
                raise EvalDataError(f"record {self.name!r} has no image")
            return to_rgb(img)  # high-bit-depth images scaled, not clipped
        except FileNotFoundError:
            raise EvalDataError(
                f"image file {self.path!r} (record {self.name!r}) does not exist; pass the folder "
                "that holds the images with --images ROOT"
            ) from None
        except (UnidentifiedImageError, OSError) as e:
            raise EvalDataError(f"cannot read image of record {self.name!r} ({self.path or 'shard bytes'}): {e}") from None


def resolve_image(name: str, image_root: str | os.PathLike | None, data_dir: str | os.PathLike | None,
                  record: str = "") -> ImageRef:
    """Resolve an image reference of a record to a file.

    Order: an absolute path as is; else relative to `image_root` when given; else relative to the
    folder of the data file (`data_dir`), or to its ``images/`` subfolder when the file is there
    (the layout of ``python -m data_prep synth``). The file is not opened here (that happens per batch).
    """
    if not isinstance(name, str) or not name:
        raise EvalDataError(f"record {record!r} has no image file name (got {name!r})")
    p = Path(name)
    if not p.is_absolute():
        if image_root is not None:
            p = Path(image_root) / p
        else:
            base = Path(data_dir) if data_dir is not None else Path(".")
            p = base / p if (base / p).exists() or not (base / "images" / p).exists() else base / "images" / p
    return ImageRef(path=str(p), name=record)


# ----------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------
def expand_paths(data: Sequence[str]) -> list[Path]:
    """Files named by `data`: files, globs, `{a..b}` ranges, folders (their *.tar shards, else their
    *.json / *.jsonl files)."""
    from braceexpand import braceexpand

    out: list[Path] = []
    for d in data:
        for item in braceexpand(str(d)):
            p = Path(item)
            if p.is_dir():
                found = sorted(f for f in p.iterdir() if f.suffix == ".tar")
                if not found:  # no shards: the JSON files (not the shard bookkeeping files)
                    found = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl")
                                   and f.name not in (MANIFEST, REJECTS))
                if not found:
                    raise EvalDataError(f"folder {str(p)!r} holds no .json, .jsonl or .tar files")
                out.extend(found)
            elif p.is_file():
                out.append(p)
            elif any(ch in item for ch in "*?["):
                hits = sorted(Path(h) for h in glob.glob(item))
                if not hits:
                    raise EvalDataError(f"pattern {item!r} matches no file")
                out.extend(hits)
            else:
                raise EvalDataError(f"data path {item!r} does not exist")
    return out


def iter_shard(path: Path) -> Iterator[tuple[str, Any, ImageRef | None]]:
    """(key, record, image or None) per sample of a WebDataset shard (members grouped by key)."""
    groups: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(m.name), key)
                if key not in groups:
                    order.append(key)
                groups[key][ext.lower()] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise EvalDataError(f"{path}: not a readable tar shard ({e})") from None
    for key in order:
        members = groups[key]
        if "json" not in members:
            raise EvalDataError(f"{path}: sample {key!r} has no .json member")
        try:
            rec = json.loads(members["json"])
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: sample {key!r}: .json member is not valid JSON ({e.msg})") from None
        img = next((members[e] for e in IMAGE_EXTS if e in members), None)
        name = str(rec.get("id", key)) if isinstance(rec, dict) else key
        yield key, rec, ImageRef(data=img, name=name) if img is not None else None


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise EvalDataError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model_and_processor(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """Load a model folder (via `distill.models`) for inference: eval mode, on `device`.

    Accepts a stock HF LLaVA folder (teacher, exported student) and a student checkpoint in
    training form (``save_student_checkpoint``; its fetched projector is folded on load).
    """
    from distill.models import is_student_checkpoint, load_processor, load_student_checkpoint, load_vlm

    if is_student_checkpoint(path):
        model = load_student_checkpoint(path, dtype=dtype, adapter_fetch=False)
    else:
        model = load_vlm(path, dtype=dtype)
    model.eval()
    model.to(torch.device(device) if device is not None else default_device())
    return model, load_processor(path)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def image_token_id(model) -> int:
    """The id of the image placeholder token, from the model config (never a hard-coded value)."""
    from distill.models import ModelConfigError, image_token_id as config_image_token_id

    try:
        return config_image_token_id(model.config)
    except ModelConfigError as e:
        raise EvalDataError(str(e)) from e


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------
IMAGE_PLACEHOLDER = "<image>"  # as written in LLaVA JSON


def user_turn(text: str, with_image: bool = True) -> dict:
    """One user message in the processor's structured chat format, LLaVA-JSON style.

    The image goes where `text` holds the ``<image>`` placeholder (as the training data renders
    LLaVA records); without a placeholder it goes first, followed by a newline (``"<image>\n" + text``,
    the LLaVA convention). Text-only messages must not hold a placeholder.
    """
    count = text.count(IMAGE_PLACEHOLDER)
    if not with_image:
        if count:
            raise EvalDataError(f"text-only prompt {text!r} holds an {IMAGE_PLACEHOLDER} placeholder")
        return {"role": "user", "content": [{"type": "text", "text": text}]}
    if count > 1:
        raise EvalDataError(f"prompt {text!r} holds {count} {IMAGE_PLACEHOLDER} placeholders; one image per prompt")
    if count == 0:
        text = IMAGE_PLACEHOLDER + "\n" + text
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return {"role": "user", "content": content}


def render_chat(processor, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render messages with the processor's chat template; a clear error when it has none."""
    tmpl = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if not tmpl:
        raise EvalDataError("the processor has no chat template; save one with the model (chat_template.jinja)")
    return processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def write_results(out_dir: str | os.PathLike | None, stem: str, results: dict, table: str,
                  per_sample: Sequence[dict] | None = None) -> None:
    """Write `<stem>.json`, `<stem>.md` and, given `per_sample`, `<stem>_samples.jsonl` (one row a line)
    under `out_dir` (created) when given."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
    if per_sample is not None:
        with open(out / f"{stem}_samples.jsonl", "w") as f:
            for row in per_sample:
                f.write(json.dumps(row) + "\n")


def read_json_or_jsonl(path: str | os.PathLike) -> Any:
    """A `.jsonl` file as a list of objects, anything else as one JSON document; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"data file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
