"""The one training loop. A stage (1 DPT, 2 SFT, 3 DFT) is a config; ``launch/stageN.py`` only
picks the stage number.

Reads top to bottom: config -> setup (process group, models, engines, data, objective, resume)
-> loop (global token counts, forward/backward per micro-batch, optimizer step) -> checkpoint
-> log -> final consolidated student in ``output_dir/final``.

Loss normalisation: before the forwards of an optimizer step, the valid-token and image counts of
all its micro-batches are summed over ranks (one all-reduce). Each micro-batch's loss is its
*sum* over valid positions divided by that global count, so gradient accumulation and data
parallelism give exactly the gradient of one big batch. DeepSpeed averages gradients over ranks
and (by default) scales by 1/accum; ``Engines.backward`` undoes both.

Host syncs happen only at log steps (and inside DeepSpeed's own gradient-norm check). A step whose
gradient norm is non-finite is skipped by DeepSpeed on every rank (no update, gradients
cleared); the loop counts it and aborts after ``run.max_nonfinite_in_row`` in a row.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.config import ConfigError, TrainConfig, config_to_dict, load_config

LOSS_TERMS = ("loss", "lm", "kd", "attn")
EXIT_CONFIG = 2
EXIT_NONFINITE = 3


class NonFiniteAbort(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def text_hidden_size(path: str) -> int:
    """Hidden size of a LLaVA folder's language model (config only, no weights)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return int(cfg.get_text_config().hidden_size)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0


def peak_accelerator_mb() -> float:
    """Peak allocated accelerator memory of this process (MiB); 0 on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return 0.0


def _image_token_id(path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    tid = getattr(cfg, "image_token_id", None)
    if tid is None:
        tid = getattr(cfg, "image_token_index", None)
    if tid is None:
        raise ConfigError(f"model.student: {path}/config.json has no image_token_id")
    return int(tid)


def count_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid shifted label positions, samples with an image) of one micro-batch, as tensors."""
    labels = batch["labels"]
    tokens = (labels[:, 1:] != -100).sum()
    images = batch["has_image"].sum() if batch.get("has_image") is not None else torch.zeros((), dtype=torch.long)
    return tokens, images


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


@dataclass
class PlaceholderImage:
    """One image-only row (``input_ids [1,n]``, ``pixel_values [1,3,H,W]``) made by the processor."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_token_id: int
    pad_token_id: int

    @classmethod
    def from_processor(cls, processor, image_token_id: int) -> "PlaceholderImage":
        from PIL import Image

        size = getattr(processor.image_processor, "size", None) or {}
        get = size.get if hasattr(size, "get") else (lambda k: getattr(size, k, None))
        h = get("height") or get("shortest_edge") or 224
        w = get("width") or get("shortest_edge") or h
        token = getattr(processor, "image_token", None) or processor.tokenizer.convert_ids_to_tokens(image_token_id)
        enc = processor(images=[Image.new("RGB", (int(w), int(h)))], text=[token], return_tensors="pt")
        pad = processor.tokenizer.pad_token_id
        return cls(enc["input_ids"][:1], enc["pixel_values"][:1], image_token_id, 0 if pad is None else int(pad))


def add_placeholder_image(batch: dict, ph: PlaceholderImage) -> dict:
    """Give an image-less micro-batch one extra image-only row.

    ZeRO-3 gathers parameters collectively, so every rank must run the same modules in the same
    order: a rank whose micro-batch has no image would skip the vision tower and projector while
    another rank runs them (a hang or a collective mismatch). The extra row has labels -100 and
    ``has_image`` False, so no loss term changes (its targets are empty and the attention term
    drops it); it only makes the vision path run forward and backward on this rank too.

    Shapes: ``input_ids/attention_mask/labels [B,T] -> [B+1,max(T,n)]``, ``pixel_values
    [1,3,H,W]``, ``has_image [B+1]``, ``vis_pos [B+1,n]``, ``vis_key_len`` for the new positions.
    Called on the host batch (before ``to_device``).
    """
    if batch.get("pixel_values") is not None:
        return batch
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b, t = ids.shape
    row = ph.input_ids.to(ids.device)
    n_row = row.shape[1]
    length = max(t, n_row)

    def pad_to(x, value):
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    out = dict(batch)
    out["input_ids"] = torch.cat([pad_to(ids, ph.pad_token_id), pad_to(row, ph.pad_token_id)])
    out["attention_mask"] = torch.cat([pad_to(am, 0), pad_to(torch.ones_like(row), 0).to(am.dtype)])
    out["labels"] = torch.cat([pad_to(labels, -100), torch.full((1, length), -100, dtype=labels.dtype,
                                                                 device=labels.device)])
    out["pixel_values"] = ph.pixel_values.to(ids.device)
    has = batch.get("has_image")
    has = torch.zeros(b, dtype=torch.bool, device=ids.device) if has is None else has.to(torch.bool)
    out["has_image"] = torch.cat([has, torch.zeros(1, dtype=torch.bool, device=ids.device)])
    pos = (row[0] == ph.image_token_id).nonzero().flatten()  # (n,) increasing
    out["vis_pos"] = pos.unsqueeze(0).expand(b + 1, -1).contiguous()
    out["vis_key_len"] = int(pos[-1]) + 1 if pos.numel() else 0  # host batch: no device sync
    return out


def select_trainable(model: torch.nn.Module, mcfg) -> None:
    """Set ``requires_grad`` by config: projector path, LLM (full / LoRA / frozen), vision tower."""
    model.requires_grad_(False)
    inner = model.model
    proj = inner.multi_modal_projector
    if mcfg.train_projector:
        # with adapter fetch only the adapter trains; the teacher's projector copy stays frozen
        (proj.adapter if hasattr(proj, "adapter") else proj).requires_grad_(True)
    if mcfg.train_vision:
        inner.vision_tower.requires_grad_(True)
    if mcfg.llm == "full":
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif mcfg.llm == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ConfigError("model.llm: 'lora' needs the peft package (pip install peft)") from None
        lcfg = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                          target_modules=list(mcfg.lora_target_modules), bias="none")
        inject_adapter_in_model(lcfg, inner.language_model)
        for n, p in inner.language_model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def merge_lora_state_dict(sd: dict, scaling: float) -> dict:
    """Fold LoRA factors into their base weights: ``W + scaling * B @ A`` (fp32 math), and
    rename ``x.base_layer.weight`` -> ``x.weight``; the result is a plain model state dict."""
    out = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if ".base_layer." in k:
            prefix, _, suffix = k.partition(".base_layer.")
            if suffix == "weight":
                a = next(sd[x] for x in sd if x.startswith(prefix + ".lora_A.") and x.endswith("weight"))
                b = next(sd[x] for x in sd if x.startswith(prefix + ".lora_B.") and x.endswith("weight"))
                v = (v.float() + scaling * (b.float() @ a.float())).to(v.dtype)
            k = f"{prefix}.{suffix}"
        out[k] = v
    return out


class BatchStream:
    """Endless micro-batches of one rank, epoch after epoch of a ``distill.data`` loader.

    The loader keeps the data position (``state_dict``: epoch, batches handed out) and advances
    the epoch when one is exhausted; every rank gets the same number of batches per epoch."""

    def __init__(self, loader, rank: int):
        self.loader = loader
        self.rank = rank
        self._it = None

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError(f"rank {self.rank}: the data loader yields no batches "
                           "(no shards for this rank, or every sample was skipped)")

    @property
    def skipped(self) -> dict[str, int]:
        """Counts of this rank by reason (cumulative over epochs and resumes): skipped samples,
        shard read errors and truncated samples alike (see ``distill.data.stats``)."""
        stats = getattr(self.loader, "stats", None)
        return stats.as_dict() if stats is not None else {}

    def data_counts(self) -> tuple[int, int, int]:
        """(skipped samples, shard read errors, samples truncated at max_length) of this rank."""
        stats = getattr(self.loader, "stats", None)
        return (stats.total, stats.read_errors, stats.truncated) if stats is not None else (0, 0, 0)

    def state(self) -> dict:
        return {"loader": self.loader.state_dict(), "skipped": self.skipped}

    def load_state(self, st: dict):
        self.loader.load_state_dict(st["loader"])
        self._it = None
        stats = getattr(self.loader, "stats", None)
        if stats is not None and st.get("skipped"):
            stats.counts.clear()
            stats.update(st["skipped"])


@dataclass
class Logger:
    """Rank-0 metrics: JSONL (+ TensorBoard), tqdm postfix."""

    path: Path
    rank: int
    tensorboard: bool = False

    def __post_init__(self):
        self._tb = None
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.tensorboard:  # RunConfig checked at load that the package is installed
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tb"))

    def log(self, record: dict):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()


def _say(rank: int, msg: str):
    if rank == 0:
        print(f"[distill] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the loop


def build_stage_engines(cfg: TrainConfig, dist_info, use_teacher: bool = True):
    """The stage's DeepSpeed engines: the student from ``model.student`` (adapter fetch as
    configured, trainable parts by config) and, with ``use_teacher``, the frozen ZeRO-3 teacher."""
    from distill import engine as E
    from distill.models import build_student, build_teacher

    mcfg, dtype = cfg.model, cfg.model.torch_dtype
    return E.build_engines(
        cfg, dist_info,
        make_student=lambda: build_student(mcfg.student, teacher_path=mcfg.teacher,
                                           adapter_fetch=mcfg.adapter_fetch, dtype=dtype),
        student_hidden=text_hidden_size(mcfg.student),
        make_teacher=(lambda: build_teacher(mcfg.teacher, dtype=dtype)) if use_teacher else None,
        teacher_hidden=text_hidden_size(mcfg.teacher) if use_teacher else None,
        select_trainable=lambda m: select_trainable(m, mcfg),
    )


def train(cfg: TrainConfig) -> dict:
    """Run one stage; returns a summary dict (rank 0 has the full one)."""
    from distill import engine as E
    from distill.attention import right_padded
    from distill.checkpoint import CheckpointManager
    from distill.data import build_loader
    from distill.models import load_processor, save_student_checkpoint
    from distill.objective import DistillObjective

    # ---- setup ----------------------------------------------------------------------------
    dist_info = E.init_distributed(cfg.deepspeed.timeout_min)
    rank, world = dist_info.rank, dist_info.world_size
    seed_everything(cfg.run.seed + rank)
    out_dir = Path(cfg.run.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"config_stage{cfg.stage}.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    mcfg, dtype = cfg.model, cfg.model.torch_dtype
    use_teacher = mcfg.teacher is not None and cfg.needs_teacher()
    processor = load_processor(mcfg.student)
    placeholder = PlaceholderImage.from_processor(processor, _image_token_id(mcfg.student))
    # Before any weights load: data errors (too few shards, unreadable shards, max_length below the
    # image tokens, ...) are config errors, and every rank stops with the failing ranks' messages
    # (a rank that failed alone would leave the others hanging in the first collective).
    stream, error = None, None
    try:
        stream = BatchStream(build_loader(cfg.data, processor, rank=rank, world_size=world, seed=cfg.run.seed), rank)
    except ValueError as e:
        error = str(e)
    failed = E.failed_ranks(error)
    if failed:
        raise ConfigError("; ".join(f"[rank {r}] {m}" for r, m in failed))

    engines = build_stage_engines(cfg, dist_info, use_teacher)
    objective = DistillObjective(cfg.loss, engines.student_model, engines.teacher_model)
    # distill.data collates right-padded batches (placeholder rows too): say so, so the attention
    # mask function needs no host sync to find it out on every forward
    def student_fn(**kw):
        with right_padded():
            return engines.student(**kw)

    def teacher_fn(**kw):
        with torch.no_grad(), right_padded():
            return engines.teacher(**kw)

    ckpts = CheckpointManager(out_dir / "checkpoints", rank, world, cfg.run.keep_last, device=dist_info.device)
    start_step, nonfinite_total = 0, 0
    resume_from = ckpts.resolve(cfg.run.resume)
    if resume_from is not None:
        st = ckpts.load(engines, resume_from)
        start_step, nonfinite_total = st["step"], st.get("nonfinite_total", 0)
        stream.load_state(st["data"])
        _say(rank, f"resumed from {resume_from} at step {start_step}")
    logger = Logger(out_dir / cfg.run.metrics_file, rank, cfg.run.tensorboard)

    def train_state() -> dict:
        return {"data": stream.state(), "nonfinite_total": nonfinite_total}

    # ---- loop -----------------------------------------------------------------------------
    accum, dev = cfg.deepspeed.grad_accum, dist_info.device
    # Per log window: ``terms`` holds this rank's sums of the loss terms (all-reduced and averaged
    # at the log step); ``counts`` the *global* valid tokens and real samples of each step, already
    # summed over ranks when the step's normalisers were made, so it is never all-reduced again.
    # tokens_per_s = sum over the window's steps of the global valid tokens / window seconds;
    # samples_per_s likewise with the samples the loader gave (placeholder image rows excluded).
    terms = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=dev)
    counts_window = torch.zeros(2, dtype=torch.float64, device=dev)  # global tokens, global samples
    window_steps, nonfinite_in_row, t_window = 0, 0, time.perf_counter()
    bar = None
    if rank == 0 and cfg.run.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.steps, initial=start_step, desc=f"stage {cfg.stage} ({cfg.stage_name})",
                   dynamic_ncols=True)
    last = {}
    engines.student.train()
    for step in range(start_step, cfg.run.steps):
        raw = [next(stream) for _ in range(accum)]
        real_samples = sum(int(mb["input_ids"].shape[0]) for mb in raw)  # host ints: before placeholder rows
        micro = [to_device(add_placeholder_image(mb, placeholder), dev, dtype) for mb in raw]
        counts = torch.zeros(3, dtype=torch.float64, device=dev)
        counts[2] = real_samples
        for mb in micro:
            tokens, images = count_targets(mb)
            counts[0] += tokens
            counts[1] += images
        E.all_reduce_sum(counts)  # global tokens / images / samples of this optimizer step
        num_tokens, num_images = counts[0].clamp(min=1), counts[1].clamp(min=1)
        lr = engines.lr()  # the rate this step's update uses
        for mb in micro:
            out = objective(student_fn, teacher_fn if use_teacher else None, mb,
                            num_tokens=num_tokens, num_images=num_images)
            engines.backward(out["loss"])
            engines.step()
            for i, k in enumerate(LOSS_TERMS):
                if k in out and out[k] is not None:
                    terms[i] += out[k].detach().to(torch.float64)
        counts_window += counts[0::2]  # global tokens and samples of this step
        window_steps += 1
        if engines.step_applied():
            nonfinite_in_row = 0
        else:  # DeepSpeed found a non-finite gradient norm on the step (same decision on all ranks)
            nonfinite_in_row += 1
            nonfinite_total += 1
            _say(rank, f"step {step + 1}: non-finite loss/gradient, update skipped ({nonfinite_in_row} in a row)")
            if nonfinite_in_row > cfg.run.max_nonfinite_in_row:
                msg = (f"aborting: {nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                       f"(run.max_nonfinite_in_row={cfg.run.max_nonfinite_in_row}). Lower deepspeed.lr, check the "
                       f"data, or resume from the last checkpoint in {ckpts.root}.")
                if bar is not None:
                    bar.close()
                raise NonFiniteAbort(msg)
        done = step + 1

        # ---- log (the only host sync of the loop) -------------------------------------------
        if done % cfg.run.log_every == 0 or done == cfg.run.steps:
            E.all_reduce_sum(terms)
            vals = terms.tolist()
            tokens_w, samples_w = counts_window.tolist()
            data_counts = torch.tensor(stream.data_counts(), dtype=torch.float64, device=dev)
            skipped, read_errors, truncated = (int(v) for v in E.all_reduce_sum(data_counts).tolist())
            peak = torch.tensor([peak_rss_mb(), peak_accelerator_mb()], dtype=torch.float64, device=dev)
            E.all_reduce_max(peak)
            dt = time.perf_counter() - t_window
            last = {"step": done, "stage": cfg.stage,
                    **{k: vals[i] / window_steps for i, k in enumerate(LOSS_TERMS)},
                    "lr": lr,
                    "tokens_per_s": tokens_w / dt, "samples_per_s": samples_w / dt,
                    "step_time_s": dt / window_steps,
                    "skipped_samples": skipped, "shard_read_errors": read_errors, "truncated_samples": truncated,
                    "nonfinite_steps": nonfinite_total,
                    "peak_rss_mb": peak[0].item()}
            if peak[1].item() > 0:
                last["peak_accelerator_mb"] = peak[1].item()
            gn = engines.grad_norm()
            if gn is not None:
                last["grad_norm"] = gn
            if rank == 0 and stream.skipped:
                last["data_by_reason_rank0"] = dict(stream.skipped)  # skips, read errors, truncations
            logger.log(last)
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            terms.zero_()
            counts_window.zero_()
            window_steps, t_window = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)

        # ---- checkpoint ---------------------------------------------------------------------
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done != cfg.run.steps:
            ckpts.save(engines, done, train_state(), {"stage": cfg.stage})
    if bar is not None:
        bar.close()

    # ---- end of stage: resumable checkpoint + consolidated student ---------------------------
    if resume_from is None or start_step < cfg.run.steps:
        ckpts.save(engines, cfg.run.steps, train_state(), {"stage": cfg.stage})
    final = out_dir / "final"
    sd = E.consolidated_state_dict(engines)  # collective
    if rank == 0:
        if mcfg.llm == "lora":
            sd = merge_lora_state_dict(sd, mcfg.lora_alpha / mcfg.lora_r)
        tmp = out_dir / "final.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_student_checkpoint(tmp, engines.student_model, processor, state_dict=sd)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _say(rank, f"stage {cfg.stage} done: student checkpoint in {final} "
                   f"(export: python -m distill.export --checkpoint {final} --out DIR)")
    E.barrier()
    return {"final": str(final), "last": last, "start_step": start_step, "nonfinite_total": nonfinite_total,
            "engines": engines}


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Train one distillation stage (DeepSpeed).",
                                 epilog="Overrides: section.key=value, e.g. deepspeed.lr=2e-5 run.steps=100")
    ap.add_argument("--config", required=True, help="stage YAML (paths inside resolve relative to it)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    return ap.parse_args(argv)


def preflight(cfg: TrainConfig):
    """Config-only checks of the model folders (no weights read)."""
    from distill.models import check_pair, is_student_checkpoint

    if cfg.model.teacher is not None:
        check_pair(cfg.model.student, cfg.model.teacher,
                   adapter_fetch=cfg.model.adapter_fetch and not is_student_checkpoint(cfg.model.student))


def main(stage: int, argv: list[str] | None = None) -> int:
    """``launch/stageN.py`` entry point; returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from distill.checkpoint import CheckpointError
    from distill.models import ModelConfigError

    try:
        cfg = load_config(args.config, args.overrides, stage=stage)
        preflight(cfg)
    except (ConfigError, ModelConfigError) as e:
        # once per node (a path missing on one node fails only that node's ranks)
        if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))) == 0:
            print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        train(cfg)
        return 0
    except NonFiniteAbort as e:
        print(f"[distill] {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (ConfigError, ModelConfigError, CheckpointError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
