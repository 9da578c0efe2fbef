"""Visual question answering: greedy answers scored by normalised exact match.

Normalisation (`normalize_answer`): lowercase; drop apostrophes and thousands separators; every other
punctuation mark becomes a space (a decimal point between digits is kept); number words zero..twenty
and the tens up to ninety become digits; the articles a / an / the are dropped; whitespace collapses.
A prediction is a hit when its normalised form equals the normalised form of any reference answer.

Input layouts (`load_vqa`):

- our Q/A split (LLaVA JSON list, JSONL, or shards from ``python -m data_prep``): records
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
  "value": "A"}, ...]}``; the first human turn is the question and the first gpt turn the
  reference answer. The image goes where the question holds ``<image>`` (as in training); records
  without an image are asked without one.
- LLaVA-style question file: JSONL with ``{"question_id", "image", "text"}`` per line; the image
  goes first (``"<image>\\n" + text``) unless ``text`` places ``<image>`` itself. Reference answers
  come from an ``answer`` field on the line (a string or a list of acceptable strings), or from
  ``--answers FILE``: JSONL with ``{"question_id", "answer"}`` per line (``answer`` a string or
  list; ``answers`` also accepted) or a JSON object ``{question_id: answer}``.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from distill.eval.common import (
    IMAGE_PLACEHOLDER,
    EvalDataError,
    ImageRef,
    expand_paths,
    iter_shard,
    model_device,
    read_json_or_jsonl,
    render_chat,
    resolve_image,
    user_turn,
)

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                 "eighty": "80", "ninety": "90"})
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """Normalised form of an answer for exact match (see module doc); e.g. "The Two dogs." -> "2 dogs"."""
    s = str(text).lower().replace("'", "").replace("\u2019", "")
    s = re.sub(r"(?<=\d),(?=\d)", "", s)
    s = _PUNCT.sub(" ", s)
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


@dataclass
class VQASample:
    """One question about an image (or none) with its acceptable reference answers."""

    id: str
    image: ImageRef | None
    question: str
    answers: list[str] = field(default_factory=list)
    category: str | None = None


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
def _answer_list(v, where: str) -> list[str]:
    if isinstance(v, str) and v.strip():
        return [v]
    if isinstance(v, list) and v and all(isinstance(a, str) for a in v):
        return list(v)
    if isinstance(v, list) and v and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in v):
        return [a["answer"] for a in v]  # VQAv2 annotation style [{"answer": ...}, ...]
    raise EvalDataError(f"{where}: reference answer must be a non-empty string or list of strings (got {v!r})")


def _from_llava_record(rec, where: str, image: ImageRef | None, image_root, data_dir) -> VQASample:
    if not isinstance(rec, dict):
        raise EvalDataError(f"{where}: expected a LLaVA record object")
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        raise EvalDataError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    q = next((t.get("value") for t in conv if isinstance(t, dict) and t.get("from") == "human"), None)
    a = next((t.get("value") for t in conv if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(q, str) or not isinstance(a, str):
        raise EvalDataError(f"{where}: needs a human question turn and a gpt answer turn")
    rid = str(rec.get("id", where))
    if image is None and rec.get("image") is not None:
        image = resolve_image(rec["image"], image_root, data_dir, rid)
    if not q.replace(IMAGE_PLACEHOLDER, "").strip():
        raise EvalDataError(f"{where}: the question is empty once <image> is removed")
    if image is None and IMAGE_PLACEHOLDER in q:
        raise EvalDataError(f"{where}: the question holds <image> but the record has no image")
    return VQASample(id=rid, image=image, question=q, answers=_answer_list(a, where),
                     category=rec.get("category") or rec.get("question_type"))


def _read_answers(path: str | os.PathLike) -> dict[str, list[str]]:
    data = read_json_or_jsonl(path)
    out: dict[str, list[str]] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out[str(k)] = _answer_list(v, f"{path} [{k}]")
    elif isinstance(data, list):
        for i, row in enumerate(data, 1):
            if not isinstance(row, dict) or "question_id" not in row:
                raise EvalDataError(f"{path}:{i}: answer lines need question_id and answer")
            v = row.get("answer", row.get("answers"))
            out[str(row["question_id"])] = _answer_list(v, f"{path}:{i}")
    else:
        raise EvalDataError(f"{path}: answers must be JSONL lines or a JSON object")
    return out


def load_vqa(data: Sequence[str] | str, image_root: str | os.PathLike | None = None,
             answers: str | os.PathLike | None = None, limit: int | None = None) -> list[VQASample]:
    """Load VQA samples from our Q/A split (JSON / JSONL / shards) or a LLaVA question file (module doc)."""
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    gt = _read_answers(answers) if answers is not None else None
    samples: list[VQASample] = []
    for path in expand_paths(data):
        if path.suffix == ".tar":
            for key, rec, ref in iter_shard(path):
                samples.append(_from_llava_record(rec, f"{path} [{key}]", ref, image_root, path.parent))
            continue
        rows = read_json_or_jsonl(path)
        if not isinstance(rows, list):
            raise EvalDataError(f"{path}: expected a list of records (JSON array or JSONL)")
        for i, rec in enumerate(rows):
            where = f"{path} [#{i}]"
            if isinstance(rec, dict) and "question_id" in rec:
                qid = str(rec["question_id"])
                if gt is not None:
                    if qid not in gt:
                        raise EvalDataError(f"{where}: question_id {qid!r} has no entry in the answers file {answers}")
                    refs = gt[qid]
                elif "answer" in rec or "answers" in rec:
                    refs = _answer_list(rec.get("answer", rec.get("answers")), where)
                else:
                    raise EvalDataError(f"{where}: no reference answer; add an 'answer' field or pass --answers FILE")
                text = rec.get("text")
                if not isinstance(text, str) or not text.replace(IMAGE_PLACEHOLDER, "").strip():
                    raise EvalDataError(f"{where}: field 'text' (the question) must be a non-empty string")
                img = resolve_image(rec["image"], image_root, path.parent, qid) if rec.get("image") else None
                if img is None and IMAGE_PLACEHOLDER in text:
                    raise EvalDataError(f"{where}: the question holds <image> but the line has no image")
                samples.append(VQASample(id=qid, image=img, question=text,
                                         answers=refs, category=rec.get("category")))
            else:
                samples.append(_from_llava_record(rec, where, None, image_root, path.parent))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise EvalDataError(f"no VQA samples found in {list(data)}")
    return samples[:limit] if limit is not None else samples


# ----------------------------------------------------------------------------------------------
# Generation and scoring
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model, processor, images: Sequence | None, questions: Sequence[str], *,
                     max_new_tokens: int = 32, suffix: str = "") -> list[str]:
    """Greedy answers for one batch of questions (left padded; decoding stops at EOS).

    Args:
        images: PIL images, one per question, or None for text-only questions.
        questions: B strings; `suffix` is appended to each (e.g. an answer-format instruction).
    Returns:
        B decoded answers (new tokens only, special tokens skipped, stripped).
    """
    with_image = images is not None
    texts = [render_chat(processor, [user_turn(q + suffix, with_image)], add_generation_prompt=True) for q in questions]
    kwargs = dict(text=texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    if with_image:
        kwargs["images"] = list(images)
    batch = processor(**kwargs)
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad)
    new = out[:, batch["input_ids"].shape[1]:]  # (B, <=max_new_tokens)
    return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 categories: Sequence[str | None] | None = None) -> dict:
    """Normalised exact-match accuracy.

    Args:
        predictions: N strings; answers: N lists of acceptable references; categories: optional N labels.
    Returns:
        {"overall": {"hits", "total", "accuracy"}, "per_category": {...}} (per_category empty without labels).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    hits = []
    for p, refs in zip(predictions, answers):
        norm = normalize_answer(p)
        hits.append(any(norm == normalize_answer(r) for r in refs))
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    if categories is not None:
        for h, c in zip(hits, categories):
            if c is not None:
                per[str(c)][0] += int(h)
                per[str(c)][1] += 1

    def entry(h, t):
        return {"hits": h, "total": t, "accuracy": h / t if t else 0.0}

    return {"overall": entry(sum(hits), len(hits)), "per_category": {c: entry(*per[c]) for c in sorted(per)}}


def evaluate_vqa(model, processor, samples: Sequence[VQASample], *, batch_size: int = 8, max_new_tokens: int = 32,
                 suffix: str = "", progress: bool = True) -> tuple[dict, list[dict]]:
    """Answer every sample greedily and compute `vqa_accuracy`.

    Image and text-only questions are batched separately. Returns (results, per_sample) with
    per_sample[i] = {"id", "question", "prediction", "answers", "hit"}.
    """
    preds: list[str | None] = [None] * len(samples)
    groups = [[i for i, s in enumerate(samples) if s.image is not None], [i for i, s in enumerate(samples) if s.image is None]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="vqa", unit="question")
    for idx in groups:
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            imgs = [samples[i].image.load() for i in chunk] if samples[chunk[0]].image is not None else None
            outs = generate_answers(model, processor, imgs, [samples[i].question for i in chunk],
                                    max_new_tokens=max_new_tokens, suffix=suffix)
            for i, o in zip(chunk, outs):
                preds[i] = o
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    cats = [s.category for s in samples]
    results = vqa_accuracy(preds, [s.answers for s in samples], cats if any(c is not None for c in cats) else None)
    per_sample = [{"id": s.id, "question": s.question, "prediction": p, "answers": s.answers,
                   "hit": any(normalize_answer(p) == normalize_answer(a) for a in s.answers)}
                  for s, p in zip(samples, preds)]
    return results, per_sample
