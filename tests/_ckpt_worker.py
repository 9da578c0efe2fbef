"""Two-rank worker for the checkpoint-save tests (gloo, no models): a stand-in student engine
whose ``save_checkpoint`` writes one file per rank, so only ``CheckpointManager`` is under test.

    python tests/_ckpt_worker.py ROOT MODE      MODE: shared | private (one folder per rank)

Writes ``ROOT/result_rank{r}.json``: the saved steps, or the CheckpointError's message.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distill.checkpoint import CheckpointError, CheckpointManager


class _Student:
    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": self.rank, **client_state}, d / f"model_rank{self.rank}.pt")


class _Engines:
    def __init__(self, rank: int):
        self.student = _Student(rank)


def main() -> int:
    root, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ck_root = root / "checkpoints" if mode == "shared" else root / f"node{rank}" / "checkpoints"
    mgr = CheckpointManager(ck_root, rank, world, keep_last=2)
    res: dict = {"saved": []}
    try:
        for step in (1, 2, 3):
            res["saved"].append(mgr.save(_Engines(rank), step, {"data": step}).name)
        res["newest"] = mgr.newest().name
    except CheckpointError as e:
        res["error"] = str(e)
    (root / f"result_rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
