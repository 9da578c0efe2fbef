"""The default learning-rate schedule (used when the DeepSpeed JSON has no ``scheduler``)."""
from __future__ import annotations

import torch

__all__ = ["lr_schedule"]


def lr_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup over ``warmup_steps`` (first step at lr/(warmup+1)), then linear decay
    reaching lr/(total-warmup) at the last step (never exactly 0 inside the run)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
