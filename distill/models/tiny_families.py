"""Tiny, offline, deterministic teacher/student pairs of the VLM families people run today.

``python -m distill.models.tiny --family F --out DIR [--seed 0]`` (``F`` one of :data:`FAMILIES`
or ``llava``, the pair of :mod:`distill.models.tiny`) writes ``DIR/teacher`` and ``DIR/student``:
Hugging Face folders of the family's own transformers classes, loadable with
``AutoModelForImageTextToText.from_pretrained``, and its own processor class, loadable with
``AutoProcessor.from_pretrained`` (see *torchvision* below). Nothing is downloaded.

Each family's image processing gives a number of image tokens that depends on the image's size,
so a batch holds samples with different visual-token counts:

====================  ===============================================  ==========================
family                classes (model / processor / image processor)    image tokens, 56 / 112 px
====================  ===============================================  ==========================
``qwen2_5_vl``        Qwen2_5_VLForConditionalGeneration /             4 / 16
                      Qwen2_5_VLProcessor / Qwen2VLImageProcessor      (patch 14, merge 2,
                                                                       28x28 .. 112x112 px)
``llava_onevision``   LlavaOnevisionForConditionalGeneration /         88 / 172
                      LlavaOnevisionProcessor /                        (SigLIP 32 px, patch 8,
                      LlavaOnevisionImageProcessor                     AnyRes 1x1 .. 3x3 tiles)
``internvl``          InternVLForConditionalGeneration /               20 / 40
                      InternVLProcessor / GotOcr2ImageProcessor        (28 px tiles: 1+4 / 1+9)
``qwen3_vl``          Qwen3VLForConditionalGeneration /                4 / 16
                      Qwen3VLProcessor / Qwen2VLImageProcessor         (patch 16, merge 2,
                                                                       32x32 .. 128x128 px)
====================  ===============================================  ==========================

Both folders of a pair share the tokenizer (the offline BPE of :func:`distill.models.tiny.
build_tokenizer` plus the family's special tokens and a chat template that renders
``{"type": "image"}`` items the way the family's processor expects), the processor settings and
the vision tower's configuration (only the vision-to-text output width follows each text model's
hidden size). The teacher's text model is wider and deeper (hidden 96, 6 layers, 6 heads); the
student's uses grouped-query attention (hidden 64, 4 layers, 4 query heads, 2 KV heads); both
have head dim 16. The teacher's vocabulary is padded up to a multiple of 64 (extra rows only),
the student's is the tokenizer's exact size, as in :mod:`distill.models.tiny`.

Each folder also holds ``distill_family.json``: the family, its image-token id, what the chat
template writes for an image (``image_text``, the stand-in for LLaVA's ``<image>`` in string
content), and ``batch_keys``, the processor outputs beyond ``input_ids``/``attention_mask`` that
the model's forward needs for the images. Their layouts (B samples, one image each):

- Qwen2.5-VL / Qwen3-VL: ``pixel_values`` ``[sum of patches over the batch's images, 3*2*p*p]``
  (concatenated, not stacked), ``image_grid_thw`` ``[images, 3]``, ``mm_token_type_ids``
  ``[B, T]`` (1 at image tokens; without it the model silently uses 1-D positions instead of
  M-RoPE, so a batch must carry it, padded like ``input_ids``).
- LLaVA-OneVision: ``pixel_values`` ``[images, max tiles, 3, 32, 32]`` (zero tiles pad the
  shorter), ``image_sizes`` ``[images, 2]`` (original height, width), ``batch_num_images`` ``[B]``
  (1: AnyRes tiling; more images in one sample are not tiled). Image-newline rows count as image
  tokens (they are ``image_token_id`` positions).
- InternVL: ``pixel_values`` ``[sum of tiles, 3, 28, 28]`` (concatenated); ``<img>``/``</img>``
  around each image's context tokens are not image tokens.

*torchvision*: in transformers 5 every one of these processor classes holds a video processor,
and video processors exist only where torchvision imports. Where it does not (this project's CPU
install), ``AutoProcessor.from_pretrained`` cannot build any of them. The folders are written
the same either way (byte-identical, so nothing depends on what is installed), and
:func:`load_processor` loads the stock processor class from a folder in both cases: through
``AutoProcessor`` where torchvision imports, else with ``video_processor=None`` (images and text
go through the stock code unchanged; only videos are unavailable). The image processors are
saved from their PIL backends (``*ImageProcessorPil``; the config names the plain class), so
``AutoProcessor`` with torchvision builds the torchvision backend: same token ids, pixel values
equal to ~1e-7 on the test images (checked with torch 2.14.1 + torchvision 0.29.1, where the
written folders are byte-identical to this install's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tiny import IM_END, IM_START, IMAGE_TOKEN, TinyPair, build_tokenizer

FAMILY_FILE = "distill_family.json"
FAMILIES = ("qwen2_5_vl", "llava_onevision", "internvl", "qwen3_vl")

TEACHER = dict(hidden=96, layers=6, heads=6, kv_heads=6, inter=192)
STUDENT = dict(hidden=64, layers=4, heads=4, kv_heads=2, inter=128)
HEAD_DIM = 16

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
VIDEO_TOKEN = "<video>"
IMG_START, IMG_CONTEXT, IMG_END = "<img>", "<IMG_CONTEXT>", "</img>"


def chat_template(image: str) -> str:
    """ChatML like :data:`distill.models.tiny.CHAT_TEMPLATE`, an image item rendered as ``image``.

    Assistant turns are wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask=True``
    marks them; string content is copied as is (a processor placeholder in it stays one)."""
    image = image.replace("\n", "\\n")
    return (
        "{% macro render(content) %}"
        "{% if content is string %}{{ content }}"
        "{% else %}{% for item in content %}"
        "{% if item['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% endmacro %}"
        "{% for message in messages %}"
        "{{ '" + IM_START + "' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ render(message['content']) }}{{ '" + IM_END + "' }}{% endgeneration %}"
        "{% else %}{{ render(message['content']) }}{{ '" + IM_END + "' }}{% endif %}"
        "{{ '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
    )


@dataclass(frozen=True)
class FamilySpec:
    """What differs between families (the rest is built by the family's functions below)."""

    name: str
    model_class: str
    processor_class: str
    special_tokens: tuple[str, ...]
    image_text: str  # what the chat template writes for an image item
    image_token: str  # the token repeated once per visual position in input_ids
    batch_keys: tuple[str, ...]  # processor outputs the forward needs besides input_ids / attention_mask
    extra_special_tokens: dict = field(default_factory=dict)  # tokenizer attributes the processor reads


SPECS = {
    "qwen2_5_vl": FamilySpec(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
        (VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD), VISION_START + IMAGE_PAD + VISION_END, IMAGE_PAD,
        ("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    ),
    "llava_onevision": FamilySpec(
        "llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
        (VIDEO_TOKEN,), IMAGE_TOKEN + "\n", IMAGE_TOKEN,
        ("pixel_values", "image_sizes", "batch_num_images"),
    ),
    "internvl": FamilySpec(
        "internvl", "InternVLForConditionalGeneration", "InternVLProcessor",
        (IMG_START, IMG_CONTEXT, IMG_END, VIDEO_TOKEN), IMG_CONTEXT + "\n", IMG_CONTEXT,
        ("pixel_values",),
        extra_special_tokens=dict(start_image_token=IMG_START, end_image_token=IMG_END,
                                  context_image_token=IMG_CONTEXT, video_token=VIDEO_TOKEN),
    ),
    "qwen3_vl": FamilySpec(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor",
        (VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD), VISION_START + IMAGE_PAD + VISION_END, IMAGE_PAD,
        ("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    ),
}


def build_family_tokenizer(family: str):
    """:func:`build_tokenizer` + the family's special tokens (appended, fixed ids) + its chat template."""
    from tokenizers import AddedToken

    spec = SPECS[family]
    tok = build_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens], special_tokens=True)
    if spec.extra_special_tokens:
        # what ``extra_special_tokens={name: token}`` does at construction: saved in tokenizer_config.json,
        # read back as ``tok.<name>`` / ``tok.<name>_id`` (the processor reads them)
        tok._set_model_specific_special_tokens(dict(spec.extra_special_tokens))
    tok.chat_template = chat_template(spec.image_text)
    return tok


# --- image processors (PIL backends: they need no torchvision) -------------------------------------------------

QWEN2_5_PATCH, QWEN3_PATCH, MERGE = 14, 16, 2
MIN_PIXELS_UNITS, MAX_PIXELS_UNITS = 1, 16  # in (patch * merge)^2 units: 1x1 .. 4x4 merged tokens per side^2

OV_IMAGE, OV_PATCH = 32, 8
OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96]]
OV_BASE_TOKENS = (OV_IMAGE // OV_PATCH) ** 2  # 16

IVL_IMAGE, IVL_PATCH, IVL_MAX_TILES = 28, 7, 9
IVL_SEQ = (IVL_IMAGE // IVL_PATCH) ** 2 // 4  # downsample 0.5 -> 4 tokens per tile


def _qwen_image_processor(patch: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = patch * MERGE
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS_UNITS * unit * unit, "longest_edge": MAX_PIXELS_UNITS * unit * unit},
        patch_size=patch, temporal_patch_size=2, merge_size=MERGE,
    )


def image_processor(family: str):
    """The family's stock image processor at tiny settings."""
    if family == "qwen2_5_vl":
        return _qwen_image_processor(QWEN2_5_PATCH)
    if family == "qwen3_vl":
        ip = _qwen_image_processor(QWEN3_PATCH)
        ip.image_mean, ip.image_std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # Qwen3-VL's own normalisation
        return ip
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil(
            size={"height": OV_IMAGE, "width": OV_IMAGE}, image_grid_pinpoints=OV_PINPOINTS,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )
    if family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil(
            size={"height": IVL_IMAGE, "width": IVL_IMAGE}, crop_to_patches=True, min_patches=1,
            max_patches=IVL_MAX_TILES,
        )
    raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")


def video_processor_dict(family: str) -> dict:
    """The ``video_processor`` entry of ``processor_config.json`` (written without torchvision: the
    stock loader fills every key left out with the class default)."""
    if family in ("qwen2_5_vl", "qwen3_vl"):
        patch = QWEN2_5_PATCH if family == "qwen2_5_vl" else QWEN3_PATCH
        unit = patch * MERGE
        d = {"video_processor_type": "Qwen2VLVideoProcessor" if family == "qwen2_5_vl" else "Qwen3VLVideoProcessor",
             "patch_size": patch, "temporal_patch_size": 2, "merge_size": MERGE,
             "size": {"shortest_edge": MIN_PIXELS_UNITS * unit * unit,
                      "longest_edge": MAX_PIXELS_UNITS * unit * unit * 2}}
        if family == "qwen3_vl":
            d["image_mean"], d["image_std"] = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        return d
    if family == "llava_onevision":
        return {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": OV_IMAGE, "width": OV_IMAGE},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    if family == "internvl":
        return {"video_processor_type": "InternVLVideoProcessor", "size": {"height": IVL_IMAGE, "width": IVL_IMAGE}}
    raise ValueError(family)


def processor_kwargs(family: str) -> dict:
    """The processor's own ``__init__`` settings (besides its sub-processors and chat template)."""
    if family == "llava_onevision":
        return dict(num_image_tokens=OV_BASE_TOKENS, vision_feature_select_strategy="full",
                    image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN, vision_aspect_ratio="anyres_max_9")
    if family == "internvl":
        return dict(image_seq_length=IVL_SEQ)
    return {}


def _processor_class(family: str):
    import transformers

    return getattr(transformers, SPECS[family].processor_class)


def _without_video(cls):
    """The stock processor class, accepting ``video_processor=None`` (:func:`distill.models.loading.processor_without_video`)."""
    from .loading import processor_without_video

    return processor_without_video(cls)


def torchvision_ok() -> bool:
    """Whether torchvision imports (:func:`distill.models.loading.torchvision_ok`)."""
    from .loading import torchvision_ok as ok

    return ok()


def make_processor(family: str, tokenizer=None, image_proc=None):
    """The family's stock processor (``video_processor=None``: for images and text; build a folder with
    :func:`save_processor`)."""
    tokenizer = tokenizer if tokenizer is not None else build_family_tokenizer(family)
    image_proc = image_proc if image_proc is not None else image_processor(family)
    cls = _without_video(_processor_class(family))
    return cls(image_processor=image_proc, tokenizer=tokenizer, video_processor=None,
               chat_template=tokenizer.chat_template, **processor_kwargs(family))


def save_processor(family: str, tokenizer, image_proc, out: Path) -> None:
    """Write the processor files as ``ProcessorMixin.save_pretrained`` lays them out (tokenizer files,
    ``chat_template.jinja``, ``processor_config.json`` with both sub-processor configs), torchvision or not."""
    spec = SPECS[family]
    tokenizer._set_processor_class(spec.processor_class)  # what ProcessorMixin.save_pretrained does
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    proc = {"image_processor": image_proc.to_dict(), "video_processor": video_processor_dict(family),
            "processor_class": spec.processor_class, **processor_kwargs(family)}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_processor(folder: str | os.PathLike):
    """The folder's stock processor: :func:`distill.models.loading.load_processor` (``AutoProcessor``
    where torchvision imports, else the same class with ``video_processor=None``; the one loader of
    the project, for these families' real checkpoints too)."""
    from .loading import load_processor as load

    return load(folder)


def family_info(folder: str | os.PathLike) -> dict:
    """``distill_family.json`` of a folder written here (``{"family", "image_token", "image_token_id",
    "batch_keys", ...}``)."""
    return json.loads((Path(folder) / FAMILY_FILE).read_text(encoding="utf-8"))


# --- model configs ---------------------------------------------------------------------------------------------


def _text_kwargs(role: dict, tokenizer, vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=role["hidden"], intermediate_size=role["inter"],
        num_hidden_layers=role["layers"], num_attention_heads=role["heads"], num_key_value_heads=role["kv_heads"],
        head_dim=HEAD_DIM, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def model_config(family: str, role: dict, tokenizer, vocab_size: int):
    """The family's composite config for a text model of shape ``role`` (:data:`TEACHER`/:data:`STUDENT`)."""
    text = _text_kwargs(role, tokenizer, vocab_size)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

        vs, img, vid, ve = _ids(tokenizer, VISION_START, IMAGE_PAD, VIDEO_PAD, VISION_END)
        text_cfg = Qwen2_5_VLTextConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [2, 3, 3]}, **text)
        vision = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN2_5_PATCH,
                                        spatial_merge_size=MERGE, temporal_patch_size=2, window_size=QWEN2_5_PATCH * MERGE * 2,
                                        fullatt_block_indexes=[1], out_hidden_size=role["hidden"])
        return Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision, image_token_id=img, video_token_id=vid,
                                vision_start_token_id=vs, vision_end_token_id=ve, tie_word_embeddings=False)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

        vs, img, vid, ve = _ids(tokenizer, VISION_START, IMAGE_PAD, VIDEO_PAD, VISION_END)
        text_cfg = Qwen3VLTextConfig(rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                      "mrope_section": [4, 2, 2], "mrope_interleaved": True}, **text)
        vision = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN3_PATCH,
                                     spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=role["hidden"],
                                     num_position_embeddings=64, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text_cfg, vision_config=vision, image_token_id=img, video_token_id=vid,
                             vision_start_token_id=vs, vision_end_token_id=ve, tie_word_embeddings=False)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=OV_IMAGE, patch_size=OV_PATCH, num_channels=3)
        return LlavaOnevisionConfig(
            vision_config=vision, text_config=Qwen2Config(**text),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
            image_grid_pinpoints=OV_PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu", multimodal_projector_bias=True,
            tie_word_embeddings=False,
        )
    if family == "internvl":
        from transformers import InternVLConfig, Qwen2Config
        from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

        vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=[IVL_IMAGE, IVL_IMAGE], patch_size=[IVL_PATCH, IVL_PATCH],
                                      use_mask_token=False, use_absolute_position_embeddings=True)
        return InternVLConfig(
            vision_config=vision, text_config=Qwen2Config(**text),
            image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT), image_seq_length=IVL_SEQ,
            downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
            vision_feature_select_strategy="default", tie_word_embeddings=False,
        )
    raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")


def _model_class(family: str):
    import transformers

    return getattr(transformers, SPECS[family].model_class)


def save_family_model(family: str, config, tokenizer, image_proc, out_dir: str | os.PathLike, seed: int) -> Path:
    """Initialise the family's model from ``seed``, save it, the processor files and ``distill_family.json``."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = _model_class(family)(config)
    finally:
        torch.set_default_dtype(old)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    del model
    save_processor(family, tokenizer, image_proc, out)
    spec = SPECS[family]
    info = {
        "family": family,
        "model_class": spec.model_class,
        "processor_class": spec.processor_class,
        "image_token": spec.image_token,
        "image_token_id": tokenizer.convert_tokens_to_ids(spec.image_token),
        "image_text": spec.image_text,
        "batch_keys": list(spec.batch_keys),
        "needs_torchvision_for_auto_processor": True,
    }
    (out / FAMILY_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def build_family_pair(family: str, out_dir: str | os.PathLike, seed: int = 0) -> TinyPair:
    """Write ``out_dir/teacher`` and ``out_dir/student`` of ``family``; same ``seed`` gives identical files."""
    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    root = Path(out_dir)
    tokenizer = build_family_tokenizer(family)
    image_proc = image_processor(family)
    padded = (len(tokenizer) // 64 + 1) * 64
    teacher = save_family_model(family, model_config(family, TEACHER, tokenizer, padded), tokenizer, image_proc,
                                root / "teacher", seed)
    student = save_family_model(family, model_config(family, STUDENT, tokenizer, len(tokenizer)), tokenizer,
                                image_proc, root / "student", seed + 1)
    return TinyPair(root=root, teacher=teacher, student=student)
