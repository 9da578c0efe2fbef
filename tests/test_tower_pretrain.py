"""The tiny tower's pre-training: its targets from the scene, and a short run that trains the tower only."""
import json

import pytest
import torch

from data_prep.synth import COLORS, RELATIONS, SHAPES, Obj
from distill.models import tower_pretrain as tp


@pytest.fixture(scope="module")
def tiny_pair_p8(tmp_path_factory):
    """The demo's kind of tiny pair: patch 8 (36 image tokens), sin/cos tower positions."""
    from distill.models.tiny import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny_p8"), seed=0, patch_size=8, position_init="sincos")


def test_scene_labels_by_hand():
    # a red circle in the top-left cell, a blue star in the bottom-right one; a 6x6 grid: 2x2 tokens per cell
    scene = [Obj("red", "circle", (0, 0)), Obj("blue", "star", (2, 2))]
    lab = tp.scene_labels([scene], grid=6)
    colors, shapes, rels = sorted(COLORS), list(SHAPES), list(RELATIONS)
    color = lab.color[0].view(6, 6)
    assert (color[:2, :2] == colors.index("red") + 1).all() and (color[4:, 4:] == colors.index("blue") + 1).all()
    assert (color > 0).sum() == 8  # every other token shows an empty cell
    assert (lab.shape[0].view(6, 6)[4:, 4:] == shapes.index("star") + 1).all()
    rel = lab.rel[0].view(6, 6, len(rels))
    # "another object lies <r> of this one": the star lies right of and below the circle
    assert rel[0, 0].tolist() == [float(r in ("to the right of", "below")) for r in rels]
    assert rel[5, 5].tolist() == [float(r in ("to the left of", "above")) for r in rels]
    assert rel[2, 2].sum() == 0  # an empty cell
    c, s = shapes.index("circle"), shapes.index("star")
    assert lab.table[0, c, s].tolist() == [float(r in ("to the left of", "above")) for r in rels]
    assert lab.table[0, s, c].tolist() == [float(r in ("to the right of", "below")) for r in rels]
    mask = torch.zeros(len(shapes), len(shapes), dtype=torch.bool)
    mask[c, s] = mask[s, c] = True
    assert torch.equal(lab.table_mask[0], mask)  # present pairs only, never a shape with itself


def test_scene_labels_refuse_repeated_shapes():
    with pytest.raises(ValueError, match="distinct shapes"):
        tp.scene_labels([[Obj("red", "circle", (0, 0)), Obj("blue", "circle", (1, 1))]], grid=6)


def test_short_run_trains_the_tower_only(tiny_pair_p8, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "tower"
    metrics = tp.pretrain_tower(tiny_pair_p8.teacher, out, steps=200, scenes=300, held_out=60, batch_size=16,
                                log=lambda s: None)
    # chance: colour 1/7 on object tokens; object tokens are 2/9 of all, so "all empty" scores 0.78
    assert metrics["colour"] > 0.5 and metrics["empty_vs_object"] > 0.9
    assert json.loads((out / "tower_pretrain.json").read_text())["held_out_accuracy"] == metrics
    before = LlavaForConditionalGeneration.from_pretrained(tiny_pair_p8.teacher).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("vision_tower" in k for k in changed)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


def test_held_out_must_leave_training_scenes(tiny_pair_p8, tmp_path):
    with pytest.raises(ValueError, match="must exceed the 500 held-out"):
        tp.pretrain_tower(tiny_pair_p8.teacher, tmp_path / "o", scenes=500)
