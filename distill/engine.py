"""All DeepSpeed setup in one place: process group, ZeRO configs, student and teacher engines,
collectives used by the loop, checkpoints and the consolidated 16-bit state dict.

The rest of the package never imports deepspeed; it receives an :class:`Engines` struct.

- Student: ``deepspeed.initialize`` with the stage's ZeRO config (ZeRO-3 by default; ZeRO-2 and
  CPU offload selectable). Under ZeRO-3 the model is built inside ``zero.Init`` (transformers'
  ``HfDeepSpeedConfig`` kept alive during ``from_pretrained``), so no rank holds all weights.
- Teacher: a ZeRO-3 inference engine (no optimizer), frozen, ``eval()``, used under ``no_grad``.
  Every rank must run every teacher/student forward: ZeRO-3 gathers parameters collectively.
- Bucket sizes follow the hidden size h: ``reduce_bucket_size = h*h``,
  ``stage3_prefetch_bucket_size = 0.9*h*h``, ``stage3_param_persistence_threshold = 10*h``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from distill.config import ConfigError, TrainConfig
from distill.schedule import lr_schedule

__all__ = [
    "DistInfo",
    "Engines",
    "init_distributed",
    "student_ds_config",
    "teacher_ds_config",
    "build_engines",
    "all_reduce_sum",
    "all_reduce_max",
    "barrier",
    "shutdown",
    "save_engine_checkpoint",
    "load_engine_checkpoint",
    "consolidated_state_dict",
    "ds_configs_dir",
]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@dataclass
class Engines:
    """What the training loop needs from DeepSpeed.

    ``student`` is a DeepSpeedEngine (call it like the model; ``.backward``, ``.step``);
    ``teacher`` a frozen ZeRO-3 inference engine or None. ``student_model``/``teacher_model`` are
    the wrapped ``nn.Module``s (for capture hooks and saving)."""

    student: Any
    teacher: Any | None
    dist: DistInfo
    student_config: dict
    teacher_config: dict | None
    _hf_ds_configs: list = field(default_factory=list, repr=False)

    @property
    def student_model(self) -> torch.nn.Module:
        return self.student.module

    @property
    def teacher_model(self) -> torch.nn.Module | None:
        return None if self.teacher is None else self.teacher.module

    def backward(self, loss: torch.Tensor):
        """Backward of a micro-batch loss that is already normalised by the global count of the
        optimizer step. DeepSpeed averages gradients over ranks and divides by the accumulation
        steps; both are undone here so gradients are the plain sum of the micro-batch losses."""
        self.student.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self):
        """``engine.step()`` after every micro-batch (updates at accumulation boundaries)."""
        self.student.step()

    def step_applied(self) -> bool:
        """False when DeepSpeed skipped the last update (non-finite gradient norm / fp16 overflow);
        the decision is global, so all ranks agree."""
        return bool(self.student.was_step_applied())

    def lr(self) -> float:
        return float(self.student.get_lr()[0])

    def grad_norm(self) -> float | None:
        gn = self.student.get_global_grad_norm()
        return None if gn is None else float(gn)


# ------------------------------------------------------------------------------ process group


def init_distributed(timeout_min: int = 30) -> DistInfo:
    """Initialise the process group from the launcher's env (RANK/WORLD_SIZE/MASTER_ADDR/...).

    Works with ``deepspeed``, ``torchrun``, ``srun`` wrappers, or a single process (world 1).
    The backend is the accelerator's (nccl on CUDA, gloo/ccl on CPU with ``DS_ACCELERATOR=cpu``).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # single process without a launcher
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    acc = get_accelerator()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(),
                                   timeout=timedelta(minutes=timeout_min))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(), local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    """Destroy the process group, if there is one (the end of a run, failed or not)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no host sync); returns ``t``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def failed_ranks(error: Any) -> list[tuple[int, Any]]:
    """Collective: each rank's error (any picklable value; ``None`` if it is fine) -> the
    ``(rank, error)`` pairs of every failing rank, the same list on every rank (so all can stop
    together)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        got: list = [None] * dist.get_world_size()
        dist.all_gather_object(got, error)
    else:
        got = [error]
    return [(r, m) for r, m in enumerate(got) if m is not None]


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


# ------------------------------------------------------------------------------ ZeRO configs


def ds_configs_dir() -> Path:
    """The repository's ``ds_configs/`` folder."""
    return Path(__file__).resolve().parent.parent / "ds_configs"


def _read_json(path: str | Path, key: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: DeepSpeed config not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {p} is not valid JSON: {e}") from e


def _fill_auto(d: Any, values: dict[str, Any], prefix: str = "", src: str = "") -> Any:
    """Replace every ``"auto"`` in nested dict ``d`` by ``values[dotted.key]``; error if unknown."""
    if isinstance(d, dict):
        return {k: _fill_auto(v, values, f"{prefix}{k}.", src) for k, v in d.items()}
    if d == "auto":
        key = prefix[:-1]
        if key not in values:
            raise ConfigError(f"deepspeed.config: {src} has \"auto\" at {key!r}, which this trainer cannot fill")
        return values[key]
    return d


def _bucket_values(hidden: int) -> dict:
    return {
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.allgather_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }


def _batch_values(cfg: TrainConfig, world_size: int) -> dict:
    ds = cfg.deepspeed
    dtype = cfg.model.dtype
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": cfg.data.batch_size * ds.grad_accum * world_size,
        "bf16.enabled": dtype == "bfloat16",
        "fp16.enabled": dtype == "float16",
    }


def student_ds_config(cfg: TrainConfig, hidden_size: int, world_size: int) -> dict:
    """The student's DeepSpeed dict: the JSON picked by ``deepspeed.{config,zero_stage,offload}``
    with "auto" values filled from the YAML and the hidden size."""
    ds = cfg.deepspeed
    if ds.config:
        path, src_key = Path(ds.config), "deepspeed.config"
    else:
        name = f"zero{ds.zero_stage}{'_offload' if ds.offload else ''}.json"
        path, src_key = ds_configs_dir() / name, "deepspeed.zero_stage"
    raw = _read_json(path, src_key)
    values = {
        **_batch_values(cfg, world_size),
        **_bucket_values(hidden_size),
        "gradient_clipping": ds.grad_clip,
        "optimizer.params.lr": ds.lr,
        "optimizer.params.betas": list(ds.betas),
        "optimizer.params.weight_decay": ds.weight_decay,
    }
    out = _fill_auto(raw, values, src=str(path))
    zero = out.setdefault("zero_optimization", {})
    stage = zero.get("stage")
    if ds.config and stage != ds.zero_stage:
        raise ConfigError(f"deepspeed.zero_stage: {ds.zero_stage} but {path} sets zero_optimization.stage={stage}")
    from deepspeed.accelerator import get_accelerator

    opt = out.get("optimizer")
    offloaded = "offload_optimizer" in zero
    if opt is not None and not offloaded and str(opt.get("type", "")).lower() in ("adam", "adamw"):
        params = opt.setdefault("params", {})
        if get_accelerator().device_name() == "cpu":
            params["torch_adam"] = True  # no fused CUDA Adam on CPU: torch's AdamW (same update)
        elif "torch_adam" not in params:  # the JSON did not choose: fused when it can be had
            ok, why = fused_adam_status()
            if not ok:
                params["torch_adam"] = True
                if int(os.environ.get("RANK", 0)) == 0:
                    print(f"[distill] {why}: the student uses torch.optim.AdamW (same update, unfused). For "
                          "DeepSpeed's FusedAdam install deepspeed with DS_BUILD_FUSED_ADAM=1, or provide nvcc "
                          "and ninja; set optimizer.params.torch_adam in deepspeed.config to choose yourself.",
                          flush=True)
    return out


def fused_adam_status() -> tuple[bool, str]:
    """Whether DeepSpeed's CUDA FusedAdam is prebuilt or can be JIT-built here (nvcc and ninja),
    and why not. A deepspeed built without ops (``DS_BUILD_OPS=0``) on a machine without the CUDA
    compiler would otherwise fail inside ``deepspeed.initialize`` with a compiler traceback."""
    import shutil

    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError as e:
        return False, f"deepspeed's build info is unreadable ({e})"
    if installed_ops.get("fused_adam"):
        return True, "FusedAdam is prebuilt"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or next((str(c) for c in [Path(cuda_home, "bin", "nvcc")] if c.exists()), None)
    if nvcc and shutil.which("ninja"):
        return True, f"FusedAdam is JIT-built with {nvcc}"
    missing = " and ".join(m for m, have in (("nvcc", nvcc), ("ninja", shutil.which("ninja"))) if not have)
    return False, f"deepspeed has no prebuilt FusedAdam and this machine lacks {missing} to build it"


def teacher_ds_config(cfg: TrainConfig, hidden_size: int, world_size: int) -> dict:
    """The teacher's ZeRO-3 inference dict (no optimizer, no scheduler)."""
    ds = cfg.deepspeed
    path = Path(ds.teacher_config) if ds.teacher_config else ds_configs_dir() / "teacher_zero3.json"
    raw = _read_json(path, "deepspeed.teacher_config")
    out = _fill_auto(raw, {**_batch_values(cfg, world_size), **_bucket_values(hidden_size)}, src=str(path))
    if out.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"deepspeed.teacher_config: {path} must use zero_optimization.stage=3")
    for k in ("optimizer", "scheduler"):
        if k in out:
            raise ConfigError(f"deepspeed.teacher_config: {path} must not define {k!r} (the teacher is frozen)")
    return out


# ------------------------------------------------------------------------------ engines


def _fix_zero_init_dtype():
    """Work around a DeepSpeed bug (0.19.x): ``zero.Init(dtype=torch.float32)`` builds bf16
    parameters on accelerators without fp16 support (CPU), because ``_set_dtype`` reads
    ``dtype or fp16 if fp16_supported else bf16``. Model code that creates modules under
    ``zero.Init(dtype=...)`` (e.g. the fetched projector) then mixes dtypes. Patched to honour an
    explicit dtype; a no-op where the upstream code is already correct."""
    import inspect

    from deepspeed.runtime.zero import partition_parameters as pp

    init_cls = pp.Init
    try:
        src = inspect.getsource(init_cls._set_dtype)
    except (OSError, TypeError, AttributeError):
        return
    if "dtype or torch.float16 if" not in src or getattr(init_cls, "_distill_dtype_fix", False):
        return
    orig = init_cls._set_dtype

    def _set_dtype(self, ds_config, dtype):
        if dtype is not None:
            self.dtype = dtype
        else:
            orig(self, ds_config, dtype)

    init_cls._set_dtype = _set_dtype
    init_cls._distill_dtype_fix = True


def _unset_hf_ds_config():
    from transformers.integrations import deepspeed as hf_ds

    if hasattr(hf_ds, "unset_hf_deepspeed_config"):
        hf_ds.unset_hf_deepspeed_config()


def build_engines(
    cfg: TrainConfig,
    dist_info: DistInfo,
    make_student: Callable[[], torch.nn.Module],
    student_hidden: int,
    make_teacher: Callable[[], torch.nn.Module] | None = None,
    teacher_hidden: int | None = None,
    select_trainable: Callable[[torch.nn.Module], None] | None = None,
) -> Engines:
    """Build the student (and teacher) engines.

    Args:
        make_student / make_teacher: zero-argument builders calling ``from_pretrained``; they run
            while ``HfDeepSpeedConfig`` is alive, so under ZeRO-3 weights load partitioned.
        student_hidden / teacher_hidden: language-model hidden sizes (bucket sizes).
        select_trainable: sets ``requires_grad`` on the built student (before the optimizer is
            made; may wrap LoRA in place and must return nothing).
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    _fix_zero_init_dtype()
    keep = []
    world = dist_info.world_size
    s_cfg = student_ds_config(cfg, student_hidden, world)
    t_cfg = teacher_ds_config(cfg, teacher_hidden, world) if make_teacher is not None else None

    # Student first: under ZeRO-3 its from_pretrained runs inside zero.Init.
    if s_cfg["zero_optimization"]["stage"] == 3:
        keep.append(HfDeepSpeedConfig(copy.deepcopy(s_cfg)))
    else:
        _unset_hf_ds_config()
    student = make_student()
    if select_trainable is not None:
        select_trainable(student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model: no trainable parameters (check model.train_projector / model.llm / model.train_vision)")
    sched = None if "scheduler" in s_cfg else (lambda opt: lr_schedule(opt, cfg.deepspeed.warmup_steps, cfg.run.steps))
    s_engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=params, config=copy.deepcopy(s_cfg),
                                             lr_scheduler=sched)

    t_engine = None
    if make_teacher is not None:
        keep.append(HfDeepSpeedConfig(copy.deepcopy(t_cfg)))
        teacher = make_teacher()
        teacher.requires_grad_(False)
        teacher.eval()
        t_engine, _, _, _ = deepspeed.initialize(model=teacher, config=copy.deepcopy(t_cfg))
        t_engine.module.eval()
        if s_cfg["zero_optimization"]["stage"] == 3:
            # leave the student's ZeRO-3 setting in force for transformers' runtime checks
            keep.append(HfDeepSpeedConfig(copy.deepcopy(s_cfg)))
    return Engines(student=s_engine, teacher=t_engine, dist=dist_info, student_config=s_cfg,
                   teacher_config=t_cfg, _hf_ds_configs=keep)


# ------------------------------------------------------------------------------ checkpoints


def save_engine_checkpoint(engines: Engines, root: str | Path, tag: str, client_state: dict | None = None):
    """DeepSpeed checkpoint of the student (weights, optimizer, scheduler) into ``root/tag``.
    Collective: every rank must call it."""
    engines.student.save_checkpoint(str(root), tag=tag, client_state=client_state or {}, save_latest=False)


def load_engine_checkpoint(engines: Engines, root: str | Path, tag: str) -> dict:
    """Load ``root/tag`` into the student engine; returns the client state. Collective."""
    path, client = engines.student.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"could not load DeepSpeed checkpoint {Path(root) / tag}")
    return client or {}


def consolidated_state_dict(engines: Engines) -> dict | None:
    """Full 16-bit (model-dtype) student state dict on rank 0 (None elsewhere). Collective."""
    eng = engines.student
    if eng.zero_optimization_stage() == 3:
        sd = eng._zero3_consolidated_16bit_state_dict()
    else:
        sd = eng.module.state_dict() if engines.dist.rank == 0 else None
    if engines.dist.rank != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in sd.items()}
