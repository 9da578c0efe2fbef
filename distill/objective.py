"""The training objective: LM + logit KD + visual-attention alignment, weighted.

``DistillObjective(loss_cfg, student_model, teacher_model)`` installs the fused attention on both
models, picks the matched layers (:func:`distill.losses.match_layers`) and sets up capture.
Calling it runs the student (and, when a teacher term has weight, the teacher under
``torch.no_grad()``), shifts logits/labels and returns the weighted loss and its unweighted terms.

Normalisation (so gradient accumulation equals one big batch): token terms are *sums* over valid
shifted label positions divided by ``num_tokens``; the attention term is a sum over samples with
an image divided by ``num_images``.  Pass the global counts of the optimizer step; ``None`` uses
the local counts of this micro-batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.attention import AttentionCapture, install, text_decoder_layers
from distill.attention.kernels import BACKENDS
from distill.losses import ATTN_KINDS, KD_KINDS, attention_alignment_loss, logit_kd_loss, match_layers

__all__ = ["LossConfig", "DistillObjective"]

IGNORE_INDEX = -100


@dataclass
class LossConfig:
    """Loss weights and options (the ``loss:`` section of a stage config)."""

    lm_weight: float = 1.0
    """Weight of the student's next-token cross-entropy on the labels."""
    kd_weight: float = 0.0
    """Weight of the token-level logit distillation term (needs a teacher)."""
    kd_kind: str = "forward_kl"
    """``forward_kl`` (KL(teacher||student)), ``reverse_kl`` or ``jsd``."""
    kd_temperature: float = 1.0
    """Softmax temperature T of both models; the divergence is scaled by T^2."""
    kd_beta: float = 0.5
    """JSD interpolation: 0 -> forward KL, 1 -> reverse KL."""
    kd_chunk_size: int | None = None
    """Positions per chunk of the KD loss (recomputed in backward); ``None``: one pass."""
    attn_weight: float = 0.0
    """Weight of the visual-attention alignment term (needs a teacher)."""
    attn_kind: str = "filtered_cosine"
    """``filtered_cosine`` (CompoDistill), ``cosine`` or ``kl``."""
    student_layers: list[int] | None = None
    """Student text layers to align; ``None``: derived from depth (see ``match_layers``)."""
    teacher_layers: list | None = None
    """One teacher layer or window (list) per student layer; ``None``: proportional windows."""
    num_layers: int | None = None
    """Number of derived student layers (``None``: max(1, depth // 4))."""
    window: int | None = None
    """Teacher window size of derived targets (``None``: round(teacher_depth / student_depth))."""
    backend: str = "auto"
    """Attention kernel: auto, flash_attn, sdpa_flash, sdpa_efficient, cpu_flash, eager."""
    attn_chunk_size: int | None = None
    """Visual query rows per backward strip of the capture op; ``None``: automatic."""

    def __post_init__(self):
        for name in ("lm_weight", "kd_weight", "attn_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"loss.{name}: must be a number >= 0, got {v!r}")
            setattr(self, name, float(v))
        if self.lm_weight == 0 and self.kd_weight == 0 and self.attn_weight == 0:
            raise ValueError("loss.lm_weight/kd_weight/attn_weight: at least one weight must be > 0")
        if self.kd_kind not in KD_KINDS:
            raise ValueError(f"loss.kd_kind: must be one of {KD_KINDS}, got {self.kd_kind!r}")
        if self.attn_kind not in ATTN_KINDS:
            raise ValueError(f"loss.attn_kind: must be one of {ATTN_KINDS}, got {self.attn_kind!r}")
        if isinstance(self.kd_temperature, bool) or not isinstance(self.kd_temperature, (int, float)) or not self.kd_temperature > 0:
            raise ValueError(f"loss.kd_temperature: must be > 0, got {self.kd_temperature!r}")
        if not isinstance(self.kd_beta, (int, float)) or not 0 <= self.kd_beta <= 1:
            raise ValueError(f"loss.kd_beta: must be in [0, 1], got {self.kd_beta!r}")
        for name in ("kd_chunk_size", "attn_chunk_size", "num_layers", "window"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"loss.{name}: must be a positive int or null, got {v!r}")
        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"loss.backend: must be one of {('auto',) + BACKENDS}, got {self.backend!r}")
        if self.student_layers is not None and not isinstance(self.student_layers, (list, tuple)):
            raise ValueError(f"loss.student_layers: must be a list of ints or null, got {self.student_layers!r}")
        if self.teacher_layers is not None and not isinstance(self.teacher_layers, (list, tuple)):
            raise ValueError(f"loss.teacher_layers: must be a list (ints or lists) or null, got {self.teacher_layers!r}")

    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.attn_weight > 0


def _unwrap(model):
    """DeepSpeed engines keep the HF model in ``.module``."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


class DistillObjective:
    """Weighted LM + KD + attention-alignment objective (see module docstring)."""

    def __init__(self, loss_cfg: LossConfig, student_model, teacher_model=None):
        self.cfg = loss_cfg
        student_model = _unwrap(student_model)
        teacher_model = None if teacher_model is None else _unwrap(teacher_model)
        if teacher_model is None and loss_cfg.needs_teacher():
            raise ValueError(
                "loss.kd_weight/attn_weight > 0 need a teacher model; set them to 0 or give model.teacher"
            )
        install(student_model, loss_cfg.backend)
        if teacher_model is not None:
            install(teacher_model, loss_cfg.backend)
        self.student_layers: list[int] = []
        self.teacher_windows: list[list[int]] = []
        self.student_capture = self.teacher_capture = None
        if loss_cfg.attn_weight > 0:
            s_depth = len(text_decoder_layers(student_model))
            t_depth = len(text_decoder_layers(teacher_model))
            self.student_layers, self.teacher_windows = match_layers(
                s_depth, t_depth, loss_cfg.student_layers, loss_cfg.teacher_layers, loss_cfg.num_layers, loss_cfg.window
            )
            self.teacher_layers = sorted({i for w in self.teacher_windows for i in w})
            slot = {layer: k for k, layer in enumerate(self.teacher_layers)}
            self._window_slots = [[slot[i] for i in w] for w in self.teacher_windows]
            self.student_capture = AttentionCapture(student_model, self.student_layers, loss_cfg.attn_chunk_size)
            self.teacher_capture = AttentionCapture(teacher_model, self.teacher_layers, loss_cfg.attn_chunk_size)

    @staticmethod
    def _inputs(batch: dict) -> dict:
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r} (have {sorted(batch)})")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if batch.get("pixel_values") is not None:
            inputs["pixel_values"] = batch["pixel_values"]
        return inputs

    def __call__(self, student_fn, teacher_fn, batch: dict, num_tokens=None, num_images=None) -> dict:
        """Run the forwards and the losses.

        Args:
            student_fn / teacher_fn: callables taking the model inputs (HF model or DeepSpeed
                engine); ``teacher_fn`` may be ``None`` only when kd/attn weights are 0.
            batch: ``input_ids [B,T]``, ``attention_mask [B,T]`` (right padding), ``labels [B,T]``
                (unshifted, -100 ignored), ``pixel_values`` or None, ``has_image [B]``,
                ``vis_pos [B,n]``.
            num_tokens: divisor of the token terms (global count of the step); default local count.
            num_images: divisor of the attention term; default local count of samples with an image.

        Returns:
            ``{"loss", "lm", "kd", "attn"}`` scalar fp32 tensors (no host sync); the terms are
            unweighted and still attached to the graph (detach them for logging).
        """
        cfg = self.cfg
        inputs = self._inputs(batch)
        labels = batch["labels"]
        if cfg.needs_teacher() and teacher_fn is None:
            raise ValueError("loss.kd_weight/attn_weight > 0 but no teacher_fn was given")
        vis_pos = batch.get("vis_pos")
        has_image = batch.get("has_image")
        use_attn = cfg.attn_weight > 0 and vis_pos is not None and vis_pos.shape[-1] > 0
        if use_attn and has_image is None:
            has_image = torch.ones(vis_pos.shape[0], dtype=torch.bool, device=vis_pos.device)

        s_ctx = self.student_capture.record(vis_pos, has_image) if use_attn else contextlib.nullcontext()
        with s_ctx as s_rec:
            s_out = student_fn(**inputs)
        t_out = t_rec = None
        if cfg.needs_teacher():
            t_ctx = self.teacher_capture.record(vis_pos, has_image) if use_attn else contextlib.nullcontext()
            with torch.no_grad(), t_ctx as t_rec:
                t_out = teacher_fn(**inputs)

        s_logits = s_out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
        tgt = labels[:, 1:].to(s_logits.device)
        if num_tokens is None:
            num_tokens = (tgt != IGNORE_INDEX).sum().clamp(min=1)
        zero = torch.zeros((), dtype=torch.float32, device=s_logits.device)

        v = s_logits.shape[-1]
        lm = F.cross_entropy(
            s_logits.float().reshape(-1, v), tgt.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        ) / num_tokens
        kd = zero
        if cfg.kd_weight > 0:
            kd = logit_kd_loss(
                s_logits, t_out.logits[:, :-1], tgt, cfg.kd_kind, cfg.kd_temperature, IGNORE_INDEX,
                beta=cfg.kd_beta, chunk_size=cfg.kd_chunk_size, reduction="sum",
            ) / num_tokens
        attn = zero
        if use_attn:
            s_maps = s_rec.maps  # (L, B, n, n)
            t_all = t_rec.maps  # (L_t, B, n, n) in self.teacher_layers order
            t_maps = torch.stack([t_all[slots].mean(0) for slots in self._window_slots])
            if num_images is None:
                num_images = has_image.sum().clamp(min=1)
            attn = attention_alignment_loss(
                s_maps, t_maps, has_image, kind=cfg.attn_kind, reduction="sum"
            ) / num_images

        loss = zero
        for w, term in ((cfg.lm_weight, lm), (cfg.kd_weight, kd), (cfg.attn_weight, attn)):
            if w > 0:
                loss = loss + w * term
        return {"loss": loss, "lm": lm, "kd": kd, "attn": attn}
