"""Tiny, offline, deterministic LLaVA-style teacher/student pair for tests and demos.

``python -m distill.models.tiny --out DIR [--seed 0]`` writes ``DIR/teacher`` and
``DIR/student``: complete Hugging Face folders (``LlavaForConditionalGeneration`` weights,
config, and a ``LlavaProcessor`` with a SigLIP image processor, a byte-level BPE tokenizer
trained on the spot and a ChatML chat template). Nothing is downloaded.

Both models share the SigLIP vision config (48x48 images, 6x6 patches -> 64 image tokens)
and the tokenizer. The teacher is Qwen2-style (6 layers, 8 heads, hidden 96) with its
vocabulary padded up to a multiple of 64 (extra rows only); the student is LLaMA-style
(4 layers, 4 query heads, 2 KV heads, hidden 64) with the exact tokenizer vocabulary. As in
real pairs the teacher is wider and deeper than the student, so the teacher-adapter-fetched
projector has no stock fold and ``distill.export`` takes its exact custom-projector path
(``--teacher-hidden 64`` gives the old equal-width pair, whose export is stock).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IMAGE_TOKEN, IM_START, IM_END]

IMAGE_SIZE = 48
PATCH_SIZE = 6
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64

# ChatML. Content is either a string (``<image>`` may appear in it) or a list of
# ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items. Assistant turns are wrapped
# in ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks them.
CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}{{ '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}{{ '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COLOURS = "red green blue yellow purple orange white black gray grey pink brown cyan magenta"
_SHAPES = "circle circles square squares triangle triangles star stars shape shapes object objects"
_SPATIAL = (
    "left right above below top bottom next to of the a an is are there how many what which "
    "where who why when colour color colours colors shape yes no and or not in on at with "
    "image picture photo scene center centre middle corner side between near far behind front "
    "first second third one two three four five six seven eight nine ten zero none some any all "
    "both each only more less than same different larger smaller big small bigger biggest "
    "smallest count number answer question describe this that these those it its do does"
)
_GENERAL = (
    "i you he she we they me my your our their be been being was were has have had can could "
    "will would should may might must shall please thank thanks hello user assistant system "
    "helpful model vision language look see shown show find tell give say word words short "
    "sentence single for from by as but if then so because about into over under up down out "
    "again also very just most much many other such own time way day year people man woman "
    "child dog cat car house tree sky water red line lines dot dots grid row column rows columns "
    "position located placed inside outside edge edges background foreground bright dark light"
)
_DIGITS = "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100"
_PUNCT = ". , ? ! : ; ' \" ( ) [ ] - _ / \\ + = * & % $ # @ < > | { } ~ `"


def _corpus() -> list[str]:
    """Built-in training text: every word alone, capitalised, and in small template sentences."""
    words = " ".join([_COLOURS, _SHAPES, _SPATIAL, _GENERAL]).split()
    lines: list[str] = []
    for w in words:
        lines += [w, w.capitalize(), f"the {w}", f"{w}."]
    colours, shapes = _COLOURS.split(), _SHAPES.split()
    for c in colours:
        for s in shapes:
            lines.append(f"Is there a {c} {s} to the left of the {s}? Yes.")
            lines.append(f"What colour is the {s} above the {c} {s}? It is {c}.")
            lines.append(f"How many {c} {s} are there? 2")
    lines += _DIGITS.split() + _PUNCT.split()
    lines.append("Describe the image in a short sentence.\nThe image shows a red circle next to a blue square.")
    return lines


def build_tokenizer(vocab_size: int = 1200):
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, offline).

    Returns a ``PreTrainedTokenizerFast`` with ``<image>``, a pad token and the ChatML markers
    as special tokens; ``eos_token`` is ``<|im_end|>``. Any text is encodable (byte fallback).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IMAGE_TOKEN, IM_START],
        padding_side="right",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer):
    """``LlavaProcessor`` = SigLIP (PIL backend) image processor at 48x48 + ``tokenizer``."""
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
    )


def llava_config(text_config, tokenizer, vision=None, **overrides):
    """A LLaVA config around ``text_config`` with the tiny SigLIP tower and ``tokenizer``'s ids."""
    from transformers import LlavaConfig

    kwargs = dict(
        vision_config=vision if vision is not None else vision_config(),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def _text_common(tokenizer, vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def teacher_text_config(tokenizer, hidden_size: int = 64, num_layers: int = 6):
    """Qwen2-style text config; vocabulary padded up to the next multiple of 64 (always > len)."""
    from transformers import Qwen2Config

    padded = (len(tokenizer) // 64 + 1) * 64
    return Qwen2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=hidden_size // 8,
        intermediate_size=4 * hidden_size,
        **_text_common(tokenizer, padded),
    )


def student_text_config(tokenizer, hidden_size: int = 64, num_layers: int = 4):
    """LLaMA-style text config with grouped-query attention (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        intermediate_size=2 * hidden_size,
        **_text_common(tokenizer, len(tokenizer)),
    )


def save_model(config, processor, out_dir: str | os.PathLike, seed: int) -> Path:
    """Initialise ``LlavaForConditionalGeneration(config)`` from ``seed`` and save it + processor."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@dataclass(frozen=True)
class TinyPair:
    """Paths of a written tiny pair."""

    root: Path
    teacher: Path
    student: Path


TEACHER_HIDDEN = 96
"""Default teacher text width of :func:`build_tiny_pair`: wider than the student's 64, like real pairs."""


def build_tiny_pair(out_dir: str | os.PathLike, seed: int = 0, teacher_hidden: int | None = None) -> TinyPair:
    """Write ``out_dir/teacher`` and ``out_dir/student``; same ``seed`` gives identical files.

    ``teacher_hidden``: the teacher's text hidden size (default :data:`TEACHER_HIDDEN`; a
    multiple of 8). Wider than the student's 64 (e.g. 96) is the realistic case, where the
    fetched projector has no stock fold and ``distill.export`` takes the custom (exact) path.
    """
    root = Path(out_dir)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    th = TEACHER_HIDDEN if teacher_hidden is None else int(teacher_hidden)
    teacher = save_model(
        llava_config(teacher_text_config(tokenizer, hidden_size=th), tokenizer), processor, root / "teacher", seed
    )
    student = save_model(
        llava_config(student_text_config(tokenizer), tokenizer), processor, root / "student", seed + 1
    )
    return TinyPair(root=root, teacher=teacher, student=student)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distill.models.tiny",
        description="Write a tiny offline LLaVA teacher/student pair (DIR/teacher, DIR/student).",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    parser.add_argument("--teacher-hidden", type=int, default=None,
                        help=f"teacher text hidden size (default {TEACHER_HIDDEN}; the student's is 64)")
    args = parser.parse_args(argv)
    pair = build_tiny_pair(args.out, seed=args.seed, teacher_hidden=args.teacher_hidden)
    print(f"teacher: {pair.teacher}\nstudent: {pair.student}")


if __name__ == "__main__":
    main()
