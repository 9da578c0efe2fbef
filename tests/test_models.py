"""Model layer tests: tiny pair CLI, loading, pair checks, adapter fetch, checkpoints."""

import filecmp
import subprocess
import sys

import torch

from distill.models import tiny


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    for sub in cmp.common_dirs:
        _same_tree(a / sub, b / sub)


def test_tiny_cli_deterministic(tiny_models, tmp_path):
    """The CLI with the fixture's seed writes byte-identical folders; another seed differs."""
    subprocess.run(
        [sys.executable, "-m", "distill.models.tiny", "--out", str(tmp_path / "a"), "--seed", "0"],
        check=True,
        capture_output=True,
    )
    _same_tree(tiny_models.teacher, tmp_path / "a" / "teacher")
    _same_tree(tiny_models.student, tmp_path / "a" / "student")
    other = tiny.build_tiny_pair(tmp_path / "b", seed=1)
    assert not filecmp.cmp(other.student / "model.safetensors", tiny_models.student / "model.safetensors", shallow=False)
    assert filecmp.cmp(other.student / "tokenizer.json", tiny_models.student / "tokenizer.json", shallow=False)


def test_tiny_pair_shapes(tiny_models):
    """Processor expands <image> to 64 tokens; both models run; teacher vocab is padded."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_models.student)
    tok = proc.tokenizer
    for t in (tiny.IMAGE_TOKEN, tiny.PAD_TOKEN, tiny.IM_START, tiny.IM_END):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert 1000 <= len(tok) <= 2048
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red stars?"}]},
        {"role": "assistant", "content": "2"},
    ]
    text = proc.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<|im_start|>user\n<image>How many red stars?<|im_end|>\n<|im_start|>assistant\n")
    img = Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))
    batch = proc(images=[img], text=[text], return_tensors="pt")
    image_id = tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    assert int((batch["input_ids"] == image_id).sum()) == tiny.NUM_IMAGE_TOKENS == 64
    assert tuple(batch["pixel_values"].shape) == (1, 3, 48, 48)
    # every word of the synthetic vocabulary is a single token (with its leading space)
    for w in "red green blue yellow purple orange white black circle square triangle star left right".split():
        assert len(tok.encode(" " + w, add_special_tokens=False)) == 1, w
    # assistant mask marks the answer and its end marker only
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(marked) == "2<|im_end|>"

    teacher = LlavaForConditionalGeneration.from_pretrained(tiny_models.teacher)
    student = LlavaForConditionalGeneration.from_pretrained(tiny_models.student)
    assert teacher.config.text_config.vocab_size % 64 == 0
    assert teacher.config.text_config.vocab_size > len(tok) == student.config.text_config.vocab_size
    assert teacher.config.image_token_id == student.config.image_token_id == image_id
    assert student.config.text_config.num_key_value_heads == 2
    # realistic: the teacher is wider and deeper than the student
    assert teacher.config.text_config.hidden_size == 96 > student.config.text_config.hidden_size == 64
    assert teacher.config.text_config.num_hidden_layers > student.config.text_config.num_hidden_layers
    with torch.no_grad():
        assert teacher(**batch).logits.shape[-1] == teacher.config.text_config.vocab_size
        assert student(**batch).logits.shape[-1] == len(tok)


# ----------------------------------------------------------------------------- loading & pair checks

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from distill.models import (  # noqa: E402
    FetchedProjector,
    ModelConfigError,
    build_student,
    build_teacher,
    check_pair,
    load_processor,
    load_student_checkpoint,
    load_vlm,
    save_student_checkpoint,
)

CONFIG_ONLY = ["config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"]


def _config_copy(src, dst, edit=None):
    """Copy a folder without weights (check_pair is config-only) and edit its config dict."""
    dst.mkdir(parents=True)
    for name in CONFIG_ONLY:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    if edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _batch(folder, text="What colour is the star?"):
    proc = load_processor(folder)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    img = Image.fromarray((np.random.RandomState(1).rand(52, 64, 3) * 255).astype("uint8"))
    return proc(images=[img], text=[prompt], return_tensors="pt")


def test_check_pair_ok(tiny_models):
    info = check_pair(tiny_models.student, tiny_models.teacher, adapter_fetch=True)
    assert info["num_image_tokens"] == 64
    assert info["vocab_size"] == info["student_vocab_rows"] < info["teacher_vocab_rows"]


def test_missing_and_bad_folders(tiny_models, tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        load_vlm(tmp_path / "nope")
    with pytest.raises(ModelConfigError, match="does not exist"):
        check_pair(tmp_path / "nope", tiny_models.teacher)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelConfigError, match="no config.json"):
        build_teacher(tmp_path / "empty")
    bert = _config_copy(tiny_models.student, tmp_path / "bert", lambda c: c.update(model_type="bert"))
    with pytest.raises(ModelConfigError, match="not LLaVA-style"):
        check_pair(bert, tiny_models.teacher)
    noweights = _config_copy(tiny_models.student, tmp_path / "noweights")
    with pytest.raises(ModelConfigError, match="no usable safetensors"):
        load_vlm(noweights)
    with pytest.raises(ModelConfigError, match="needs teacher_path"):
        build_student(tiny_models.student)


def test_check_pair_vocab_mismatch(tiny_models, tmp_path):
    # student embedding smaller than the shared tokenizer
    def shrink(c):
        c["text_config"]["vocab_size"] = 1000

    small = _config_copy(tiny_models.student, tmp_path / "small", shrink)
    with pytest.raises(ModelConfigError, match="embedding table has 1000 rows"):
        check_pair(small, tiny_models.teacher)
    # a different tokenizer
    other = _config_copy(tiny_models.student, tmp_path / "othertok")
    tiny.build_tokenizer(vocab_size=900).save_pretrained(other)
    with pytest.raises(ModelConfigError, match="tokenizers differ"):
        check_pair(other, tiny_models.teacher)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(image_token_index=2), "image_token_id differs"),
        (lambda c: c.update(vision_feature_select_strategy="default"), "image tokens per image differ"),
        (lambda c: c["vision_config"].update(image_size=96), "image size|resizes"),
    ],
)
def test_check_pair_image_mismatch(tiny_models, tmp_path, edit, match):
    bad = _config_copy(tiny_models.student, tmp_path / "bad", edit)
    if "vision_feature_select_strategy" in str(json.loads((bad / "config.json").read_text())):
        proc = json.loads((bad / "processor_config.json").read_text())
        proc["vision_feature_select_strategy"] = json.loads((bad / "config.json").read_text())[
            "vision_feature_select_strategy"
        ]
        (bad / "processor_config.json").write_text(json.dumps(proc))
    with pytest.raises(ModelConfigError, match=match):
        check_pair(bad, tiny_models.teacher)


def test_teacher_projector_not_fetchable(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    for name, mutate, match in [
        ("noproj", lambda sd: {k: v for k, v in sd.items() if "multi_modal_projector" not in k}, "cannot fetch"),
        (
            "badshape",
            lambda sd: {k: (v[:-1] if k.endswith("multi_modal_projector.linear_2.weight") else v) for k, v in sd.items()},
            "has shape",
        ),
    ]:
        t = tmp_path / name
        shutil.copytree(tiny_models.teacher, t)
        sd = load_file(t / "model.safetensors")
        save_file(mutate(sd), t / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ModelConfigError, match=match):
            build_student(tiny_models.student, t)


# ----------------------------------------------------------------------------- build & checkpoints


def test_build_teacher_and_student(tiny_models):
    teacher = build_teacher(tiny_models.teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = build_student(tiny_models.student, tiny_models.teacher)
    proj = student.model.multi_modal_projector
    assert isinstance(proj, FetchedProjector) and student.training
    assert not any(p.requires_grad for p in proj.teacher_projector.parameters())
    assert all(p.requires_grad for n, p in student.named_parameters() if "teacher_projector" not in n)
    # the frozen copy equals the teacher's projector
    for name in ("linear_1", "linear_2"):
        torch.testing.assert_close(
            getattr(proj.teacher_projector, name).weight, getattr(teacher.model.multi_modal_projector, name).weight, rtol=0, atol=0
        )
    # the adapter starts norm-preserving: the identity when Ht == Hs (the student then sees the
    # teacher's image embeddings), else semi-orthogonal with orthonormal rows (Hs < Ht) or columns
    feats = torch.randn(2, 5, 32)
    hs, ht = proj.adapter.weight.shape
    w = proj.adapter.weight.detach()
    gram = w @ w.T if hs <= ht else w.T @ w
    torch.testing.assert_close(gram, torch.eye(min(hs, ht)), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(proj(feats), proj.adapter(teacher.model.multi_modal_projector(feats)))
        if hs == ht:
            torch.testing.assert_close(proj(feats), teacher.model.multi_modal_projector(feats))
    # gradients reach the adapter but not the frozen copy
    batch = _batch(tiny_models.student)
    out = student(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert proj.adapter.weight.grad is not None and proj.adapter.weight.grad.abs().sum() > 0
    assert proj.teacher_projector.linear_1.weight.grad is None


def test_student_checkpoint_round_trip(tiny_models, tmp_path):
    student = build_student(tiny_models.student, tiny_models.teacher)
    with torch.no_grad():  # a trained-looking adapter (not the identity)
        adapter = student.model.multi_modal_projector.adapter
        adapter.weight.add_(0.1 * torch.randn(adapter.weight.shape))
        student.model.multi_modal_projector.adapter.bias.normal_()
    student.eval()
    batch = _batch(tiny_models.student)
    with torch.no_grad():
        ref = student(**batch).logits
    save_student_checkpoint(tmp_path / "ck", student, load_processor(tiny_models.student))

    back = load_student_checkpoint(tmp_path / "ck")
    assert isinstance(back.model.multi_modal_projector, FetchedProjector) and back.training
    assert not any(p.requires_grad for p in back.model.multi_modal_projector.teacher_projector.parameters())
    sd, sd2 = student.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd2[k], rtol=0, atol=0)

    # a stage may start from the checkpoint; folded (adapter_fetch=False) gives the same function
    again = build_student(tmp_path / "ck", tiny_models.teacher).eval()
    folded = build_student(tmp_path / "ck", tiny_models.teacher, adapter_fetch=False).eval()
    assert not isinstance(folded.model.multi_modal_projector, FetchedProjector)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ref, rtol=0, atol=0)
        assert (folded(**batch).logits - ref).abs().max() < 1e-4
    bf16 = load_student_checkpoint(tmp_path / "ck", dtype="bf16")
    assert bf16.model.multi_modal_projector.adapter.weight.dtype == torch.bfloat16


_ZERO3_WORKER = r'''
import sys, torch, torch.distributed as dist, deepspeed, numpy as np
from PIL import Image
from transformers.integrations import HfDeepSpeedConfig
from distill.models import build_student, save_student_checkpoint, load_processor, FetchedProjector
from distill.models.projector import init_adapter_, read_projector_weights

student_dir, teacher_dir, out = sys.argv[1:4]
deepspeed.init_distributed(dist_backend="gloo")
cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": dist.get_world_size(),
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
keep = HfDeepSpeedConfig(cfg)
student = build_student(student_dir, teacher_dir)
proj = student.model.multi_modal_projector
assert isinstance(proj, FetchedProjector)
assert all(p.ds_tensor.numel() < p.ds_numel for p in proj.parameters()), "not partitioned"
ref_w = read_projector_weights(teacher_dir)
with deepspeed.zero.GatheredParameters(list(proj.parameters())):
    assert torch.equal(proj.teacher_projector.linear_2.weight, ref_w["linear_2.weight"])
    assert torch.equal(proj.teacher_projector.linear_1.bias, ref_w["linear_1.bias"])
    init = torch.nn.Linear(proj.adapter.in_features, proj.adapter.out_features)
    init_adapter_(init)
    assert torch.equal(proj.adapter.weight, init.weight)
engine, *_ = deepspeed.initialize(model=student, model_parameters=[p for p in student.parameters() if p.requires_grad], config=cfg)
proc = load_processor(student_dir)
img = Image.fromarray((np.random.RandomState(0).rand(48, 48, 3) * 255).astype("uint8"))
batch = proc(images=[img], text=["<|im_start|>user\n<image>hi<|im_end|>\n"], return_tensors="pt")
out_ = engine(**batch, labels=batch["input_ids"]); engine.backward(out_.loss); engine.step()
engine.eval()
with torch.no_grad():
    logits = engine(**batch).logits
sd = engine._zero3_consolidated_16bit_state_dict()
save_student_checkpoint(out + "/ck", engine.module, proc, state_dict=sd)
if dist.get_rank() == 0:
    torch.save({"logits": logits, "batch": dict(batch)}, out + "/ref.pt")
dist.barrier()
'''


def test_build_student_under_zero3_two_ranks(tiny_models, tmp_path):
    """ZeRO-3 (2 CPU ranks): fetched projector partitioned with the teacher's weights; one step;
    the consolidated checkpoint reloads in a plain process with the engine's logits."""
    import os

    script = tmp_path / "worker.py"
    script.write_text(_ZERO3_WORKER)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    port = str(29600 + os.getpid() % 300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(script), str(tiny_models.student), str(tiny_models.teacher), str(tmp_path)]
    # a hang guard, not a speed check: in a fresh venv DeepSpeed first JIT-builds its CPU comm op,
    # which takes minutes on a loaded 2-core machine
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ref = torch.load(tmp_path / "ref.pt")
    model = load_student_checkpoint(tmp_path / "ck").eval()
    adapter = model.model.multi_modal_projector.adapter.weight
    from distill.models.projector import init_adapter_

    init = torch.nn.Linear(adapter.shape[1], adapter.shape[0])
    init_adapter_(init)
    assert not torch.equal(adapter, init.weight)  # the step trained the adapter
    with torch.no_grad():
        torch.testing.assert_close(model(**ref["batch"]).logits, ref["logits"], rtol=0, atol=1e-5)


def test_tiny_demo_tower_and_shared_weights(tiny_models, tmp_path):
    """--patch-size 8 gives a 6 x 6 grid (36 image tokens); --vision-from gives both models that folder's
    tower weights exactly (the text weights stay the seed's); a tower of another shape is refused."""
    import pytest
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    def towers(path):
        return LlavaForConditionalGeneration.from_pretrained(path).model.vision_tower.state_dict()

    first = tmp_path / "first"
    subprocess.run([sys.executable, "-m", "distill.models.tiny", "--out", str(first), "--patch-size", "8"],
                   check=True, capture_output=True)
    proc = AutoProcessor.from_pretrained(first / "student")
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    ids = proc(images=[Image.new("RGB", (48, 48))], text=[text], return_tensors="pt")["input_ids"]
    assert int((ids == proc.tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN)).sum()) == 36

    # the source tower: the first pair's teacher tower, changed so no seed could give it
    src = LlavaForConditionalGeneration.from_pretrained(first / "teacher")
    with torch.no_grad():
        for p in src.model.vision_tower.parameters():
            p.add_(1.0)
    src.save_pretrained(tmp_path / "src")
    shared = tiny.build_tiny_pair(tmp_path / "shared", seed=3, patch_size=8, vision_from=tmp_path / "src")
    want = src.model.vision_tower.state_dict()
    for role in (shared.teacher, shared.student):
        got = towers(role)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
    plain = tiny.build_tiny_pair(tmp_path / "plain", seed=3, patch_size=8)
    s_shared = LlavaForConditionalGeneration.from_pretrained(shared.student).model.language_model.state_dict()
    s_plain = LlavaForConditionalGeneration.from_pretrained(plain.student).model.language_model.state_dict()
    assert all(torch.equal(s_shared[k], s_plain[k]) for k in s_plain)

    with pytest.raises(ValueError, match="does not fit"):
        tiny.build_tiny_pair(tmp_path / "bad", seed=0, vision_from=tmp_path / "src")  # patch 6 vs 8


def test_tiny_sincos_position_init(tmp_path):
    """--vision-position-init sincos writes the 2-D table into both towers: row and column are exact
    linear reads of it, its rows have the patch embeddings' scale (norm sqrt(width)); every other
    weight is the seed's. A width the table cannot split in four, or an unknown init, is refused."""
    import math

    import pytest
    from transformers import LlavaForConditionalGeneration

    subprocess.run([sys.executable, "-m", "distill.models.tiny", "--out", str(tmp_path / "sc"), "--patch-size", "8",
                    "--vision-position-init", "sincos"], check=True, capture_output=True)
    plain = tiny.build_tiny_pair(tmp_path / "plain", seed=0, patch_size=8)
    table = tiny.sincos_positions(6, 32)
    assert table.shape == (36, 32)
    assert torch.allclose(table.norm(dim=1), torch.full((36,), math.sqrt(32)))
    cells = torch.arange(36, dtype=torch.float64)
    x = torch.cat([table.double(), torch.ones(36, 1, dtype=torch.float64)], dim=1)
    for target in (cells // 6, cells % 6):  # row, column
        w = torch.linalg.pinv(x) @ target[:, None]
        assert torch.allclose(x @ w, target[:, None], atol=1e-6)
    for role in ("teacher", "student"):
        got = LlavaForConditionalGeneration.from_pretrained(tmp_path / "sc" / role).state_dict()
        ref = LlavaForConditionalGeneration.from_pretrained(getattr(plain, role)).state_dict()
        (key,) = [k for k in got if k.endswith("embeddings.position_embedding.weight")]
        assert torch.equal(got[key], table)
        assert not torch.allclose(ref[key], table)
        assert all(torch.equal(got[k], ref[k]) for k in ref if k != key)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny.sincos_positions(6, 30)
    with pytest.raises(ValueError, match="position_init"):
        tiny.build_tiny_pair(tmp_path / "bad", seed=0, position_init="learned")
