"""Streaming WebDataset pipeline: shards -> right-padded LLaVA batches (docs/INTERFACES.md "Data")."""

from .collate import collate
from .config import DataConfig
from .encode import Encoded, SampleEncoder, SkipSample, TemplateError
from .loader import EpochStream, StreamingLoader, build_loader
from .shardlist import ShardInfo, resolve_shards, split_by_node, split_by_worker
from .stats import SKIP_REASONS, SkipStats

__all__ = [
    "DataConfig", "build_loader", "StreamingLoader", "EpochStream", "SkipStats", "SKIP_REASONS",
    "SampleEncoder", "Encoded", "SkipSample", "TemplateError", "collate",
    "ShardInfo", "resolve_shards", "split_by_node", "split_by_worker",
]
