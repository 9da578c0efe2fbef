"""The stage-3 objective on the VLM families whose visual-token counts vary per image (Qwen2.5-VL,
LLaVA-OneVision, InternVL, Qwen3-VL): on a loader batch of mixed-size images (ragged ``vis_pos``,
-1 padded), the fused capture's attention term and the student's gradients equal eager attention
with ``output_attentions=True`` sliced to each sample's own visual block, the original loss per
sample; LM and KD equal the plain full-logits formulas."""

import copy

import pytest
import torch
import torch.nn.functional as F

from data_prep.synth import make_synthetic
from distill.data import DataConfig, build_loader
from distill.losses import attention_alignment_loss
from distill.models import tiny_families as tf
from distill.objective import DistillObjective, LossConfig


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfam_synth")
    make_synthetic(str(root), num=16, seed=1, num_test=1, shard_size=16, progress=False, sizes=[56, 112])
    return root / "instruct" / "shards"


def _models(pair):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return [AutoModelForImageTextToText.from_pretrained(p).float() for p in (pair.student, pair.teacher)]


def _eager(model):
    ref = copy.deepcopy(model)
    for c in (ref.config, ref.config.get_text_config()):
        c._attn_implementation = "eager"
    return ref


def _image_batch(shards, processor):
    """The first loader batch whose two image samples have different visual-token counts."""
    cfg = DataConfig(shards=[str(shards)], batch_size=2, max_length=1024, shuffle_buffer=0, num_workers=0)
    for batch in build_loader(cfg, processor, rank=0, world_size=1, seed=0):
        n = (batch["vis_pos"] >= 0).sum(1)
        if bool(batch["has_image"].all()) and n[0] != n[1]:
            return batch
    raise AssertionError("no batch with two differently sized images")


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_family_objective_matches_eager_reference(tmp_path, shards, family):
    pair = tf.build_family_pair(family, tmp_path / family, seed=0)
    student0, teacher0 = _models(pair)
    batch = _image_batch(shards, tf.load_processor(pair.student))
    vis = batch["vis_pos"]
    assert (vis < 0).any(), "the batch should be ragged (-1 padding on the shorter sample)"
    student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
    ref_s, ref_t = _eager(student0), _eager(teacher0)
    cfg = LossConfig(lm_weight=1.0, kd_weight=0.5, attn_weight=2.0, attn_kind="filtered_cosine",
                     backend="cpu_flash", attn_chunk_size=5)
    obj = DistillObjective(cfg, student, teacher)
    out = obj(student, teacher, batch)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs.update({k: batch[k] for k in batch["model_inputs"] if batch[k] is not None})
    s_out = ref_s(**inputs, output_attentions=True)
    with torch.no_grad():
        t_out = ref_t(**inputs, output_attentions=True)
    tgt = batch["labels"][:, 1:]
    keep = tgt != -100
    s_log = s_out.logits[:, :-1].float()
    t_log = t_out.logits[:, :-1, :s_log.shape[-1]].float()
    lm = F.cross_entropy(s_log[keep], tgt[keep], reduction="sum") / keep.sum()
    pt, ps = F.log_softmax(t_log, -1), F.log_softmax(s_log, -1)
    kd = (pt.exp() * (pt - ps)).sum(-1)[keep].sum() / keep.sum()
    terms = []
    for b in range(vis.shape[0]):
        pos = vis[b][vis[b] >= 0]

        def block(att):
            return att[b].float().mean(0)[pos][:, pos]

        s_maps = torch.stack([block(s_out.attentions[i]) for i in obj.student_layers])[:, None]
        t_maps = torch.stack([torch.stack([block(t_out.attentions[i]) for i in w]).mean(0)
                              for w in obj.teacher_windows])[:, None]
        terms.append(attention_alignment_loss(s_maps, t_maps, kind="filtered_cosine", reduction="sum"))
    attn = torch.stack(terms).sum() / vis.shape[0]
    ref = {"lm": lm, "kd": kd, "attn": attn, "loss": lm + 0.5 * kd + 2.0 * attn}
    for k in ("lm", "kd", "attn", "loss"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    assert out["attn"] > 0
    out["loss"].backward()
    ref["loss"].backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_s.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == ref_grads.keys()
    layer = obj.student_layers[0]
    assert any(f"layers.{layer}.self_attn" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=3e-5, rtol=1e-4, msg=name)
