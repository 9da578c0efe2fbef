"""Export: fold exactness, stock-transformers round trip (Ht == Hs), padded fold (Ht < Hs), Ht > Hs path.

The realistic Ht > Hs exports (custom projector, --stock fit) are in test_export_wide.py."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from distill.export import export_student, main
from distill.models import (
    FetchedProjector,
    ModelConfigError,
    build_student,
    fold_projector,
    load_processor,
    save_student_checkpoint,
)
from distill.models import tiny
from test_models import _batch


def _randomize_adapter(student, seed=0):
    """A trained-looking adapter: random weight and bias (not the identity init)."""
    g = torch.Generator().manual_seed(seed)
    adapter = student.model.multi_modal_projector.adapter
    with torch.no_grad():
        adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=g) / adapter.weight.shape[1] ** 0.5)
        adapter.bias.copy_(torch.randn(adapter.bias.shape, generator=g))


def _stock_from_fold(fetched: FetchedProjector, hs: int, act="gelu") -> LlavaMultiModalProjector:
    w = {f"linear_{i}.{p}": getattr(getattr(fetched.teacher_projector, f"linear_{i}"), p) for i in (1, 2) for p in ("weight", "bias")}
    w = {k: v for k, v in w.items() if v is not None}
    w.update({f"adapter.{p}": getattr(fetched.adapter, p) for p in ("weight", "bias") if getattr(fetched.adapter, p) is not None})
    folded = fold_projector(w, act, hs)
    cfg = SimpleNamespace(  # the attributes LlavaMultiModalProjector reads
        vision_config=SimpleNamespace(hidden_size=fetched.teacher_projector.linear_1.in_features),
        text_config=SimpleNamespace(hidden_size=hs),
        vision_feature_layer=-1,
        multimodal_projector_bias="linear_1.bias" in folded,
        projector_hidden_act=act,
    )
    stock = LlavaMultiModalProjector(cfg)
    stock.load_state_dict(folded)
    return stock


@pytest.mark.parametrize("ht, hs, bias, act", [(16, 16, True, "gelu"), (12, 20, True, "gelu"), (8, 24, False, "relu"), (8, 16, True, "silu")])
def test_fold_exact(ht, hs, bias, act):
    torch.manual_seed(0)
    fetched = FetchedProjector(10, ht, hs, act=act, bias=bias)
    for p in fetched.parameters():
        torch.nn.init.normal_(p)
    stock = _stock_from_fold(fetched, hs, act)
    x = torch.randn(3, 7, 10)
    ref = fetched(x)
    assert ref.shape == (3, 7, hs)
    torch.testing.assert_close(stock(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_errors():
    fetched = FetchedProjector(10, 24, 16)
    w = {f"linear_{i}.{p}": getattr(getattr(fetched.teacher_projector, f"linear_{i}"), p) for i in (1, 2) for p in ("weight", "bias")}
    w.update({"adapter.weight": fetched.adapter.weight, "adapter.bias": fetched.adapter.bias})
    with pytest.raises(ModelConfigError, match="adapter_fetch: false"):
        fold_projector(w, "gelu", 16)
    narrow = FetchedProjector(10, 8, 16)
    w = {f"linear_{i}.{p}": getattr(getattr(narrow.teacher_projector, f"linear_{i}"), p) for i in (1, 2) for p in ("weight", "bias")}
    w.update({"adapter.weight": narrow.adapter.weight, "adapter.bias": narrow.adapter.bias})
    with pytest.raises(ModelConfigError, match="act\\(0\\) = 0"):
        fold_projector(w, "sigmoid", 16)


def _export_and_compare(student_dir, teacher_dir, tmp_path, cli=False, stock=False):
    student = build_student(student_dir, teacher_dir)
    _randomize_adapter(student)
    student.eval()
    batch = _batch(student_dir)
    with torch.no_grad():
        ref = student(**batch).logits
    save_student_checkpoint(tmp_path / "ck", student, load_processor(student_dir))
    if cli:
        args = ["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--dtype", "fp32"]
        assert main(args + (["--stock"] if stock else [])) == 0
    else:
        export_student(tmp_path / "ck", tmp_path / "out", dtype=torch.float32, stock=stock)
    assert not (tmp_path / "out" / "distill_checkpoint.json").exists()
    info = json.loads((tmp_path / "out" / "distill_export.json").read_text())
    assert info["export"] == "stock" and info["exact"]  # Ht <= Hs: the exact stock fold, --stock or not
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in cfg and "projector_intermediate_size" not in cfg
    assert not (tmp_path / "out" / "modeling_distill_llava.py").exists()

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(model.model.multi_modal_projector) is LlavaMultiModalProjector
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert torch.equal(proc(images=[_image()], text=[prompt], return_tensors="pt")["input_ids"], batch["input_ids"])
    with torch.no_grad():
        got = model(**batch).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4
    return model, proc, batch


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(1).rand(52, 64, 3) * 255).astype("uint8"))


def test_export_round_trip_stock_load_and_generate(tiny_models, odd_widths, tmp_path):
    """Equal widths (Ht = Hs = 64): the fold is exact and stock."""
    model, proc, batch = _export_and_compare(tiny_models.student, odd_widths["teacher64"], tmp_path, cli=True)
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    assert gen.shape[1] >= batch["input_ids"].shape[1] + 1
    assert isinstance(proc.batch_decode(gen[:, batch["input_ids"].shape[1]:])[0], str)


@pytest.fixture(scope="module")
def odd_widths(tmp_path_factory):
    """Teachers Ht=32 and Ht=64 (as wide as the tiny student), students Hs=64 and Hs=32."""
    root = tmp_path_factory.mktemp("widths")
    tok = tiny.build_tokenizer()
    proc = tiny.build_processor(tok)
    mk = lambda text_cfg, name, seed: tiny.save_model(tiny.llava_config(text_cfg, tok), proc, root / name, seed)  # noqa: E731
    return {
        "teacher32": mk(tiny.teacher_text_config(tok, hidden_size=32, num_layers=2), "teacher32", 0),
        "teacher64": mk(tiny.teacher_text_config(tok, hidden_size=64, num_layers=2), "teacher64", 3),
        "student64": mk(tiny.student_text_config(tok, hidden_size=64, num_layers=2), "student64", 1),
        "student32": mk(tiny.student_text_config(tok, hidden_size=32, num_layers=2), "student32", 2),
    }


@pytest.mark.parametrize("stock", [False, True])
def test_export_padded_fold(odd_widths, tmp_path, stock):
    """Student wider than the teacher: linear_1 zero-padded, still exact (``--stock`` changes nothing)."""
    model, _, _ = _export_and_compare(odd_widths["student64"], odd_widths["teacher32"], tmp_path, stock=stock)
    w1 = model.model.multi_modal_projector.linear_1.weight
    assert w1.shape[0] == 64 and torch.all(w1[32:] == 0)


def test_export_teacher_wider_than_student_takes_custom_path(odd_widths, tmp_path, capsys):
    """Ht=64 > Hs=32: no stock fold; the default export is exact with the shipped projector code."""
    student = build_student(odd_widths["student32"], odd_widths["teacher64"])  # trains fine
    save_student_checkpoint(tmp_path / "ck", student, load_processor(odd_widths["student32"]))
    assert main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    info = json.loads((tmp_path / "out" / "distill_export.json").read_text())
    assert info["export"] == "custom" and info["exact"] and (info["teacher_hidden"], info["student_hidden"]) == (64, 32)
    assert (tmp_path / "out" / "modeling_distill_llava.py").is_file()
