"""Pre-train the tiny teacher's SigLIP tower on what each image token shows, before any LM training.

A study script, not the product's path (yet): a linear head on the tower's last encoder layer (the
features LLaVA feeds its projector, ``vision_feature_layer=-1``) predicts, for every image token,
the colour and the shape of the object in the grid cell the token lies in ("none" for empty
cells), on synthetic scenes drawn by ``data_prep.synth``'s own ``make_scene``/``render`` from a
seed stream of their own (``tower/<i>``), so no training or test scene is reused. Prints held-out
token accuracies and writes the whole LLaVA folder back with the trained tower.

    python -m distill.models.tiny --out M --patch-size 8 --vision-position-init sincos
    python docs/results/tower_pretrain.py --model M/teacher --out MT/teacher --steps 3000
    python docs/results/teacher_explore.py --model MT/teacher --data D --test T --steps 1500

Results of 2026-12-02: ``docs/results/2026-12-02-teacher-position.md``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HELD_OUT = 500
"""The last scenes, on which the token accuracies are measured."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an HF LLaVA folder (e.g. distill.models.tiny's teacher)")
    ap.add_argument("--out", required=True, help="where to write the folder with the trained tower")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak rate: 20 warm-up steps, then cosine to 0")
    ap.add_argument("--scenes", type=int, default=4000, help=f"rendered scenes (the last {HELD_OUT} held out)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--relations", action="store_true",
                    help="also predict, per object token, whether another object lies left of / right of / above / "
                         "below it (data_prep.synth's relations)")
    ap.add_argument("--scene-relations", action="store_true",
                    help="also predict, from every image token, the whole scene's relation table: for each ordered "
                         "pair of shapes present, which of data_prep.synth's relations hold (shapes are distinct "
                         "within a scene), so the relations are readable without attending to the objects")
    args = ap.parse_args()
    if args.scenes <= HELD_OUT:
        ap.error(f"--scenes must exceed the {HELD_OUT} held-out scenes, got {args.scenes}")

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from data_prep.synth import COLORS, RELATIONS, SHAPES, make_scene, render

    torch.manual_seed(0)
    torch.set_num_threads(1)
    proc = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    tower, vc = model.model.vision_tower, model.config.vision_config
    grid = vc.image_size // vc.patch_size
    colors, shapes = sorted(COLORS), list(SHAPES)

    rels = list(RELATIONS)
    images, lab_c, lab_s, lab_r, lab_t, mask_t = [], [], [], [], [], []
    for i in range(args.scenes):
        rng = random.Random(f"tower/{i}")
        scene = make_scene(rng)
        images.append(render(scene, 96, rng))
        by_cell = {o.cell: o for o in scene}
        cells = [by_cell.get((int((r + 0.5) * 3 / grid), int((c + 0.5) * 3 / grid)))
                 for r in range(grid) for c in range(grid)]  # the 3x3 scene cell under each token's centre
        lab_c.append([colors.index(o.color) + 1 if o else 0 for o in cells])
        lab_s.append([shapes.index(o.shape) + 1 if o else 0 for o in cells])
        lab_r.append([[float(bool(o) and any(RELATIONS[r](x.cell, o.cell) for x in scene if x is not o)) for r in rels]
                      for o in cells])  # "some object lies <r> this one"
        by_shape = {o.shape: o for o in scene}
        lab_t.append([[[float(a in by_shape and b in by_shape and RELATIONS[r](by_shape[a].cell, by_shape[b].cell))
                        for r in rels] for b in shapes] for a in shapes])
        mask_t.append([[a != b and a in by_shape and b in by_shape for b in shapes] for a in shapes])
    pv = torch.cat([proc.image_processor(images[i:i + 500], return_tensors="pt")["pixel_values"]
                    for i in range(0, len(images), 500)])
    lab_c, lab_s, lab_r = torch.tensor(lab_c), torch.tensor(lab_s), torch.tensor(lab_r)
    lab_t, mask_t = torch.tensor(lab_t), torch.tensor(mask_t)  # [scenes, shape a, shape b, relation], [scenes, a, b]
    n_t = len(shapes) * len(shapes) * len(rels)

    nc = 1 + len(colors)
    ns = 1 + len(shapes)
    head = torch.nn.Linear(vc.hidden_size, nc + ns + len(rels) + n_t)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n_train = args.scenes - HELD_OUT

    def forward(idx):
        out = head(tower(pv[idx], output_hidden_states=True).hidden_states[-1])
        k = nc + ns + len(rels)
        return (out[..., :nc], out[..., nc:nc + ns], out[..., nc + ns:k],
                out[..., k:].unflatten(-1, (len(shapes), len(shapes), len(rels))))  # [B, tokens, a, b, relation]

    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, n_train, (args.batch_size,))
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        oc, os_, or_, ot = forward(idx)
        loss = (torch.nn.functional.cross_entropy(oc.flatten(0, 1), lab_c[idx].flatten())
                + torch.nn.functional.cross_entropy(os_.flatten(0, 1), lab_s[idx].flatten()))
        if args.relations:
            obj = lab_c[idx] > 0
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(or_[obj], lab_r[idx][obj])
        if args.scene_relations:
            m = mask_t[idx][:, None].expand(ot.shape[:-1])
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
                ot[m], lab_t[idx][:, None].expand(ot.shape)[m])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 500 == 0 or step + 1 == args.steps:
            with torch.no_grad():
                idx = torch.arange(n_train, args.scenes)
                oc, os_, or_, ot = forward(idx)
                m = mask_t[idx][:, None].expand(ot.shape[:-1])
                table = ((ot > 0).float() == lab_t[idx][:, None])[m].all(-1).float().mean().item()
                obj = lab_c[idx] > 0
                relation = ((or_ > 0).float() == lab_r[idx])[obj].all(-1).float().mean().item()
                colour = (oc.argmax(-1) == lab_c[idx])[obj].float().mean().item()
                shape = (os_.argmax(-1) == lab_s[idx])[obj].float().mean().item()
                empty = ((oc.argmax(-1) == 0) == ~obj).float().mean().item()
            print(f"step {step + 1} loss {loss.item():.3f} held-out object tokens: colour {colour:.3f} shape {shape:.3f}; "
                  f"empty-vs-object {empty:.3f}" + (f"; relations (all 4 right) {relation:.3f}" if args.relations else "")
                  + (f"; scene table, per token and pair (all 4 right) {table:.3f}" if args.scene_relations else "")
                  + f" ({time.time() - t0:.0f}s)", flush=True)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)


if __name__ == "__main__":
    main()
