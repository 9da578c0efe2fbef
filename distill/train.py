"""The one training loop. A stage (1 DPT, 2 SFT, 3 DFT) is a config; ``launch/stageN.py`` only
picks the stage number.

Named phases, top to bottom: :func:`setup` (process group, data, engines, objective, resume) ->
a :class:`Run`; :func:`fit` runs :func:`train_step` per optimizer step, :func:`log_window` every
``run.log_every`` steps and a checkpoint every ``run.save_every``; :func:`finalize` writes the last
checkpoint and the consolidated student to ``output_dir/final``. :func:`train` is the three in a
row and :func:`main` the CLI.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from distill import engine as E
from distill import models as M
from distill.attention import right_padded
from distill.checkpoint import CheckpointError, CheckpointManager
from distill.config import ConfigError, TrainConfig, config_to_dict, load_config
from distill.data import (BatchStream, DataConfigError, PlaceholderImage, add_placeholder_image, build_loader,
                          count_targets, to_device)
from distill.engine import DistInfo, Engines
from distill.metrics import Logger, peak_accelerator_mb, peak_rss_mb
from distill.objective import DistillObjective

LOSS_TERMS = ("loss", "lm", "kd", "attn")
EXIT_CONFIG = 2
EXIT_NONFINITE = 3


class NonFiniteAbort(RuntimeError):
    pass


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _say(rank: int, msg: str):
    if rank == 0:
        print(f"[distill] {msg}", file=sys.stderr, flush=True)


@dataclass
class Window:
    """Device-side sums over the optimizer steps since the last log step (no host sync).

    ``terms``: this rank's sums of :data:`LOSS_TERMS` (all-reduced and averaged at the log step);
    ``tokens`` / ``samples`` / ``input_tokens``: the *global* valid label tokens, real samples and
    non-padding input tokens of each step, already summed over ranks when the step's normalisers
    were made, so never all-reduced again."""

    terms: torch.Tensor
    tokens: torch.Tensor
    samples: torch.Tensor
    input_tokens: torch.Tensor
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, device) -> "Window":
        z = lambda n=(): torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(terms=z(len(LOSS_TERMS)), tokens=z(), samples=z(), input_tokens=z())

    def reset(self):
        for t in (self.terms, self.tokens, self.samples, self.input_tokens):
            t.zero_()
        self.steps, self.started = 0, time.perf_counter()


@dataclass
class Run:
    """Everything :func:`setup` built for one stage, and the loop's running state."""

    cfg: TrainConfig
    dist: DistInfo
    engines: Engines
    objective: DistillObjective
    processor: object  # the student's AutoProcessor
    placeholder: PlaceholderImage
    stream: BatchStream
    ckpts: CheckpointManager
    logger: Logger
    out_dir: Path
    resumed_from: Path | None = None
    start_step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    lr: float = 0.0
    window: Window | None = None
    last: dict = field(default_factory=dict)

    def train_state(self) -> dict:
        """What a checkpoint keeps beside DeepSpeed's state."""
        return {"data": self.stream.state(), "nonfinite_total": self.nonfinite_total}

    # distill.data collates right-padded batches (placeholder rows too): say so, so the attention
    # mask function needs no host sync to find it out on every forward
    def student_fn(self, **kw):
        with right_padded():
            return self.engines.student(**kw)

    def teacher_fn(self, **kw):  # DistillObjective runs it under torch.no_grad()
        with right_padded():
            return self.engines.teacher(**kw)


# ------------------------------------------------------------------------------------ setup


def _stream(cfg: TrainConfig, processor, dist_info):
    """This rank's data stream, built before any weights load. A data configuration that cannot be
    served (too few or unreadable shards, max_length below the image tokens, ...) on any rank is a
    ConfigError on every rank, with the failing ranks' messages; any other failure stops every rank
    too (a rank that failed alone would leave the others hanging in the first collective)."""
    rank, stream, error, cause = dist_info.rank, None, None, None
    try:
        stream = BatchStream(build_loader(cfg.data, processor, rank=rank, world_size=dist_info.world_size,
                                          seed=cfg.run.seed), rank)
    except DataConfigError as e:
        error, cause = (True, str(e)), e
    except Exception as e:  # a bug, not a config mistake: still stop every rank, with its traceback here
        error, cause = (False, f"{type(e).__name__}: {e}"), e
    failed = E.failed_ranks(error)  # [(rank, (is_config, message))], the same on every rank
    if not failed:
        return stream
    text = "; ".join(f"[rank {r}] {msg}" for r, (_, msg) in failed)
    if all(is_config for _, (is_config, _) in failed):
        raise ConfigError(text) from cause
    raise RuntimeError(f"building the data loader failed: {text}") from cause


def _engines(cfg: TrainConfig, dist_info, use_teacher: bool):
    """The stage's DeepSpeed engines: the student from ``model.student`` (adapter fetch as
    configured, trainable parts by config) and, with ``use_teacher``, the frozen ZeRO-3 teacher."""
    mcfg, dtype = cfg.model, cfg.model.torch_dtype
    return E.build_engines(
        cfg, dist_info,
        make_student=lambda: M.build_student(mcfg.student, teacher_path=mcfg.teacher,
                                           adapter_fetch=mcfg.adapter_fetch, dtype=dtype),
        student_hidden=M.text_hidden_size(mcfg.student),
        make_teacher=(lambda: M.build_teacher(mcfg.teacher, dtype=dtype)) if use_teacher else None,
        teacher_hidden=M.text_hidden_size(mcfg.teacher) if use_teacher else None,
        select_trainable=lambda m: M.select_trainable(m, mcfg),
    )


def setup(cfg: TrainConfig) -> Run:
    """Process group, seeds, data stream (before any weights), engines, objective, checkpoints and
    resume, metrics logger. Collective: every rank calls it. The teacher engine is built only when
    a loss term reads the teacher (:meth:`TrainConfig.runs_teacher`)."""
    dist_info = E.init_distributed(cfg.deepspeed.timeout_min)
    rank = dist_info.rank
    seed_everything(cfg.run.seed + rank)
    out_dir = Path(cfg.run.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"config_stage{cfg.stage}.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    student = cfg.model.student
    processor = M.load_processor(student)
    tid = M.image_token_id(AutoConfig.from_pretrained(student), f"model.student: {student}/config.json")
    placeholder = PlaceholderImage.from_processor(processor, tid)
    stream = _stream(cfg, processor, dist_info)
    engines = _engines(cfg, dist_info, cfg.runs_teacher())
    run = Run(cfg=cfg, dist=dist_info, engines=engines,
              objective=DistillObjective(cfg.loss, engines.student_model, engines.teacher_model),
              processor=processor, placeholder=placeholder, stream=stream,
              ckpts=CheckpointManager(out_dir / "checkpoints", rank, dist_info.world_size, cfg.run.keep_last,
                                      device=dist_info.device),
              logger=Logger(out_dir / cfg.run.metrics_file, rank, cfg.run.tensorboard), out_dir=out_dir,
              window=Window.zeros(dist_info.device))
    run.resumed_from = run.ckpts.resolve(cfg.run.resume)
    if run.resumed_from is not None:
        st = run.ckpts.load(engines, run.resumed_from)
        run.start_step, run.nonfinite_total = st["step"], st.get("nonfinite_total", 0)
        stream.load_state(st["data"])
        _say(rank, f"resumed from {run.resumed_from} at step {run.start_step}")
    return run


# ------------------------------------------------------------------------------------ one step


def train_step(run: Run, micro_batches: list[dict]) -> bool:
    """One optimizer step over this rank's host micro-batches; adds to ``run.window``. No host
    sync. Returns whether DeepSpeed applied the update (False: non-finite gradient norm, the same
    decision on every rank)."""
    eng, dev, dtype = run.engines, run.dist.device, run.cfg.model.torch_dtype
    real_samples = sum(int(mb["input_ids"].shape[0]) for mb in micro_batches)  # host ints, before placeholders
    # non-padding input tokens of the real rows: a sum over host (CPU) tensors, no device sync
    input_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    micro = [to_device(add_placeholder_image(mb, run.placeholder), dev, dtype) for mb in micro_batches]
    counts = torch.zeros(4, dtype=torch.float64, device=dev)  # tokens, images, samples, input tokens
    counts[2], counts[3] = real_samples, input_tokens
    for mb in micro:
        tokens, images = count_targets(mb)
        counts[0] += tokens
        counts[1] += images
    E.all_reduce_sum(counts)  # global tokens / images / samples / input tokens of this optimizer step
    num_tokens, num_images = counts[0].clamp(min=1), counts[1].clamp(min=1)
    run.lr = eng.lr()  # the rate this step's update uses
    teacher_fn = run.teacher_fn if eng.teacher is not None else None
    terms = run.window.terms
    for mb in micro:
        out = run.objective(run.student_fn, teacher_fn, mb, num_tokens=num_tokens, num_images=num_images)
        eng.backward(out["loss"])
        eng.step()
        for i, k in enumerate(LOSS_TERMS):
            terms[i] += out[k].detach().to(torch.float64)
    run.window.tokens += counts[0]
    run.window.samples += counts[2]
    run.window.input_tokens += counts[3]
    run.window.steps += 1
    return eng.step_applied()


def _count_nonfinite(run: Run, step: int, applied: bool):
    """Count a skipped update; more than ``run.max_nonfinite_in_row`` in a row raise NonFiniteAbort."""
    if applied:
        run.nonfinite_in_row = 0
        return
    run.nonfinite_in_row += 1
    run.nonfinite_total += 1
    limit = run.cfg.run.max_nonfinite_in_row
    _say(run.dist.rank, f"step {step}: non-finite loss/gradient, update skipped ({run.nonfinite_in_row} in a row)")
    if run.nonfinite_in_row > limit:
        raise NonFiniteAbort(
            f"aborting: {run.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
            f"(run.max_nonfinite_in_row={limit}). Lower deepspeed.lr, check the data, or resume from the "
            f"last checkpoint in {run.ckpts.root}.")


def log_window(run: Run, step: int) -> dict:
    """Reduce the window over ranks, log one record (rank 0 writes it) and reset the window.

    The loop's only host sync. With ``dt`` the window's wall time and ``n`` its steps:
    - ``loss/lm/kd/attn`` = (sum over ranks and steps of the rank's term) / n: each rank's term is
      already divided by the step's global count, so the rank sum is the step's global value;
    - ``tokens_per_s`` = (sum over steps of the global valid shifted label tokens) / dt;
    - ``input_tokens_per_s`` = (sum over steps of the global non-padding input tokens, image tokens
      included, placeholder rows excluded) / dt: the rate the models process, for MFU;
    - ``samples_per_s`` = (sum over steps of the global samples the loader gave, placeholder
      image rows excluded) / dt; ``step_time_s`` = dt / n;
    - ``skipped_samples``, ``shard_read_errors``, ``truncated_samples``: sums over ranks;
      ``peak_rss_mb`` / ``peak_accelerator_mb``: maxima over ranks.
    """
    w, dev, stream = run.window, run.dist.device, run.stream
    sums = torch.cat([w.terms, torch.tensor(stream.data_counts(), dtype=torch.float64, device=dev)])
    E.all_reduce_sum(sums)  # loss terms and data counts of every rank, in one collective
    peak = E.all_reduce_max(torch.tensor([peak_rss_mb(), peak_accelerator_mb()], dtype=torch.float64, device=dev))
    # note: host sync points (the log step)
    term_sums, (skipped, read_errors, truncated) = sums[:len(LOSS_TERMS)].tolist(), sums[len(LOSS_TERMS):].tolist()
    tokens, samples, input_tokens = w.tokens.item(), w.samples.item(), w.input_tokens.item()
    rss_mb, acc_mb = peak.tolist()
    dt = time.perf_counter() - w.started
    rec = {"step": step, "stage": run.cfg.stage,
           **{k: v / w.steps for k, v in zip(LOSS_TERMS, term_sums)},
           "lr": run.lr, "tokens_per_s": tokens / dt, "input_tokens_per_s": input_tokens / dt,
           "samples_per_s": samples / dt, "step_time_s": dt / w.steps,
           "skipped_samples": int(skipped), "shard_read_errors": int(read_errors),
           "truncated_samples": int(truncated), "nonfinite_steps": run.nonfinite_total, "peak_rss_mb": rss_mb}
    if acc_mb > 0:
        rec["peak_accelerator_mb"] = acc_mb
    gn = run.engines.grad_norm()
    if gn is not None:
        rec["grad_norm"] = gn
    if run.dist.rank == 0 and stream.skipped:
        rec["data_by_reason_rank0"] = dict(stream.skipped)  # skips, read errors, truncations
    run.logger.log(rec)
    w.reset()
    run.last = rec
    return rec


# ------------------------------------------------------------------------------------ loop, end


def _progress_bar(run: Run):
    cfg = run.cfg
    if run.dist.rank != 0 or not cfg.run.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.run.steps, initial=run.start_step, desc=f"stage {cfg.stage} ({cfg.stage_name})",
                dynamic_ncols=True)


def fit(run: Run) -> Run:
    """Train from ``run.start_step`` to ``run.steps``: step, log, checkpoint."""
    rc = run.cfg.run
    bar = _progress_bar(run)
    run.engines.student.train()
    run.window.reset()
    try:
        for step in range(run.start_step + 1, rc.steps + 1):
            applied = train_step(run, [next(run.stream) for _ in range(run.cfg.deepspeed.grad_accum)])
            _count_nonfinite(run, step, applied)
            if step % rc.log_every == 0 or step == rc.steps:
                rec = log_window(run, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if rc.save_every and step % rc.save_every == 0 and step != rc.steps:
                run.ckpts.save(run.engines, step, run.train_state(), {"stage": run.cfg.stage})
    finally:
        if bar is not None:
            bar.close()
    return run


def finalize(run: Run) -> dict:
    """The end-of-stage checkpoint (unless resumed at the end) and the consolidated 16-bit student
    in ``output_dir/final`` (LoRA merged). Collective. Returns the stage summary."""
    cfg, rank, out_dir = run.cfg, run.dist.rank, run.out_dir
    if run.resumed_from is None or run.start_step < cfg.run.steps:
        run.ckpts.save(run.engines, cfg.run.steps, run.train_state(), {"stage": cfg.stage})
    final = out_dir / "final"
    sd = E.consolidated_state_dict(run.engines)  # collective
    if rank == 0:
        if cfg.model.llm == "lora":
            sd = M.merge_lora_state_dict(sd, cfg.model.lora_alpha / cfg.model.lora_r)
        tmp = out_dir / "final.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        M.save_student_checkpoint(tmp, run.engines.student_model, run.processor, state_dict=sd)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _say(rank, f"stage {cfg.stage} done: student checkpoint in {final} "
                   f"(export: python -m distill.export --checkpoint {final} --out DIR)")
    E.barrier()
    return {"final": str(final), "last": run.last, "start_step": run.start_step,
            "nonfinite_total": run.nonfinite_total}


def train(cfg: TrainConfig) -> dict:
    """Run one stage; returns a summary dict (rank 0 has the full one)."""
    return finalize(fit(setup(cfg)))


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
    if cfg.model.teacher is not None:
        M.check_pair(cfg.model.student, cfg.model.teacher,
                   adapter_fetch=cfg.model.adapter_fetch and not M.is_student_checkpoint(cfg.model.student))


def main(stage: int, argv: list[str] | None = None) -> int:
    """``launch/stageN.py`` entry point; returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides, stage=stage)
        preflight(cfg)
    except (ConfigError, M.ModelConfigError) as e:
        # once per node (a path missing on one node fails only that node's ranks)
        if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))) == 0:
            print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return _train_and_exit_code(cfg)


def _train_and_exit_code(cfg: TrainConfig) -> int:
    """:func:`train` with its failures as exit codes; the process group is torn down either way."""
    try:
        train(cfg)
        return 0
    except NonFiniteAbort as e:
        print(f"[distill] {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (ConfigError, M.ModelConfigError, CheckpointError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        E.shutdown()
