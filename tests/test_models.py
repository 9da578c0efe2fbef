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
    with torch.no_grad():
        assert teacher(**batch).logits.shape[-1] == teacher.config.text_config.vocab_size
        assert student(**batch).logits.shape[-1] == len(tok)
