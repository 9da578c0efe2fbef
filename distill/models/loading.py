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


def load_llava_config(path: str | os.PathLike, role: str = "model"):
    """Read and validate the ``LlavaConfig`` of a folder (no weights are read)."""
    from transformers import AutoConfig, LlavaConfig

    p = model_folder(path, role)
    try:
        raw = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{role} folder {str(p)!r}: config.json is not valid JSON ({exc}).") from exc
    model_type = raw.get("model_type")
    if model_type != "llava":
        raise ModelConfigError(
            f"{role} folder {str(p)!r} is not LLaVA-style: config.json has model_type={model_type!r}, "
            "expected 'llava' (LlavaForConditionalGeneration: vision tower + multi_modal_projector + "
            "text model, image tokens = image_token_id in input_ids). Convert the checkpoint to the "
            "transformers LLaVA format (e.g. llava-hf/* or llava-onevision converted with the "
            "transformers conversion scripts)."
        )
    try:
        cfg = AutoConfig.from_pretrained(p)
    except Exception as exc:  # transformers raises many types for malformed configs
        raise ModelConfigError(f"{role} folder {str(p)!r}: transformers cannot parse config.json: {exc}") from exc
    if not isinstance(cfg, LlavaConfig):
        raise ModelConfigError(f"{role} folder {str(p)!r}: config parsed as {type(cfg).__name__}, expected LlavaConfig.")
    for key in ("vision_config", "text_config"):
        if getattr(cfg, key, None) is None:
            raise ModelConfigError(f"{role} folder {str(p)!r}: config.json has no {key}.")
    return cfg


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


def load_vlm(path: str | os.PathLike, dtype=torch.float32, attn_implementation: str | None = None, role: str = "model"):
    """Load a stock HF LLaVA folder as ``LlavaForConditionalGeneration`` (validated first).

    Under an alive ZeRO-3 ``HfDeepSpeedConfig`` transformers loads it partitioned (``zero.Init``).
    For a student checkpoint folder use :func:`distill.models.load_student_checkpoint`.

    A folder whose projector is wider inside than the text model (``projector_intermediate_size``
    in its config: an exact export of a student trained with a wider teacher's projector fetched)
    loads as ``DistillLlavaForConditionalGeneration`` from this package (the same class the folder
    ships for ``trust_remote_code``); no code from the folder is run.
    """
    from transformers import LlavaForConditionalGeneration

    cfg = load_llava_config(path, role)
    weight_files(path, role)
    kwargs = {"dtype": as_torch_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    cls = LlavaForConditionalGeneration
    if has_wide_projector(cfg):
        from .modeling_distill_llava import DistillLlavaForConditionalGeneration as cls
    return cls.from_pretrained(Path(path), **kwargs)


def has_wide_projector(cfg) -> bool:
    """True when a LLaVA config's projector has an inner width other than the text hidden size."""
    inner = getattr(cfg, "projector_intermediate_size", None)
    return bool(inner) and int(inner) != int(cfg.text_config.hidden_size)


def load_processor(path: str | os.PathLike, role: str = "model"):
    """``AutoProcessor`` of a folder (image processor + tokenizer + chat template), validated."""
    from transformers import AutoProcessor

    p = model_folder(path, role)
    try:
        proc = AutoProcessor.from_pretrained(p)
    except Exception as exc:
        raise ModelConfigError(
            f"{role} folder {str(p)!r}: cannot load its processor ({exc}). The folder needs the files "
            "written by `processor.save_pretrained` (processor_config.json / preprocessor_config.json, "
            "tokenizer files, chat template)."
        ) from exc
    if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
        raise ModelConfigError(
            f"{role} folder {str(p)!r}: AutoProcessor gave {type(proc).__name__}, not a multimodal "
            "processor with an image processor and a tokenizer. Save a LlavaProcessor into the folder."
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


def vision_feature_width(cfg) -> int:
    """Input width of the projector: vision hidden size x number of selected feature layers."""
    layers = cfg.vision_feature_layer
    n = 1 if isinstance(layers, int) else len(layers)
    return int(cfg.vision_config.hidden_size) * n


def check_fetch_shapes(scfg, tcfg, pair: str = "pair") -> None:
    """The student's vision features must be the teacher projector's input."""
    sw, tw = vision_feature_width(scfg), vision_feature_width(tcfg)
    if sw != tw:
        raise ModelConfigError(
            f"{pair}: teacher-adapter fetch needs the student's vision features ({sw} wide) to match the "
            f"teacher projector's input ({tw} wide). Use the same vision tower and vision_feature_layer "
            "in both, or train with adapter_fetch: false."
        )
