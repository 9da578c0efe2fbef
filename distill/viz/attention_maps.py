"""Teacher vs student visual attention as heat maps over the image grid.

The maps come from the training capture path (`distill.attention.install` + `AttentionCapture`):
for each captured text layer the head-averaged visual block ``P [n, n]`` (visual query rows,
visual key columns, normalised over all keys). The attention an image token receives is the column
mean of ``P`` over the ``n`` visual query rows (causal zeros above the diagonal included), reshaped
to the ``sqrt(n) x sqrt(n)`` patch grid. Layers are paired with `distill.losses.match_layers`
(its defaults unless layers are given); a teacher window is shown as the mean of its layers' maps.

Ragged batches (``vis_pos [B, n_max]`` padded with -1, optional ``vis_image_id [B, n_max]``):
:func:`sample_blocks` cuts one sample's own block(s) out of the padded ``[L, B, n_max, n_max]``
maps, one ``[L, n_k, n_k]`` block per image, so each heat map is drawn over that image's own
``n_k`` tokens and its own ``sqrt(n_k) x sqrt(n_k)`` grid (the same blocks the alignment loss uses).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from data_prep.images import to_rgb
from distill.eval.common import EvalDataError, image_token_id, model_device, render_chat, user_turn
from distill.viz.curves import save_figure


def visual_attention_profile(maps: torch.Tensor, visible_rows: bool = False) -> torch.Tensor:
    """Attention received by each visual token.

    Args:
        maps: [..., n, n] causal visual block (query rows, key columns).
        visible_rows: average column j over the n - j query rows that can see it (i >= j) instead
            of all n rows; removes the causal bias towards early image tokens.
    Returns:
        [..., n] fp32: the column mean over the query rows.
    """
    if maps.dim() < 2 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must be [..., n, n], got shape {tuple(maps.shape)}")
    if not visible_rows:
        return maps.float().mean(dim=-2)
    n = maps.shape[-1]
    rows = torch.arange(n, 0, -1, device=maps.device, dtype=torch.float32)  # (n,) = n - j
    return maps.float().sum(dim=-2) / rows


def sample_blocks(maps: torch.Tensor, vis_pos: torch.Tensor, b: int,
                  image_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Sample ``b``'s visual blocks from batch maps with ragged visual tokens.

    Args:
        maps: [L, B, n_max, n_max] captured maps (``rec.maps``).
        vis_pos: [B, n_max] long, -1 padding.
        b: the sample.
        image_ids: optional [B, n_max] long image index per visual token (-1 padding); None: the
            sample's real tokens are one block.
    Returns:
        one [L, n_k, n_k] tensor per image of the sample (in image-id order; empty list for a
        sample without visual tokens): rows and columns of that image's tokens only.
    """
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must be [L, B, n, n], got shape {tuple(maps.shape)}")
    if vis_pos.shape != maps.shape[1:3]:
        raise ValueError(f"vis_pos must be [B, n]={tuple(maps.shape[1:3])}, got {tuple(vis_pos.shape)}")
    real = vis_pos[b].cpu() >= 0
    ids = torch.zeros_like(real, dtype=torch.long) if image_ids is None else image_ids[b].cpu().long()
    ids = torch.where(real, ids, -1)
    out = []
    for k in sorted(set(ids[ids >= 0].tolist())):
        idx = (ids == k).nonzero().flatten().to(maps.device)
        out.append(maps[:, b].index_select(1, idx).index_select(2, idx))
    return out


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the square patch grid holding n image tokens; error when n is not square."""
    side = math.isqrt(n)
    if side * side != n or n == 0:
        raise ValueError(
            f"{n} image tokens do not form a square grid; heat maps need a square number of image tokens "
            "(models that add tokens such as a CLS or newline tokens per row are not supported by this view)"
        )
    return side, side


def prompt_batch(processor, image, prompt: str) -> dict:
    """One-sample processor batch: user turn (image + prompt) followed by the generation prompt."""
    text = render_chat(processor, [user_turn(prompt)], add_generation_prompt=True)
    return dict(processor(images=[image], text=[text], add_special_tokens=False, return_tensors="pt"))


def image_grid(processor, image, n: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid that one image's ``n`` visual tokens lie on.

    LLaVA-style towers: the square ``sqrt(n) x sqrt(n)`` grid. Qwen-VL: the processor's
    ``image_grid_thw`` after the ``merge_size`` merge (non-square images give non-square grids).
    Families that tile the image (LLaVA-OneVision AnyRes, InternVL dynamic tiles) have no single
    grid: a clear error, never a heat map drawn over the wrong layout."""
    from distill.data.families import family_of

    family = family_of(processor)
    if family in ("llava_onevision", "internvl"):
        raise EvalDataError(
            f"heat maps over the image grid need one patch grid per image; {family} splits the image into "
            "tiles (plus newline/thumbnail tokens), so its visual tokens have no single grid. The alignment "
            "loss handles these families; this view supports LLaVA-style and Qwen-VL models.")
    if family in ("qwen2_5_vl", "qwen3_vl"):
        ip = processor.image_processor
        thw = ip(images=[to_rgb(image)], return_tensors="pt")["image_grid_thw"][0].tolist()
        merge = int(getattr(ip, "merge_size", 1))
        rows, cols = thw[0] * thw[1] // merge, thw[2] // merge
        if rows * cols != n:
            raise EvalDataError(f"image_grid_thw {thw} (merge {merge}) gives {rows}x{cols} tokens, the prompt holds {n}")
        return rows, cols
    return grid_shape(n)


@torch.no_grad()
def capture_visual_attention(model, processor, image, prompt: str, layers: Sequence[int],
                             backend: str = "auto") -> torch.Tensor:
    """Head-averaged visual attention of `layers` for one (image, prompt), via the training capture path.

    Installs the fused attention function on `model` (`distill.attention.install`) if needed.
    Returns:
        [len(layers), n, n] fp32 CPU tensor (n = image tokens).
    """
    from distill.attention import AttentionCapture, install

    impl = getattr(getattr(model.config, "text_config", model.config), "_attn_implementation", None)
    if not (isinstance(impl, str) and impl.startswith("distill_")):
        install(model, backend)
    batch = prompt_batch(processor, image, prompt)
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    vis = (batch["input_ids"][0] == image_token_id(model)).nonzero().flatten()
    if vis.numel() == 0:
        raise EvalDataError("the prompt holds no image tokens; does the processor expand <image>?")
    cap = AttentionCapture(model, list(layers))
    try:
        with cap.record(vis.unsqueeze(0), torch.ones(1, dtype=torch.bool, device=device)) as rec:
            model(**batch)
            maps = rec.maps  # (L, 1, n, n)
    finally:
        cap.remove()
    (block,) = sample_blocks(maps, vis.unsqueeze(0), 0)  # this sample's own n (no padding here)
    return block.float().cpu()


def _depth(model) -> int:
    cfg = getattr(model.config, "text_config", model.config)
    return int(cfg.num_hidden_layers)


def matched_maps(teacher, student, teacher_processor, student_processor, image, prompt: str, *,
                 student_layers: Sequence[int] | None = None, window: int | None = None,
                 backend: str = "auto") -> tuple[list[int], list[list[int]], torch.Tensor, torch.Tensor]:
    """Matched student and teacher visual blocks for one image and prompt.

    Layers are paired with `distill.losses.match_layers` (its defaults unless given); a teacher
    window's map is the mean of its layers' maps, as in training.
    Returns:
        ``(student_layers, teacher_windows, student [L, n, n], teacher [L, n, n])`` fp32 maps.
    """
    from distill.losses import match_layers

    s_layers, t_windows = match_layers(_depth(student), _depth(teacher), student_layers=student_layers, window=window)
    t_layers = sorted({t for w in t_windows for t in w})
    s_maps = capture_visual_attention(student, student_processor, image, prompt, s_layers, backend)  # (L, n, n)
    t_all = capture_visual_attention(teacher, teacher_processor, image, prompt, t_layers, backend)  # (Lt, n, n)
    if s_maps.shape[-1] != t_all.shape[-1]:
        raise EvalDataError(f"student has {s_maps.shape[-1]} image tokens, teacher {t_all.shape[-1]}; "
                            "the pair must share the image-token count")
    t_maps = torch.stack([t_all[[t_layers.index(t) for t in w]].mean(0) for w in t_windows])  # (L, n, n)
    return list(s_layers), [list(w) for w in t_windows], s_maps, t_maps


def attention_maps(teacher, student, teacher_processor, student_processor, image, prompt: str, *,
                   student_layers: Sequence[int] | None = None, window: int | None = None,
                   backend: str = "auto", visible_rows: bool = False) -> dict:
    """Matched teacher and student visual-attention profiles for one image and prompt.

    Returns a dict with ``student_layers`` (list[int]), ``teacher_windows`` (list[list[int]]),
    ``student`` [L, n] and ``teacher`` [L, n] fp32 profiles (`visual_attention_profile` with
    `visible_rows` of the :func:`matched_maps`), and ``grid`` (rows, cols).
    """
    s_layers, t_windows, s_maps, t_maps = matched_maps(teacher, student, teacher_processor, student_processor, image,
                                                       prompt, student_layers=student_layers, window=window,
                                                       backend=backend)
    return {"student_layers": s_layers, "teacher_windows": t_windows,
            "student": visual_attention_profile(s_maps, visible_rows),
            "teacher": visual_attention_profile(t_maps, visible_rows),
            "grid": image_grid(student_processor, image, s_maps.shape[-1])}


def render_attention(image, teacher: torch.Tensor, student: torch.Tensor, out: str | os.PathLike, *,
                     row_labels: Sequence[str] | None = None, cell_inches: float = 3.0, dpi: int = 100,
                     grid: tuple[int, int] | None = None) -> Path:
    """Write a PNG: one row per matched layer; columns = image, teacher heat map, student heat map.

    Args:
        image: PIL image (shown stretched to the square model view, as the processor resizes it).
        teacher, student: [L, n] attention profiles (n a square number unless ``grid`` is given).
        grid: (rows, cols) of the image's token grid (``attention_maps(...)["grid"]``); default square.
    Returns:
        the PNG path; its size is exactly (3 * cell_inches * dpi, L * cell_inches * dpi) pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if teacher.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"teacher and student profiles must both be [L, n]; got {tuple(teacher.shape)} "
                         f"and {tuple(student.shape)}")
    L, n = teacher.shape
    h, w = grid if grid is not None else grid_shape(n)
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not hold the profiles' {n} tokens")
    labels = list(row_labels) if row_labels is not None else [f"pair {i}" for i in range(L)]
    if len(labels) != L:
        raise ValueError(f"{len(labels)} row labels for {L} rows")
    img = np.asarray(to_rgb(image))
    extent = (0, 1, 1, 0)
    fig, axes = plt.subplots(L, 3, figsize=(3 * cell_inches, L * cell_inches), dpi=dpi, squeeze=False)
    for r in range(L):
        for c, (name, prof) in enumerate([("image", None), ("teacher", teacher[r]), ("student", student[r])]):
            ax = axes[r, c]
            ax.imshow(img, extent=extent, aspect="auto")
            if prof is not None:
                heat = prof.float().reshape(h, w).numpy()
                ax.imshow(heat, extent=extent, aspect="auto", cmap="jet", alpha=0.55, interpolation="bilinear")
                ax.set_title(f"{name}: max {heat.max():.3g}", fontsize=8)
            else:
                ax.set_title(labels[r], fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    return save_figure(fig, out, dpi)


def attention_figure(teacher, student, teacher_processor, student_processor, image, prompt: str,
                     out: str | os.PathLike, *, student_layers: Sequence[int] | None = None,
                     window: int | None = None, backend: str = "auto", visible_rows: bool = False) -> Path:
    """`attention_maps` then `render_attention` (what ``python -m distill.viz attention`` runs)."""
    res = attention_maps(teacher, student, teacher_processor, student_processor, image, prompt,
                         student_layers=student_layers, window=window, backend=backend,
                         visible_rows=visible_rows)
    labels = [f"student L{s} / teacher L{','.join(map(str, w))}"
              for s, w in zip(res["student_layers"], res["teacher_windows"])]
    return render_attention(image, res["teacher"], res["student"], out, row_labels=labels, grid=res["grid"])
