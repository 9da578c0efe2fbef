"""Aggregate the ablation's evaluations (sft / kd / kd_attn over seeds) into one table.

Layout read (what ``python -m distill.demo --ablation`` writes; the JSONs are those of
``python -m distill.eval compositional`` (likelihood), ``compositional --protocol ab``, ``vqa``
and ``attn_similarity``)::

    root/teacher/eval/{compositional.json, compositional_ab.json, vqa.json}
    root/seed{s}/{variant}/eval/{compositional.json, compositional_ab.json, vqa.json, attn_similarity.json}

Values taken: ``overall.accuracy`` and ``per_category[c].accuracy`` of the two compositional
files, ``overall.accuracy`` of ``vqa.json`` (fractions there, percent here, rounded to 2
decimals) and ``mean`` of ``attn_similarity.json`` (the cosine in [-1, 1], rounded to 6 decimals).
Per variant, ``mean`` is the mean over seeds and ``std`` the sample standard deviation over seeds
(ddof=1), 0.0 when there is one seed; both are computed from the unrounded per-seed values.

CLI: ``python -m distill.eval.ablation --root DIR --seeds 0 1 2 [--variants sft kd kd_attn]``
writes ``DIR/ablation.json`` and ``DIR/ablation.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from distill.eval.common import EvalDataError

VARIANTS = ("sft", "kd", "kd_attn")
TEACHER_FILES = ("compositional.json", "compositional_ab.json", "vqa.json")
RUN_FILES = TEACHER_FILES + ("attn_similarity.json",)


def _read(path: Path, run: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"ablation: missing {path} (the evaluation of {run}); "
                                "run that evaluation or leave the run out")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalDataError(f"ablation: {path} ({run}) is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise EvalDataError(f"ablation: {path} ({run}) must hold a JSON object")
    return data


def _accuracy(entry, path: Path, run: str, where: str) -> float:
    try:
        value = float(entry["accuracy"])
    except (KeyError, TypeError, ValueError):
        raise EvalDataError(f"ablation: {path} ({run}) has no numeric {where}.accuracy") from None
    return 100.0 * value


def _accuracies(data: dict, path: Path, run: str, protocol: str | None) -> dict:
    """{"per_category": {c: %}, "overall": %} of an accuracy JSON (compositional / A/B)."""
    if protocol is not None and data.get("protocol", protocol) != protocol:
        raise EvalDataError(f"ablation: {path} ({run}) holds protocol {data.get('protocol')!r}, expected {protocol!r}")
    cats = data.get("per_category", {})
    if not isinstance(cats, dict):
        raise EvalDataError(f"ablation: {path} ({run}) per_category must be an object")
    return {"per_category": {c: _accuracy(e, path, run, f"per_category.{c}") for c, e in sorted(cats.items())},
            "overall": _accuracy(data.get("overall"), path, run, "overall")}


def _read_eval(folder: Path, run: str, with_similarity: bool) -> dict:
    lik_path, ab_path, vqa_path = folder / "compositional.json", folder / "compositional_ab.json", folder / "vqa.json"
    lik = _accuracies(_read(lik_path, run), lik_path, run, "likelihood")
    ab = _accuracies(_read(ab_path, run), ab_path, run, "ab")
    out = {**lik, "ab": ab, "vqa": _accuracy(_read(vqa_path, run).get("overall"), vqa_path, run, "overall")}
    if with_similarity:
        path = folder / "attn_similarity.json"
        try:
            out["attn_similarity"] = float(_read(path, run)["mean"])
        except (KeyError, TypeError, ValueError):
            raise EvalDataError(f"ablation: {path} ({run}) has no numeric 'mean'") from None
    return out


def _reduce(entries: Sequence[dict], fn, where: str = ""):
    """Apply ``fn(list of floats)`` per key, recursing into nested dicts; every entry must hold the same keys."""
    keys = list(entries[0])
    for e in entries[1:]:
        if set(e) != set(keys):
            raise EvalDataError(f"ablation: the seeds' results differ in keys{' under ' + where if where else ''}: "
                                f"{sorted(keys)} vs {sorted(e)}")
    out = {}
    for k in keys:
        vals = [e[k] for e in entries]
        out[k] = _reduce(vals, fn, f"{where}.{k}".lstrip(".")) if isinstance(vals[0], dict) else fn(vals)
    return out


def _mean(vals: Sequence[float]) -> float:
    return sum(vals) / len(vals)


def _std(vals: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0.0 for a single value."""
    if len(vals) < 2:
        return 0.0
    m = _mean(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _rounded(d: dict) -> dict:
    """Accuracies (%) to 2 decimals, the attention similarity to 6."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _rounded(v)
        elif k == "seed":
            out[k] = v
        else:
            out[k] = round(v, 6 if k == "attn_similarity" else 2)
    return out


def collect_ablation(root: Path, seeds: Sequence[int], variants: Sequence[str] = VARIANTS) -> dict:
    """Read the layout of the module doc and aggregate it.

    Returns:
        {"seeds": [...], "teacher": {"per_category", "overall", "ab": {"per_category", "overall"}, "vqa"},
        "variants": {variant: {"per_seed": [{"seed", "per_category", "overall", "ab", "vqa",
        "attn_similarity"}], "mean": {...}, "std": {...}}}}; mean and std hold a per-seed entry's
        keys less "seed" (mean over seeds; sample std, ddof=1, 0.0 for one seed). Accuracies in %.
    Raises:
        FileNotFoundError naming the missing file and its run; EvalDataError for malformed files.
    """
    root = Path(root)
    seeds, variants = [int(s) for s in seeds], list(variants)
    if not seeds:
        raise ValueError("ablation: give at least one seed")
    if not variants or len(set(variants)) != len(variants):
        raise ValueError(f"ablation: variants must be non-empty and distinct, got {variants}")
    teacher = _read_eval(root / "teacher" / "eval", "the teacher", with_similarity=False)
    out_variants = {}
    for v in variants:
        runs = [_read_eval(root / f"seed{s}" / v / "eval", f"variant {v!r}, seed {s}", with_similarity=True)
                for s in seeds]
        out_variants[v] = {"per_seed": [_rounded({"seed": s, **r}) for s, r in zip(seeds, runs)],
                           "mean": _rounded(_reduce(runs, _mean)), "std": _rounded(_reduce(runs, _std))}
    return {"seeds": seeds, "teacher": _rounded(teacher), "variants": out_variants}


def ablation_markdown(result: dict) -> str:
    """A line naming the seeds, then one table row per model (teacher first, then the variants):
    likelihood overall, each category, A/B overall, VQA (all %), attention similarity; student cells
    ``mean ± std``, teacher cells plain (no attention similarity: '—')."""
    seeds = result["seeds"]
    n = len(seeds)
    spread = "sample std (ddof=1)" if n > 1 else "std (0.00: one seed)"
    cats = list(result["teacher"]["per_category"])
    for v in result["variants"].values():
        cats += [c for c in v["mean"]["per_category"] if c not in cats]
    head = ["model", "likelihood overall"] + cats + ["A/B overall", "VQA", "attn similarity"]
    lines = [f"Seeds {', '.join(map(str, seeds))}: student cells are mean ± {spread} over {n} seed{'s' * (n > 1)}; "
             "teacher cells are its single evaluation. Accuracies in %, attention similarity is the cosine of the "
             "loss's filtered column profiles (1 = identical).", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def pick(entry, k):
        if k == "overall":
            return entry["overall"]
        if isinstance(k, tuple):
            return entry["per_category"].get(k[1])
        if k == "ab":
            return entry["ab"]["overall"]
        return entry.get(k)

    def plain(x, digits=2):
        return "—" if x is None else f"{x:.{digits}f}"

    keys = ["overall"] + [("cat", c) for c in cats] + ["ab", "vqa"]
    row = [plain(pick(result["teacher"], k)) for k in keys] + ["—"]
    lines.append("| teacher | " + " | ".join(row) + " |")
    for name, v in result["variants"].items():
        row = []
        for k in keys + ["attn_similarity"]:
            m, s = pick(v["mean"], k), pick(v["std"], k)
            digits = 4 if k == "attn_similarity" else 2
            row.append("—" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_ablation(root: Path, result: dict) -> tuple[Path, Path]:
    """Write ``root/ablation.json`` and ``root/ablation.md``; returns their paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    js, md = root / "ablation.json", root / "ablation.md"
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(ablation_markdown(result) + "\n")
    return js, md


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m distill.eval.ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the ablation folder (teacher/, seed{s}/{variant}/)")
    ap.add_argument("--seeds", required=True, type=int, nargs="+")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args(argv)
    try:
        result = collect_ablation(Path(args.root), args.seeds, args.variants)
    except (EvalDataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    write_ablation(Path(args.root), result)
    print(ablation_markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
