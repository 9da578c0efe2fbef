"""Tiny offline pairs of the Qwen2.5-VL, LLaVA-OneVision, InternVL and Qwen3-VL families
(``python -m distill.models.tiny --family F``): stock loading, per-image visual-token counts that
differ inside a batch, finite forwards, the batch keys each family needs, determinism."""

import filecmp
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from distill.models import tiny_families as tf

FAMILIES = tf.FAMILIES


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_families")
    return {f: tf.build_family_pair(f, root / f, seed=0) for f in FAMILIES}


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def _images():
    small = Image.new("RGB", (56, 56), (230, 230, 230))
    big = Image.new("RGB", (112, 112), (230, 230, 230))
    for im, fill in ((small, (220, 40, 40)), (big, (40, 80, 220))):
        im.paste(fill, (8, 8, 40, 40))
    return [small, big]


def _texts(proc):
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
    ]
    return [proc.apply_chat_template(msgs, tokenize=False), proc.apply_chat_template(msgs, tokenize=False)]


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_loads_counts_differ_and_forward_is_finite(pairs, family):
    from transformers import AutoModelForImageTextToText

    pair = pairs[family]
    spec = tf.SPECS[family]
    counts = {}
    for role in ("teacher", "student"):
        folder = getattr(pair, role)
        info = tf.family_info(folder)
        assert info["family"] == family and info["batch_keys"] == list(spec.batch_keys)
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        assert type(model).__name__ == spec.model_class
        proc = tf.load_processor(folder)
        assert type(proc).__name__ == spec.processor_class
        image_id = model.config.image_token_id
        assert image_id == info["image_token_id"] == proc.tokenizer.convert_tokens_to_ids(spec.image_token)

        texts = _texts(proc)
        assert spec.image_text in texts[0]
        batch = proc(text=texts, images=_images(), return_tensors="pt", padding=True)
        for key in ("input_ids", "attention_mask", *info["batch_keys"]):
            assert key in batch, (family, key, sorted(batch))
        n = (batch["input_ids"] == image_id).sum(1).tolist()
        assert n[0] < n[1], (family, n)  # 56 px gives fewer visual tokens than 112 px
        # right padding: the shorter sample ends in pad tokens, the longer one has none
        mask = batch["attention_mask"]
        assert mask[1].all() and not mask[0].all() and mask[0, -1] == 0
        assert mask[0].sum() == (batch["input_ids"][0] != proc.tokenizer.pad_token_id).sum()
        counts[role] = n
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape[:2] == batch["input_ids"].shape
        assert logits.shape[-1] == model.config.text_config.vocab_size
        assert torch.isfinite(logits).all()
        # one image alone gives the count it has inside the batch
        single = proc(text=texts[:1], images=_images()[:1], return_tensors="pt")
        assert int((single["input_ids"] == image_id).sum()) == n[0]
    assert counts["teacher"] == counts["student"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_shapes(pairs, family):
    """Teacher wider and deeper, student GQA; same tokenizer, image processing and vision tower."""
    from transformers import AutoConfig

    pair = pairs[family]
    t, s = AutoConfig.from_pretrained(pair.teacher), AutoConfig.from_pretrained(pair.student)
    tt, st = t.text_config, s.text_config
    assert tt.hidden_size > st.hidden_size and tt.num_hidden_layers > st.num_hidden_layers
    assert st.num_attention_heads == 4 and st.num_key_value_heads == 2
    assert tt.vocab_size >= st.vocab_size
    tv, sv = t.vision_config.to_dict(), s.vision_config.to_dict()
    for d in (tv, sv):
        d.pop("out_hidden_size", None)  # Qwen's merger projects to its own text width
    assert tv == sv
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert filecmp.cmp(pair.teacher / name, pair.student / name, shallow=False), name


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_files_are_the_stock_layout(pairs, family):
    """processor_config.json is what the stock processor's to_dict gives, plus the video processor entry."""
    proc = tf.make_processor(family)
    stock = json.loads(json.dumps(proc.to_dict()))
    written = json.loads((pairs[family].student / "processor_config.json").read_text())
    video = written.pop("video_processor")
    stock.pop("video_processor", None)
    assert written == stock
    assert video["video_processor_type"].endswith("VideoProcessor")
    tok_cfg = json.loads((pairs[family].student / "tokenizer_config.json").read_text())
    assert tok_cfg["processor_class"] == tf.SPECS[family].processor_class


@pytest.mark.skipif(not tf.torchvision_ok(), reason="transformers' video processors (so AutoProcessor) need torchvision")
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_processor_loads(pairs, family):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(pairs[family].student)
    assert type(proc).__name__ == tf.SPECS[family].processor_class
    batch = proc(text=_texts(proc), images=_images(), return_tensors="pt", padding=True)
    ref = tf.load_processor(pairs[family].student)(text=_texts(proc), images=_images(), return_tensors="pt",
                                                   padding=True)
    assert torch.equal(batch["input_ids"], ref["input_ids"])


def test_qwen_forward_needs_mm_token_type_ids(pairs):
    """Without mm_token_type_ids Qwen falls back to 1-D positions silently: the batch must carry it."""
    from transformers import AutoModelForImageTextToText

    folder = pairs["qwen2_5_vl"].student
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    proc = tf.load_processor(folder)
    batch = proc(text=_texts(proc), images=_images(), return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**batch).logits
        without = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits
    assert not torch.allclose(full, without)


def test_chat_template_assistant_mask(pairs):
    proc = tf.load_processor(pairs["internvl"].student)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]
    out = proc.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert proc.tokenizer.decode(marked) == "A red circle.<|im_end|>"


def test_cli_deterministic(pairs, tmp_path):
    """The CLI with the fixture's seed writes byte-identical folders; another seed changes the weights only."""
    subprocess.run([sys.executable, "-m", "distill.models.tiny", "--family", "llava_onevision", "--out",
                    str(tmp_path / "a"), "--seed", "0"], check=True, capture_output=True)
    _same_tree(pairs["llava_onevision"].teacher, tmp_path / "a" / "teacher")
    _same_tree(pairs["llava_onevision"].student, tmp_path / "a" / "student")
    for family in ("qwen2_5_vl", "qwen3_vl", "internvl"):
        again = tf.build_family_pair(family, tmp_path / family, seed=0)
        _same_tree(pairs[family].teacher, again.teacher)
        _same_tree(pairs[family].student, again.student)
    other = tf.build_family_pair("qwen2_5_vl", tmp_path / "other", seed=1)
    ref = pairs["qwen2_5_vl"].student
    assert not filecmp.cmp(other.student / "model.safetensors", ref / "model.safetensors", shallow=False)
    assert filecmp.cmp(other.student / "tokenizer.json", ref / "tokenizer.json", shallow=False)


def test_cli_rejects_llava_only_options(tmp_path):
    from distill.models.tiny import main

    with pytest.raises(SystemExit):
        main(["--family", "qwen2_5_vl", "--out", str(tmp_path), "--preset", "real"])
    with pytest.raises(SystemExit):
        main(["--family", "nope", "--out", str(tmp_path)])


def test_load_processor_without_distill_file_and_for_llava(pairs, tiny_models, tmp_path):
    """load_processor reads the class from processor_config.json (any such folder, not only ours), and
    leaves processors without a video processor (LLaVA) to AutoProcessor."""
    import shutil

    folder = tmp_path / "qwen"
    shutil.copytree(pairs["qwen2_5_vl"].student, folder)
    (folder / tf.FAMILY_FILE).unlink()
    assert type(tf.load_processor(folder)).__name__ == "Qwen2_5_VLProcessor"
    assert type(tf.load_processor(tiny_models.student)).__name__ == "LlavaProcessor"
