"""Stage-3 objective on the tiny LLaVA pair vs the same loss computed the eager/reference way."""

import copy

import pytest
import torch
import torch.nn.functional as F

from distill.losses import attention_alignment_loss
from distill.models import load_vlm
from distill.objective import DistillObjective, LossConfig

N_IMG = 64


@pytest.fixture(scope="module")
def pair(tiny_models):
    torch.manual_seed(0)
    return load_vlm(tiny_models.student), load_vlm(tiny_models.teacher)


def _batch(student, t_len=90):
    cfg = student.config
    img, pad = cfg.image_token_id, cfg.text_config.pad_token_id or 0
    g = torch.Generator().manual_seed(1)
    hi = min(cfg.text_config.vocab_size, 200)
    ids = torch.randint(10, hi, (3, t_len), generator=g)
    ids[ids == img] = 11
    starts, lens = [3, None, 12], [t_len, 50, 80]  # sample 1: no image; samples 1,2 right-padded
    vis = []
    for b, s in enumerate(starts):
        if s is not None:
            ids[b, s : s + N_IMG] = img
            vis.append(torch.arange(s, s + N_IMG))
        else:
            vis.append(torch.arange(N_IMG))
        ids[b, lens[b] :] = pad
    mask = (torch.arange(t_len)[None] < torch.tensor(lens)[:, None]).long()
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[ids == img] = -100
    labels[:, :5] = -100
    has = torch.tensor([s is not None for s in starts])
    pix = torch.randn(int(has.sum()), 3, 48, 48, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix,
            "has_image": has, "vis_pos": torch.stack(vis)}


def _reference(cfg, student, teacher, batch, s_layers, t_windows):
    """Eager attention + output_attentions + slicing, hand-written KD and LM."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    s_out = student(**inputs, output_attentions=True)
    with torch.no_grad():
        t_out = teacher(**inputs, output_attentions=True)
    tgt = batch["labels"][:, 1:]
    keep = tgt != -100
    ntok = keep.sum()
    s_log = s_out.logits[:, :-1].float()
    v = s_log.shape[-1]
    t_log = t_out.logits[:, :-1, :v].float()
    lm = F.cross_entropy(s_log[keep], tgt[keep], reduction="sum") / ntok
    temp = cfg.kd_temperature
    pt = F.log_softmax(t_log / temp, -1)
    ps = F.log_softmax(s_log / temp, -1)
    kd = ((pt.exp() * (pt - ps)).sum(-1)[keep]).sum() * temp**2 / ntok
    vis = batch["vis_pos"]
    b, n = vis.shape

    def block(att):  # (B, H, T, T) -> (B, n, n) head-averaged visual block
        a = att.float().mean(1)
        rows = a.gather(1, vis[:, :, None].expand(b, n, a.shape[-1]))
        return rows.gather(2, vis[:, None, :].expand(b, n, n))

    s_maps = torch.stack([block(s_out.attentions[i]) for i in s_layers])
    t_maps = torch.stack([torch.stack([block(t_out.attentions[i]) for i in w]).mean(0) for w in t_windows])
    has = batch["has_image"]
    attn = attention_alignment_loss(s_maps, t_maps, has, kind=cfg.attn_kind, reduction="sum") / has.sum()
    loss = cfg.lm_weight * lm + cfg.kd_weight * kd + cfg.attn_weight * attn
    return {"loss": loss, "lm": lm, "kd": kd, "attn": attn}


def _eager_copy(model):
    ref = copy.deepcopy(model)
    ref.config.text_config._attn_implementation = "eager"
    ref.config.vision_config._attn_implementation = "eager"
    return ref


@pytest.mark.parametrize("attn_kind", ["filtered_cosine", "kl"])
def test_stage3_objective_matches_reference(pair, attn_kind):
    student0, teacher0 = pair
    ref_s, ref_t = _eager_copy(student0), _eager_copy(teacher0)
    student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
    student.config.vision_config._attn_implementation = "eager"
    teacher.config.vision_config._attn_implementation = "eager"
    cfg = LossConfig(lm_weight=1.0, kd_weight=0.7, kd_temperature=2.0, attn_weight=3.0, attn_kind=attn_kind,
                     backend="cpu_flash", attn_chunk_size=5)
    obj = DistillObjective(cfg, student, teacher)
    assert obj.student_layers == [1] and obj.teacher_windows == [[1, 2]]  # 4-layer student, 6-layer teacher
    batch = _batch(student)
    batch["vis_key_len"] = int(batch["vis_pos"].max()) + 1  # as collate gives it: bounds the op's key loops
    out = obj(student, teacher, batch)
    ref = _reference(cfg, ref_s, ref_t, batch, obj.student_layers, obj.teacher_windows)
    for k in ("loss", "lm", "kd", "attn"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    assert out["attn"] > 0 and out["kd"] > 0
    out["loss"].backward()
    ref["loss"].backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_s.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    lm_layer_grads = [n for n in grads if "language_model.layers.1.self_attn" in n]
    assert lm_layer_grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_accumulation_equals_big_batch(pair):
    student0, teacher = pair
    cfg = LossConfig(kd_weight=1.0, attn_weight=1.0, backend="cpu_flash")
    batch = _batch(student0)
    s_big, s_acc = copy.deepcopy(student0), copy.deepcopy(student0)
    big = DistillObjective(cfg, s_big, teacher)(s_big, teacher, batch)
    big["loss"].backward()
    obj = DistillObjective(cfg, s_acc, teacher)
    ntok = (batch["labels"][:, 1:] != -100).sum()
    nimg = batch["has_image"].sum()
    total = 0.0
    for idx in ([0], [1, 2]):
        mb = {k: v[idx] for k, v in batch.items() if k != "pixel_values"}
        img_rows = torch.cumsum(batch["has_image"].long(), 0)[idx] - 1
        sel = [r for r, h in zip(img_rows.tolist(), mb["has_image"].tolist()) if h]
        mb["pixel_values"] = batch["pixel_values"][sel] if sel else None
        out = obj(s_acc, teacher, mb, num_tokens=ntok, num_images=nimg)
        out["loss"].backward()
        total = total + out["loss"].detach()
    torch.testing.assert_close(total, big["loss"].detach(), atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(s_big.named_parameters(), s_acc.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_no_image_batch_gives_zero_attn_but_runs_forwards(pair):
    student, teacher = pair
    cfg = LossConfig(kd_weight=1.0, attn_weight=1.0, backend="cpu_flash")
    obj = DistillObjective(cfg, student, teacher)
    batch = _batch(student)
    batch = {k: v[[1]] for k, v in batch.items() if k != "pixel_values"}
    batch["pixel_values"] = None
    calls = []

    def wrap(m, tag):
        def fn(**kw):
            calls.append(tag)
            return m(**kw)

        return fn

    out = obj(wrap(student, "s"), wrap(teacher, "t"), batch)
    assert calls == ["s", "t"]
    assert out["attn"] == 0 and torch.isfinite(out["loss"]) and out["kd"] > 0


def test_config_validation_and_teacher_requirement(pair):
    student, _ = pair
    with pytest.raises(ValueError, match="loss.kd_kind"):
        LossConfig(kd_kind="kl")
    with pytest.raises(ValueError, match="loss.attn_weight"):
        LossConfig(attn_weight=-1)
    with pytest.raises(ValueError, match="loss.backend"):
        LossConfig(backend="triton")
    with pytest.raises(ValueError, match="loss.capture_impl"):
        LossConfig(capture_impl="cuda")
    with pytest.raises(ValueError, match="loss.kd_temperature"):
        LossConfig(kd_temperature=0)
    with pytest.raises(ValueError, match="need a teacher"):
        DistillObjective(LossConfig(kd_weight=1.0), student, None)
    obj = DistillObjective(LossConfig(backend="cpu_flash"), student, None)  # LM only
    out = obj(student, None, _batch(student))
    assert out["kd"] == 0 and out["attn"] == 0 and out["loss"] == out["lm"]


# ----------------------------------------------------------------------------- ragged visual tokens (issue 15)


def _ragged_batch(student, t_len=200):
    """Sample 0: two images (128 visual tokens, vis_image_id 0/1); sample 1: one image, only its
    first 40 image tokens declared visual (ragged n: 40 real + 88 x -1); sample 2: no image."""
    cfg = student.config
    img, pad = cfg.image_token_id, cfg.text_config.pad_token_id or 0
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, min(cfg.text_config.vocab_size, 200), (3, t_len), generator=g)
    ids[ids == img] = 11
    ids[0, 3:3 + N_IMG] = img
    ids[0, 80:80 + N_IMG] = img
    ids[1, 20:20 + N_IMG] = img
    lens = [t_len, 150, 120]
    for b in range(3):
        ids[b, lens[b]:] = pad
    mask = (torch.arange(t_len)[None] < torch.tensor(lens)[:, None]).long()
    labels = ids.clone()
    labels[(mask == 0) | (ids == img)] = -100
    labels[:, :5] = -100
    n_max = 2 * N_IMG
    vis = torch.full((3, n_max), -1, dtype=torch.long)
    vis_id = torch.full((3, n_max), -1, dtype=torch.long)
    vis[0] = torch.cat([torch.arange(3, 3 + N_IMG), torch.arange(80, 80 + N_IMG)])
    vis_id[0] = torch.cat([torch.zeros(N_IMG), torch.ones(N_IMG)]).long()
    vis[1, :40] = torch.arange(20, 60)
    vis_id[1, :40] = 0
    pix = torch.randn(3, 3, 48, 48, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pix,
            "has_image": torch.tensor([True, True, False]), "vis_pos": vis, "vis_image_id": vis_id,
            "vis_key_len": int(vis.max()) + 1}


@pytest.mark.parametrize("attn_kind", ["filtered_cosine", "kl"])
def test_ragged_and_multi_image_attention_term(pair, attn_kind):
    """Objective on a ragged, multi-image batch == eager attention sliced per image block, the
    original loss per block, averaged over each sample's images, summed over samples / 2."""
    student0, teacher0 = pair
    ref_s, ref_t = _eager_copy(student0), _eager_copy(teacher0)
    student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
    for m in (student, teacher):
        m.config.vision_config._attn_implementation = "eager"
    cfg = LossConfig(kd_weight=0.0, attn_weight=1.0, attn_kind=attn_kind, backend="cpu_flash", attn_chunk_size=7)
    obj = DistillObjective(cfg, student, teacher)
    batch = _ragged_batch(student)
    out = obj(student, teacher, batch)

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    s_out = ref_s(**inputs, output_attentions=True)
    with torch.no_grad():
        t_out = ref_t(**inputs, output_attentions=True)
    total = 0.0
    for b in range(2):
        terms = []
        for k in sorted(set(batch["vis_image_id"][b][batch["vis_image_id"][b] >= 0].tolist())):
            pos = batch["vis_pos"][b][batch["vis_image_id"][b] == k]

            def block(att):
                return att[b].float().mean(0)[pos][:, pos]

            s_maps = torch.stack([block(s_out.attentions[i]) for i in obj.student_layers])[:, None]
            t_maps = torch.stack([torch.stack([block(t_out.attentions[i]) for i in w]).mean(0)
                                  for w in obj.teacher_windows])[:, None]
            terms.append(attention_alignment_loss(s_maps, t_maps, kind=attn_kind, reduction="sum"))
        total = total + torch.stack(terms).mean()
    ref = total / 2
    torch.testing.assert_close(out["attn"], ref, atol=1e-5, rtol=1e-5)
    assert out["attn"] > 0
    out["attn"].backward()
    ref.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_s.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_ragged_batch_equals_samples_alone(pair):
    """Two samples of different n in one -1-padded batch: the attention term equals the mean of
    each sample run alone (unpadded vis_pos, its own normaliser of 1)."""
    student, teacher = pair
    cfg = LossConfig(kd_weight=0.0, attn_weight=1.0, backend="cpu_flash")
    obj = DistillObjective(cfg, student, teacher)
    batch = _ragged_batch(student)
    both = {k: (v[[0, 1]] if isinstance(v, torch.Tensor) and k != "pixel_values" else v) for k, v in batch.items()}
    both["vis_image_id"] = None  # one block per sample: sample 0's 128 tokens are one block
    with torch.no_grad():
        together = obj(student, teacher, both)["attn"]
        alone = []
        for b, (pix, n) in enumerate(((batch["pixel_values"][:2], 128), (batch["pixel_values"][2:], 40))):
            one = {k: v[[b]] for k, v in both.items() if isinstance(v, torch.Tensor) and k != "pixel_values"}
            one["pixel_values"] = pix
            one["vis_pos"] = one["vis_pos"][:, :n]
            assert (one["vis_pos"] >= 0).all()
            alone.append(obj(student, teacher, one)["attn"])
    torch.testing.assert_close(together, (alone[0] + alone[1]) / 2, atol=1e-6, rtol=1e-5)
    assert alone[0] > 0 and alone[1] > 0
