"""The training objective: LM + logit KD + visual-attention alignment, weighted.

``DistillObjective(loss_cfg, student_model, teacher_model)`` installs the fused attention on both
models, picks the matched layers (:func:`distill.losses.match_layers`) and sets up capture.
Calling it runs the student (and, when a teacher term has weight, the teacher under
``torch.no_grad()``) and returns the weighted loss and its unweighted terms.

Logits (DESIGN.md "Logits"): the forwards run with ``logits_to_keep=1`` (a [B, 1, V] tensor, not
used) and a forward hook on the base model (``model.base_model``, LLaVA's ``LlavaModel``) takes
its output, the final normed hidden state that the model feeds its lm_head; this works the same
through a DeepSpeed engine (the hook sits on the wrapped module). Only the rows of shifted labelled
positions (``labels[:, 1:] != -100``) are gathered, on the device: ``torch.nonzero_static`` with the
count ``batch["num_targets"]`` (a Python int from :func:`distill.data.collate.collate`; without it
the count is read with one host sync). :func:`distill.losses.fused_lm_kd_loss` then applies both
lm_heads per chunk of ``loss.logits_chunk_size`` rows, so no [B, T, V] tensor exists for either
model.

Ragged visual tokens (DESIGN.md: ``vis_pos`` is ``[B, n_max]``, the tail padded with -1): the
captured maps are ``[L, B, n_max, n_max]``; the attention term of each sample is computed over its
own block only (:func:`distill.losses.attention_alignment_loss` with ``vis_mask`` or
``image_ids``), so padding never enters the filtered cosine's mean, std, filter, profiles or
cosine.  Multi-image samples:
an optional ``batch["vis_image_id"]`` ``[B, n_max]`` long gives the image (0, 1, ... within the
sample) of each visual token, -1 on padding; the term is then computed per image block (the
image's own n_k x n_k sub-map, as the reference does for its single image) and averaged over the
sample's images.  Without it a sample's visual tokens form one block.  The block ids are derived
on the device from ``vis_pos >= 0`` (no host sync).

Normalisation (so gradient accumulation equals one big batch): token terms are *sums* over valid
shifted label positions divided by ``num_tokens``; the attention term is a sum over samples with
an image (``has_image`` and at least one real visual token) divided by ``num_images``.  Pass the
global counts of the optimizer step; ``None`` uses the local counts of this micro-batch.
"""

from __future__ import annotations

import contextlib

import torch

from distill.attention import AttentionCapture, install, text_decoder_layers
from distill.config import LossConfig
from distill.losses import attention_alignment_loss, fused_lm_kd_loss, match_layers
from distill.models.loading import unwrap_model

__all__ = ["LossConfig", "DistillObjective"]

IGNORE_INDEX = -100


class _HiddenCapture:
    """Forward hook on a model's base model that keeps its output's first tensor: the final
    (normed) hidden state [B, T, H] that the model's lm_head consumes."""

    def __init__(self, model):
        base = getattr(model, "base_model", None)
        if not isinstance(base, torch.nn.Module) or base is model:
            raise TypeError(f"{type(model).__name__}: no base model to take the final hidden state from")
        head = model.get_output_embeddings()
        if head is None:
            raise TypeError(f"{type(model).__name__}: no lm_head (get_output_embeddings() is None)")
        self.base, self.head = base, head
        self.value = None

    def _hook(self, module, args, output):
        self.value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)

    @contextlib.contextmanager
    def record(self):
        self.value = None
        handle = self.base.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def take(self) -> torch.Tensor:
        h, self.value = self.value, None
        if h is None:
            raise RuntimeError("the model forward did not run its base model (no hidden state captured)")
        return h


def _target_rows(labels: torch.Tensor, count) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index [N], position [N], target [N]) of the shifted labelled positions, in row-major
    order; ``count`` (Python int, ``labels[:, 1:] != -100`` summed) keeps it free of host syncs."""
    tgt = labels[:, 1:]
    keep = (tgt != IGNORE_INDEX).reshape(-1)
    if count is None:
        count = int(keep.sum())  # one host sync; collate's ``num_targets`` avoids it
    try:
        flat = torch.nonzero_static(keep, size=int(count), fill_value=0).squeeze(1)
    except (NotImplementedError, AttributeError):  # a torch build without it on this device
        flat = keep.nonzero().squeeze(1)
    if hasattr(torch, "_assert_async"):  # async on accelerators: a wrong count fails the step
        torch._assert_async(keep.sum() == int(count), "batch['num_targets'] != (labels[:, 1:] != -100).sum()")
    t1 = tgt.shape[1]
    return flat // t1, flat % t1, tgt.reshape(-1)[flat]


class DistillObjective:
    """Weighted LM + KD + attention-alignment objective (see module docstring)."""

    def __init__(self, loss_cfg: LossConfig, student_model, teacher_model=None):
        self.cfg = loss_cfg
        student_model = unwrap_model(student_model)
        teacher_model = None if teacher_model is None else unwrap_model(teacher_model)
        if teacher_model is None and loss_cfg.needs_teacher():
            raise ValueError(
                "loss.kd_weight/attn_weight > 0 need a teacher model; set them to 0 or give model.teacher"
            )
        self.teacher_model = teacher_model
        install(student_model, loss_cfg.backend)
        if teacher_model is not None:
            install(teacher_model, loss_cfg.backend)
        self.student_hidden = _HiddenCapture(student_model)
        self.teacher_hidden = _HiddenCapture(teacher_model) if teacher_model is not None else None
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
            self.student_capture = AttentionCapture(student_model, self.student_layers, loss_cfg.attn_chunk_size,
                                                    loss_cfg.capture_impl)
            self.teacher_capture = AttentionCapture(teacher_model, self.teacher_layers, loss_cfg.attn_chunk_size,
                                                    loss_cfg.capture_impl)

    @staticmethod
    def _inputs(batch: dict) -> dict:
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r} (have {sorted(batch)})")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        # the family's image inputs (distill.data.collate): pixel_values, and e.g. image_grid_thw +
        # mm_token_type_ids (Qwen-VL) or image_sizes + batch_num_images (OneVision); None = no image
        for key in batch.get("model_inputs", ("pixel_values",)):
            if batch.get(key) is not None:
                inputs[key] = batch[key]
        return inputs

    def __call__(self, student_fn, teacher_fn, batch: dict, num_tokens=None, num_images=None) -> dict:
        """Run the forwards and the losses.

        Args:
            student_fn / teacher_fn: callables taking the model inputs (HF model or DeepSpeed
                engine); ``teacher_fn=None`` calls the teacher model given at construction
                (which ``__init__`` requires when a kd/attn weight is > 0).
            batch: ``input_ids [B,T]``, ``attention_mask [B,T]`` (right padding), ``labels [B,T]``
                (unshifted, -100 ignored), ``pixel_values`` or None, ``has_image [B]``,
                ``vis_pos [B,n]`` (long, -1 padding at the tail of samples with fewer visual tokens);
                optional ``vis_image_id [B,n]`` (long image index of each visual token within its
                sample, -1 on padding; absent: one block per sample); optional ``num_targets``: Python int, ``(labels[:, 1:] != -100).sum()``
                (collate provides it; without it the labelled rows are counted with one host sync);
                optional ``vis_key_len``: Python int ``max(vis_pos) + 1`` (collate provides it), the
                bound of the capture op's key loops.
            num_tokens: divisor of the token terms (global count of the step); default local count.
            num_images: divisor of the attention term; default local count of samples with an image
                and at least one real visual token (``has_image & (vis_pos >= 0).any(-1)``).

        Returns:
            ``{"loss", "lm", "kd", "attn"}`` scalar fp32 tensors (no host sync); the terms are
            unweighted; ``loss`` is differentiable, ``lm`` and ``kd`` are not (their gradients
            are computed inside :func:`distill.losses.fused_lm_kd_loss` for the weighted sum),
            ``attn`` is attached to the graph.
        """
        cfg = self.cfg
        inputs = self._inputs(batch)
        labels = batch["labels"]
        if teacher_fn is None:
            teacher_fn = self.teacher_model
        vis_pos = batch.get("vis_pos")
        key_len = batch.get("vis_key_len")  # host int from collate: bounds the capture op's key loops
        has_image = batch.get("has_image")
        use_attn = cfg.attn_weight > 0 and vis_pos is not None and vis_pos.shape[-1] > 0
        if use_attn and has_image is None:
            has_image = torch.ones(vis_pos.shape[0], dtype=torch.bool, device=vis_pos.device)

        s_ctx = self.student_capture.record(vis_pos, has_image, key_len) if use_attn else contextlib.nullcontext()
        with s_ctx as s_rec, self.student_hidden.record():
            student_fn(**inputs, logits_to_keep=1)  # the [B, 1, V] logits are not used
        s_h = self.student_hidden.take()  # (B, T, H_s), final norm applied
        t_h = t_rec = None
        if cfg.needs_teacher():
            t_ctx = self.teacher_capture.record(vis_pos, has_image, key_len) if use_attn else contextlib.nullcontext()
            with torch.no_grad(), t_ctx as t_rec, self.teacher_hidden.record():
                teacher_fn(**inputs, logits_to_keep=1)
            t_h = self.teacher_hidden.take()

        device = s_h.device
        rows_b, rows_t, tgt = _target_rows(labels.to(device), batch.get("num_targets"))
        if num_tokens is None:
            num_tokens = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        zero = torch.zeros((), dtype=torch.float32, device=device)
        use_kd = cfg.kd_weight > 0
        weighted, lm_sum, kd_sum = fused_lm_kd_loss(
            s_h[rows_b, rows_t], self.student_hidden.head, tgt,
            t_h[rows_b.to(t_h.device), rows_t.to(t_h.device)].to(device) if use_kd else None,
            self.teacher_hidden.head if use_kd else None,
            kind=cfg.kd_kind, temperature=cfg.kd_temperature, beta=cfg.kd_beta,
            lm_weight=cfg.lm_weight, kd_weight=cfg.kd_weight, chunk_size=cfg.logits_chunk_size,
            ignore_index=IGNORE_INDEX,
        )
        del s_h, t_h
        lm, kd = lm_sum / num_tokens, kd_sum / num_tokens
        attn = zero
        if use_attn:
            s_maps = s_rec.maps  # (L, B, n, n)
            t_all = t_rec.maps  # (L_t, B, n, n) in self.teacher_layers order
            t_maps = torch.stack([t_all[slots].mean(0) for slots in self._window_slots])
            dev = s_maps.device
            real = vis_pos.to(dev) >= 0  # (B, n) on the device: no host sync
            img_id = batch.get("vis_image_id")
            if img_id is not None and img_id.shape != vis_pos.shape:
                raise ValueError(f"batch['vis_image_id'] {tuple(img_id.shape)} must match vis_pos "
                                 f"{tuple(vis_pos.shape)} (-1 on the same padding)")
            # one block per sample (masked reductions), or per image when the batch says which
            blocks = ({"vis_mask": real} if img_id is None
                      else {"image_ids": torch.where(real, img_id.to(dev).long(), -1)})
            valid = has_image.to(dev)
            if num_images is None:
                num_images = (valid & real.any(-1)).sum().clamp(min=1)
            attn = attention_alignment_loss(
                s_maps, t_maps.to(dev), valid, kind=cfg.attn_kind, reduction="sum", **blocks
            ) / num_images

        loss = weighted / num_tokens  # lm_weight * lm + kd_weight * kd, differentiable
        if cfg.attn_weight > 0:
            loss = loss + cfg.attn_weight * attn
        return {"loss": loss, "lm": lm, "kd": kd, "attn": attn}
