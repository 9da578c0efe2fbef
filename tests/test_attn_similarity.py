"""Student–teacher visual-attention similarity (distill/eval/attn_similarity.py) on the tiny pair."""

import copy
import json

import pytest
import torch

from distill.eval.common import EvalDataError


@pytest.fixture(scope="module")
def pair(tiny_models):
    from distill.models import load_processor, load_vlm

    t = load_vlm(tiny_models.teacher).eval()
    s = load_vlm(tiny_models.student).eval()
    return t, s, load_processor(tiny_models.teacher), load_processor(tiny_models.student)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data_prep.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth_attn")
    make_synthetic(str(out), num=2, seed=0, num_test=2, progress=False)
    return out


@pytest.fixture(scope="module")
def samples(synth):
    from distill.eval.compositional import load_compositional

    return load_compositional([str(synth / "compositional" / "shards")])


def test_model_against_itself_is_one(pair, samples):
    from distill.eval.attn_similarity import evaluate_attn_similarity

    t, s, tp, sp = pair
    for model, proc in ((s, sp), (t, tp)):
        res, per = evaluate_attn_similarity(model, model, proc, proc, samples, progress=False)
        assert res["images"] == len(samples) == len(per) == 2
        assert len(res["per_layer"]) == len(res["student_layers"]) == len(res["teacher_windows"]) >= 1
        assert res["per_layer"] == pytest.approx([1.0] * len(res["per_layer"]), abs=1e-5)
        assert res["mean"] == pytest.approx(1.0, abs=1e-5)


def _sharpened(model, scale=30.0):
    """A copy of `model` whose text attention is sharper (query projections scaled): the random
    tiny models attend almost uniformly, so a sharper copy gives a clearly different attention."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in out.named_modules():
            if name.endswith("self_attn.q_proj"):
                mod.weight.mul_(scale)
    return out


def test_teacher_vs_student_is_a_cosine_below_one(pair, samples):
    from distill.eval.attn_similarity import evaluate_attn_similarity, image_similarity
    from distill.losses import attention_alignment_loss, match_layers
    from distill.viz.attention_maps import capture_visual_attention

    t, s, tp, sp = pair
    res, per = evaluate_attn_similarity(t, s, tp, sp, samples, progress=False)
    s_layers, windows = match_layers(s.config.text_config.num_hidden_layers, t.config.text_config.num_hidden_layers)
    assert res["student_layers"] == s_layers and res["teacher_windows"] == windows
    assert all(-1.0 <= c <= 1.0 for c in res["per_layer"])
    # the random tiny pair attends almost uniformly: close to 1, but not 1 (self-similarity is 1 to ~1e-7)
    assert 1.0 - res["mean"] > 1e-6
    # per_layer is the mean over images; mean is the mean over layers
    by_img = torch.tensor([p["per_layer"] for p in per], dtype=torch.float64)
    assert res["per_layer"] == pytest.approx(by_img.mean(0).tolist())
    assert res["mean"] == pytest.approx(sum(res["per_layer"]) / len(res["per_layer"]))

    # a student with clearly different attention: clearly below 1, and the loss's filter matters
    sharp = _sharpened(s)
    img, prompt = samples[0].image.load(), "Describe the image."
    one = image_similarity(t, sharp, tp, sp, img, prompt, student_layers=[0, 1, 2, 3])
    plain = image_similarity(t, sharp, tp, sp, img, prompt, student_layers=[0, 1, 2, 3], kind="cosine")
    assert all(-1.0 <= c < 0.9999 for c in one["per_layer"])
    assert one["per_layer"] != pytest.approx(plain["per_layer"], abs=1e-6)
    # the value is 1 - the training loss on the captured maps (the loss's own filter)
    s_layers, windows = one["student_layers"], one["teacher_windows"]
    t_layers = sorted({i for w in windows for i in w})
    sm = capture_visual_attention(sharp, sp, img, prompt, s_layers)
    tm = capture_visual_attention(t, tp, img, prompt, t_layers)
    tw = torch.stack([tm[[t_layers.index(i) for i in w]].mean(0) for w in windows])
    for k, c in enumerate(one["per_layer"]):
        loss = attention_alignment_loss(sm[k][None, None], tw[k][None, None], kind="filtered_cosine")
        assert c == pytest.approx(1.0 - float(loss), abs=1e-6)
    # the whole stack at once, as training calls it (sum over layers, one sample)
    loss = attention_alignment_loss(sm[:, None], tw[:, None], kind="filtered_cosine",
                                    vis_mask=torch.ones(1, sm.shape[-1], dtype=torch.bool))
    assert sum(1.0 - c for c in one["per_layer"]) == pytest.approx(float(loss), abs=1e-5)


def test_bad_input_errors(pair, samples, monkeypatch):
    import importlib

    from distill.eval import attn_similarity as mod

    # the module itself: distill.viz re-exports a function of the same name
    am = importlib.import_module("distill.viz.attention_maps")

    t, s, tp, sp = pair
    with pytest.raises(EvalDataError, match="no images"):
        mod.evaluate_attn_similarity(t, s, tp, sp, [], progress=False)
    real = am.capture_visual_attention

    def fake(model, processor, image, prompt, layers, backend="auto"):
        maps = real(model, processor, image, prompt, layers, backend)
        return maps[:, 1:, 1:] if model is t else maps  # the teacher "sees" one token fewer

    monkeypatch.setattr(am, "capture_visual_attention", fake)
    with pytest.raises(EvalDataError, match="image-token count"):
        mod.evaluate_attn_similarity(t, s, tp, sp, samples, progress=False)
    with pytest.raises(ValueError, match="kind"):
        mod.image_similarity(t, s, tp, sp, samples[0].image.load(), "x", kind="kl")


def test_cli_writes_json_and_markdown(tiny_models, synth, tmp_path, capsys):
    from distill.eval.__main__ import main

    out = tmp_path / "eval"
    res = main(["attn_similarity", "--teacher", str(tiny_models.teacher), "--student", str(tiny_models.student),
                "--data", str(synth / "compositional" / "shards"), "--limit", "1", "--device", "cpu",
                "--student-layers", "0", "1", "--window", "1", "--out", str(out), "--no-progress"])
    saved = json.loads((out / "attn_similarity.json").read_text())
    assert {"student_layers", "teacher_windows", "per_layer", "mean", "images"} <= set(saved)
    assert saved["student_layers"] == [0, 1] and all(len(w) == 1 for w in saved["teacher_windows"])
    assert saved["images"] == 1 and len(saved["per_layer"]) == 2 and saved["mean"] == pytest.approx(res["mean"])
    assert saved["kind"] == "filtered_cosine"
    md = (out / "attn_similarity.md").read_text()
    assert md.startswith("| student layer |") and "**mean**" in md and "**mean**" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "attn_similarity_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["per_layer"] == pytest.approx(saved["per_layer"])
    with pytest.raises(SystemExit, match="matches no file"):
        main(["attn_similarity", "--teacher", str(tiny_models.teacher), "--student", str(tiny_models.student),
              "--data", str(tmp_path / "empty*.json"), "--no-progress"])
