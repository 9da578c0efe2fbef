"""Streaming WebDataset pipeline: shards -> right-padded LLaVA batches (docs/INTERFACES.md "Data")."""

from .batch import PlaceholderImage, add_placeholder_image, count_targets, to_device
from . import families
from .collate import MODEL_INPUTS_KEY, collate, collate_family
from distill.config import DataConfig, DataConfigError
from .encode import Encoded, SampleEncoder, SkipSample, TemplateError
from .loader import EpochStream, StreamingLoader, build_loader
from .shardlist import ShardInfo, resolve_shards, split_by_node, split_by_worker
from .stats import SKIP_REASONS, SkipStats
from .stream import BatchStream

__all__ = [
    "DataConfig", "DataConfigError", "build_loader", "StreamingLoader", "EpochStream", "SkipStats", "SKIP_REASONS",
    "SampleEncoder", "Encoded", "SkipSample", "TemplateError", "collate", "collate_family", "MODEL_INPUTS_KEY",
    "families",
    "ShardInfo", "resolve_shards", "split_by_node", "split_by_worker",
    "BatchStream", "PlaceholderImage", "add_placeholder_image", "count_targets", "to_device",
]
