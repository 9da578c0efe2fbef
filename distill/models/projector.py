"""Teacher-adapter fetch: the student's projector = frozen teacher projector + trainable Linear.

``FetchedProjector(x) = adapter(linear_2(act(linear_1(x))))`` where ``linear_1``/``linear_2``
are a frozen copy of the teacher's LLaVA projector and ``adapter`` maps the teacher's text
width ``Ht`` to the student's ``Hs``. Because it ends in two linear maps it folds exactly into
one stock ``LlavaMultiModalProjector`` (:func:`fold_projector`) when ``Ht <= Hs``, and for any
widths into a projector of inner width ``Ht`` (:func:`fold_projector_exact`, the
``DistillLlavaMultiModalProjector`` of :mod:`distill.models.modeling_distill_llava`). A stock-shaped
approximation for ``Ht > Hs`` is fitted by :func:`fit_stock_projector`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from .loading import ModelConfigError, weight_files

_PROJ_KEY = re.compile(r"(?:^|\.)multi_modal_projector\.(?:(teacher_projector)\.)?(linear_1|linear_2)\.(weight|bias)$")
_ADAPTER_KEY = re.compile(r"(?:^|\.)multi_modal_projector\.adapter\.(weight|bias)$")


class TeacherProjector(nn.Module):
    """Same computation and parameter names as transformers' ``LlavaMultiModalProjector``.

    x ``[..., V]`` -> ``linear_2(act(linear_1(x)))`` ``[..., Ht]``.
    """

    def __init__(self, in_features: int, hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        if act not in ACT2FN:
            raise ModelConfigError(f"Unknown projector activation {act!r}; transformers knows {sorted(ACT2FN)}.")
        self.act_name = act
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class FetchedProjector(nn.Module):
    """Frozen teacher projector followed by a trainable ``Linear(Ht, Hs)`` adapter.

    Args:
        in_features: vision feature width ``V`` (vision hidden x number of feature layers).
        teacher_hidden: teacher text width ``Ht`` (output of the teacher projector).
        student_hidden: student text width ``Hs``.
        act: activation name of the teacher projector (``config.projector_hidden_act``).
        bias: whether the projector linears (and the adapter) have biases.

    Forward: image features ``[N, P, V]`` -> ``[N, P, Hs]``.
    """

    def __init__(self, in_features: int, teacher_hidden: int, student_hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.teacher_projector = TeacherProjector(in_features, teacher_hidden, act, bias)
        self.adapter = nn.Linear(teacher_hidden, student_hidden, bias=bias)
        self.teacher_projector.requires_grad_(False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.teacher_projector(image_features))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_projector.train(False)  # frozen copy: always eval
        return self

    def spec(self) -> dict:
        """Shapes and settings, as stored in a student checkpoint's metadata."""
        lin1 = self.teacher_projector.linear_1  # in/out_features stay valid under ZeRO-3 partitioning
        return {
            "in_features": int(lin1.in_features),
            "teacher_hidden": int(lin1.out_features),
            "student_hidden": int(self.adapter.out_features),
            "act": self.teacher_projector.act_name,
            "bias": lin1.bias is not None,
        }


def read_projector_weights(path: str | Path, role: str = "teacher") -> dict[str, torch.Tensor]:
    """Read a folder's projector tensors straight from its safetensors files (no model load).

    Returns a dict with ``linear_1.weight``, ``linear_2.weight`` (+ ``.bias``) and, for a student
    checkpoint holding a fetched projector, ``adapter.weight`` (+ ``.bias``). Keys are matched
    by suffix, so both the legacy (``multi_modal_projector.*``) and the current
    (``model.multi_modal_projector.*``) layouts work.
    """
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for f in weight_files(path, role):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                m = _PROJ_KEY.search(key)
                if m:
                    found[f"{m.group(2)}.{m.group(3)}"] = fh.get_tensor(key)
                    continue
                m = _ADAPTER_KEY.search(key)
                if m:
                    found[f"adapter.{m.group(1)}"] = fh.get_tensor(key)
    for need in ("linear_1.weight", "linear_2.weight"):
        if need not in found:
            raise ModelConfigError(
                f"{role} folder {str(path)!r}: cannot fetch its projector: no '*multi_modal_projector.{need}' "
                "tensor in its safetensors files. The folder must hold a LLaVA projector (linear_1, act, "
                "linear_2); otherwise train with adapter_fetch: false."
            )
    return found


def validate_teacher_projector(weights: dict, in_features: int, teacher_hidden: int, bias: bool, role: str = "teacher"):
    """Check fetched tensors against the shapes the teacher config promises."""
    expect = {
        "linear_1.weight": (teacher_hidden, in_features),
        "linear_2.weight": (teacher_hidden, teacher_hidden),
    }
    if bias:
        expect.update({"linear_1.bias": (teacher_hidden,), "linear_2.bias": (teacher_hidden,)})
    for key, shape in expect.items():
        got = tuple(weights[key].shape) if key in weights else None
        if got != shape:
            raise ModelConfigError(
                f"{role} projector tensor {key} has shape {got}, expected {shape} from its config "
                f"(vision features {in_features} -> text hidden {teacher_hidden}, bias={bias}). The "
                "folder's weights and config.json disagree; re-save the teacher with save_pretrained."
            )


def init_adapter_(adapter: nn.Linear, seed: int = 0) -> None:
    """Identity when square; otherwise a (seeded) semi-orthogonal map, so norms are preserved."""
    out_f, in_f = adapter.weight.shape
    with torch.no_grad():
        if out_f == in_f:
            w = torch.eye(out_f)
        else:
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(max(out_f, in_f), min(out_f, in_f), generator=g))
            w = q if out_f >= in_f else q.T
        adapter.weight.copy_(w.to(adapter.weight.dtype))
        if adapter.bias is not None:
            adapter.bias.zero_()


def fold_projector(weights: dict[str, torch.Tensor], act: str, student_hidden: int) -> dict[str, torch.Tensor]:
    """Fold teacher projector + adapter into stock ``LlavaMultiModalProjector`` tensors.

    Fetched: ``y = P (W2 act(W1 x + b1) + b2) + p`` with W1 ``[Ht,V]``, W2 ``[Ht,Ht]``, P ``[Hs,Ht]``.
    Stock (intermediate width = ``Hs``): ``linear_2' = P W2`` and ``b2' = P b2 + p``; when
    ``Ht < Hs`` linear_1 gets ``Hs - Ht`` zero rows (bias 0), whose units stay ``act(0) = 0``,
    and ``linear_2'`` zero columns. Computed in fp32; returns fp32 ``linear_{1,2}.{weight,bias}``.

    Raises :class:`ModelConfigError` when ``Ht > Hs`` (not representable by the stock class) or
    when padding is needed but ``act(0) != 0``.
    """
    w1 = weights["linear_1.weight"].float()
    w2 = weights["linear_2.weight"].float()
    pw = weights["adapter.weight"].float()
    ht, v = w1.shape
    hs = pw.shape[0]
    if hs != student_hidden or pw.shape[1] != ht:
        raise ModelConfigError(f"adapter weight has shape {tuple(pw.shape)}, expected ({student_hidden}, {ht}).")
    if ht > hs:
        raise ModelConfigError(
            f"Cannot fold the fetched projector into a stock LLaVA projector: the teacher's projector is "
            f"{ht} wide but transformers' LlavaMultiModalProjector of a student with text hidden size {hs} "
            f"has an intermediate width of {hs} < {ht}, so the fold (linear_2' = P.W2) has no exact stock "
            "form. Options: the default `python -m distill.export` (exact, ships a small model file: load "
            "with trust_remote_code=True), `python -m distill.export --stock` (fits a stock projector), "
            "or train with `adapter_fetch: false` / a student at least as wide as the teacher."
        )
    if ht < hs:
        zero = torch.zeros(1)
        if float(ACT2FN[act](zero).abs().max()) != 0.0:
            raise ModelConfigError(
                f"Cannot fold the fetched projector: it must be zero-padded from {ht} to {hs} units, which "
                f"is exact only when act(0) = 0, but projector_hidden_act={act!r} gives "
                f"{float(ACT2FN[act](zero))}. Train with `adapter_fetch: false` or a student as wide as the teacher."
            )
    b1 = weights.get("linear_1.bias")
    b2 = weights.get("linear_2.bias")
    pb = weights.get("adapter.bias")
    out = {"linear_1.weight": torch.zeros(hs, v), "linear_2.weight": torch.zeros(hs, hs)}
    out["linear_1.weight"][:ht] = w1
    out["linear_2.weight"][:, :ht] = pw @ w2
    if b1 is not None or b2 is not None or pb is not None:
        out["linear_1.bias"] = torch.zeros(hs)
        if b1 is not None:
            out["linear_1.bias"][:ht] = b1.float()
        b2f = pw @ b2.float() if b2 is not None else torch.zeros(hs)
        out["linear_2.bias"] = b2f + (pb.float() if pb is not None else 0.0)
    return out


def fold_projector_exact(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold teacher projector + adapter into one projector of inner width ``Ht`` (any widths).

    ``linear_1 = W1`` ``[Ht,V]`` (unchanged), ``linear_2' = P W2`` ``[Hs,Ht]`` and
    ``b2' = P b2 + p``: the tensors of a ``DistillLlavaMultiModalProjector`` with
    ``projector_intermediate_size = Ht``. Computed in fp32; exact up to rounding.
    """
    w1 = weights["linear_1.weight"].float()
    w2 = weights["linear_2.weight"].float()
    pw = weights["adapter.weight"].float()
    if pw.shape[1] != w2.shape[0]:
        raise ModelConfigError(f"adapter weight has shape {tuple(pw.shape)}, expected (*, {w2.shape[0]}).")
    out = {"linear_1.weight": w1.clone(), "linear_2.weight": pw @ w2}
    b1, b2, pb = weights.get("linear_1.bias"), weights.get("linear_2.bias"), weights.get("adapter.bias")
    if b1 is not None or b2 is not None or pb is not None:
        out["linear_1.bias"] = b1.float().clone() if b1 is not None else torch.zeros(w1.shape[0])
        b2f = pw @ b2.float() if b2 is not None else torch.zeros(pw.shape[0])
        out["linear_2.bias"] = b2f + (pb.float() if pb is not None else 0.0)
    return out


def _apply(w: dict[str, torch.Tensor], act, x: torch.Tensor) -> torch.Tensor:
    h = act(torch.nn.functional.linear(x, w["linear_1.weight"], w.get("linear_1.bias")))
    return torch.nn.functional.linear(h, w["linear_2.weight"], w.get("linear_2.bias"))


def projector_rel_error(ref: dict, fit: dict, act: str, x: torch.Tensor, batch: int = 8192) -> float:
    """``||fit(x) - ref(x)||_F / ||ref(x)||_F`` over the rows of ``x`` ``[N, V]`` (fp32, batched)."""
    fn = ACT2FN[act]
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].float()
            y = _apply(ref, fn, xb)
            num += float((_apply(fit, fn, xb) - y).pow(2).sum())
            den += float(y.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def fit_stock_projector(
    exact: dict[str, torch.Tensor],
    act: str,
    x_fit: torch.Tensor,
    x_val: torch.Tensor | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    ridge: float = 1e-6,
    batch: int = 8192,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit a stock-shaped projector ``Linear(V,Hs) -> act -> Linear(Hs,Hs)`` to an exact one.

    ``exact``: tensors of the inner-width-``Ht`` projector (:func:`fold_projector_exact`).
    ``x_fit`` / ``x_val``: vision features ``[N, V]`` (rows = image tokens) to fit on / to
    report on (held out; default ``x_fit``).

    1. Initialise ``linear_1`` with the ``Hs`` hidden units of the exact projector that carry the
       most output (std of the unit on ``x_fit`` x norm of its column of ``linear_2``): a
       projection of the teacher's first layer onto ``Hs`` of its units.
    2. Least squares (ridge ``ridge`` x mean diagonal) for ``linear_2`` and its bias on those units.
    3. ``steps`` Adam steps (``lr`` relative to each tensor's RMS, cosine decay, minibatches of
       ``batch`` rows) on all four tensors, minimising the relative squared error.

    The result with the lower held-out error (least squares alone, or after Adam) is returned
    with a report: ``rel_error_val`` / ``rel_error_fit`` (``||fit - exact|| / ||exact||``),
    ``rel_error_lstsq_val``, ``steps``, ``units`` (indices kept), sizes. fp32 throughout.
    """
    fn = ACT2FN[act]
    dev = x_fit.device
    ref = {k: v.float().to(dev) for k, v in exact.items()}
    w1, b1 = ref["linear_1.weight"], ref.get("linear_1.bias")
    w2 = ref["linear_2.weight"]
    ht, v = w1.shape
    hs = w2.shape[0]
    if ht <= hs:
        raise ModelConfigError(f"fit_stock_projector: inner width {ht} <= {hs} folds exactly (fold_projector); nothing to fit.")
    x_fit = x_fit.float()
    x_val = x_fit if x_val is None else x_val.float().to(dev)
    bias = b1 is not None or "linear_2.bias" in ref
    with torch.no_grad():
        y = _apply(ref, fn, x_fit)
        h = fn(torch.nn.functional.linear(x_fit, w1, b1))
        score = h.std(0) * w2.norm(dim=0)
        units = torch.sort(torch.topk(score, hs).indices).values
        hsel = h[:, units]
        a = torch.cat([hsel, torch.ones(hsel.shape[0], 1, device=dev)], 1) if bias else hsel
        gram = a.T @ a
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], device=dev)
        sol = torch.linalg.solve(gram, a.T @ y)  # [Hs(+1), Hs]
    fit = {"linear_1.weight": w1[units].clone(), "linear_2.weight": sol[:hs].T.contiguous()}
    if bias:
        fit["linear_1.bias"] = (b1[units].clone() if b1 is not None else torch.zeros(hs, device=dev))
        fit["linear_2.bias"] = sol[hs].clone()
    err_ls = projector_rel_error(ref, fit, act, x_val)
    best, best_err, used = fit, err_ls, 0
    if steps > 0:
        params = {n: t.clone().requires_grad_(True) for n, t in fit.items()}
        groups = [{"params": [p], "lr": lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)} for p in params.values()]
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        g = torch.Generator(device="cpu").manual_seed(seed)
        n = x_fit.shape[0]
        y2 = y.pow(2).mean()
        for _ in range(steps):
            idx = torch.randperm(n, generator=g)[:batch].to(dev) if n > batch else slice(None)
            loss = (_apply(params, fn, x_fit[idx]) - y[idx]).pow(2).mean() / y2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        adam = {n_: p.detach() for n_, p in params.items()}
        err_adam = projector_rel_error(ref, adam, act, x_val)
        if err_adam < best_err:
            best, best_err, used = adam, err_adam, steps
    report = {
        "rel_error_val": best_err,
        "rel_error_fit": projector_rel_error(ref, best, act, x_fit),
        "rel_error_lstsq_val": err_ls,
        "steps": used,
        "fit_rows": int(x_fit.shape[0]),
        "val_rows": int(x_val.shape[0]),
        "teacher_hidden": int(ht),
        "student_hidden": int(hs),
        "units_kept": int(len(units)),
    }
    return {k_: t.cpu() for k_, t in best.items()}, report


# ----------------------------------------------------------------------------- per-family fetch support

MERGER_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
"""Families whose projector is the vision model's patch merger (``model.visual.merger``; Qwen3-VL
also every ``model.visual.deepstack_merger_list[i]``), each ending in a Linear to the text width."""

MERGER_LAST_LINEAR = {"qwen2_5_vl": "mlp.2", "qwen3_vl": "linear_fc2"}
"""The merger's final ``Linear(hidden, out_hidden_size)``: the one the adapter folds into."""

PROJECTOR_FAMILIES = ("llava", "llava_onevision")
"""Families with a LLaVA projector ``linear_2(act(linear_1(x)))`` at ``model.multi_modal_projector``."""


def fetch_support(cfg) -> str:
    """``"projector"`` / ``"merger"``: how the teacher adapter of ``cfg``'s family is fetched; raises a
    :class:`ModelConfigError` (at config time) for a family where the fetch is out of scope."""
    fam = getattr(cfg, "model_type", None)
    if fam in PROJECTOR_FAMILIES:
        return "projector"
    if fam in MERGER_FAMILIES:
        return "merger"
    if fam == "internvl":
        raise ModelConfigError(
            "teacher-adapter fetch is not supported for InternVL: its projector is LayerNorm -> Linear(V, Ht) -> GELU "
            "-> Linear(Ht, Ht), and transformers' InternVLMultiModalProjector fixes the inner width to the "
            "student's text hidden size, so the fetched projector (inner width Ht) has no export in the "
            "family's stock layout (and no custom InternVL class is shipped). Set `model.adapter_fetch: false` "
            "(the student trains its own projector)."
        )
    raise ModelConfigError(
        f"teacher-adapter fetch is not supported for model_type {fam!r}. Set `model.adapter_fetch: false`."
    )


def merger_slots(vision_config, family: str) -> list[str]:
    """Attribute paths (under ``model.visual``) of the mergers the fetch replaces."""
    slots = ["merger"]
    if family == "qwen3_vl":
        slots += [f"deepstack_merger_list.{i}" for i in range(len(getattr(vision_config, "deepstack_visual_indexes", []) or []))]
    return slots


def new_teacher_merger(family: str, teacher_vision_config, slot: str) -> nn.Module:
    """An empty merger of the teacher's shape (transformers' own class) for ``slot``."""
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

        vc = teacher_vision_config
        return Qwen2_5_VLPatchMerger(dim=vc.out_hidden_size, context_dim=vc.hidden_size, spatial_merge_size=vc.spatial_merge_size)
    if family == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

        return Qwen3VLVisionPatchMerger(teacher_vision_config, use_postshuffle_norm=slot != "merger")
    raise ModelConfigError(f"internal: no merger for family {family!r}")


class FetchedMerger(nn.Module):
    """A frozen copy of the teacher's patch merger followed by a trainable ``Linear(Ht, Hs)`` adapter.

    Same call as the merger it replaces: ``[tokens, vision hidden]`` -> ``[merged tokens, Hs]``.
    Folds exactly into the student's stock merger (its last Linear is ``hidden -> Hs``):
    ``W' = P W``, ``b' = P b + p`` (:func:`fold_merger`)."""

    def __init__(self, teacher_merger: nn.Module, teacher_hidden: int, student_hidden: int):
        super().__init__()
        self.teacher_merger = teacher_merger
        self.adapter = nn.Linear(teacher_hidden, student_hidden, bias=True)
        self.teacher_merger.requires_grad_(False)
        # read by transformers' Qwen vision code / the merger's callers
        self.hidden_size = getattr(teacher_merger, "hidden_size", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.teacher_merger(x))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_merger.train(False)
        return self


_MERGER_KEY = re.compile(r"(?:^|\.)visual\.(merger|deepstack_merger_list\.\d+)\.(.+)$")


def read_merger_weights(path: str | Path, role: str = "teacher") -> dict[str, dict[str, torch.Tensor]]:
    """``{slot: {name: tensor}}`` of a folder's merger tensors (``model.visual.merger.*``,
    ``model.visual.deepstack_merger_list.i.*``), read from its safetensors (no model load)."""
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    for f in weight_files(path, role):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                m = _MERGER_KEY.search(key)
                if m:
                    found.setdefault(m.group(1), {})[m.group(2)] = fh.get_tensor(key)
    if "merger" not in found:
        raise ModelConfigError(
            f"{role} folder {str(path)!r}: cannot fetch its merger: no '*visual.merger.*' tensors in its safetensors "
            "files. Train with adapter_fetch: false."
        )
    return found


def fold_merger(family: str, teacher: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Teacher merger tensors + adapter -> the student's stock merger tensors (fp32, exact)."""
    last = MERGER_LAST_LINEAR[family]
    out = {k: v.float().clone() for k, v in teacher.items() if not k.startswith(last + ".")}
    pw = adapter["weight"].float()
    out[last + ".weight"] = pw @ teacher[last + ".weight"].float()
    b = teacher.get(last + ".bias")
    out[last + ".bias"] = (pw @ b.float() if b is not None else torch.zeros(pw.shape[0])) + (
        adapter["bias"].float() if adapter.get("bias") is not None else 0.0)
    return out
