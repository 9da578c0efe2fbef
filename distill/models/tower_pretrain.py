"""Pre-train a tiny LLaVA's SigLIP tower on what its image tokens show, before any LM training.

``python -m distill.models.tower_pretrain --model DIR/teacher --out DIR/teacher_tower`` trains the
tower of an HF LLaVA folder (e.g. :mod:`distill.models.tiny`'s teacher) with linear heads on its last
encoder layer (the features LLaVA projects, ``vision_feature_layer=-1``) on synthetic scenes drawn
by :mod:`data_prep.synth`'s own ``make_scene``/``render`` from a seed stream of their own
(``tower/<i>``), so no training or test scene of the pipeline is reused. Targets, per image token:

- the colour and the shape of the object in the scene cell under the token ("none" for empty cells);
- ``relations``: for object tokens, whether another object lies left of / right of / above / below it;
- ``scene_relations``: the whole scene's relation table, for each ordered pair of shapes present
  (shapes are distinct within a scene) which of the synthetic relations hold. Every token carries it,
  so a relation is readable from any attention pattern, pooled ones included.

Only the tower's tensors change; the folder is written back whole (LLM, projector and processor as
they were) with ``tower_pretrain.json``: the held-out token accuracies. This is the demo's answer to
"a tower that knows objects": the demo's LM budget (about a thousand steps on 2 CPU cores) is far too
small to train a tower from the language loss alone (``docs/results/2026-12-02-teacher-position.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HELD_OUT = 500
"""Default number of the last rendered scenes on which the token accuracies are measured."""


@dataclass
class Labels:
    """Per-scene targets: ``color``/``shape`` ``[N, tokens]`` (0 = empty cell, else 1 + index),
    ``rel`` ``[N, tokens, R]`` (another object lies <r> of this token's object), ``table``
    ``[N, S, S, R]`` (shape a lies <r> of shape b) with ``table_mask`` ``[N, S, S]`` (both present, a != b)."""

    color: torch.Tensor
    shape: torch.Tensor
    rel: torch.Tensor
    table: torch.Tensor
    table_mask: torch.Tensor


def scene_labels(scenes, grid: int) -> Labels:
    """The targets of ``scenes`` (lists of ``data_prep.synth.Obj``) for a ``grid`` x ``grid`` token grid
    (row-major, as SigLIP flattens its patches): each token takes the 3x3 scene cell under its centre."""
    from data_prep.synth import COLORS, RELATIONS, SHAPES

    colors, shapes, rels = sorted(COLORS), list(SHAPES), list(RELATIONS.values())
    lab_c, lab_s, lab_r, lab_t, mask_t = [], [], [], [], []
    for scene in scenes:
        if len({o.shape for o in scene}) != len(scene):
            raise ValueError("scene_relations needs distinct shapes within a scene (data_prep.synth draws them so)")
        by_cell = {o.cell: o for o in scene}
        cells = [by_cell.get((int((r + 0.5) * 3 / grid), int((c + 0.5) * 3 / grid)))
                 for r in range(grid) for c in range(grid)]
        lab_c.append([colors.index(o.color) + 1 if o else 0 for o in cells])
        lab_s.append([shapes.index(o.shape) + 1 if o else 0 for o in cells])
        lab_r.append([[float(o is not None and any(fn(x.cell, o.cell) for x in scene if x is not o)) for fn in rels]
                      for o in cells])
        by_shape = {o.shape: o for o in scene}
        lab_t.append([[[float(a in by_shape and b in by_shape and fn(by_shape[a].cell, by_shape[b].cell))
                        for fn in rels] for b in shapes] for a in shapes])
        mask_t.append([[a != b and a in by_shape and b in by_shape for b in shapes] for a in shapes])
    return Labels(torch.tensor(lab_c), torch.tensor(lab_s), torch.tensor(lab_r), torch.tensor(lab_t),
                  torch.tensor(mask_t))


class TowerHeads(torch.nn.Module):
    """One linear map from the tower's last hidden state to every target's logits."""

    def __init__(self, hidden: int):
        super().__init__()
        from data_prep.synth import COLORS, RELATIONS, SHAPES

        self.nc, self.ns, self.nr = 1 + len(COLORS), 1 + len(SHAPES), len(RELATIONS)
        self.S = len(SHAPES)
        self.proj = torch.nn.Linear(hidden, self.nc + self.ns + self.nr + self.S * self.S * self.nr)

    def forward(self, h: torch.Tensor):
        out = self.proj(h)
        a, b, c = self.nc, self.nc + self.ns, self.nc + self.ns + self.nr
        return out[..., :a], out[..., a:b], out[..., b:c], out[..., c:].unflatten(-1, (self.S, self.S, self.nr))


def _losses(heads_out, lab: Labels, idx, relations: bool, scene_relations: bool) -> torch.Tensor:
    oc, os_, or_, ot = heads_out
    loss = F.cross_entropy(oc.flatten(0, 1), lab.color[idx].flatten()) + F.cross_entropy(
        os_.flatten(0, 1), lab.shape[idx].flatten())
    obj = lab.color[idx] > 0
    if relations:
        loss = loss + F.binary_cross_entropy_with_logits(or_[obj], lab.rel[idx][obj])
    if scene_relations:
        m = lab.table_mask[idx][:, None].expand(ot.shape[:-1])  # every token, every present pair
        loss = loss + F.binary_cross_entropy_with_logits(ot[m], lab.table[idx][:, None].expand(ot.shape)[m])
    return loss


@torch.no_grad()
def _held_out(heads_out, lab: Labels, idx) -> dict:
    oc, os_, or_, ot = heads_out
    obj = lab.color[idx] > 0
    m = lab.table_mask[idx][:, None].expand(ot.shape[:-1])
    return {
        "colour": (oc.argmax(-1) == lab.color[idx])[obj].float().mean().item(),
        "shape": (os_.argmax(-1) == lab.shape[idx])[obj].float().mean().item(),
        "empty_vs_object": ((oc.argmax(-1) == 0) == ~obj).float().mean().item(),
        "relations": ((or_ > 0).float() == lab.rel[idx])[obj].all(-1).float().mean().item(),
        "scene_table": ((ot > 0).float() == lab.table[idx][:, None])[m].all(-1).float().mean().item(),
    }


def pretrain_tower(model_dir: str | Path, out: str | Path, *, steps: int = 6000, scenes: int = 12000,
                   held_out: int = HELD_OUT, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
                   relations: bool = True, scene_relations: bool = True, log=print) -> dict:
    """Train the tower of the LLaVA folder ``model_dir`` and write the whole folder to ``out``.
    Returns (and writes to ``out/tower_pretrain.json``) the held-out accuracies: per object token
    colour, shape, all four relation flags right; per token empty-vs-object; per token and present
    pair the whole scene-table row right."""
    if steps < 1 or batch_size < 1 or held_out < 1:
        raise ValueError(f"steps, batch_size and held_out must be >= 1, got {steps}, {batch_size}, {held_out}")
    if scenes <= held_out:
        raise ValueError(f"scenes must exceed the {held_out} held-out scenes, got {scenes}")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from data_prep.synth import make_scene, render

    torch.manual_seed(seed)
    proc = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    tower, vc = model.model.vision_tower, model.config.vision_config
    grid = vc.image_size // vc.patch_size
    t0 = time.time()
    drawn, images = [], []
    for i in range(scenes):
        rng = random.Random(f"tower/{seed}/{i}")
        drawn.append(make_scene(rng))
        images.append(render(drawn[-1], 2 * vc.image_size, rng))
    lab = scene_labels(drawn, grid)
    pv = torch.cat([proc.image_processor(images[i:i + 500], return_tensors="pt")["pixel_values"]
                    for i in range(0, len(images), 500)])
    del images
    log(f"tower pre-training: {scenes} scenes rendered ({time.time() - t0:.0f}s), {grid}x{grid} tokens")

    heads = TowerHeads(vc.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n_train = scenes - held_out
    gen = torch.Generator().manual_seed(seed)
    test_idx = torch.arange(n_train, scenes)

    def forward(idx):
        return heads(tower(pv[idx], output_hidden_states=True).hidden_states[-1])

    metrics: dict = {}
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = _losses(forward(idx), lab, idx, relations, scene_relations)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 1000 == 0 or step + 1 == steps:
            with torch.no_grad():
                metrics = _held_out(forward(test_idx), lab, test_idx)
            log(f"tower pre-training step {step + 1}/{steps} loss {loss.item():.4f} held-out: "
                + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" ({time.time() - t0:.0f}s)")
    out = Path(out)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    record = {"steps": steps, "scenes": scenes, "held_out": held_out, "lr": lr, "batch_size": batch_size,
              "seed": seed, "relations": relations, "scene_relations": scene_relations, "held_out_accuracy": metrics}
    (out / "tower_pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m distill.models.tower_pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an HF LLaVA folder (e.g. distill.models.tiny's teacher)")
    ap.add_argument("--out", required=True, help="where to write the folder with the trained tower")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--scenes", type=int, default=12000, help="rendered scenes, the last --held-out of them held out")
    ap.add_argument("--held-out", type=int, default=HELD_OUT)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak rate: 20 warm-up steps, then cosine to 0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="scene stream and head initialisation")
    ap.add_argument("--no-relations", action="store_true", help="drop the per-object relation flags")
    ap.add_argument("--no-scene-relations", action="store_true", help="drop the per-token scene relation table")
    args = ap.parse_args(argv)
    try:
        pretrain_tower(args.model, args.out, steps=args.steps, scenes=args.scenes, held_out=args.held_out, lr=args.lr,
                       batch_size=args.batch_size, seed=args.seed, relations=not args.no_relations,
                       scene_relations=not args.no_scene_relations, log=lambda s: print(s, flush=True))
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
