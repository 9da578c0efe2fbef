"""Shard sources -> ``ShardInfo`` list; node/worker splitting on explicit rank arguments."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

from data_prep.shards import MANIFEST

from distill.config import DataConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int | None  # from the manifest next to the shard; None when unknown


def _expand_braces(spec: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:  # webdataset depends on braceexpand; keep a clear error anyway
        if "{" in spec:
            raise DataConfigError(f"brace pattern {spec!r} needs the braceexpand package") from None
        return [spec]
    return list(braceexpand(spec))


def _manifest_counts(directory: str, cache: dict) -> dict[str, int] | None:
    if directory not in cache:
        path = os.path.join(directory, MANIFEST)
        counts = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    counts = {s["name"]: int(s["num_samples"]) for s in json.load(f)["shards"]}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataConfigError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); rerun python -m data_prep") from e
        cache[directory] = counts
    return cache[directory]


def resolve_shards(specs: Sequence[str]) -> list[ShardInfo]:
    """Resolve directories (with ``manifest.json``), manifest files, ``.tar`` paths, globs and brace
    patterns into an ordered, de-duplicated ``ShardInfo`` list. Raises ``DataConfigError`` naming the
    spec that matched nothing or the file that is missing."""
    out: list[ShardInfo] = []
    seen = set()
    cache: dict = {}
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if os.path.isdir(spec) or os.path.basename(spec) == MANIFEST:
            directory = spec if os.path.isdir(spec) else os.path.dirname(spec)
            counts = _manifest_counts(directory, cache)
            if counts is None:
                raise DataConfigError(f"{spec}: no {MANIFEST} here; build shards with `python -m data_prep llava --out {directory}` "
                                 "or list the .tar files")
            paths = [os.path.join(directory, name) for name in counts]
        else:
            paths = []
            for p in _expand_braces(spec):
                paths.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
            if not paths:
                raise DataConfigError(f"shard spec {spec!r} matched no file")
        for p in paths:
            if not os.path.isfile(p):
                raise DataConfigError(f"shard {p} (from {spec!r}) does not exist")
            real = os.path.realpath(p)
            if real in seen:
                continue
            seen.add(real)
            counts = _manifest_counts(os.path.dirname(os.path.abspath(p)), cache)
            out.append(ShardInfo(p, counts.get(os.path.basename(p)) if counts else None))
    if not out:
        raise DataConfigError(f"no shards in {list(specs)}")
    return out


def split_by_node(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of ``rank``: ``items[rank::world_size]`` (disjoint, complete over ranks)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return list(items[rank::world_size])


def split_by_worker(items: Sequence[T], worker_id: int, num_workers: int) -> list[T]:
    """The items of a DataLoader worker: ``items[worker_id::num_workers]``."""
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker {worker_id} not in [0, {num_workers})")
    return list(items[worker_id::num_workers])
