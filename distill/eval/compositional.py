"""Compositional caption ranking (SugarCrepe-style): does the model prefer the true caption?

This module is the ``likelihood`` protocol (the default of ``python -m distill.eval compositional``)
and the readers; the reference's A/B question protocol (``--protocol ab``) is `distill.eval.ab`.

Every caption of a sample (the positive and each hard negative) is scored by the model's mean token
log-likelihood given the image (`distill.eval.scoring.score_captions`). Accounting:

- overall: a sample is a hit when the positive scores strictly higher than every negative
  (a tie is a miss);
- per category: a sample counts once for each category among its negatives, and is a hit there when
  the positive strictly beats every negative of that category.

With one negative per sample (SugarCrepe) both reduce to the usual pairwise accuracy.

Input layouts (`load_compositional`):

- SugarCrepe: one JSON file per category (``swap_att.json`` ...), a dict keyed by id whose values
  hold ``filename`` (image, relative to ``--images``), ``caption`` (positive) and ``negative_caption``;
  the category is the file name without ``.json``. Pass files or the folder holding them (the
  released layout: ``add_att.json``, ``add_obj.json``, ``replace_att.json``, ``replace_obj.json``,
  ``replace_rel.json``, ``swap_att.json``, ``swap_obj.json``, images from COCO val2017 under
  ``--images`` / ``--image-root``). Records whose image file is missing are skipped, counted and
  logged (`load_compositional`).
- our synthetic split (``python -m data_prep synth``): records
  ``{"id", "image", "positive", "negatives": [{"caption", "category"}, ...]}`` as a JSON list,
  JSONL, or WebDataset shards (``<key>.json`` record + ``<key>.<ext>`` image bytes per sample);
  image paths are relative to ``--images`` when given, else to the data file's folder (or its
  ``images/`` subfolder, the ``data_prep synth`` layout).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from distill.eval.common import (
    DEFAULT_CAPTION_PROMPT,
    EvalDataError,
    ImageRef,
    expand_paths,
    iter_shard,
    read_json_or_jsonl,
    resolve_image,
)

log = logging.getLogger(__name__)


@dataclass
class CompoSample:
    """One image with its positive caption and hard negatives (each with a category)."""

    id: str
    image: ImageRef
    positive: str
    negatives: list[tuple[str, str]] = field(default_factory=list)  # (caption, category)

    @property
    def captions(self) -> list[str]:
        """Positive first, then the negatives in order."""
        return [self.positive] + [c for c, _ in self.negatives]


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
def _need_str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise EvalDataError(f"{where}: field {key!r} must be a non-empty string (got {v!r})")
    return v


def load_sugarcrepe(paths: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None) -> list[CompoSample]:
    """Read SugarCrepe files (dict id -> {filename, caption, negative_caption}); category = file stem."""
    samples = []
    for path in paths:
        path = Path(path)
        data = read_json_or_jsonl(path)
        if not isinstance(data, dict):
            raise EvalDataError(f"{path}: a SugarCrepe file is a JSON object keyed by id, got {type(data).__name__}")
        cat = path.stem
        for key, rec in data.items():
            where = f"{path} [{key}]"
            if not isinstance(rec, dict):
                raise EvalDataError(f"{where}: expected an object with filename/caption/negative_caption")
            samples.append(CompoSample(
                id=f"{cat}/{key}",
                image=resolve_image(_need_str(rec, "filename", where), image_root, path.parent, f"{cat}/{key}"),
                positive=_need_str(rec, "caption", where),
                negatives=[(_need_str(rec, "negative_caption", where), cat)],
            ))
    return samples


def _synthetic_sample(rec, where: str, image: ImageRef | None, image_root, data_dir) -> CompoSample:
    if not isinstance(rec, dict):
        raise EvalDataError(f"{where}: expected an object {{id, image, positive, negatives}}")
    rid = str(rec.get("id", where))
    negs = rec.get("negatives")
    if not isinstance(negs, list) or not negs:
        raise EvalDataError(f"{where}: 'negatives' must be a non-empty list of {{caption, category}}")
    negatives = []
    for i, n in enumerate(negs):
        if not isinstance(n, dict):
            raise EvalDataError(f"{where}: negatives[{i}] must be an object {{caption, category}}")
        negatives.append((_need_str(n, "caption", f"{where} negatives[{i}]"), str(n.get("category") or "default")))
    if image is None:
        image = resolve_image(rec.get("image"), image_root, data_dir, rid)
    return CompoSample(id=rid, image=image, positive=_need_str(rec, "positive", where), negatives=negatives)


def load_synthetic(paths: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None) -> list[CompoSample]:
    """Read our synthetic compositional split from JSON / JSONL files or WebDataset shards."""
    samples = []
    for path in paths:
        path = Path(path)
        if path.suffix == ".tar":
            for key, rec, ref in iter_shard(path):
                samples.append(_synthetic_sample(rec, f"{path} [{key}]", ref, image_root, path.parent))
            continue
        data = read_json_or_jsonl(path)
        if isinstance(data, dict) and isinstance(data.get("records"), list):
            data = data["records"]
        if not isinstance(data, list):
            raise EvalDataError(f"{path}: expected a list of compositional records")
        for i, rec in enumerate(data):
            samples.append(_synthetic_sample(rec, f"{path} [#{i}]", None, image_root, path.parent))
    return samples


def detect_layout(path: Path) -> str:
    """'sugarcrepe' or 'synthetic' for one data file (from its content; shards are synthetic)."""
    if path.suffix == ".tar":
        return "synthetic"
    data = read_json_or_jsonl(path)
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "negative_caption" in v for v in data.values()):
        return "sugarcrepe"
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        data = data["records"]
    if isinstance(data, list) and all(isinstance(r, dict) and "positive" in r and "negatives" in r for r in data):
        return "synthetic"
    raise EvalDataError(
        f"{path}: unknown compositional layout; expected SugarCrepe (object id -> "
        "{filename, caption, negative_caption}) or our synthetic records ({id, image, positive, negatives})"
    )


class CompoSamples(list):
    """The samples `load_compositional` returns (a list), with ``skipped``: ids of the records left
    out because their image file does not exist."""

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped: list[str] = list(skipped)


def _image_missing(smp: CompoSample) -> bool:
    return smp.image.data is None and smp.image.path is not None and not os.path.isfile(smp.image.path)


def load_compositional(data: Sequence[str] | str, image_root: str | os.PathLike | None = None,
                       limit: int | None = None, missing_images: str = "skip") -> CompoSamples:
    """Load samples from any mix of SugarCrepe files and synthetic files/shards (see module doc).

    Records whose image file does not exist are left out with ``missing_images="skip"`` (the
    default): they are counted (``.skipped`` of the result) and logged as a warning naming the first
    one, never dropped silently; when no record has its image the load fails with an error naming
    the image root option. ``missing_images="error"`` fails on the first missing file. `limit`
    counts the samples kept.
    """
    if missing_images not in ("skip", "error"):
        raise ValueError(f"missing_images must be 'skip' or 'error', got {missing_images!r}")
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    samples: list[CompoSample] = []
    skipped: list[CompoSample] = []
    for p in expand_paths(data):
        loader = load_sugarcrepe if detect_layout(p) == "sugarcrepe" else load_synthetic
        for smp in loader([p], image_root):
            if _image_missing(smp):
                if missing_images == "error":
                    smp.image.load()  # raises the error naming the file and --images
                skipped.append(smp)
            else:
                samples.append(smp)
        if limit is not None and len(samples) >= limit:
            break
    if skipped:
        first = skipped[0]
        if not samples:
            raise EvalDataError(
                f"none of the images of the {len(skipped)} compositional records exist (first: "
                f"{first.image.path!r}, record {first.id!r}); pass the folder that holds them with "
                "--images / --image-root ROOT"
            )
        log.warning("skipping %d of %d compositional records whose image file does not exist (first: %r, record %r)",
                    len(skipped), len(skipped) + len(samples), first.image.path, first.id)
    if not samples:
        raise EvalDataError(f"no compositional samples found in {list(data)}")
    return CompoSamples(samples[:limit] if limit is not None else samples, [s.id for s in skipped])


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------
def compositional_accuracy(samples: Sequence[CompoSample], scores: Sequence[torch.Tensor | Sequence[float]]) -> dict:
    """Accuracy overall and per category from per-sample caption scores.

    Args:
        samples: S samples; scores: S vectors, scores[s] of length 1 + len(samples[s].negatives),
            positive first (the order of `CompoSample.captions`).
    Returns:
        {"overall": {"hits", "total", "accuracy"}, "per_category": {category: {"hits", "total", "accuracy"}}}
        (accuracy in [0, 1]; a tie between the positive and a negative is a miss).
    """
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} score vectors")
    hits, total = 0, 0
    cat_hits: dict[str, int] = defaultdict(int)
    cat_total: dict[str, int] = defaultdict(int)
    for smp, sc in zip(samples, scores):
        sc = torch.as_tensor(sc, dtype=torch.float64).flatten()
        if sc.numel() != 1 + len(smp.negatives):
            raise ValueError(f"sample {smp.id!r}: {sc.numel()} scores for {1 + len(smp.negatives)} captions")
        if not bool(torch.isfinite(sc).all()):
            raise ValueError(f"sample {smp.id!r}: non-finite caption score {sc.tolist()}")
        beats = sc[0] > sc[1:]  # strict: ties are misses
        total += 1
        hits += int(bool(beats.all()))
        by_cat: dict[str, bool] = {}
        for (_, cat), b in zip(smp.negatives, beats.tolist()):
            by_cat[cat] = by_cat.get(cat, True) and b
        for cat, ok in by_cat.items():
            cat_total[cat] += 1
            cat_hits[cat] += int(ok)

    def entry(h, t):
        return {"hits": h, "total": t, "accuracy": h / t if t else 0.0}

    return {"overall": entry(hits, total),
            "per_category": {c: entry(cat_hits[c], cat_total[c]) for c in sorted(cat_total)}}


def markdown_table(results: dict, title: str = "accuracy") -> str:
    """Markdown table of `compositional_accuracy` / `vqa_accuracy` style results."""
    lines = [f"| category | n | {title} |", "|---|---:|---:|"]
    for cat, e in results.get("per_category", {}).items():
        lines.append(f"| {cat} | {e['total']} | {100 * e['accuracy']:.2f} |")
    o = results["overall"]
    lines.append(f"| **overall** | {o['total']} | {100 * o['accuracy']:.2f} |")
    return "\n".join(lines)


def batched_scores(samples: Sequence[CompoSample], texts, score, batch_size: int, progress: bool,
                   desc: str) -> list[list]:
    """``score(images, texts) -> tensor [k, ...]`` over every text of ``texts(sample)`` of every
    sample, in batches of ``batch_size`` (image, text) pairs that may span samples; each sample's
    image is opened once. Returns, per sample, the rows of its texts in order."""
    pending_imgs, pending_texts, owners = [], [], []
    out: list[list] = [[] for _ in samples]

    def flush(full_only: bool):
        k = (len(pending_texts) // batch_size) * batch_size if full_only else len(pending_texts)
        if k == 0:
            return
        for o, v in zip(owners[:k], score(pending_imgs[:k], pending_texts[:k]).tolist()):
            out[o].append(v)
        del pending_imgs[:k], pending_texts[:k], owners[:k]

    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc=desc, unit="sample")
    for s, smp in enumerate(it):
        img = smp.image.load()
        for text in texts(smp):
            pending_imgs.append(img), pending_texts.append(text), owners.append(s)
        flush(full_only=True)
    flush(full_only=False)
    return out


def evaluate_compositional(model, processor, samples: Sequence[CompoSample], *, batch_size: int = 8,
                           prompt: str = DEFAULT_CAPTION_PROMPT, progress: bool = True) -> tuple[dict, list[dict]]:
    """Score every caption of every sample and compute `compositional_accuracy`.

    Images are opened once per sample, batch by batch (never all at once). Pairs of several samples
    share a batch of `batch_size` (image, caption) pairs.

    Returns:
        (results, per_sample) where per_sample[s] = {"id", "scores": [positive, negatives...],
        "categories": [...], "hit": bool}.
    """
    from distill.eval.scoring import score_captions

    def score(imgs, caps):
        return score_captions(model, processor, imgs, caps, prompt=prompt, batch_size=batch_size)

    sample_scores = batched_scores(samples, lambda smp: smp.captions, score, batch_size, progress, "compositional")
    results = compositional_accuracy(samples, sample_scores)
    per_sample = []
    for smp, sc in zip(samples, sample_scores):
        per_sample.append({"id": smp.id, "scores": sc, "categories": [c for _, c in smp.negatives],
                           "hit": all(sc[0] > x for x in sc[1:])})
    return results, per_sample
