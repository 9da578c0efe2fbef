"""Export of the realistic case, a teacher wider than the student (Ht=96 > Hs=64).

Teacher-adapter fetch makes the student's projector V -> Ht -> Ht -> Hs; its exact fold has
inner width Ht, which transformers' stock LLaVA projector (inner width Hs) cannot hold.
- default export: exact, projector of inner width Ht as `modeling_distill_llava.py` in the
  folder (config `auto_map`), loaded by the stock auto classes with trust_remote_code=True;
- `--stock`: a plain LlavaForConditionalGeneration folder with a fitted projector, fit reported.
"""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from distill.export import EXPORT_INFO, REMOTE_CODE_FILE, export_student, images_from_folder, main, template_source
from distill.models import build_student, load_processor, load_student_checkpoint, load_vlm, save_student_checkpoint
from distill.models import tiny
from distill.models.projector import FetchedProjector, fit_stock_projector, fold_projector_exact, projector_rel_error
from test_export import _randomize_adapter
from test_models import _batch

# Stated bounds of the stock fit on the tiny pair (measured: held-out relative projector error
# ~7e-4, logits max |diff| ~4e-4 over the held-out prompts, top-1 agreement 1.0).
FIT_REL_ERROR_BOUND = 1e-2
FIT_LOGIT_BOUND = 0.05


def _scene(rs):
    im = Image.new("RGB", (48, 48), tuple(int(c) for c in rs.randint(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rs.randint(0, 40, 2)
        d.ellipse([x, y, x + rs.randint(4, 16), y + rs.randint(4, 16)], fill=tuple(int(c) for c in rs.randint(0, 256, 3)))
    return im


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Tiny pair with a wider teacher; a fetched student with a trained-looking adapter, saved."""
    root = tmp_path_factory.mktemp("wide")
    pair = tiny.build_tiny_pair(root / "pair", seed=0, teacher_hidden=96)
    student = build_student(pair.student, pair.teacher)
    proj = student.model.multi_modal_projector
    assert isinstance(proj, FetchedProjector) and proj.spec()["teacher_hidden"] == 96 > proj.spec()["student_hidden"] == 64
    _randomize_adapter(student)
    student.eval()
    batch = _batch(pair.student)
    with torch.no_grad():
        ref = student(**batch).logits
    save_student_checkpoint(root / "ck", student, load_processor(pair.student))
    return {"root": root, "pair": pair, "ck": root / "ck", "batch": batch, "ref": ref}


def test_export_exact_custom_projector(wide, tmp_path, capsys):
    # transformers copies the folder's code to HF_MODULES_CACHE/transformers_modules/<folder name>/:
    # a unique name keeps concurrent test sessions apart
    out = tmp_path / f"custom_{tmp_path.parent.name}_{tmp_path.name}".replace("-", "_")
    assert main(["--checkpoint", str(wide["ck"]), "--out", str(out), "--dtype", "fp32"]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["export"] == "custom" and info["exact"] and (info["teacher_hidden"], info["student_hidden"]) == (96, 64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoModelForImageTextToText": "modeling_distill_llava.DistillLlavaForConditionalGeneration"}
    assert cfg["projector_intermediate_size"] == 96 and cfg["model_type"] == "llava"
    assert (out / REMOTE_CODE_FILE).read_text() == template_source()
    assert not (out / "distill_checkpoint.json").exists()

    # stock auto classes, remote code from the folder
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    proc = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "DistillLlavaForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's file, not ours
    assert tuple(model.model.multi_modal_projector.linear_2.weight.shape) == (64, 96)
    batch = wide["batch"]
    with torch.no_grad():
        got = model(**batch).logits
    assert (got - wide["ref"]).abs().max() < 1e-4
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    assert gen.shape[1] >= batch["input_ids"].shape[1] + 1
    assert isinstance(proc.batch_decode(gen[:, batch["input_ids"].shape[1]:])[0], str)

    # the stock class refuses it loudly (no silent re-initialisation of the projector)
    with pytest.raises(RuntimeError, match="mismatch"):
        LlavaForConditionalGeneration.from_pretrained(out)
    # this project's loader (eval, viz, as teacher) reads it with the package's class, no remote code
    ours = load_vlm(out).eval()
    assert type(ours).__module__ == "distill.models.modeling_distill_llava"
    with torch.no_grad():
        assert (ours(**batch).logits - wide["ref"]).abs().max() < 1e-4
    # such a folder cannot be a fetch teacher (its projector is not square): a clear error
    from distill.models import ModelConfigError

    with pytest.raises(ModelConfigError, match="custom projector"):
        build_student(wide["pair"].student, out)
    # the training-form checkpoint folded (what distill.eval does) is the same function
    folded = load_student_checkpoint(wide["ck"], adapter_fetch=False).eval()
    with torch.no_grad():
        assert (folded(**batch).logits - wide["ref"]).abs().max() < 1e-4
    # ... and saved again in training form (a later stage with adapter_fetch: false) it reloads as is
    save_student_checkpoint(tmp_path / "ck2", folded, proc)
    again = load_student_checkpoint(tmp_path / "ck2").eval()
    assert tuple(again.model.multi_modal_projector.linear_1.weight.shape) == (96, 32)
    with torch.no_grad():
        assert (again(**batch).logits - wide["ref"]).abs().max() < 1e-4


def _write_shard(path, images):
    """A data_prep-style WebDataset shard: <key>.json + <key>.png per sample."""
    import io

    with tarfile.open(path, "w") as tar:
        for i, im in enumerate(images):
            key = f"{i:09d}"
            for name, data in ((f"{key}.json", json.dumps({"id": key}).encode()), (f"{key}.png", None)):
                if data is None:
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    data = buf.getvalue()
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def test_export_stock_fit(wide, tmp_path, capsys):
    rs = np.random.RandomState(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "shard-000000.tar", [_scene(rs) for _ in range(20)])
    _write_shard(shards / "shard-000001.tar", [_scene(rs) for _ in range(20)])
    out = tmp_path / "stock"
    args = ["--checkpoint", str(wide["ck"]), "--out", str(out), "--dtype", "fp32", "--stock", "--fit-shards", str(shards),
            "--fit-steps", "200", "--max-fit-error", str(FIT_REL_ERROR_BOUND)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fitted projector" in printed and "rel_error_val" in printed
    info = json.loads((out / EXPORT_INFO).read_text())
    fit = info["fit"]
    assert info["export"] == "stock-fit" and not info["exact"]
    assert (fit["fit_images"], fit["val_images"], fit["val_rows"]) == (32, 8, 8 * 64)
    assert fit["rel_error_val"] < FIT_REL_ERROR_BOUND and fit["rel_error_val"] <= fit["rel_error_lstsq_val"]
    lg = fit["logits_val"]
    assert lg["images"] == 8 and lg["max_abs_diff"] < FIT_LOGIT_BOUND and lg["top1_agreement"] >= 0.99

    # a plain stock folder: no custom code, no auto_map
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and "projector_intermediate_size" not in cfg
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and not (out / REMOTE_CODE_FILE).exists()
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert type(model.model.multi_modal_projector) is LlavaMultiModalProjector
    auto = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert type(auto) is LlavaForConditionalGeneration
    proc = AutoProcessor.from_pretrained(out)
    with torch.no_grad():
        got = model(**wide["batch"]).logits
    assert (got - wide["ref"]).abs().max() < FIT_LOGIT_BOUND
    gen = model.generate(**wide["batch"], max_new_tokens=3, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    assert gen.shape[1] > wide["batch"]["input_ids"].shape[1]


def test_export_stock_needs_fit_data(wide, tmp_path, capsys):
    assert main(["--checkpoint", str(wide["ck"]), "--out", str(tmp_path / "o"), "--stock"]) == 2
    assert "--fit-shards" in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    _scene(np.random.RandomState(0)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    assert len(images_from_folder(tmp_path / "imgs", 10)) == 1
    assert main(["--checkpoint", str(wide["ck"]), "--out", str(tmp_path / "o"), "--stock", "--fit-images",
                 str(tmp_path / "imgs")]) == 2
    assert "needs images" in capsys.readouterr().err


def _random_fetched(v, ht, hs, act, scale, seed=0):
    torch.manual_seed(seed)
    f = FetchedProjector(v, ht, hs, act=act)
    for p in f.parameters():
        torch.nn.init.normal_(p, std=scale / p.shape[-1] ** 0.5)
    w = {f"linear_{i}.{n}": getattr(getattr(f.teacher_projector, f"linear_{i}"), n).detach() for i in (1, 2) for n in ("weight", "bias")}
    w.update({f"adapter.{n}": getattr(f.adapter, n).detach() for n in ("weight", "bias")})
    return f, w


def test_fold_exact_any_widths():
    for ht, hs in ((24, 16), (16, 16), (8, 16)):
        f, w = _random_fetched(10, ht, hs, "gelu", 2.0)
        exact = fold_projector_exact(w)
        assert exact["linear_1.weight"].shape == (ht, 10) and exact["linear_2.weight"].shape == (hs, ht)
        x = torch.randn(50, 10)
        with torch.no_grad():
            ref = f(x)
        y = torch.nn.functional.linear(torch.nn.functional.gelu(x @ exact["linear_1.weight"].T + exact["linear_1.bias"]),
                                       exact["linear_2.weight"], exact["linear_2.bias"])
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_fit_stock_projector_unit():
    # a linear activation with V <= Hs: the stock shape can represent it, the fit is exact
    _, w = _random_fetched(12, 48, 32, "linear", 1.0)
    x = torch.randn(2000, 12)
    fitted, rep = fit_stock_projector(fold_projector_exact(w), "linear", x[:1500], x[1500:], steps=0)
    assert rep["rel_error_val"] < 1e-4 and fitted["linear_1.weight"].shape == (32, 12) and fitted["linear_2.weight"].shape == (32, 32)
    # a strongly non-linear projector (pre-activations O(3)): approximate; Adam never makes it worse
    _, w = _random_fetched(16, 48, 32, "gelu", 3.0)
    x = torch.randn(3000, 16)
    fitted, rep = fit_stock_projector(fold_projector_exact(w), "gelu", x[:2400], x[2400:], steps=150)
    assert rep["rel_error_val"] <= rep["rel_error_lstsq_val"] < 0.5
    assert abs(projector_rel_error(fold_projector_exact(w), fitted, "gelu", x[2400:]) - rep["rel_error_val"]) < 1e-6
