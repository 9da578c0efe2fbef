"""Visualisation: capture-path maps vs eager attention, heat-map figure, curves."""

import json

import pytest
import torch
from PIL import Image

from distill.viz import (
    attention_maps,
    capture_visual_attention,
    grid_shape,
    metric_series,
    plot_curves,
    render_attention,
    visual_attention_profile,
)


@pytest.fixture(scope="module")
def pair(tiny_models):
    from distill.models import load_processor, load_vlm

    t = load_vlm(tiny_models.teacher).eval()
    s = load_vlm(tiny_models.student).eval()
    return t, s, load_processor(tiny_models.teacher), load_processor(tiny_models.student)


@pytest.fixture
def image():
    img = Image.new("RGB", (40, 30), (240, 240, 240))
    img.paste((200, 30, 30), (5, 5, 20, 20))
    img.paste((30, 30, 200), (22, 12, 36, 28))
    return img


def test_profile_is_column_mean_and_grid():
    maps = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])  # (1, 2, 2)
    torch.testing.assert_close(visual_attention_profile(maps), torch.tensor([[0.625, 0.375]]))
    # visible rows: column j averaged over the n - j rows i >= j
    torch.testing.assert_close(visual_attention_profile(maps, visible_rows=True), torch.tensor([[0.625, 0.75]]))
    assert visual_attention_profile(torch.rand(3, 2, 5, 5, dtype=torch.bfloat16)).dtype == torch.float32
    assert grid_shape(64) == (8, 8) and grid_shape(729) == (27, 27)
    with pytest.raises(ValueError, match="square grid"):
        grid_shape(65)
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\]"):
        visual_attention_profile(torch.rand(3, 4, 5))


def test_capture_path_equals_eager_attention(pair, tiny_models, image):
    """The maps the figure shows equal the eager attention probabilities' visual block."""
    from transformers import LlavaForConditionalGeneration

    from distill.viz.attention_maps import prompt_batch

    _, student, _, proc = pair
    layers = [0, 2, 3]
    captured = capture_visual_attention(student, proc, image, "Where is the red square?", layers)
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_models.student, attn_implementation="eager").eval()
    batch = prompt_batch(proc, image, "Where is the red square?")
    with torch.no_grad():
        out = eager(**batch, output_attentions=True)
    vis = (batch["input_ids"][0] == eager.config.image_token_id).nonzero().flatten()
    assert captured.shape == (3, len(vis), len(vis)) == (3, 64, 64)
    for i, l in enumerate(layers):
        ref = out.attentions[l][0].mean(0)[vis][:, vis]  # (n, n), heads averaged
        torch.testing.assert_close(captured[i], ref.float(), rtol=1e-4, atol=1e-6)
    assert torch.triu(captured, diagonal=1).abs().max() == 0  # causal zeros above the diagonal


def test_attention_maps_and_png_size(pair, image, tmp_path):
    teacher, student, t_proc, s_proc = pair
    res = attention_maps(teacher, student, t_proc, s_proc, image, "Describe the image.")
    from distill.losses import match_layers

    s_layers, t_windows = match_layers(4, 6)
    assert res["student_layers"] == s_layers and res["teacher_windows"] == t_windows
    L = len(s_layers)
    assert res["student"].shape == res["teacher"].shape == (L, 64) and res["grid"] == (8, 8)
    # sum over keys of the column means = mean visual row mass, in (0, 1]
    for prof in (res["student"], res["teacher"]):
        mass = prof.sum(-1)
        assert bool((mass > 0).all()) and bool((mass <= 1 + 1e-5).all())
    # teacher window = mean of the window layers' maps
    t_ref = capture_visual_attention(teacher, t_proc, image, "Describe the image.", t_windows[0]).mean(0)
    torch.testing.assert_close(res["teacher"][0], visual_attention_profile(t_ref))

    out = render_attention(image, res["teacher"], res["student"], tmp_path / "a.png", cell_inches=2.0, dpi=50)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (3 * 100, L * 100)
        assert len(set(png.convert("RGB").getcolors(1 << 20) or [])) > 10  # not a blank canvas
    with pytest.raises(ValueError, match=r"\[L, n\]"):
        render_attention(image, res["teacher"], res["student"][:, :4], tmp_path / "b.png")


def test_cli_attention_explicit_layers(tiny_models, image, tmp_path):
    from distill.viz.__main__ import main

    img = tmp_path / "img.png"
    image.save(img)
    out = main(["attention", "--teacher", str(tiny_models.teacher), "--student", str(tiny_models.student),
                "--image", str(img), "--prompt", "What is left of the blue square?", "--out", str(tmp_path / "m.png"),
                "--layers", "1", "3", "--visible-rows"])
    with Image.open(out) as png:
        assert png.size == (900, 600)  # 2 matched layers, default 3-inch cells at 100 dpi
    with pytest.raises(SystemExit, match="does not exist"):
        main(["attention", "--teacher", str(tiny_models.teacher), "--student", str(tiny_models.student),
              "--image", str(tmp_path / "missing.png"), "--prompt", "x", "--out", str(tmp_path / "n.png")])


def test_curves_png_and_series(tmp_path):
    rows = [{"step": s, "loss": 3.0 / (s + 1), "lm": 2.0 / (s + 1), "kd": 0.5, "attn": 0.1 * s, "tag": "train", "stage": 3}
            for s in range(6)]
    rows.insert(3, {"step": 2, "eval_acc": 0.5})
    rows.append({"step": 6, "loss": float("nan")})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    from distill.viz.curves import read_metrics

    series = metric_series(read_metrics(path))
    assert list(series) == ["loss", "lm", "kd", "attn", "eval_acc"]
    assert series["lm"][0] == list(range(6)) and series["eval_acc"] == ([2], [0.5])
    assert series["loss"][0][-1] == 6  # non-finite kept as a gap
    out = plot_curves(path, tmp_path / "c.png")
    with Image.open(out) as png:
        assert png.size == (2 * 800, 3 * 250)  # 5 metrics: 2-column grid
    from distill.viz.__main__ import main

    out = main(["curves", str(path), "--out", str(tmp_path / "d.png"), "--keys", "loss", "kd"])
    with Image.open(out) as png:
        assert png.size == (800, 500)
    path.write_text('{"step": 0, "loss": 1}\n{"loss": 2}\n')
    with pytest.raises(ValueError, match="line 2 has no numeric 'step'"):
        plot_curves(path, tmp_path / "e.png")
    path.write_text('{"step": 0, "loss": 1}\n{oops\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:2: not valid JSON"):
        main(["curves", str(path), "--out", str(tmp_path / "f.png")])
    path.write_text('{"step": 0, "loss": 1}\n')
    with pytest.raises(ValueError, match="no numeric values for metric 'kd'"):
        plot_curves(path, tmp_path / "g.png", keys=["kd"])


def test_sample_blocks_ragged_and_multi_image():
    from distill.viz.attention_maps import sample_blocks

    L, n = 2, 13
    maps = torch.arange(L * 3 * n * n, dtype=torch.float32).view(L, 3, n, n)
    vis_pos = torch.full((3, n), -1)
    vis_pos[0, :9] = torch.arange(5, 14)  # 9 tokens (3x3 grid), padded to 13
    vis_pos[1] = torch.arange(13)  # two images: 4 + 9 tokens
    ids = torch.full((3, n), -1)
    ids[0, :9] = 0
    ids[1, :4], ids[1, 4:] = 0, 1
    (b0,) = sample_blocks(maps, vis_pos, 0)
    assert b0.shape == (L, 9, 9)
    torch.testing.assert_close(b0, maps[:, 0, :9, :9])
    assert grid_shape(visual_attention_profile(b0).shape[-1]) == (3, 3)
    one = sample_blocks(maps, vis_pos, 1)  # no image ids: the whole visual block
    assert len(one) == 1 and one[0].shape == (L, 13, 13)
    i0, i1 = sample_blocks(maps, vis_pos, 1, ids)
    torch.testing.assert_close(i0, maps[:, 1, :4, :4])
    torch.testing.assert_close(i1, maps[:, 1, 4:, 4:])
    assert [grid_shape(x.shape[-1]) for x in (i0, i1)] == [(2, 2), (3, 3)]
    assert sample_blocks(maps, vis_pos, 2, ids) == []
    with pytest.raises(ValueError, match="vis_pos must be"):
        sample_blocks(maps, vis_pos[:, :5], 0)


def test_family_heat_maps_use_the_image_grid(tmp_path):
    """Qwen-VL: the grid is the processor's image_grid_thw after the merge (a 112 x 56 image gives
    a non-square 2 x 4 grid here, drawn as such); tiled families (OneVision, InternVL) have no single
    grid and get a clear error instead of a heat map over the wrong layout."""
    from distill.eval.common import EvalDataError
    from distill.models import load_processor, load_vlm
    from distill.models import tiny_families as tf
    from distill.viz.attention_maps import attention_figure, image_grid

    pair = tf.build_family_pair("qwen2_5_vl", tmp_path / "q", seed=0)
    t, s = load_vlm(pair.teacher).eval(), load_vlm(pair.student).eval()
    tp, sp = load_processor(pair.teacher), load_processor(pair.student)
    wide = Image.new("RGB", (112, 56), (200, 30, 30))
    res = attention_maps(t, s, tp, sp, wide, "what is this?")
    assert res["grid"] == (2, 4) and res["student"].shape[-1] == 8
    png = attention_figure(t, s, tp, sp, wide, "what is this?", tmp_path / "q.png")
    assert png.exists() and png.stat().st_size > 0
    with pytest.raises(ValueError, match="does not hold"):
        render_attention(wide, res["teacher"], res["student"], tmp_path / "bad.png", grid=(3, 3))
    ov = tf.build_family_pair("llava_onevision", tmp_path / "o", seed=0)
    with pytest.raises(EvalDataError, match="tiles"):
        image_grid(load_processor(ov.student), wide, 88)
