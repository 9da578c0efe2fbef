"""``DataConfig``: what the streaming loader reads and how it batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)
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
        if not self.shards:
            raise ValueError("data.shards: give at least one shard directory, manifest, .tar path or brace pattern")
        checks = {
            "batch_size": self.batch_size >= 1,
            "max_length": self.max_length >= 2,
            "shuffle_buffer": self.shuffle_buffer >= 0,
            "num_workers": self.num_workers >= 0,
            "prefetch_factor": self.prefetch_factor >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"data.{key}: invalid value {getattr(self, key)!r}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch_size:
            raise ValueError(
                f"data.samples_per_epoch ({self.samples_per_epoch}) is smaller than data.batch_size "
                f"({self.batch_size}): an epoch would have no batch"
            )

    @classmethod
    def coerce(cls, obj: Any) -> "DataConfig":
        """Accept a ``DataConfig``, a dict, or any object with the same attribute names."""
        if isinstance(obj, cls):
            return obj
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(obj, dict):
            unknown = sorted(set(obj) - set(names))
            if unknown:
                raise ValueError(f"data: unknown key(s) {unknown}; known: {names}")
            return cls(**obj)
        return cls(**{n: getattr(obj, n) for n in names if hasattr(obj, n)})
