"""Training configuration: the five sections (run, model, data, loss, deepspeed) as small
dataclasses, YAML loading, dotted CLI overrides, one validation pass.

A stage is a config. ``load_config(yaml_path, ["deepspeed.lr=2e-5", ...], stage=3)`` returns a
validated :class:`TrainConfig`. Validation is one pass that collects every problem (unknown keys,
wrong types, bad values, missing paths, a stage that needs a teacher without one) and raises one
:class:`ConfigError`, a line per problem, each starting with the dotted key, before any model or
process group is touched. A section built directly (``LossConfig(kd_kind="kl")``) checks itself in
``__post_init__`` and raises the same way.

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

from distill.attention import BACKENDS, VISUAL_IMPLS
from distill.losses import ATTN_KINDS, KD_KINDS

__all__ = [
    "ConfigError",
    "DataConfigError",
    "RunConfig",
    "ModelConfig",
    "DataConfig",
    "LossConfig",
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
    """A bad configuration value; each line of the message starts with the dotted key."""


class DataConfigError(ConfigError):
    """The data configuration cannot be served (shards, lengths, batch counts), found when the
    loader is built: a user's fix, not a bug."""


def _check(problems: list[str]) -> None:
    """Raise one ConfigError holding every problem (a line each), if there is any."""
    if problems:
        raise ConfigError("\n".join(problems))


def _path(default=None, **kw):
    """A dataclass field holding a filesystem path (resolved relative to the YAML folder)."""
    return field(default=default, metadata={"path": True, **kw})


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
    metrics_file: str = "metrics.jsonl"
    """Metrics JSONL file name, relative to output_dir."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to ``output_dir/tb`` (needs the ``tensorboard`` package)."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""

    def __post_init__(self):
        _check(self.problems())

    def problems(self) -> list[str]:
        out = [f"run.{k}: must be >= 1, got {getattr(self, k)}"
               for k in ("steps", "log_every", "keep_last") if getattr(self, k) < 1]
        out += [f"run.{k}: must be >= 0, got {getattr(self, k)}"
                for k in ("save_every", "max_nonfinite_in_row") if getattr(self, k) < 0]
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                out.append("run.tensorboard: true needs the tensorboard package; "
                           "pip install tensorboard, or set run.tensorboard=false")
        return out


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
        _check(self.problems())

    def problems(self) -> list[str]:
        out = []
        if self.dtype not in ("bfloat16", "float16", "float32"):
            out.append(f"model.dtype: must be bfloat16|float16|float32, got {self.dtype!r}")
        if self.llm not in ("full", "lora", "frozen"):
            out.append(f"model.llm: must be full|lora|frozen, got {self.llm!r}")
        if self.llm == "lora" and self.lora_r < 1:
            out.append(f"model.lora_r: must be >= 1, got {self.lora_r}")
        return out

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
        _check(self.problems())

    def problems(self) -> list[str]:
        out = []
        if self.zero_stage not in (2, 3):
            out.append(f"deepspeed.zero_stage: must be 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            out.append(f"deepspeed.grad_accum: must be >= 1, got {self.grad_accum}")
        if self.lr <= 0:
            out.append(f"deepspeed.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            out.append("deepspeed.warmup_steps/grad_clip/weight_decay: must be >= 0")
        if len(self.betas) != 2:
            out.append(f"deepspeed.betas: must be two floats, got {self.betas}")
        return out


@dataclass
class DataConfig:
    """What the streaming loader (:func:`distill.data.build_loader`) reads and how it batches."""

    shards: list[str] = field(default_factory=list, metadata={"path": True})
    """Shard sources: directories holding ``manifest.json`` (from ``python -m data_prep``), manifest
    files, ``.tar`` paths or brace patterns (``/data/shard-{000000..000127}.tar``). A single string
    is accepted. Per-shard sample counts come from the manifest next to the shards when present."""
    batch_size: int = 8
    """Micro-batch size per rank."""
    max_length: int = 2048
    """Maximum tokens per sample (image tokens included). Longer samples are cut after their image
    tokens; a sample whose image tokens would be cut is dropped and counted (``image_truncated``).
    ``build_loader`` refuses a value that cannot hold even the shortest image sample (the
    processor's image tokens + the chat template + one answer token), before any model loads."""
    shuffle_buffer: int = 1000
    """Samples held in each reader's shuffle buffer (0 or 1 = no sample shuffling; shard order is
    still shuffled per epoch)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = read in the training process)."""
    resampled: bool = False
    """Draw shards with replacement (infinite stream cut to ``samples_per_epoch``); use for multi-node
    runs and for shard counts smaller than ``world_size * max(1, num_workers)``."""
    samples_per_epoch: int | None = None
    """Samples per epoch *per rank*. Required when resampled or when shard counts are unknown (no
    manifest); default = manifest total // world_size. Batches per epoch = this // batch_size."""
    seed: int = 0
    """Data order seed (``build_loader(seed=...)`` overrides it when given)."""
    drop_text_only: bool = False
    """Skip samples without an image (counted as ``text_only_dropped``)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker (ignored when ``num_workers == 0``)."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        _check(self.problems())

    def problems(self) -> list[str]:
        out = []
        if not self.shards:
            out.append("data.shards: give at least one shard directory, manifest, .tar path or brace pattern")
        checks = {
            "batch_size": self.batch_size >= 1,
            "max_length": self.max_length >= 2,
            "shuffle_buffer": self.shuffle_buffer >= 0,
            "num_workers": self.num_workers >= 0,
            "prefetch_factor": self.prefetch_factor >= 1,
        }
        out += [f"data.{key}: invalid value {getattr(self, key)!r}" for key, ok in checks.items() if not ok]
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch_size:
            out.append(f"data.samples_per_epoch ({self.samples_per_epoch}) is smaller than data.batch_size "
                       f"({self.batch_size}): an epoch would have no batch")
        return out

    @classmethod
    def coerce(cls, obj: Any) -> "DataConfig":
        """Accept a ``DataConfig``, a dict, or any object with the same attribute names."""
        if isinstance(obj, cls):
            return obj
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(obj, dict):
            unknown = sorted(set(obj) - set(names))
            if unknown:
                raise ConfigError(f"data: unknown key(s) {unknown}; known: {names}")
            return cls(**obj)
        return cls(**{n: getattr(obj, n) for n in names if hasattr(obj, n)})


@dataclass
class LossConfig:
    """Loss weights and options (the ``loss:`` section of a stage config)."""

    lm_weight: float = 1.0
    """Weight of the student's next-token cross-entropy on the labels."""
    kd_weight: float = 0.0
    """Weight of the token-level logit distillation term (needs a teacher)."""
    kd_kind: str = "forward_kl"
    """``forward_kl`` (KL(teacher||student)), ``reverse_kl`` or ``jsd``."""
    kd_temperature: float = 1.0
    """Softmax temperature T of both models; the divergence is scaled by T^2."""
    kd_beta: float = 0.5
    """JSD interpolation: 0 -> forward KL, 1 -> reverse KL."""
    logits_chunk_size: int = 256
    """Labelled rows per chunk of the fused LM + KD loss (both lm_heads applied per chunk, fp32
    math): peak logits memory is about 6 x rows x V x 4 bytes (256 rows, V = 151,936: ~0.9 GiB)."""
    attn_weight: float = 0.0
    """Weight of the visual-attention alignment term (needs a teacher)."""
    attn_kind: str = "filtered_cosine"
    """``filtered_cosine`` (CompoDistill), ``cosine`` or ``kl``."""
    student_layers: list[int] | None = None
    """Student text layers to align; ``None``: derived from depth (see ``match_layers``)."""
    teacher_layers: list | None = None
    """One teacher layer or window (list) per student layer; ``None``: proportional windows."""
    num_layers: int | None = None
    """Number of derived student layers (``None``: max(1, depth // 4))."""
    window: int | None = None
    """Teacher window size of derived targets (``None``: round(teacher_depth / student_depth))."""
    backend: str = "auto"
    """Attention kernel: auto, flash_attn, sdpa_flash, sdpa_efficient, cpu_flash, eager."""
    attn_chunk_size: int | None = None
    """Visual query rows per backward strip of the capture op's torch path; ``None``: automatic."""
    capture_impl: str = "auto"
    """Visual-attention op: ``triton`` (fused kernels, CUDA), ``torch`` (batched fallback) or
    ``auto`` (triton on CUDA when it imports, else torch)."""

    def __post_init__(self):
        for name in ("lm_weight", "kd_weight", "attn_weight"):
            v = getattr(self, name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(self, name, float(v))
        _check(self.problems())

    def problems(self) -> list[str]:
        out = []
        weights = ("lm_weight", "kd_weight", "attn_weight")
        for name in weights:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                out.append(f"loss.{name}: must be a number >= 0, got {v!r}")
        if not out and all(getattr(self, n) == 0 for n in weights):
            out.append("loss.lm_weight/kd_weight/attn_weight: at least one weight must be > 0")
        if self.kd_kind not in KD_KINDS:
            out.append(f"loss.kd_kind: must be one of {KD_KINDS}, got {self.kd_kind!r}")
        if self.attn_kind not in ATTN_KINDS:
            out.append(f"loss.attn_kind: must be one of {ATTN_KINDS}, got {self.attn_kind!r}")
        t = self.kd_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            out.append(f"loss.kd_temperature: must be > 0, got {t!r}")
        if not isinstance(self.kd_beta, (int, float)) or not 0 <= self.kd_beta <= 1:
            out.append(f"loss.kd_beta: must be in [0, 1], got {self.kd_beta!r}")
        v = self.logits_chunk_size
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            out.append(f"loss.logits_chunk_size: must be a positive int, got {v!r}")
        for name in ("attn_chunk_size", "num_layers", "window"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                out.append(f"loss.{name}: must be a positive int or null, got {v!r}")
        if self.capture_impl not in VISUAL_IMPLS:
            out.append(f"loss.capture_impl: must be one of {VISUAL_IMPLS}, got {self.capture_impl!r}")
        if self.backend not in ("auto",) + BACKENDS:
            out.append(f"loss.backend: must be one of {('auto',) + BACKENDS}, got {self.backend!r}")
        if self.student_layers is not None and not isinstance(self.student_layers, (list, tuple)):
            out.append(f"loss.student_layers: must be a list of ints or null, got {self.student_layers!r}")
        if self.teacher_layers is not None and not isinstance(self.teacher_layers, (list, tuple)):
            out.append(f"loss.teacher_layers: must be a list (ints or lists) or null, got {self.teacher_layers!r}")
        return out

    def needs_teacher(self) -> bool:
        """True when a teacher term (logit KD, attention alignment) has weight."""
        return self.kd_weight > 0 or self.attn_weight > 0


@dataclass
class TrainConfig:
    """One stage of the pipeline. Sections: run, model, data, loss, deepspeed."""

    stage: int
    """1 (DPT), 2 (SFT) or 3 (DFT); set by ``launch/stageN.py``."""
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    deepspeed: DeepSpeedConfig
    source: str | None = None
    """The YAML file this config was read from."""

    @property
    def stage_name(self) -> str:
        return STAGES[self.stage]

    def needs_teacher(self) -> bool:
        """True when ``model.teacher`` must be given: the stage's recipe (1, 3) distils from a
        teacher, or a teacher loss weight is > 0. Whether one is loaded: :meth:`runs_teacher`."""
        return self.stage in TEACHER_STAGES or self.loss.needs_teacher()

    def runs_teacher(self) -> bool:
        """True when a loss term reads teacher outputs (``loss.kd_weight`` or ``loss.attn_weight``
        > 0): only then is a teacher engine built. A stage-1/3 config with both weights 0 (an
        ablation) keeps ``model.teacher`` for the adapter fetch but never loads the teacher."""
        return self.model.teacher is not None and self.loss.needs_teacher()


# ----------------------------------------------------------------------------------- loading


SECTIONS = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "loss": LossConfig,
            "deepspeed": DeepSpeedConfig}


def _is_path_field(f: dataclasses.Field) -> bool:
    """Fields declared with :func:`_path`: resolved relative to the YAML folder, checked to exist."""
    return bool(f.metadata.get("path"))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check/convert ``value`` (already YAML-parsed) to the field annotation ``tp``: ``X | None``,
    ``list[X]`` (a scalar becomes a one-item list), bool, int, float, str. ConfigError names key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(key, value, a)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, Path)) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return str(value)
    kind = {bool: "a bool", int: "an int", float: "a float", str: "a string"}.get(tp, _type_name(tp))
    raise ConfigError(f"{key}: expected {kind}, got {value!r}")


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


def _build_section(name: str, cls, raw: dict, bases: dict) -> tuple[Any, list[str]]:
    """Dataclass ``cls`` from ``raw`` (key -> value) and the problems found; ``bases`` maps key ->
    the folder its path value resolves from. Keys with a problem are left at their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs, problems, bad = {}, [], set()
    for k, v in raw.items():
        key = f"{name}.{k}"
        try:
            if k not in fields:
                close = [f for f in fields if f.startswith(k[:3])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{key}: unknown key{hint}; known keys: {', '.join(sorted(fields))}")
            v = _coerce(key, v, hints[k])
        except ConfigError as e:
            problems.append(str(e))
            bad.add(key)
            continue
        kwargs[k] = _resolve_path(v, bases[k]) if _is_path_field(fields[k]) else v
    try:
        return cls(**kwargs), problems
    except ConfigError as e:  # the section's own checks; a key already reported is not repeated
        problems += [m for m in str(e).splitlines() if m.partition(":")[0] not in bad]
        return None, problems


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


def _read_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return raw


def _merge(raw: dict, yaml_base: Path, overrides, problems: list[str]) -> tuple[dict, dict]:
    """Section -> {key: value} from the YAML then the overrides, and section -> {key: folder its
    path value resolves from}; problems are appended to ``problems``."""
    merged = {name: {} for name in SECTIONS}
    bases = {name: {} for name in SECTIONS}
    for k, v in raw.items():
        if k not in SECTIONS:
            problems.append(f"{k}: unknown section; known: stage, {', '.join(SECTIONS)}")
        elif v is not None and not isinstance(v, dict):
            problems.append(f"{k}: must be a mapping of keys")
        else:
            merged[k].update(v or {})
            bases[k].update({key: yaml_base for key in v or {}})
    for item in overrides:
        try:
            key, value = _parse_override(item)
        except ConfigError as e:
            problems.append(str(e))
            continue
        sec, _, k = key.partition(".")
        if sec == "stage":
            problems.append("stage: set by the launcher (launch/stageN.py), not an override")
        elif sec not in SECTIONS:
            problems.append(f"{key}: unknown section {sec!r}; known: {', '.join(SECTIONS)}")
        else:
            merged[sec][k] = value
            bases[sec][k] = Path.cwd()
    return merged, bases


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                stage: int | None = None, check_paths: bool = True) -> TrainConfig:
    """Read a stage config.

    Args:
        path: YAML file with sections run/model/data/loss/deepspeed (and optionally ``stage``).
        overrides: ``section.key=value`` strings; values are YAML-parsed then type-checked.
        stage: the launcher's stage (1, 2, 3); must agree with a ``stage`` key in the YAML.
        check_paths: check that input paths (models, data, DeepSpeed JSONs) exist.
    Raises:
        ConfigError listing every problem found (a line each, naming the dotted key), before
        anything heavy is loaded.
    """
    raw = _read_yaml(path) if path is not None else {}
    yaml_base = Path(path).resolve().parent if path is not None else Path.cwd()
    problems: list[str] = []
    yaml_stage = raw.pop("stage", None)
    merged, bases = _merge(raw, yaml_base, overrides, problems)
    if stage is None:
        stage = yaml_stage
    if stage not in STAGES:
        problems.append(f"stage: must be 1, 2 or 3, got {stage!r}")
    elif yaml_stage is not None and yaml_stage != stage:
        problems.append(f"stage: {path} is a stage-{yaml_stage} config but the stage-{stage} launcher was used")
    built = {}
    for name, cls in SECTIONS.items():
        built[name], errors = _build_section(name, cls, merged[name], bases[name])
        problems += errors
    _check(problems)  # the checks below need every section
    cfg = TrainConfig(stage=stage, source=str(path) if path else None, **built)
    if cfg.run.output_dir and not Path(cfg.run.output_dir).is_absolute():
        cfg.run.output_dir = str(Path(cfg.run.output_dir).resolve())
    _check(_cross_problems(cfg) + (_path_problems(cfg) if check_paths else []))
    return cfg


def _cross_problems(cfg: TrainConfig) -> list[str]:
    """Checks that involve more than one section."""
    out = []
    if cfg.model.student is None:
        out.append("model.student: required (HF LLaVA folder or a previous stage's final/ folder)")
    if cfg.needs_teacher() and cfg.model.teacher is None:
        why = (f"stage {cfg.stage} ({cfg.stage_name}) distils from a teacher"
               if cfg.stage in TEACHER_STAGES else "a teacher loss weight is > 0")
        out.append(f"model.teacher: required because {why}; set model.teacher=PATH")
    if cfg.deepspeed.zero_stage == 3 and cfg.loss.lm_weight == 0 and cfg.loss.kd_weight == 0:
        out.append("loss.lm_weight: with loss.kd_weight=0 too, the loss skips the LM head and the last "
                   "layers, which ZeRO-3's backward hooks do not support; keep lm_weight or kd_weight > 0 "
                   "(a small value such as 1e-4 is enough) or use deepspeed.zero_stage=2")
    return out


def _path_problems(cfg: TrainConfig) -> list[str]:
    """Input paths that do not exist (patterns and URLs are checked when the data is read)."""
    out = []
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).exists():
        out.append(f"run.resume: checkpoint folder does not exist: {cfg.run.resume}")
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
                    out.append(f"{name}.{f.name}: path does not exist: {item}")
    return out


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain dict (for logging / saving next to checkpoints)."""
    out = {"stage": cfg.stage}
    for name in ("run", "model", "data", "loss", "deepspeed"):
        out[name] = dataclasses.asdict(getattr(cfg, name))
    return out
