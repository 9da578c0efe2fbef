"""Teacher/student model layer: loading, pair checks, teacher-adapter fetch, checkpoints, export.

See docs/INTERFACES.md ("Models"). All user-facing failures raise :class:`ModelConfigError`.
"""

from .build import build_student, build_teacher, load_student_checkpoint, save_student_checkpoint
from .loading import (
    ModelConfigError,
    check_pair,
    has_wide_projector,
    image_token_id,
    is_student_checkpoint,
    load_processor,
    load_vlm,
    load_vlm_config,
    text_hidden_size,
    unwrap_model,
)
from .projector import FetchedMerger, FetchedProjector, fetch_support, fold_merger, fold_projector, fold_projector_exact
from .trainable import merge_lora_state_dict, select_trainable

__all__ = [
    "FetchedMerger",
    "FetchedProjector",
    "fetch_support",
    "fold_merger",
    "load_vlm_config",
    "ModelConfigError",
    "build_student",
    "build_teacher",
    "check_pair",
    "fold_projector",
    "fold_projector_exact",
    "has_wide_projector",
    "image_token_id",
    "is_student_checkpoint",
    "load_processor",
    "load_student_checkpoint",
    "load_vlm",
    "merge_lora_state_dict",
    "save_student_checkpoint",
    "select_trainable",
    "text_hidden_size",
    "unwrap_model",
]
