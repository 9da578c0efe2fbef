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

``--preset real`` writes the same kind of pair at real shapes with random weights, in bf16: a
Qwen1.5-1.8B-class student (hidden 2048, 24 layers, 16 heads), a Qwen1.5-4B-class teacher
(hidden 2560, 40 layers, 20 heads), both with Qwen's 151,936-row vocabulary, sharing a
SigLIP-so400m/14 tower at 384 px (729 image tokens). The tokenizer is the same offline BPE (its
ids are a prefix of the vocabulary; the other rows are padding, as in Qwen's own checkpoints).
About 13 GB on disk; build it where the weights are meant to live (``--device cuda`` initialises
on the GPU, which takes seconds instead of minutes). These are the shapes ``launch/bench.py
--preset real`` uses and ``launch/gpu_e2e.py`` trains.
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


def build_processor(tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """``LlavaProcessor`` = SigLIP (PIL backend) image processor at ``image_size`` + ``tokenizer``."""
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def tiny_vision(patch_size: int = PATCH_SIZE, hidden: int = 32) -> dict:
    """The tiny SigLIP tower's spec (2 layers, 2 heads, 48 px) for :func:`vision_config`."""
    return dict(hidden=hidden, inter=2 * hidden, layers=2, heads=2, image=IMAGE_SIZE, patch=patch_size)


def vision_config(spec: dict | None = None):
    """The tiny SigLIP tower (:func:`tiny_vision`), or the one described by ``spec`` (e.g. a :data:`REAL`
    ``"vision"`` entry)."""
    from transformers import SiglipVisionConfig

    v = spec or tiny_vision()
    return SiglipVisionConfig(
        hidden_size=v["hidden"],
        intermediate_size=v["inter"],
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        image_size=v["image"],
        patch_size=v["patch"],
        num_channels=3,
    )


def llava_config(text_config, tokenizer, vision=None, **overrides):
    """A LLaVA config around ``text_config`` with the tiny SigLIP tower and ``tokenizer``'s ids."""
    from transformers import LlavaConfig

    vision = vision if vision is not None else vision_config()
    kwargs = dict(
        vision_config=vision,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
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


POSITION_INITS = ("random", "sincos")
"""How the tiny tower's position embeddings start: ``random`` (SigLIP's own init, rows of norm ~1,
about a fifth of a patch embedding's) or ``sincos`` (:func:`sincos_positions`)."""


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """A ``(grid * grid, dim)`` 2-D position table in raster order: a quarter of the channels are
    ``cos`` and a quarter ``sin`` of the row at ``dim / 4`` frequencies ``pi (k + 1/2) / grid``, the other
    half the same of the column, each row scaled to unit RMS per channel (norm ``sqrt(dim)``), the
    scale of a patch embedding. Row and column are then linear reads of every image token."""
    import math

    if dim % 4:
        raise ValueError(f"a sincos position table needs a width divisible by 4, got {dim}")
    q = dim // 4
    freq = math.pi * (torch.arange(q, dtype=torch.float64) + 0.5) / grid
    cell = torch.arange(grid, dtype=torch.float64) + 0.5
    ang = cell[:, None] * freq[None, :]  # (grid, q)
    per_axis = torch.cat([ang.cos(), ang.sin()], dim=1)  # (grid, 2q)
    rows = per_axis[:, None, :].expand(grid, grid, 2 * q)
    cols = per_axis[None, :, :].expand(grid, grid, 2 * q)
    table = torch.cat([rows, cols], dim=2).reshape(grid * grid, dim)
    return (table / table.norm(dim=1, keepdim=True) * math.sqrt(dim)).float()


def save_model(config, processor, out_dir: str | os.PathLike, seed: int,
               dtype: torch.dtype | None = None, device: str = "cpu",
               tower: dict[str, torch.Tensor] | None = None, position_init: str = "random") -> Path:
    """Initialise ``LlavaForConditionalGeneration(config)`` from ``seed`` and save it + processor.

    ``dtype``: build (and save) the weights in this dtype (default float32); ``device``: where to
    initialise them (the folder is the same; a GPU only makes large models quick to build);
    ``tower``: vision tower weights to load instead of the random ones (every tensor, same shapes);
    ``position_init``: one of :data:`POSITION_INITS` for the tower's position embeddings (a given
    ``tower`` brings its own)."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    if position_init not in POSITION_INITS:
        raise ValueError(f"position_init must be one of {', '.join(POSITION_INITS)}, got {position_init!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    if position_init == "sincos" and tower is None:
        # the tower's embeddings sit at .embeddings or .vision_model.embeddings, by transformers version
        emb = next(m.position_embedding for m in model.model.vision_tower.modules()
                   if isinstance(getattr(m, "position_embedding", None), torch.nn.Embedding))
        grid = config.vision_config.image_size // config.vision_config.patch_size
        with torch.no_grad():
            emb.weight.copy_(sincos_positions(grid, emb.weight.shape[1]).to(emb.weight))
    if tower is not None:
        try:
            model.model.vision_tower.load_state_dict(tower, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the given vision tower does not fit this model's tower ({config.vision_config.hidden_size} "
                             f"wide, patch {config.vision_config.patch_size}): {e}") from e
    model.generation_config = GenerationConfig(
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    return out


@dataclass(frozen=True)
class TinyPair:
    """Paths of a written tiny pair."""

    root: Path
    teacher: Path
    student: Path


TEACHER_HIDDEN = 96
"""Default teacher text width of :func:`build_tiny_pair`: wider than the student's 64, like real pairs."""


def build_tiny_pair(out_dir: str | os.PathLike, seed: int = 0, teacher_hidden: int | None = None,
                    patch_size: int = PATCH_SIZE, vision_hidden: int = 32,
                    vision_from: str | os.PathLike | None = None, position_init: str = "random") -> TinyPair:
    """Write ``out_dir/teacher`` and ``out_dir/student``; same arguments give identical files.

    ``teacher_hidden``: the teacher's text hidden size (default :data:`TEACHER_HIDDEN`; a
    multiple of 8). Wider than the student's 64 (e.g. 96) is the realistic case, where the
    fetched projector has no stock fold and ``distill.export`` takes the custom (exact) path.
    ``patch_size`` / ``vision_hidden``: the shared SigLIP tower's patch side (``48 / patch_size``
    squared image tokens: 64 by default, 36 at 8) and width. ``vision_from``: an HF LLaVA folder whose
    vision tower weights both models take (a tower shared by the pair, as in real pairs; e.g. the
    tower a teacher trained), which must have this tower's shape. ``position_init``: the tower's
    position embeddings, one of :data:`POSITION_INITS`.
    """
    root = Path(out_dir)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, patch_size=patch_size)
    th = TEACHER_HIDDEN if teacher_hidden is None else int(teacher_hidden)
    v = vision_config(tiny_vision(patch_size, vision_hidden))
    tower = _tower_weights(vision_from) if vision_from is not None else None
    teacher = save_model(llava_config(teacher_text_config(tokenizer, hidden_size=th), tokenizer, vision=v),
                         processor, root / "teacher", seed, tower=tower, position_init=position_init)
    student = save_model(llava_config(student_text_config(tokenizer), tokenizer, vision=v),
                         processor, root / "student", seed + 1, tower=tower, position_init=position_init)
    return TinyPair(root=root, teacher=teacher, student=student)


def _tower_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of the HF LLaVA folder ``path`` (names relative to the tower)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}


REAL = dict(
    # Qwen1.5-1.8B-class student, Qwen1.5-4B-class teacher (Qwen1.5 is Qwen2's architecture),
    # SigLIP-so400m/14 at 384 px (27 x 27 = 729 image tokens), Qwen's vocabulary rows.
    student=dict(family="qwen2", hidden=2048, layers=24, heads=16, kv_heads=16, inter=5504),
    teacher=dict(family="qwen2", hidden=2560, layers=40, heads=20, kv_heads=20, inter=6912),
    vision=dict(hidden=1152, layers=27, heads=16, inter=4304, image=384, patch=14),
    vocab=151936,
)
"""The real shapes (``--preset real``; ``launch/bench.py --preset real`` builds the same models)."""


def real_text_config(spec: dict, tokenizer, vocab_size: int):
    """A text config of :data:`REAL`'s ``student``/``teacher`` shape with ``tokenizer``'s ids."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec["family"]]
    common = _text_common(tokenizer, vocab_size)
    common["max_position_embeddings"] = 32768
    return cls(hidden_size=spec["hidden"], num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
               num_key_value_heads=spec["kv_heads"], head_dim=spec["hidden"] // spec["heads"],
               intermediate_size=spec["inter"], **common)


def real_configs(tokenizer=None):
    """``(processor, student LlavaConfig, teacher LlavaConfig)`` of the real preset (no weights)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    v = REAL["vision"]
    processor = build_processor(tokenizer, image_size=v["image"], patch_size=v["patch"])
    tokenizer.model_max_length = 32768
    vision = vision_config(v)
    configs = [llava_config(real_text_config(REAL[role], tokenizer, REAL["vocab"]), tokenizer, vision)
               for role in ("student", "teacher")]
    return processor, configs[0], configs[1]


def build_real_pair(out_dir: str | os.PathLike, seed: int = 0, device: str = "cpu") -> TinyPair:
    """Write the real-shape pair (random weights, bf16; ~13 GB) to ``out_dir/{teacher,student}``."""
    root = Path(out_dir)
    processor, s_cfg, t_cfg = real_configs()
    teacher = save_model(t_cfg, processor, root / "teacher", seed, dtype=torch.bfloat16, device=device)
    if device != "cpu":
        torch.cuda.empty_cache()
    student = save_model(s_cfg, processor, root / "student", seed + 1, dtype=torch.bfloat16, device=device)
    return TinyPair(root=root, teacher=teacher, student=student)


def main(argv: list[str] | None = None) -> None:
    from .tiny_families import FAMILIES, build_family_pair

    parser = argparse.ArgumentParser(
        prog="python -m distill.models.tiny",
        description="Write an offline teacher/student pair (DIR/teacher, DIR/student): LLaVA (tiny, or real "
                    "shapes) or a tiny pair of another VLM family (--family).",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    parser.add_argument("--family", choices=("llava",) + FAMILIES, default="llava",
                        help="model family (default llava: LlavaForConditionalGeneration; the others are tiny pairs "
                             "of the family's own transformers classes, see distill/models/tiny_families.py)")
    parser.add_argument("--teacher-hidden", type=int, default=None,
                        help=f"llava: teacher text hidden size (default {TEACHER_HIDDEN}; the student's is 64)")
    parser.add_argument("--preset", choices=("tiny", "real"), default="tiny",
                        help="llava: tiny (default; seconds, a few MB) or real (1.8B/4B-class pair with a "
                             "SigLIP-so400m tower, random bf16 weights, ~13 GB)")
    parser.add_argument("--device", default="cpu", help="real preset: where to initialise the weights (cuda: fast)")
    parser.add_argument("--patch-size", type=int, default=PATCH_SIZE,
                        help=f"llava tiny: patch side of the 48 px tower (default {PATCH_SIZE}: 64 image tokens; 8: 36)")
    parser.add_argument("--vision-hidden", type=int, default=32, help="llava tiny: tower width (default 32)")
    parser.add_argument("--vision-position-init", choices=POSITION_INITS, default="random",
                        help="llava tiny: the tower's position embeddings: random (SigLIP's init) or sincos (a 2-D "
                             "sin/cos table at the patch embeddings' scale, row and column linearly readable)")
    parser.add_argument("--vision-from", default=None,
                        help="llava tiny: an HF LLaVA folder whose vision tower weights both models take")
    args = parser.parse_args(argv)
    if args.family != "llava":
        if args.preset != "tiny" or args.teacher_hidden is not None:
            parser.error(f"--preset real and --teacher-hidden apply to --family llava only, not {args.family}")
        pair = build_family_pair(args.family, args.out, seed=args.seed)
    elif args.preset == "real":
        if args.teacher_hidden is not None:
            parser.error("--teacher-hidden applies to the tiny preset only")
        pair = build_real_pair(args.out, seed=args.seed, device=args.device)
    else:
        if IMAGE_SIZE % args.patch_size:
            parser.error(f"--patch-size must divide the image side {IMAGE_SIZE}, got {args.patch_size}")
        pair = build_tiny_pair(args.out, seed=args.seed, teacher_hidden=args.teacher_hidden,
                               patch_size=args.patch_size, vision_hidden=args.vision_hidden,
                               vision_from=args.vision_from, position_init=args.vision_position_init)
    print(f"teacher: {pair.teacher}\nstudent: {pair.student}")


if __name__ == "__main__":
    main()
