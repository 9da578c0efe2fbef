"""Run metrics: the rank-0 metrics writer (JSONL + TensorBoard) and this process's peak memory."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Logger", "peak_rss_mb", "peak_accelerator_mb"]


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


@dataclass
class Logger:
    """Rank-0 metrics: JSONL (+ TensorBoard); other ranks write nothing."""

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


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 peak of the SXM parts (TFLOP/s), for MFU figures; matched by name substring."""


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of ``device_name`` (e.g. ``torch.cuda.get_device_name()``), None if unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
