"""Validated loading of LLaVA-style Hugging Face folders and the config-only pair check.

Everything here fails early with a :class:`ModelConfigError` that names the folder, the
problem and the fix, instead of a deep traceback from inside transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CHECKPOINT_META = "distill_checkpoint.json"
"""File that marks a folder as a student checkpoint written by ``save_student_checkpoint``."""


class ModelConfigError(ValueError):
    """A model folder or a teacher/student pair cannot be used; the message says how to fix it."""


def model_folder(path: str | os.PathLike, role: str = "model") -> Path:
    """``path`` as a ``Path`` after checking it is a folder holding ``config.json``."""
    if path is None:
        raise ModelConfigError(f"No {role} folder given: pass the path of a Hugging Face LLaVA folder.")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelConfigError(
            f"{role} folder {str(p)!r} does not exist. Pass a local Hugging Face LLaVA folder "
            "(one written by save_pretrained, with config.json and *.safetensors); this project "
            "never downloads from a hub, so download it first (e.g. `huggingface-cli download`)."
        )
    if not p.is_dir():
        raise ModelConfigError(f"{role} path {str(p)!r} is a file, not a folder: pass the folder that holds config.json.")
    if not (p / "config.json").is_file():
        raise ModelConfigError(
            f"{role} folder {str(p)!r} has no config.json, so it is not a Hugging Face model folder. "
            "Point to the folder written by `save_pretrained` (or a student checkpoint / export)."
        )
    return p


FAMILY_MODEL_TYPES = ("llava", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl")
"""``config.json`` model types the pipeline loads (each through transformers' own class, found by
``AutoModelForImageTextToText`` from the config; nothing here maps a type to a class)."""


def family_of_config(cfg) -> str:
    """The family (``config.model_type``) of a loaded VLM config."""
    return str(getattr(cfg, "model_type", None))


def load_vlm_config(path: str | os.PathLike, role: str = "model", llava_only: bool = False):
    """Read and validate the composite VLM config of a folder (no weights are read).

    Accepted: the model types of :data:`FAMILY_MODEL_TYPES` (LLaVA, Qwen2.5-VL, Qwen3-VL,
    LLaVA-OneVision, InternVL); ``llava_only`` restricts it to LLaVA.
    """
    from transformers import AutoConfig

    p = model_folder(path, role)
    try:
        raw = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{role} folder {str(p)!r}: config.json is not valid JSON ({exc}).") from exc
    model_type = raw.get("model_type")
    allowed = ("llava",) if llava_only else FAMILY_MODEL_TYPES
    if model_type not in allowed:
        raise ModelConfigError(
            f"{role} folder {str(p)!r} is not LLaVA-style: config.json has model_type={model_type!r}, "
            f"expected one of {', '.join(repr(a) for a in allowed)} (a vision tower + projector + text model "
            "whose image tokens are image_token_id in input_ids: LlavaForConditionalGeneration, "
            "Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, "
            "LlavaOnevisionForConditionalGeneration, InternVLForConditionalGeneration). Convert the checkpoint "
            "to the transformers format of its family (e.g. the llava-hf/*, Qwen/*-VL or OpenGVLab/*-hf folders)."
        )
    try:
        cfg = AutoConfig.from_pretrained(p)
    except Exception as exc:  # transformers raises many types for malformed configs
        raise ModelConfigError(f"{role} folder {str(p)!r}: transformers cannot parse config.json: {exc}") from exc
    if getattr(cfg, "model_type", None) != model_type:
        raise ModelConfigError(f"{role} folder {str(p)!r}: config parsed as {type(cfg).__name__}, expected model_type {model_type!r}.")
    for key in ("vision_config", "text_config"):
        if getattr(cfg, key, None) is None:
            raise ModelConfigError(f"{role} folder {str(p)!r}: config.json has no {key}.")
    return cfg


def load_llava_config(path: str | os.PathLike, role: str = "model"):
    """The validated config of a folder of any supported family (:func:`load_vlm_config`)."""
    return load_vlm_config(path, role)


def weight_files(path: str | os.PathLike, role: str = "model") -> list[Path]:
    """The ``*.safetensors`` weight files of a folder (sharded or single), checked to exist."""
    p = model_folder(path, role)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [p / n for n in names]
    else:
        files = sorted(p.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        has_bin = any(p.glob("*.bin"))
        hint = (
            " The folder holds PyTorch *.bin weights: re-save it with "
            "`LlavaForConditionalGeneration.from_pretrained(dir).save_pretrained(dir)` to get safetensors."
            if has_bin
            else ""
        )
        raise ModelConfigError(
            f"{role} folder {str(p)!r} has no usable safetensors weights"
            f"{' (missing shards: ' + ', '.join(missing) + ')' if missing else ''}.{hint}"
        )
    return files


def is_student_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``save_student_checkpoint``."""
    return (Path(path) / CHECKPOINT_META).is_file()


def as_torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ModelConfigError(f"Unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype.")
    return names[dtype]


def unwrap_model(model):
    """The ``nn.Module`` inside any DeepSpeed engine wrapping (engines keep it in ``.module``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def image_token_id(cfg, where: str = "model config") -> int:
    """The id that marks image positions in ``input_ids`` (``image_token_id``, or the older
    ``image_token_index``) of a LLaVA config object."""
    tid = getattr(cfg, "image_token_id", None)
    if tid is None:
        tid = getattr(cfg, "image_token_index", None)
    if tid is None:
        raise ModelConfigError(f"{where} has no image_token_id; is this a LLaVA-style model?")
    return int(tid)


def text_hidden_size(path: str | os.PathLike) -> int:
    """Hidden size of a LLaVA folder's language model (config only, no weights)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path).get_text_config().hidden_size)


def import_model_classes(cfg) -> None:
    """Import the transformers modules of ``cfg``'s model and of every sub-config's model now.

    Under ZeRO-3, ``from_pretrained`` builds the model inside ``deepspeed.zero.Init``, and a
    composite model creates its text and vision models from their configs, which imports their
    modules lazily. A class first defined inside ``zero.Init`` loses every ``__init__`` wrapper
    applied after its class body: DeepSpeed restores the body's ``__init__`` on exit. With the
    ``kernels`` package installed (transformers 5.25 requires it), transformers wraps the attention
    classes' ``__init__`` and ``forward`` (``use_kernelized_func``), so every later model of those
    classes in the process (a teacher of the student's family, the next run of a test) fails at its
    first forward: "'LlamaAttention' object has no attribute '_kernel_funcs'". Importing the
    modules first, outside ``zero.Init``, keeps the classes whole whatever the caller imported.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        MODEL_MAPPING[type(cfg)]  # resolving the class imports its module
    except (KeyError, ValueError):
        pass  # a config without a base model class (nothing built from it)
    for key in getattr(cfg, "sub_configs", None) or {}:  # a tree: text, vision, ... configs
        sub = getattr(cfg, key, None)
        if sub is not None:
            import_model_classes(sub)


def load_vlm(path: str | os.PathLike, dtype=torch.float32, attn_implementation: str | None = None, role: str = "model"):
    """Load a stock HF VLM folder through transformers' own class (validated first).

    The class is the one ``AutoModelForImageTextToText`` picks from the config (LLaVA, Qwen2.5-VL,
    Qwen3-VL, LLaVA-OneVision, InternVL). Under an alive ZeRO-3 ``HfDeepSpeedConfig``
    transformers loads it partitioned (``zero.Init``). For a student checkpoint folder use
    :func:`distill.models.load_student_checkpoint`.

    A LLaVA folder whose projector is wider inside than the text model (``projector_intermediate_size``
    in its config: an exact export of a student trained with a wider teacher's projector fetched)
    loads as ``DistillLlavaForConditionalGeneration`` from this package (the same class the folder
    ships for ``trust_remote_code``); no code from the folder is run.
    """
    from transformers import AutoModelForImageTextToText

    cfg = load_vlm_config(path, role)
    weight_files(path, role)
    import_model_classes(cfg)
    kwargs = {"dtype": as_torch_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if has_wide_projector(cfg):
        from .modeling_distill_llava import WIDE_CLASSES

        if cfg.model_type not in WIDE_CLASSES:
            raise ModelConfigError(f"{role} folder {str(path)!r}: projector_intermediate_size is set but model_type "
                                   f"{cfg.model_type!r} has no wide-projector class; remove it from config.json.")
        return WIDE_CLASSES[cfg.model_type].from_pretrained(Path(path), **kwargs)
    if cfg.model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        # a folder with auto_map (custom export) must not pull remote code in through the auto class
        return LlavaForConditionalGeneration.from_pretrained(Path(path), **kwargs)
    return AutoModelForImageTextToText.from_pretrained(Path(path), config=cfg, **kwargs)


def has_wide_projector(cfg) -> bool:
    """True when a LLaVA config's projector has an inner width other than the text hidden size."""
    inner = getattr(cfg, "projector_intermediate_size", None)
    return bool(inner) and int(inner) != int(cfg.get_text_config().hidden_size)


def torchvision_ok() -> bool:
    """Whether torchvision imports (transformers' video processors, hence ``AutoProcessor`` for the
    Qwen-VL / OneVision / InternVL processors, need it)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CUDA-only wheel on a CPU torch fails with RuntimeError/OSError, not ImportError
        return False
    return True


def processor_without_video(cls):
    """The stock processor class, accepting ``video_processor=None`` (its class check needs torchvision)."""

    def check(self, name, arg):
        if arg is None and name == "video_processor":
            return None
        return cls.check_argument_for_proper_class(self, name, arg)

    def save_pretrained(self, save_directory, **kwargs):
        """What ``ProcessorMixin.save_pretrained`` writes (tokenizer files, ``chat_template.jinja``,
        ``processor_config.json`` with the image processor's and the source folder's video processor
        settings), without a video processor object."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer._set_processor_class(cls.__name__)
        self.tokenizer.save_pretrained(out)
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        cfg = dict(getattr(self, "_distill_processor_config", None) or {})
        cfg.update({"image_processor": self.image_processor.to_dict(), "processor_class": cls.__name__})
        (out / "processor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [str(out / "processor_config.json")]

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check, "save_pretrained": save_pretrained,
                                       "__module__": cls.__module__})


def _auto_processor(p: Path):
    """The folder's stock processor: ``AutoProcessor.from_pretrained`` where torchvision imports (or
    the processor class holds no video processor), else the same class (named by
    ``processor_config.json`` or the tokenizer config) built from the folder's tokenizer, image
    processor, chat template and processor settings with ``video_processor=None`` (images and text
    go through the stock code unchanged; only videos are unavailable)."""
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if torchvision_ok():
        return AutoProcessor.from_pretrained(p)
    cfg_path = p / "processor_config.json"
    proc_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    tokenizer = AutoTokenizer.from_pretrained(p)
    name = proc_cfg.get("processor_class") or tokenizer.init_kwargs.get("processor_class")
    base = getattr(transformers, name, None) if name else None
    if base is None or "video_processor" not in base.get_attributes():
        return AutoProcessor.from_pretrained(p)  # no video processor: the stock path works as it is
    params = inspect.signature(base.__init__).parameters
    kwargs = {k: v for k, v in proc_cfg.items()
              if k in params and k not in ("image_processor", "tokenizer", "video_processor", "chat_template")}
    template = p / "chat_template.jinja"
    chat = template.read_text(encoding="utf-8") if template.exists() else tokenizer.chat_template
    proc = processor_without_video(base)(image_processor=AutoImageProcessor.from_pretrained(p), tokenizer=tokenizer,
                                         video_processor=None, chat_template=chat, **kwargs)
    proc._distill_processor_config = {k: v for k, v in proc_cfg.items() if k != "image_processor"}
    return proc


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_processor(path: str | os.PathLike, role: str = "model"):
    """The folder's processor (image processor + tokenizer + chat template), validated.

    ``AutoProcessor`` where it works; for the processor classes that hold a video processor
    (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL) on an install without torchvision, the same
    stock class with ``video_processor=None`` (see :func:`_auto_processor`)."""
    p = model_folder(path, role)
    try:
        proc = _auto_processor(p)
    except Exception as exc:
        if "torchvision" in str(exc).lower():
            # transformers 5.17 has only torchvision image processors for these families; 5.24 (tested)
            # also ships PIL ones, which this loader uses when torchvision is absent
            raise ModelConfigError(
                f"{role} folder {str(p)!r}: its image processor needs torchvision on this transformers "
                f"{_transformers_version()}. Install the torchvision build that matches your torch, or "
                "transformers >= 5.24 (its PIL image processors need no torchvision)."
            ) from exc
        raise ModelConfigError(
            f"{role} folder {str(p)!r}: cannot load its processor ({exc}). The folder needs the files "
            "written by `processor.save_pretrained` (processor_config.json / preprocessor_config.json, "
            "tokenizer files, chat template)."
        ) from exc
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise ModelConfigError(
            f"{role} folder {str(p)!r}: AutoProcessor gave {type(proc).__name__}, not a multimodal "
            "processor with an image processor and a tokenizer. Save the family's processor (e.g. a "
            "LlavaProcessor) into the folder."
        )
    return proc


# ----------------------------------------------------------------------------- pair check


def _processor_json(p: Path) -> dict | None:
    """Processor settings (merged processor_config.json / preprocessor_config.json) or None."""
    out: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = p / name
        if f.is_file():
            data = json.loads(f.read_text())
            out.update(data.get("image_processor", {}) if "image_processor" in data else {})
            out.update({k: v for k, v in data.items() if k != "image_processor"})
    return out or None


def _size_hw(size) -> tuple[int, int] | None:
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    if isinstance(size, int):
        return size, size
    return None


def image_geometry(path: str | os.PathLike, cfg=None) -> dict:
    """Image size and number of image tokens per image, from config (+ processor settings).

    The count is what the processor expands ``<image>`` to: ``(H//patch)*(W//patch)`` plus the
    processor's ``num_additional_image_tokens``, minus one for the ``"default"`` feature-select
    strategy (which drops the first vision token). Without processor settings the config's
    ``image_seq_length`` is used.
    """
    p = Path(path)
    cfg = cfg if cfg is not None else load_llava_config(p)
    vc = cfg.vision_config
    size = (int(vc.image_size), int(vc.image_size))
    proc = _processor_json(p)
    count = int(cfg.image_seq_length)
    if proc is not None:
        hw = _size_hw(proc.get("size")) or _size_hw(proc.get("crop_size"))
        if hw is not None and hw != size:
            raise ModelConfigError(
                f"model folder {str(p)!r}: its image processor resizes to {hw[0]}x{hw[1]} but the vision "
                f"tower expects {size[0]}x{size[1]}. Fix `size` in the processor config."
            )
        patch = proc.get("patch_size") or vc.patch_size
        extra = int(proc.get("num_additional_image_tokens") or 0)
        strategy = proc.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        count = (size[0] // patch) * (size[1] // patch) + extra - (1 if strategy == "default" else 0)
    return {"image_size": size, "num_image_tokens": count}


def _tokenizer_vocab(p: Path) -> dict | None:
    if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p).get_vocab()
    except Exception as exc:
        raise ModelConfigError(f"model folder {str(p)!r}: cannot load its tokenizer ({exc}).") from exc


def check_pair(student_path: str | os.PathLike, teacher_path: str | os.PathLike, adapter_fetch: bool = False) -> dict:
    """Config-only compatibility check of a student and a teacher folder (no weights are read).

    Checks: both LLaVA-style; the same tokenizer vocabulary (token -> id) with both embedding
    tables covering it (extra rows are padding; without tokenizer files the vocab sizes must be
    equal); the same ``image_token_id``; the same image size and image-token count per image.
    With ``adapter_fetch`` also that the student's vision features fit the teacher's projector.

    Returns a summary dict (``vocab_size`` = shared real vocabulary, ``num_image_tokens``,
    ``image_token_id``, ``student_vocab_rows``, ``teacher_vocab_rows``).
    Raises :class:`ModelConfigError` naming the mismatch and the fix.
    """
    sp, tp = model_folder(student_path, "student"), model_folder(teacher_path, "teacher")
    scfg, tcfg = load_llava_config(sp, "student"), load_llava_config(tp, "teacher")
    pair = f"student {str(sp)!r} / teacher {str(tp)!r}"

    s_rows, t_rows = int(scfg.text_config.vocab_size), int(tcfg.text_config.vocab_size)
    s_vocab, t_vocab = _tokenizer_vocab(sp), _tokenizer_vocab(tp)
    if s_vocab is not None and t_vocab is not None:
        if s_vocab != t_vocab:
            diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:5]
            raise ModelConfigError(
                f"{pair}: the tokenizers differ ({len(s_vocab)} vs {len(t_vocab)} tokens; first "
                f"differences {diff}). Logit distillation needs one shared vocabulary: use a student "
                "from the teacher's tokenizer family, or copy the teacher's tokenizer into the student "
                "folder and resize the student's embeddings."
            )
        real = max(s_vocab.values()) + 1
        for role, rows in (("student", s_rows), ("teacher", t_rows)):
            if rows < real:
                raise ModelConfigError(
                    f"{pair}: the {role}'s embedding table has {rows} rows but the tokenizer uses ids up "
                    f"to {real - 1}. Resize the {role}'s token embeddings (model.resize_token_embeddings) "
                    "and save it again."
                )
    else:
        if s_rows != t_rows:
            raise ModelConfigError(
                f"{pair}: vocab sizes differ ({s_rows} vs {t_rows}) and at least one folder has no "
                "tokenizer files, so padding rows cannot be told from real tokens. Save the tokenizer "
                "into both folders."
            )
        real = s_rows

    if scfg.image_token_id != tcfg.image_token_id:
        raise ModelConfigError(
            f"{pair}: image_token_id differs ({scfg.image_token_id} vs {tcfg.image_token_id}); both models "
            "must mark image positions with the same token id. Use a pair from one family or fix the "
            "student's config.image_token_id (and its tokenizer) to the teacher's."
        )
    if scfg.model_type != tcfg.model_type:
        raise ModelConfigError(
            f"{pair}: the models are of different families (student model_type={scfg.model_type!r}, teacher "
            f"{tcfg.model_type!r}); their processors expand an image to different visual tokens. Use a "
            "student and a teacher of one family."
        )
    if scfg.model_type != "llava":
        count = check_family_visual_tokens(sp, tp, scfg, tcfg, pair)
        if adapter_fetch:
            check_fetch_shapes(scfg, tcfg, pair)
        return {"vocab_size": real, "student_vocab_rows": s_rows, "teacher_vocab_rows": t_rows,
                "image_token_id": int(image_token_id(scfg)), "num_image_tokens": count, "family": scfg.model_type}
    sg, tg = image_geometry(sp, scfg), image_geometry(tp, tcfg)
    if sg["image_size"] != tg["image_size"]:
        raise ModelConfigError(
            f"{pair}: image size differs ({sg['image_size']} vs {tg['image_size']}); both models see the "
            "same pixel_values, so their vision towers need the same input resolution."
        )
    if sg["num_image_tokens"] != tg["num_image_tokens"]:
        raise ModelConfigError(
            f"{pair}: image tokens per image differ ({sg['num_image_tokens']} vs {tg['num_image_tokens']}); "
            "visual-attention alignment compares maps over the same image tokens. Use towers with "
            "the same patch grid and the same vision_feature_select_strategy."
        )
    if adapter_fetch:
        check_fetch_shapes(scfg, tcfg, pair)
    return {
        "vocab_size": real,
        "student_vocab_rows": s_rows,
        "teacher_vocab_rows": t_rows,
        "image_token_id": int(scfg.image_token_id),
        "num_image_tokens": sg["num_image_tokens"],
    }


# Per family: the settings that decide how many visual tokens (and which pixels) an image gives.
# ("processor", key): a key of the merged processor_config.json / preprocessor_config.json (the image
# processor's settings and the processor's own); ("config", dotted attribute): of config.json.
_QWEN_TOKEN_SETTINGS = (
    ("processor", "patch_size"), ("processor", "merge_size"), ("processor", "temporal_patch_size"),
    ("processor", "min_pixels"), ("processor", "max_pixels"), ("processor", "size"),
    ("processor", "image_mean"), ("processor", "image_std"),
    ("config", "vision_config.patch_size"), ("config", "vision_config.spatial_merge_size"),
    ("config", "vision_config.temporal_patch_size"),
)
FAMILY_TOKEN_SETTINGS = {
    "qwen2_5_vl": _QWEN_TOKEN_SETTINGS,
    "qwen3_vl": _QWEN_TOKEN_SETTINGS,
    "llava_onevision": (
        ("processor", "image_grid_pinpoints"), ("processor", "vision_aspect_ratio"), ("processor", "size"),
        ("processor", "crop_size"), ("processor", "num_image_tokens"), ("processor", "vision_feature_select_strategy"),
        ("processor", "image_mean"), ("processor", "image_std"), ("processor", "do_pad"),
        ("config", "image_grid_pinpoints"), ("config", "vision_aspect_ratio"),
        ("config", "vision_feature_select_strategy"), ("config", "vision_config.image_size"),
        ("config", "vision_config.patch_size"),
    ),
    "internvl": (
        ("processor", "size"), ("processor", "crop_to_patches"), ("processor", "min_patches"),
        ("processor", "max_patches"), ("processor", "use_thumbnail"), ("processor", "image_seq_length"),
        ("processor", "image_mean"), ("processor", "image_std"),
        ("config", "image_seq_length"), ("config", "downsample_ratio"), ("config", "vision_feature_select_strategy"),
        ("config", "vision_config.image_size"), ("config", "vision_config.patch_size"),
    ),
}


def _config_attr(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _norm_setting(v):
    if isinstance(v, tuple):
        return [_norm_setting(x) for x in v]
    if isinstance(v, list):
        return [_norm_setting(x) for x in v]
    return v


def check_family_visual_tokens(sp: Path, tp: Path, scfg, tcfg, pair: str = "pair") -> None:
    """The student and the teacher of a Qwen-VL / OneVision / InternVL pair expand every image to
    the same visual tokens: the settings of :data:`FAMILY_TOKEN_SETTINGS` must agree (config only)."""
    family = scfg.model_type
    sproc, tproc = _processor_json(sp) or {}, _processor_json(tp) or {}
    if not sproc or not tproc:
        missing = "student" if not sproc else "teacher"
        raise ModelConfigError(
            f"{pair}: the {missing} folder has no processor settings (processor_config.json / "
            "preprocessor_config.json), so the visual tokens per image cannot be checked. Save the family's "
            "processor into it (copy the teacher's processor files into the student folder)."
        )
    for where, key in FAMILY_TOKEN_SETTINGS.get(family, ()):
        if where == "processor":
            a, b = _norm_setting(sproc.get(key)), _norm_setting(tproc.get(key))
            fix = ("copy the teacher's processor settings into the student folder (its preprocessor_config.json / "
                   "processor_config.json), so both processors expand an image alike")
            name = f"processor setting {key!r}"
        else:
            a, b = _norm_setting(_config_attr(scfg, key)), _norm_setting(_config_attr(tcfg, key))
            fix = (f"set the student's config.json {key} to the teacher's value (the vision tower must cut and "
                   "merge an image like the teacher's)")
            name = f"config setting {key!r}"
        if a != b:
            raise ModelConfigError(
                f"{pair}: {family} {name} differs (student {a!r}, teacher {b!r}); it decides the visual tokens per "
                f"image, which must be the same in both models for logit and visual-attention distillation. To "
                f"align them, {fix}."
            )
    return None


def vision_feature_width(cfg) -> int:
    """Input width of the projector: vision hidden size x number of selected feature layers."""
    layers = cfg.vision_feature_layer
    n = 1 if isinstance(layers, int) else len(layers)
    return int(cfg.vision_config.hidden_size) * n


def check_fetch_shapes(scfg, tcfg, pair: str = "pair") -> None:
    """The student's vision features must be the teacher projector's input (and the family's layout
    must allow the fetch: :func:`distill.models.projector.fetch_support`)."""
    from .projector import fetch_support

    fetch_support(tcfg)
    if scfg.model_type in ("qwen2_5_vl", "qwen3_vl"):
        for key in ("hidden_size", "spatial_merge_size", "deepstack_visual_indexes"):
            a, b = getattr(scfg.vision_config, key, None), getattr(tcfg.vision_config, key, None)
            if a != b:
                raise ModelConfigError(
                    f"{pair}: teacher-adapter fetch reuses the teacher's merger on the student's vision features, "
                    f"so vision_config.{key} must match (student {a!r}, teacher {b!r}). Use the same vision tower "
                    "in both, or train with adapter_fetch: false."
                )
        return
    sw, tw = vision_feature_width(scfg), vision_feature_width(tcfg)
    if sw != tw:
        raise ModelConfigError(
            f"{pair}: teacher-adapter fetch needs the student's vision features ({sw} wide) to match the "
            f"teacher projector's input ({tw} wide). Use the same vision tower and vision_feature_layer "
            "in both, or train with adapter_fetch: false."
        )
