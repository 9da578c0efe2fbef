"""Atomic, resumable checkpoints of a training stage.

Layout under ``output_dir/checkpoints``::

    step00000020/                 complete checkpoint (DeepSpeed student + per-rank train state)
        zero_pp_rank_*_...pt      DeepSpeed files (weights, optimizer, scheduler)
        train_state_rank{r}.pt    step, data position, RNG states (torch, numpy, python) of rank r
        meta.json                 step and world size; written last, before the rename
    step00000030.tmp/             a save in progress (or killed): never used, removed on next save
    latest                        name of the newest complete checkpoint (moved by os.replace)

A save writes ``stepN.tmp``, waits for every rank (barrier), then every rank checks that it sees
every rank's train state and the ranks exchange what they saw (an all-reduce, so the check of the
slowest rank is over before anyone goes on); only then does rank 0 rename it to ``stepN`` and move
``latest``. A ``kill -9`` at any moment leaves the previous complete
checkpoint untouched. Collective calls: every rank must call :meth:`CheckpointManager.save` and
:meth:`CheckpointManager.load`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from distill import engine as E
from distill import faults

_TAG = re.compile(r"^step(\d{8})$")


def rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and, where present, the accelerator)."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class CheckpointError(RuntimeError):
    pass


class CheckpointManager:
    """Save/find/load stage checkpoints under ``root`` keeping the newest ``keep_last``."""

    def __init__(self, root: str | Path, rank: int, world_size: int, keep_last: int = 2,
                 device: torch.device | str = "cpu"):
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.device = torch.device(device)  # of the collective's tensor (CUDA under NCCL)

    # ---------------------------------------------------------------- find
    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first."""
        out = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                m = _TAG.match(d.name)
                if m and d.is_dir() and (d / "meta.json").is_file():
                    out.append((int(m.group(1)), d))
        return sorted(out)

    def newest(self) -> Path | None:
        """The checkpoint ``latest`` points to, or a newer complete one if the pointer lags
        (a kill between the rename and the pointer move)."""
        found = self.complete()
        best = found[-1][1] if found else None
        ptr = self.root / "latest"
        if ptr.is_file():
            cand = self.root / ptr.read_text().strip()
            if (cand / "meta.json").is_file() and (best is None or _step(cand) >= _step(best)):
                best = cand
        return best

    def resolve(self, resume: str) -> Path | None:
        """``auto`` -> newest complete checkpoint or None; ``never`` -> None; else the folder."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.newest()
        p = Path(resume)
        if p.is_dir() and not (p / "meta.json").is_file() and (p / "latest").is_file():
            p = p / (p / "latest").read_text().strip()
        if not (p / "meta.json").is_file():
            raise CheckpointError(f"run.resume: {resume} is not a complete checkpoint (no meta.json)")
        return p

    # ---------------------------------------------------------------- save
    def save(self, engines, step: int, train_state: dict, extra_meta: dict | None = None) -> Path:
        """Collective save of the student engine + this rank's ``train_state`` at ``step``."""
        tag = f"step{step:08d}"
        tmp = self.root / f"{tag}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in self.root.glob("*.tmp"):
                shutil.rmtree(d, ignore_errors=True)
        E.barrier()
        E.save_engine_checkpoint(engines, self.root, tmp.name, client_state={"step": step})
        torch.save({**train_state, "rng": rng_state(), "step": step, "world_size": self.world_size},
                   tmp / f"train_state_rank{self.rank}.pt")
        faults.in_save(step, self.rank)
        E.barrier()
        final = self.root / tag
        faults.before_check(self.rank, final)
        # Every rank checks, then all exchange what they saw: rank 0 cannot rename the folder
        # before the slowest rank's check is done, and all ranks raise together on a failure.
        seen = torch.zeros(self.world_size, self.world_size, dtype=torch.float32, device=self.device)
        for r in range(self.world_size):
            seen[self.rank, r] = float((tmp / f"train_state_rank{r}.pt").is_file())
        seen = E.all_reduce_sum(seen).tolist()  # one host sync per save
        blind = {r: [s for s in range(self.world_size) if not seen[r][s]] for r in range(self.world_size)}
        blind = {r: m for r, m in blind.items() if m}
        if blind:
            detail = "; ".join(f"rank {r} cannot see the train state of ranks {m}" for r, m in blind.items())
            raise CheckpointError(f"checkpoint {tmp}: {detail}; run.output_dir must be on a filesystem shared "
                                  "by all nodes")
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, **(extra_meta or {})}
            _atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / "latest", tag)
            self._prune()
        E.barrier()
        return final

    def _prune(self):
        found = self.complete()
        for _, d in found[:-self.keep_last]:
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def load(self, engines, ckpt: Path) -> dict:
        """Collective load of ``ckpt`` into the engine; restores RNGs; returns this rank's state."""
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise CheckpointError(
                f"run.resume: {ckpt} was written by {meta['world_size']} ranks, this run has {self.world_size}; "
                "resume with the same world size, or start a new stage from its consolidated weights")
        E.load_engine_checkpoint(engines, ckpt.parent, ckpt.name)
        st = torch.load(ckpt / f"train_state_rank{self.rank}.pt", weights_only=False)
        set_rng_state(st["rng"])
        return st


def _step(p: Path) -> int:
    m = _TAG.match(p.name)
    return int(m.group(1)) if m else -1


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
