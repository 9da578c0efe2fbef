"""Student–teacher visual-attention similarity on held-out images (``python -m distill.eval attn_similarity``).

What is computed, per image (each compositional sample's image with the caption prompt
:data:`distill.eval.common.DEFAULT_CAPTION_PROMPT`, the generation prompt appended):

1. Layers are paired with :func:`distill.losses.match_layers` (its defaults unless
   ``student_layers`` / ``window`` are given), as training and ``distill.viz`` pair them.
2. The head-averaged visual blocks ``P [n, n]`` (visual query rows, visual key columns, causal
   zeros above the diagonal) come from :func:`distill.viz.attention_maps.matched_maps` (the training
   capture path); a teacher window's target is the mean of its layers' blocks, as in training
   (``distill.objective``).
3. Per matched layer the similarity is ``1 - attention_alignment_loss(student, teacher, kind)``
   on that layer's single-image ``[1, 1, n, n]`` maps, i.e. exactly the cosine the loss optimises.
   For the default ``kind="filtered_cosine"`` (CompoDistill): with ``m`` and ``s`` the mean and
   unbiased std over the n*n entries of each map (causal zeros included), entry (i, j) is kept iff
   ``student <= m_s + s_s`` and ``teacher <= m_t + s_t`` and ``teacher != 0``; the profile of key
   column j is the mean of its kept entries over the query rows (0 if none); the value is
   ``cos(student profile, teacher profile)`` over the n image tokens. ``kind="cosine"``: the same
   profiles over every causal entry (i >= j), no filter.

The full maps are needed for the filter (it thresholds individual entries), so this module takes
the matched maps, not the column profiles `distill.viz.attention_maps.attention_maps` draws; it
applies the loss function itself rather than a copy of its math.

Result: ``per_layer`` = the mean over images of each matched layer's cosine, ``mean`` = the mean
of ``per_layer``, in [-1, 1] (1: identical filtered profiles).
"""

from __future__ import annotations

from typing import Sequence

import torch

from distill.eval.common import EvalDataError

SIM_KINDS = ("filtered_cosine", "cosine")


def image_similarity(teacher, student, teacher_processor, student_processor, image, prompt: str, *,
                     student_layers: Sequence[int] | None = None, window: int | None = None,
                     kind: str = "filtered_cosine", backend: str = "auto") -> dict:
    """Per-layer attention cosine of one image (see the module doc).

    Returns:
        {"student_layers": [int], "teacher_windows": [[int]], "per_layer": [float] (one per pair),
        "image_tokens": n}. Raises `EvalDataError` when the pair sees different image-token counts.
    """
    from distill.losses import attention_alignment_loss
    from distill.viz.attention_maps import matched_maps

    if kind not in SIM_KINDS:
        raise ValueError(f"similarity kind must be one of {SIM_KINDS}, got {kind!r}")
    s_layers, t_windows, s_maps, t_maps = matched_maps(teacher, student, teacher_processor, student_processor, image,
                                                       prompt, student_layers=student_layers, window=window,
                                                       backend=backend)
    per_layer = [1.0 - float(attention_alignment_loss(s[None, None], t[None, None], kind=kind))
                 for s, t in zip(s_maps, t_maps)]
    return {"student_layers": s_layers, "teacher_windows": t_windows, "per_layer": per_layer,
            "image_tokens": int(s_maps.shape[-1])}


def evaluate_attn_similarity(teacher, student, teacher_processor, student_processor, samples, *,
                             prompt: str | None = None, student_layers: Sequence[int] | None = None,
                             window: int | None = None, kind: str = "filtered_cosine", backend: str = "auto",
                             progress: bool = True) -> tuple[dict, list[dict]]:
    """`image_similarity` over the images of `samples` (objects with ``.id`` and ``.image``, e.g.
    `distill.eval.compositional.CompoSample`).

    Returns:
        (results, per_sample): results = {"student_layers", "teacher_windows", "per_layer" (mean
        over images per matched layer), "mean" (mean of per_layer), "images", "kind", "prompt"};
        per_sample = one {"id", "per_layer"} per image.
    """
    from distill.eval.common import DEFAULT_CAPTION_PROMPT

    prompt = DEFAULT_CAPTION_PROMPT if prompt is None else prompt
    samples = list(samples)
    if not samples:
        raise EvalDataError("no images to compare the attention of; the data holds no samples")
    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="attn similarity", unit="image")
    per_sample, first = [], None
    for smp in it:
        res = image_similarity(teacher, student, teacher_processor, student_processor, smp.image.load(), prompt,
                               student_layers=student_layers, window=window, kind=kind, backend=backend)
        first = first or res
        per_sample.append({"id": smp.id, "per_layer": res["per_layer"]})
    vals = torch.tensor([r["per_layer"] for r in per_sample], dtype=torch.float64)  # (images, L)
    per_layer = vals.mean(0).tolist()
    results = {"student_layers": first["student_layers"], "teacher_windows": first["teacher_windows"],
               "per_layer": per_layer, "mean": sum(per_layer) / len(per_layer), "images": len(per_sample),
               "kind": kind, "prompt": prompt}
    return results, per_sample


def markdown_table(results: dict) -> str:
    """One row per matched layer pair and a mean row."""
    lines = ["| student layer | teacher window | cosine |", "|---:|---|---:|"]
    for s, w, c in zip(results["student_layers"], results["teacher_windows"], results["per_layer"]):
        lines.append(f"| {s} | {','.join(map(str, w))} | {c:.4f} |")
    lines.append(f"| **mean** | ({results['images']} images) | {results['mean']:.4f} |")
    return "\n".join(lines)
