"""Build the frozen teacher and the trainable student; student checkpoints in training form.

Works in a plain process and under an alive DeepSpeed ZeRO-3 ``HfDeepSpeedConfig``: then
transformers loads partitioned (``zero.Init``), new modules are created under ``zero.Init`` too
and fetched weights are written under ``GatheredParameters(..., modifier_rank=0)``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .loading import (
    CHECKPOINT_META,
    ModelConfigError,
    as_torch_dtype,
    model_folder,
    check_fetch_shapes,
    check_pair,
    has_wide_projector,
    is_student_checkpoint,
    load_llava_config,
    load_vlm,
    unwrap_model,
    vision_feature_width,
    weight_files,
)
from .projector import (
    MERGER_FAMILIES,
    FetchedMerger,
    FetchedProjector,
    fetch_support,
    fold_merger,
    merger_slots,
    new_teacher_merger,
    read_merger_weights,
    fold_projector,
    fold_projector_exact,
    init_adapter_,
    read_projector_weights,
    validate_teacher_projector,
)

CHECKPOINT_FORMAT = "distill.student_checkpoint"
CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------- ZeRO-3 helpers


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _new_module(factory, like: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``factory()`` for a module joining the model: partitioned (``zero.Init``) under ZeRO-3, else
    moved to ``like``'s device and ``dtype``."""
    if not _zero3():
        return factory().to(device=_device_of(like), dtype=dtype)
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    # Like transformers: the DeepSpeed config decides the dtype (bf16/fp16 section, else fp32),
    # so the new parameters match the rest of the partitioned model. (Passing ``dtype`` here
    # is ignored on accelerators without fp16 in deepspeed 0.19.)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        return factory()


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]):
    """Whole (possibly ZeRO-3 partitioned) parameters, rank 0's writes kept on exit."""
    if _zero3():
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


def _fill_adapter(adapter: nn.Module, weights: dict[str, torch.Tensor], init: bool) -> None:
    """A fetched projector's trainable adapter: freshly initialised (``init``), or its
    ``adapter.*`` tensors from ``weights`` (a student checkpoint)."""
    if init:
        with _gathered(list(adapter.parameters())):
            init_adapter_(adapter)
    else:
        _write(adapter, weights, "adapter.")


def _write(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy ``tensors[prefix + name]`` into every parameter ``name`` of ``module``."""
    pairs = [(p, tensors[prefix + n]) for n, p in module.named_parameters()]
    with _gathered([p for p, _ in pairs]), torch.no_grad():
        for p, t in pairs:
            if tuple(p.shape) != tuple(t.shape):
                raise ModelConfigError(f"internal: cannot copy a {tuple(t.shape)} tensor into a {tuple(p.shape)} parameter")
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def projector_home(model) -> nn.Module:
    """The module that owns ``multi_modal_projector`` (``LlavaModel`` inside the LM head wrapper)."""
    model = unwrap_model(model)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "multi_modal_projector"):
        return inner
    if hasattr(model, "multi_modal_projector"):
        return model
    raise ModelConfigError(f"{type(model).__name__} has no multi_modal_projector: not a LLaVA model.")


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _install_fetched(model, spec: dict, weights: dict, dtype: torch.dtype, init_adapter: bool) -> FetchedProjector:
    """Replace the student's projector by a ``FetchedProjector`` holding ``weights``."""
    home = projector_home(model)
    proj = _new_module(
        lambda: FetchedProjector(spec["in_features"], spec["teacher_hidden"], spec["student_hidden"], spec["act"], spec["bias"]),
        home.multi_modal_projector, dtype)
    _write(proj.teacher_projector, weights)
    _fill_adapter(proj.adapter, weights, init_adapter)
    proj.teacher_projector.requires_grad_(False)
    home.multi_modal_projector = proj
    return proj


def _install_folded(model, spec: dict, weights: dict, dtype: torch.dtype) -> nn.Module:
    """Replace the projector by one equal to the folded fetched projector.

    ``Ht <= Hs``: a stock ``LlavaMultiModalProjector`` (:func:`fold_projector`). ``Ht > Hs``: a
    ``DistillLlavaMultiModalProjector`` of inner width ``Ht`` (:func:`fold_projector_exact`), and
    ``config.projector_intermediate_size = Ht`` so a saved folder reloads with that shape
    (:func:`distill.models.load_vlm`, or ``trust_remote_code`` after ``distill.export``).
    """
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from .modeling_distill_llava import DistillLlavaMultiModalProjector

    cfg = unwrap_model(model).config
    cfg.projector_hidden_act = spec["act"]
    if spec["teacher_hidden"] > spec["student_hidden"]:
        folded = fold_projector_exact(weights)
        cfg.projector_intermediate_size = int(spec["teacher_hidden"])
        factory = lambda: DistillLlavaMultiModalProjector(cfg)  # noqa: E731
    else:
        folded = fold_projector(weights, spec["act"], spec["student_hidden"])
        if hasattr(cfg, "projector_intermediate_size"):
            del cfg.projector_intermediate_size
        factory = lambda: LlavaMultiModalProjector(cfg)  # noqa: E731
    cfg.multimodal_projector_bias = "linear_1.bias" in folded
    home = projector_home(model)
    proj = _new_module(factory, home.multi_modal_projector, dtype)
    _write(proj, folded)
    home.multi_modal_projector = proj
    return proj


def _visual(model) -> nn.Module:
    inner = getattr(unwrap_model(model), "model", None)
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise ModelConfigError(f"{type(unwrap_model(model)).__name__} has no model.visual: not a Qwen-VL model.")
    return visual


def _get_slot(visual: nn.Module, slot: str) -> nn.Module:
    mod = visual
    for part in slot.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def _set_slot(visual: nn.Module, slot: str, new: nn.Module) -> None:
    parent, _, last = slot.rpartition(".")
    holder = _get_slot(visual, parent) if parent else visual
    if last.isdigit():
        holder[int(last)] = new
    else:
        setattr(holder, last, new)


def merger_spec(student_cfg, teacher_cfg) -> dict:
    """Shapes of the fetched mergers of a Qwen-VL pair (stored in a checkpoint's metadata)."""
    fam = teacher_cfg.model_type
    return {
        "family": fam,
        "slots": merger_slots(teacher_cfg.vision_config, fam),
        "teacher_hidden": int(teacher_cfg.vision_config.out_hidden_size),
        "student_hidden": int(student_cfg.vision_config.out_hidden_size),
        "teacher_vision_config": teacher_cfg.vision_config.to_dict(),
    }


def _teacher_vision_config(model, spec: dict):
    cfg = unwrap_model(model).config
    vc = type(cfg.vision_config)(**{k: v for k, v in spec["teacher_vision_config"].items()
                                    if k not in ("model_type", "transformers_version")})
    return vc


def _install_merger_fetch(model, spec: dict, weights: dict, dtype: torch.dtype, init_adapter: bool, from_checkpoint: bool):
    """Replace each merger slot of the student's vision model by a :class:`FetchedMerger`.

    ``weights``: ``{slot: {name: tensor}}`` (a teacher folder's mergers, or a checkpoint's
    ``teacher_merger.*`` / ``adapter.*``)."""
    visual = _visual(model)
    unwrap_model(model)._distill_merger_spec = {k: v for k, v in spec.items() if k != "kind"}
    tvc = _teacher_vision_config(model, spec)
    for slot in spec["slots"]:
        if slot not in weights:
            raise ModelConfigError(f"cannot fetch merger {slot!r}: its tensors are missing.")
        w = weights[slot]
        fetched = _new_module(
            lambda: FetchedMerger(new_teacher_merger(spec["family"], tvc, slot), spec["teacher_hidden"], spec["student_hidden"]),
            _get_slot(visual, slot), dtype)
        teacher = {k[len("teacher_merger."):]: v for k, v in w.items() if k.startswith("teacher_merger.")} if from_checkpoint else w
        try:
            _write(fetched.teacher_merger, teacher)
        except KeyError as exc:
            raise ModelConfigError(f"merger {slot!r}: tensor {exc} missing; the folder is incomplete.") from exc
        _fill_adapter(fetched.adapter, w, init_adapter)
        fetched.teacher_merger.requires_grad_(False)
        _set_slot(visual, slot, fetched)


def _install_merger_folded(model, spec: dict, weights: dict) -> None:
    """Fold each stored fetched merger into the student's stock merger (exact)."""
    visual = _visual(model)
    for slot in spec["slots"]:
        w = weights[slot]
        teacher = {k[len("teacher_merger."):]: v for k, v in w.items() if k.startswith("teacher_merger.")}
        adapter = {k[len("adapter."):]: v for k, v in w.items() if k.startswith("adapter.")}
        _write(_get_slot(visual, slot), fold_merger(spec["family"], teacher, adapter))


def _fetch_image_newline(model, teacher_path, proj: FetchedProjector) -> None:
    """LLaVA-OneVision: the student's ``image_newline`` (``[Hs]``, appended after the projector at
    the end of each row of image tokens) starts as the teacher's newline mapped through the
    fetched adapter, ``P t + p``: the same map that takes the teacher's projected image tokens to
    the student's width, so the newline rows keep their relation to the image rows. It stays a
    plain ``[Hs]`` parameter of the stock layout (so export needs no fold for it) and trains with
    the projector (``model.train_projector``)."""
    from safetensors import safe_open

    home = projector_home(model)
    if not hasattr(home, "image_newline"):
        return
    t = None
    for f in weight_files(teacher_path, "teacher"):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith("image_newline"):
                    t = fh.get_tensor(key)
    if t is None:
        raise ModelConfigError(f"teacher folder {str(teacher_path)!r}: no image_newline tensor to fetch.")
    with _gathered([home.image_newline, *proj.adapter.parameters()]), torch.no_grad():
        home.image_newline.copy_(proj.adapter(t.to(proj.adapter.weight)).to(home.image_newline.dtype))


def teacher_projector_spec(student_cfg, teacher_cfg) -> dict:
    """Shapes/settings of the ``FetchedProjector`` for a student/teacher config pair."""
    check_fetch_shapes(student_cfg, teacher_cfg)
    if has_wide_projector(teacher_cfg):
        raise ModelConfigError(
            "teacher-adapter fetch needs a teacher with a stock LLaVA projector (inner width = its text hidden "
            f"size {teacher_cfg.text_config.hidden_size}); this teacher is an exact export with a custom projector "
            f"(projector_intermediate_size={teacher_cfg.projector_intermediate_size}). Train with "
            "`adapter_fetch: false`, or use a `python -m distill.export --stock` export of it as the teacher."
        )
    return {
        "in_features": vision_feature_width(teacher_cfg),
        "teacher_hidden": int(teacher_cfg.text_config.hidden_size),
        "student_hidden": int(student_cfg.text_config.hidden_size),
        "act": teacher_cfg.projector_hidden_act,
        "bias": bool(teacher_cfg.multimodal_projector_bias),
    }


# ----------------------------------------------------------------------------- public builders


def build_teacher(path: str | os.PathLike, dtype=torch.float32, attn_implementation: str | None = None):
    """Load the teacher (its family's transformers class, :func:`load_vlm`), all parameters frozen, ``eval()``."""
    model = load_vlm(path, dtype=dtype, attn_implementation=attn_implementation, role="teacher")
    model.requires_grad_(False)
    model.eval()
    return model


def build_student(
    path: str | os.PathLike,
    teacher_path: str | os.PathLike | None = None,
    adapter_fetch: bool = True,
    dtype=torch.float32,
    attn_implementation: str | None = None,
):
    """Load the trainable student (``train()`` mode), optionally with the teacher's projector fetched.

    Args:
        path: a stock HF LLaVA folder or a student checkpoint (``save_student_checkpoint``).
        teacher_path: the teacher folder; required for ``adapter_fetch`` from a stock folder and,
            when given, checked against the student with :func:`check_pair`.
        adapter_fetch: replace ``model.model.multi_modal_projector`` by a
            :class:`FetchedProjector` (teacher projector read from ``teacher_path``'s safetensors,
            frozen, + trainable ``adapter``; LLaVA and LLaVA-OneVision, whose student
            ``image_newline`` starts as ``adapter(teacher image_newline)`` and trains with the
            projector), or, for Qwen2.5-VL / Qwen3-VL, ``model.model.visual.merger`` (and Qwen3-VL's
            ``deepstack_merger_list[i]``) by a :class:`FetchedMerger` (teacher merger, frozen, +
            ``Linear(Ht, Hs)``). InternVL: a :class:`ModelConfigError` (use ``adapter_fetch: false``). For a checkpoint folder the stored projector is
            kept when True; when False a stored fetched projector is folded into a stock one
            (``Ht <= Hs``) or into an exact projector of inner width ``Ht`` (``Ht > Hs``).
        dtype: parameter dtype (``torch.dtype`` or "fp32"/"bf16"/"fp16").

    All errors (bad folder, incompatible pair, teacher projector missing or misshapen) are
    :class:`ModelConfigError` raised before any weights of the student are loaded.
    """
    dtype = as_torch_dtype(dtype)
    p = model_folder(path, "student")
    if teacher_path is not None:
        check_pair(p, teacher_path, adapter_fetch=adapter_fetch and not is_student_checkpoint(p))
    if is_student_checkpoint(p):
        model = load_student_checkpoint(p, dtype=dtype, attn_implementation=attn_implementation, adapter_fetch=adapter_fetch)
        model.train()
        return model

    if adapter_fetch:
        if teacher_path is None:
            raise ModelConfigError(
                f"build_student({str(p)!r}): adapter_fetch=True needs teacher_path (the teacher folder whose "
                "projector is fetched). Pass teacher_path, or set adapter_fetch: false."
            )
        scfg, tcfg = load_llava_config(p, "student"), load_llava_config(teacher_path, "teacher")
        kind = fetch_support(tcfg)
        if kind == "merger":
            check_fetch_shapes(scfg, tcfg)
            spec = merger_spec(scfg, tcfg)
            weights = read_merger_weights(teacher_path, "teacher")
        else:
            spec = teacher_projector_spec(scfg, tcfg)
            weights = read_projector_weights(teacher_path, "teacher")
            validate_teacher_projector(weights, spec["in_features"], spec["teacher_hidden"], spec["bias"])
    model = load_vlm(p, dtype=dtype, attn_implementation=attn_implementation, role="student")
    if adapter_fetch:
        if kind == "merger":
            _install_merger_fetch(model, spec, weights, dtype, init_adapter=True, from_checkpoint=False)
        else:
            proj = _install_fetched(model, spec, weights, dtype, init_adapter=True)
            _fetch_image_newline(model, teacher_path, proj)
    model.train()
    return model


# ----------------------------------------------------------------------------- checkpoints


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / CHECKPOINT_META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"checkpoint {str(path)!r}: unreadable {CHECKPOINT_META} ({exc}).") from exc
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ModelConfigError(
            f"checkpoint {str(path)!r}: {CHECKPOINT_META} has format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this code reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}."
        )
    return meta


def save_student_checkpoint(out_dir: str | os.PathLike, model, processor, state_dict: dict | None = None) -> Path | None:
    """Write the consolidated student in training form (adapter unfolded) + processor.

    ``state_dict`` is the consolidated (e.g. DeepSpeed 16-bit) state dict when given, else
    ``model.state_dict()``. Under ``torch.distributed`` only global rank 0 writes (other ranks
    return None), so it may be called on every rank. The folder loads with
    :func:`load_student_checkpoint` / :func:`build_student` and exports with ``distill.export``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = unwrap_model(model)
    if module.config.model_type in MERGER_FAMILIES:
        merger = _visual(module).merger
        projector = dict(getattr(module, "_distill_merger_spec", {}), kind="fetched_merger") \
            if isinstance(merger, FetchedMerger) else {"kind": "stock"}
        if projector["kind"] == "fetched_merger" and "slots" not in projector:
            raise ModelConfigError("internal: a fetched merger without its spec (build it with build_student).")
    else:
        proj = projector_home(module).multi_modal_projector
        projector = {"kind": "fetched", **proj.spec()} if isinstance(proj, FetchedProjector) else {"kind": "stock"}
    if state_dict is None:
        state_dict = module.state_dict()
    if not state_dict:
        raise ModelConfigError(
            "save_student_checkpoint got an empty state dict (under ZeRO-3 pass the consolidated 16-bit "
            "state dict from global rank 0)."
        )
    module.save_pretrained(out, state_dict=state_dict)
    processor.save_pretrained(out)
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "projector": projector}
    (out / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


@contextlib.contextmanager
def _expect_fetched_keys(cfg=None):
    """Let ``from_pretrained`` expect the fetched projector's (or merger's) keys instead of the stock ones.

    Temporarily extends the class-level ignore patterns of the family's model class (the one
    ``AutoModelForImageTextToText`` picks for ``cfg``; LLaVA without one; read by ``post_init``) so
    loading a training-form checkpoint logs no spurious missing/unexpected keys; the stock
    projector it builds is replaced (or overwritten by the fold) right after.
    """
    from transformers import LlavaForConditionalGeneration

    cls = LlavaForConditionalGeneration
    if cfg is not None and cfg.model_type != "llava":
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        cls = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(cfg)]
    saved = {k: cls.__dict__.get(k) for k in ("_keys_to_ignore_on_load_unexpected", "_keys_to_ignore_on_load_missing")}
    cls._keys_to_ignore_on_load_unexpected = list(saved["_keys_to_ignore_on_load_unexpected"] or []) + [
        r"multi_modal_projector\.(teacher_projector|adapter)\.",
        r"visual\.(merger|deepstack_merger_list\.\d+)\.(teacher_merger|adapter)\.",
    ]
    cls._keys_to_ignore_on_load_missing = list(saved["_keys_to_ignore_on_load_missing"] or []) + [
        r"multi_modal_projector\.linear_[12]\.",
        r"visual\.(merger|deepstack_merger_list\.\d+)\.(ln_q|mlp|norm|linear_fc[12])\.",
    ]
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                delattr(cls, k)
            else:
                setattr(cls, k, v)


def load_student_checkpoint(
    path: str | os.PathLike,
    dtype=torch.float32,
    attn_implementation: str | None = None,
    adapter_fetch: bool = True,
):
    """Read a folder written by :func:`save_student_checkpoint` (training form).

    A stored fetched projector comes back as a :class:`FetchedProjector` (``adapter_fetch``
    True) or folded (``adapter_fetch`` False): into a stock projector when ``Ht <= Hs``, else
    into a ``DistillLlavaMultiModalProjector`` of inner width ``Ht`` (exact either way). Returns the model in
    ``train()`` mode with the teacher-projector copy frozen.
    """
    dtype = as_torch_dtype(dtype)
    p = model_folder(path, "checkpoint")
    if not is_student_checkpoint(p):
        raise ModelConfigError(
            f"{str(p)!r} is not a student checkpoint (no {CHECKPOINT_META}); use build_student / load_vlm "
            "for stock Hugging Face folders."
        )
    meta = _read_meta(p)
    ccfg = load_llava_config(p, "checkpoint")
    weight_files(p, "checkpoint")
    spec = meta["projector"]
    if spec.get("kind") == "stock":
        model = load_vlm(p, dtype=dtype, attn_implementation=attn_implementation, role="checkpoint")
        model.train()
        return model
    if spec.get("kind") == "fetched_merger":
        weights = read_merger_weights(p, "checkpoint")
        with _expect_fetched_keys(load_llava_config(p, "checkpoint")):
            model = load_vlm(p, dtype=dtype, attn_implementation=attn_implementation, role="checkpoint")
        if adapter_fetch:
            _install_merger_fetch(model, spec, weights, dtype, init_adapter=False, from_checkpoint=True)
        else:
            _install_merger_folded(model, spec, weights)
        model.train()
        return model
    if spec.get("kind") != "fetched":
        raise ModelConfigError(f"checkpoint {str(p)!r}: unknown projector kind {spec.get('kind')!r} in {CHECKPOINT_META}.")
    weights = read_projector_weights(p, "checkpoint")
    validate_teacher_projector(weights, spec["in_features"], spec["teacher_hidden"], spec["bias"], role="checkpoint")
    if "adapter.weight" not in weights or tuple(weights["adapter.weight"].shape) != (spec["student_hidden"], spec["teacher_hidden"]):
        raise ModelConfigError(f"checkpoint {str(p)!r}: adapter weights missing or misshapen; the checkpoint is incomplete.")
    with _expect_fetched_keys(ccfg):
        model = load_vlm(p, dtype=dtype, attn_implementation=attn_implementation, role="checkpoint")
    if adapter_fetch:
        _install_fetched(model, spec, weights, dtype, init_adapter=False)
    else:
        _install_folded(model, spec, weights, dtype)
    model.train()
    return model
