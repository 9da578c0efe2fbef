"""What trains in the student (``model.*`` keys) and folding LoRA back into plain weights."""
from __future__ import annotations

import torch

from .loading import ModelConfigError

__all__ = ["select_trainable", "merge_lora_state_dict", "projector_modules", "vision_tower"]


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder: ``model.model.vision_tower`` (LLaVA, OneVision, InternVL) or
    ``model.model.visual`` (Qwen-VL, whose patch merger inside it is the projector)."""
    inner = model.model
    tower = getattr(inner, "vision_tower", None)
    return tower if tower is not None else inner.visual


def projector_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision-to-text projector(s): ``multi_modal_projector``, or Qwen-VL's ``visual.merger``
    (+ Qwen3-VL's ``visual.deepstack_merger_list``)."""
    inner = model.model
    proj = getattr(inner, "multi_modal_projector", None)
    if proj is not None:
        return [proj]
    visual = inner.visual
    return [visual.merger, *list(getattr(visual, "deepstack_merger_list", None) or [])]


def select_trainable(model: torch.nn.Module, mcfg) -> None:
    """Set ``requires_grad`` by config: projector path, LLM (full / LoRA / frozen), vision tower."""
    model.requires_grad_(False)
    inner = model.model
    projectors = projector_modules(model)
    if mcfg.train_vision:
        vision_tower(model).requires_grad_(True)
        for proj in projectors:  # a merger inside the vision model (Qwen-VL) is the projector, not the tower
            proj.requires_grad_(False)
    if mcfg.train_projector:
        for proj in projectors:
            # with adapter fetch only the adapter trains; the teacher's projector copy stays frozen
            (proj.adapter if hasattr(proj, "adapter") else proj).requires_grad_(True)
        newline = getattr(inner, "image_newline", None)  # LLaVA-OneVision: text-width row-end embedding
        if isinstance(newline, torch.nn.Parameter):
            newline.requires_grad_(True)
    if mcfg.llm == "full":
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif mcfg.llm == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:
            raise ModelConfigError("model.llm: 'lora' needs the peft package (pip install peft)") from e
        lcfg = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                          target_modules=list(mcfg.lora_target_modules), bias="none")
        inject_adapter_in_model(lcfg, inner.language_model)
        for n, p in inner.language_model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def merge_lora_state_dict(sd: dict, scaling: float) -> dict:
    """Fold LoRA factors into their base weights: ``W + scaling * B @ A`` (fp32 math), and
    rename ``x.base_layer.weight`` -> ``x.weight``; the result is a plain model state dict."""
    out = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        if ".base_layer." in k:
            prefix, _, suffix = k.partition(".base_layer.")
            if suffix == "weight":
                a = next(sd[x] for x in sd if x.startswith(prefix + ".lora_A.") and x.endswith("weight"))
                b = next(sd[x] for x in sd if x.startswith(prefix + ".lora_B.") and x.endswith("weight"))
                v = (v.float() + scaling * (b.float() @ a.float())).to(v.dtype)
            k = f"{prefix}.{suffix}"
        out[k] = v
    return out
