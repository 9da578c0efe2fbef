"""Export of family students (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision with the teacher adapter
fetched; InternVL without): the exported folder loads with stock
``AutoModelForImageTextToText.from_pretrained`` (``trust_remote_code`` only for OneVision's
wide projector) and reproduces the checkpoint's logits on a batch with two image sizes."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from distill.export import EXPORT_INFO, REMOTE_CODE_FILE, export_student, main
from distill.models import ModelConfigError, build_student, load_processor, load_student_checkpoint, save_student_checkpoint
from distill.models import tiny_families as tf
from test_models_families import family_batch, family_pairs  # noqa: F401  (fixture)


def _perturb_trainable(student, seed=0):
    """A trained-looking student: random changes to what trains (adapters / projector / newline)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "adapter" in n or "image_newline" in n or (".merger." in n and "teacher_merger" not in n) \
                    or ("multi_modal_projector" in n and "teacher_projector" not in n):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


CASES = [("qwen2_5_vl", True), ("qwen3_vl", True), ("llava_onevision", True), ("internvl", False), ("qwen2_5_vl", False)]


@pytest.mark.parametrize("family,fetch", CASES)
def test_export_round_trip_reproduces_logits(family_pairs, family, fetch, tmp_path):  # noqa: F811
    pair = family_pairs[family]
    student = build_student(pair.student, teacher_path=pair.teacher, adapter_fetch=fetch)
    _perturb_trainable(student)
    student.eval()
    proc = load_processor(pair.student)
    ckpt = save_student_checkpoint(tmp_path / "ckpt", student, proc)
    batch = family_batch(proc)
    assert len(set((batch["input_ids"] == student.config.image_token_id).sum(1).tolist())) == 2  # two token counts
    with torch.no_grad():
        ref = student(**batch).logits
        # the checkpoint reloads in training form (fetched) and folded, same logits
        for af in (True, False):
            again = load_student_checkpoint(ckpt, adapter_fetch=af).eval()
            torch.testing.assert_close(again(**batch).logits, ref, rtol=1e-5, atol=1e-5)
    out = export_student(ckpt, tmp_path / "export")
    info = json.loads((out / EXPORT_INFO).read_text())
    remote = (out / REMOTE_CODE_FILE).exists()
    assert info["exact"] and info["family"] == family
    assert remote == (family == "llava_onevision" and fetch)  # only the wide OneVision projector needs code
    assert info["export"] == ("custom" if remote else "stock")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family
    if not remote:
        assert cfg["architectures"] == [tf.SPECS[family].model_class] and "auto_map" not in cfg
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=remote).eval()
    if not remote:
        assert type(model).__name__ == tf.SPECS[family].model_class
    with torch.no_grad():
        got = model(**family_batch(load_processor(out))).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_onevision_stock_export_says_what_to_set(family_pairs, tmp_path, capsys):  # noqa: F811
    pair = family_pairs["llava_onevision"]
    student = build_student(pair.student, teacher_path=pair.teacher, adapter_fetch=True)
    ckpt = save_student_checkpoint(tmp_path / "ckpt", student, load_processor(pair.student))
    with pytest.raises(ModelConfigError, match="adapter_fetch: false"):
        export_student(ckpt, tmp_path / "out", stock=True, fit_images=tmp_path)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "cli")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
