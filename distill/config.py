"""Training configuration: small grouped dataclasses, YAML loading, dotted CLI overrides.

A stage is a config. ``load_config(yaml_path, ["deepspeed.lr=2e-5", ...], stage=3)`` returns a
validated :class:`TrainConfig`; every error (unknown key, wrong type, missing path, a stage that
needs a teacher without one) is a :class:`ConfigError` naming the dotted key, raised before any
model or process group is touched.

Paths in a YAML file resolve relative to that file's folder (never the working directory); paths
given on the command line resolve relative to the working directory, like any CLI argument.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "RunConfig",
    "ModelConfig",
    "DeepSpeedConfig",
    "TrainConfig",
    "load_config",
    "config_to_dict",
]

STAGES = {1: "dpt", 2: "sft", 3: "dft"}
"""Stage number -> short name (distillation pre-training, supervised fine-tuning, distillation
fine-tuning)."""

TEACHER_STAGES = (1, 3)
"""Stages whose recipe is defined by teacher signals (logit KD / attention alignment)."""


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted key."""


def _path(default=None, **kw):
    """A dataclass field holding a filesystem path (resolved relative to the YAML folder)."""
    return field(default=default, metadata={"path": True, **kw})


def _not_path(default):
    """A field whose name looks like a path (``*_file``, ...) but is not resolved (see ``_is_path_field``)."""
    return field(default=default, metadata={"path": False})


@dataclass
class RunConfig:
    output_dir: str = _path("runs/out")
    """Folder for checkpoints (``checkpoints/``), metrics and the final student (``final/``)."""
    seed: int = 0
    """Seed for torch/numpy/python RNGs and the data order."""
    steps: int = 10
    """Number of optimizer steps of the stage."""
    save_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints, delete older ones."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in output_dir if any), ``never``, or a checkpoint folder."""
    log_every: int = 10
    """Synchronise and log metrics every N optimizer steps (the only host syncs of the loop)."""
    max_nonfinite_in_row: int = 5
    """Abort when more than this many optimizer steps in a row had a non-finite loss/gradient."""
    metrics_file: str = _not_path("metrics.jsonl")
    """Metrics JSONL file name, relative to output_dir."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to ``output_dir/tb`` (needs the ``tensorboard`` package)."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""

    def __post_init__(self):
        for k in ("steps", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"run.{k}: must be >= 1, got {getattr(self, k)}")
        for k in ("save_every", "max_nonfinite_in_row"):
            if getattr(self, k) < 0:
                raise ConfigError(f"run.{k}: must be >= 0, got {getattr(self, k)}")
        if self.keep_last < 1:
            raise ConfigError(f"run.keep_last: must be >= 1, got {self.keep_last}")
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(
                    "run.tensorboard: true needs the tensorboard package; "
                    "pip install tensorboard, or set run.tensorboard=false"
                )


@dataclass
class ModelConfig:
    student: str | None = _path(None)
    """Student: a stock HF LLaVA folder or the ``final/`` checkpoint of a previous stage."""
    teacher: str | None = _path(None)
    """Teacher HF LLaVA folder, or null for stages without teacher signals."""
    adapter_fetch: bool = True
    """Student projector = frozen copy of the teacher's projector + trainable Linear adapter."""
    dtype: str = "bfloat16"
    """Parameter/compute dtype: bfloat16, float16 or float32."""
    train_projector: bool = True
    """Train the projector path (the adapter when adapter_fetch, else the whole projector)."""
    llm: str = "frozen"
    """Language model: ``full`` (all weights train), ``lora`` (peft adapters) or ``frozen``."""
    train_vision: bool = False
    """Train the vision tower (frozen by default)."""
    lora_r: int = 16
    """LoRA rank (llm=lora)."""
    lora_alpha: int = 32
    """LoRA alpha (llm=lora)."""
    lora_dropout: float = 0.0
    """LoRA dropout (llm=lora)."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module name suffixes inside the language model that get LoRA adapters (llm=lora)."""
    gradient_checkpointing: bool = False
    """Non-reentrant activation checkpointing of the student's decoder layers."""

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"model.dtype: must be bfloat16|float16|float32, got {self.dtype!r}")
        if self.llm not in ("full", "lora", "frozen"):
            raise ConfigError(f"model.llm: must be full|lora|frozen, got {self.llm!r}")
        if self.llm == "lora" and self.lora_r < 1:
            raise ConfigError(f"model.lora_r: must be >= 1, got {self.lora_r}")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    """ZeRO stage of the student engine: 2 or 3 (the teacher is always ZeRO-3)."""
    offload: bool = False
    """Offload optimizer states (and, under ZeRO-3, parameters) to CPU memory."""
    config: str | None = _path(None)
    """Student DeepSpeed JSON; null picks ``ds_configs/zero{2,3}[_offload].json``. ``"auto"`` values
    are filled from this section."""
    teacher_config: str | None = _path(None)
    """Teacher DeepSpeed JSON (ZeRO-3 inference); null picks ``ds_configs/teacher_zero3.json``."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the micro-batch size per rank is ``data.batch_size``)."""
    lr: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup steps (then linear decay to 0 at run.steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    timeout_min: int = 30
    """Process-group timeout in minutes."""

    def __post_init__(self):
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"deepspeed.zero_stage: must be 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ConfigError(f"deepspeed.grad_accum: must be >= 1, got {self.grad_accum}")
        if self.lr <= 0:
            raise ConfigError(f"deepspeed.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("deepspeed.warmup_steps/grad_clip/weight_decay: must be >= 0")
        if len(self.betas) != 2:
            raise ConfigError(f"deepspeed.betas: must be two floats, got {self.betas}")


def _data_config_cls():
    from distill.data import DataConfig

    return DataConfig


def _loss_config_cls():
    from distill.objective import LossConfig

    return LossConfig


@dataclass
class TrainConfig:
    """One stage of the pipeline. Sections: run, model, data, loss, deepspeed."""

    stage: int
    """1 (DPT), 2 (SFT) or 3 (DFT); set by ``launch/stageN.py``."""
    run: RunConfig
    model: ModelConfig
    data: Any
    """``distill.data.DataConfig``."""
    loss: Any
    """``distill.objective.LossConfig``."""
    deepspeed: DeepSpeedConfig
    source: str | None = None
    """The YAML file this config was read from."""

    @property
    def stage_name(self) -> str:
        return STAGES[self.stage]

    def needs_teacher(self) -> bool:
        """True when the stage's recipe or its loss weights need teacher outputs."""
        return self.stage in TEACHER_STAGES or self.loss.needs_teacher()


# ----------------------------------------------------------------------------------- loading


def _sections():
    return {
        "run": RunConfig,
        "model": ModelConfig,
        "data": _data_config_cls(),
        "loss": _loss_config_cls(),
        "deepspeed": DeepSpeedConfig,
    }


PATH_FIELD_NAMES = ("shards",)
PATH_FIELD_SUFFIXES = ("_dir", "_path", "_file", "_root")


def _is_path_field(f: dataclasses.Field) -> bool:
    """Path fields: as ``metadata["path"]`` says where set, else (for sections defined elsewhere)
    a name in PATH_FIELD_NAMES or ending in one of PATH_FIELD_SUFFIXES."""
    if "path" in f.metadata:
        return bool(f.metadata["path"])
    return f.name in PATH_FIELD_NAMES or f.name.endswith(PATH_FIELD_SUFFIXES)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check/convert ``value`` (already YAML-parsed) to annotation ``tp``; ConfigError names key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _resolve_path(value, base: Path):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve_path(v, base) for v in value)
    s = os.path.expanduser(os.path.expandvars(str(value)))
    if "://" in s:  # URLs (e.g. pipe:/s3 shard specs) are left alone
        return s
    p = Path(s)
    return str(p if p.is_absolute() else (base / p).resolve())


def _build_section(name: str, cls, raw: dict, bases: dict):
    """Instantiate dataclass ``cls`` from ``raw`` (key -> value); ``bases`` maps key -> Path for
    the folder its path value resolves from."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in raw.items():
        key = f"{name}.{k}"
        if k not in fields:
            close = [f for f in fields if f.startswith(k[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}; known keys: {', '.join(sorted(fields))}")
        v = _coerce(key, v, hints[k])
        if _is_path_field(fields[k]):
            v = _resolve_path(v, bases[k])
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{name}.") else f"{name}: {msg}") from None


def _parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, _, text = item.partition("=")
    key = key.strip().lstrip("-")
    if key.count(".") != 1:
        raise ConfigError(f"{key}: overrides are section.key=value (sections: run, model, data, loss, deepspeed)")
    try:
        value = yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError:
        value = text
    return key, value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                stage: int | None = None, check_paths: bool = True) -> TrainConfig:
    """Read a stage config.

    Args:
        path: YAML file with sections run/model/data/loss/deepspeed (and optionally ``stage``).
        overrides: ``section.key=value`` strings; values are YAML-parsed then type-checked.
        stage: the launcher's stage (1, 2, 3); must agree with a ``stage`` key in the YAML.
        check_paths: check that input paths (models, data, DeepSpeed JSONs) exist.
    Raises:
        ConfigError naming the dotted key, before anything heavy is loaded.
    """
    raw: dict = {}
    yaml_base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
        yaml_base = p.resolve().parent
    sections = _sections()
    yaml_stage = raw.pop("stage", None)
    for k in raw:
        if k not in sections:
            raise ConfigError(f"{k}: unknown section; known: stage, {', '.join(sections)}")
        if raw[k] is not None and not isinstance(raw[k], dict):
            raise ConfigError(f"{k}: must be a mapping of keys")
    merged = {name: dict(raw.get(name) or {}) for name in sections}
    bases = {name: {k: yaml_base for k in merged[name]} for name in sections}
    for item in overrides:
        key, value = _parse_override(item)
        sec, _, k = key.partition(".")
        if sec == "stage":
            raise ConfigError("stage: set by the launcher (launch/stageN.py), not an override")
        if sec not in sections:
            raise ConfigError(f"{key}: unknown section {sec!r}; known: {', '.join(sections)}")
        merged[sec][k] = value
        bases[sec][k] = Path.cwd()
    if stage is None:
        stage = yaml_stage
    if stage not in STAGES:
        raise ConfigError(f"stage: must be 1, 2 or 3, got {stage!r}")
    if yaml_stage is not None and yaml_stage != stage:
        raise ConfigError(f"stage: {path} is a stage-{yaml_stage} config but the stage-{stage} launcher was used")
    built = {name: _build_section(name, cls, merged[name], bases[name]) for name, cls in sections.items()}
    cfg = TrainConfig(stage=stage, source=str(path) if path else None, **built)
    if cfg.run.output_dir and not Path(cfg.run.output_dir).is_absolute():
        cfg.run.output_dir = str(Path(cfg.run.output_dir).resolve())
    _validate(cfg, check_paths)
    return cfg


def _validate(cfg: TrainConfig, check_paths: bool):
    if cfg.model.student is None:
        raise ConfigError("model.student: required (HF LLaVA folder or a previous stage's final/ folder)")
    if cfg.needs_teacher() and cfg.model.teacher is None:
        why = (f"stage {cfg.stage} ({cfg.stage_name}) distils from a teacher"
               if cfg.stage in TEACHER_STAGES else "a teacher loss weight is > 0")
        raise ConfigError(f"model.teacher: required because {why}; set model.teacher=PATH")
    if cfg.deepspeed.zero_stage == 3 and cfg.loss.lm_weight == 0 and cfg.loss.kd_weight == 0:
        raise ConfigError("loss.lm_weight: with loss.kd_weight=0 too, the loss skips the LM head and the last "
                          "layers, which ZeRO-3's backward hooks do not support; keep lm_weight or kd_weight > 0 "
                          "(a small value such as 1e-4 is enough) or use deepspeed.zero_stage=2")
    if cfg.run.resume not in ("auto", "never") and check_paths and not Path(cfg.run.resume).exists():
        raise ConfigError(f"run.resume: checkpoint folder does not exist: {cfg.run.resume}")
    if not check_paths:
        return
    for name in ("model", "deepspeed", "data"):
        sec = getattr(cfg, name)
        for f in dataclasses.fields(sec):
            if not _is_path_field(f):
                continue
            v = getattr(sec, f.name)
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                if item is None or "://" in str(item) or any(c in str(item) for c in "{*?"):
                    continue
                if not Path(item).exists():
                    raise ConfigError(f"{name}.{f.name}: path does not exist: {item}")


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain dict (for logging / saving next to checkpoints)."""
    out = {"stage": cfg.stage}
    for name in ("run", "model", "data", "loss", "deepspeed"):
        out[name] = dataclasses.asdict(getattr(cfg, name))
    return out
