"""Fused attention for HF text models, with exact visual-attention capture on chosen layers.

``install(model, backend)`` registers ``distill_<backend>`` with transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask
function) and points the text model's config at it.  Every layer then runs a fused kernel from
:mod:`distill.attention.kernels`; that is all a layer does unless it is being captured.

``AttentionCapture(model, layers)`` adds a forward pre-hook on the chosen decoder layers.  Inside
``with cap.record(vis_pos, valid) as rec:`` the hook passes a small capture token down the
layer's kwargs (HF forwards ``**kwargs`` from the decoder layer to the attention function).  The
attention function then also forms the visual block ``P`` with
:func:`distill.attention.visual_attention_probs` from the kernel's LSE, averages heads and hands
the ``[B, n, n]`` map to the token.

Activation checkpointing (non-reentrant): the recompute in backward must run the same ops as the
original forward (the checkpoint's saved-tensor bookkeeping counts them) and must not collect
again. transformers versions differ in where the pre-hook runs: some checkpoint
``partial(forward, **kwargs)`` with the hook outside (the recompute reuses the kwargs, token
included), others checkpoint ``partial(Module.__call__, **kwargs)`` so the hook runs again inside
the recompute, possibly after the record context has closed. The hook therefore remembers, per
layer, the token it gave and the hidden-state tensor it was given: a call with that very tensor
object is the recompute of that forward (checkpointing passes the saved inputs back unchanged)
and gets the same token, whatever the record state. The token ignores the second delivery.

Masks: with no padding, or right padding and no KV cache, the mask function returns ``None`` and
a dense causal kernel is used; valid rows never see pad keys, so this is exact for them (pad rows
are masked out of every loss). Finding that out from the mask costs a host sync per forward; the
training loop knows it from the collate step (its batches are right-padded) and says so with
``with right_padded():`` around the forwards, which skips the check.  Anything else (left padding, packed sequences, sliding windows,
a KV cache with padding) gets an explicit 4D boolean mask and goes through PyTorch SDPA; capture
refuses that case with a clear error.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    flash_attention_mask,
    sdpa_mask,
)

from distill.attention.kernels import attention_with_lse, check_backend, expand_kv
from distill.attention.visual import IMPLS, visual_attention_probs

__all__ = ["AttentionCapture", "Recording", "install", "right_padded", "text_decoder_layers", "implementation_name"]

_TOKEN_KEY = "distill_capture"
_PREFIX = "distill_"


def implementation_name(backend: str) -> str:
    """The name registered with transformers for ``backend`` (``"auto"`` included)."""
    check_backend(backend)
    return _PREFIX + backend


# ----------------------------------------------------------------------------- capture token


@dataclass
class _Session:
    vis_pos: torch.Tensor  # (B, n) long, -1 padding
    valid: torch.Tensor | None  # (B,) bool
    key_len: int | None = None  # host int >= max(vis_pos) + 1 (collate-time), bounds the op's key loops
    maps: dict = field(default_factory=dict)  # layer_idx -> (B, n, n)


class _Token:
    """Travels in a decoder layer's kwargs; a checkpoint recompute gets the same object."""

    __slots__ = ("session", "layer_idx", "chunk_size", "impl", "delivered")

    def __init__(self, session: _Session, layer_idx: int, chunk_size: int | None, impl: str):
        self.session = session
        self.layer_idx = layer_idx
        self.chunk_size = chunk_size
        self.impl = impl
        self.delivered = False

    def deliver(self, head_mean: torch.Tensor) -> None:
        if not self.delivered:  # a checkpoint recompute runs the same ops but never collects again
            self.session.maps[self.layer_idx] = head_mean
            self.delivered = True


# ----------------------------------------------------------------------------- registered functions

_RIGHT_PADDED: contextvars.ContextVar[bool] = contextvars.ContextVar("distill_right_padded", default=False)


@contextlib.contextmanager
def right_padded():
    """Declare that the forwards inside run right-padded (or unpadded) batches without a KV cache.

    The mask function then returns ``None`` (dense causal kernel) without reading the mask, which
    would sync the host on every forward. Only declare it for batches that are right-padded, as
    ``distill.data`` collates them: a left-padded batch inside would let valid rows attend to pad
    keys.
    """
    tok = _RIGHT_PADDED.set(True)
    try:
        yield
    finally:
        _RIGHT_PADDED.reset(tok)


def _fused_mask(
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask=None,
    **kwargs,
):
    """``None`` when a dense causal kernel is exact for valid rows, else a 4D bool mask."""
    if mask_function is causal_mask_function and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        if _RIGHT_PADDED.get() and (attention_mask is None or attention_mask.shape[-1] == kv_length):
            return None  # declared by the caller (collate-time fact): no look at the mask, no sync
        mask2d = flash_attention_mask(
            batch_size, q_length, kv_length, attention_mask=attention_mask, mask_function=mask_function
        )
        if mask2d is None:
            return None
        if mask2d.shape[1] == kv_length and not bool((mask2d[:, 1:] & ~mask2d[:, :-1]).any()):
            return None  # right padding: valid rows never see pad keys under causal attention
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        **kwargs,
    )


def _masked_sdpa(module, query, key, value, mask, scaling):
    """General path: explicit boolean mask [B|1, 1, Tq, Tk] through PyTorch SDPA."""
    groups = query.shape[1] // key.shape[1]
    key, value = expand_kv(key, groups), expand_kv(value, groups)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask > -1  # additive float mask: 0 keeps, large negative drops
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def _fused_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    backend: str = "auto",
    **kwargs,
):
    """HF attention function: q [B,Hq,T,D], k/v [B,Hk,T,D] -> (out [B,T,Hq,D], None)."""
    token = kwargs.get(_TOKEN_KEY)
    if dropout and module.training:
        raise ValueError(
            f"attention dropout {dropout} is not supported by the fused capture path; set attention_dropout=0"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or q_len != kv_len:
        if token is not None:
            raise ValueError(
                "attention capture needs right-padded (or unpadded) batches without a KV cache, packing or "
                "sliding windows; this forward got an explicit mask. Right-pad the batch."
            )
        mask = attention_mask
        if mask is None:  # KV cache without padding: bottom-right causal
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        return _masked_sdpa(module, query, key, value, mask, scaling), None

    out, lse = attention_with_lse(query, key, value, scale=scaling, causal=True, backend=backend)
    if token is not None:
        # (B, n, n): heads averaged inside the op, one KV group's maps at a time (it checks vis_pos against q)
        ses = token.session
        token.deliver(visual_attention_probs(query, key, lse, ses.vis_pos, scaling, token.chunk_size, head_mean=True,
                                             impl=token.impl, key_len=ses.key_len))
    return out, None


_REGISTERED: set[str] = set()


def _register(backend: str) -> str:
    name = implementation_name(backend)
    if name not in _REGISTERED:
        AttentionInterface.register(name, partial(_fused_attention, backend=backend))
        AttentionMaskInterface.register(name, _fused_mask)
        _REGISTERED.add(name)
    return name


# ----------------------------------------------------------------------------- model helpers


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (module with ``.layers`` and ``.config``) of a LLaVA or causal LM."""
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(Exception):
            candidates.append(get_decoder())
    candidates += [
        getattr(getattr(model, "model", None), "language_model", None),
        getattr(model, "language_model", None),
        getattr(model, "model", None),
        model,
    ]
    for cand in candidates:
        layers = getattr(cand, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return cand
    raise ValueError(
        f"could not find the text decoder layers of {type(model).__name__}; expected a LLaVA-style model "
        "or a causal LM with `.model.layers[i].self_attn`"
    )


def text_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The text model's decoder layers (``layers[i].self_attn.layer_idx == i``)."""
    return _text_model(model).layers


def install(model: torch.nn.Module, backend: str = "auto") -> str:
    """Run the model's text attention through the fused kernels (capture-ready).

    Returns the registered implementation name set on the text model's config.  The vision tower
    keeps its own attention implementation.
    """
    name = _register(backend)
    text = _text_model(model)
    text.config._attn_implementation = name
    return name


# ----------------------------------------------------------------------------- capture


class Recording:
    """What one ``record()`` collected. ``maps`` is ``[L, B, n, n]`` in the capture's layer order."""

    def __init__(self, session: _Session, layers: list[int]):
        self._session = session
        self.layers = list(layers)
        self.vis_pos = session.vis_pos
        self.valid = session.valid
        self._stacked: torch.Tensor | None = None

    @property
    def maps(self) -> torch.Tensor:
        if self._stacked is not None:
            return self._stacked
        missing = [i for i in self.layers if i not in self._session.maps]
        if missing:
            raise RuntimeError(
                f"no visual attention was captured for layer(s) {missing}: did the forward run inside record(), "
                "and was install(model) called so the fused attention function is used?"
            )
        self._stacked = torch.stack([self._session.maps[i] for i in self.layers])
        self._session.maps.clear()  # keep one copy only (a recompute never delivers again)
        return self._stacked


class AttentionCapture:
    """Capture head-averaged visual attention of chosen text layers.

    Args:
        model: LLaVA-style model or causal LM (the module itself, not a DeepSpeed engine; the
            engine's ``.module`` works too).  ``install(model)`` must have been called.
        layers: text layer indices to capture, in the order ``rec.maps`` returns them.
        chunk_size: visual query rows per backward strip (see ``visual_attention_probs``).
        impl: the visual op's implementation, ``"auto"``, ``"triton"`` or ``"torch"``.

    Usage::

        cap = AttentionCapture(model, [1, 2])
        with cap.record(vis_pos, valid) as rec:   # vis_pos [B,n] long, valid [B] bool
            out = model(**batch)
        maps = rec.maps                           # [L, B, n, n]
    """

    def __init__(self, model: torch.nn.Module, layers, chunk_size: int | None = None, impl: str = "auto"):
        self.model = model
        self.text = _text_model(model)
        depth = len(self.text.layers)
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"capture layers {layers} must be distinct indices in [0, {depth})")
        self.layers = layers
        self.chunk_size = chunk_size
        if impl not in IMPLS:  # device-dependent checks come with the first forward (resolve_impl)
            raise ValueError(f"unknown visual attention impl {impl!r}; choose one of {IMPLS}")
        self.impl = impl
        self._session: _Session | None = None
        self._last: dict[int, tuple[weakref.ref, _Token]] = {}  # layer -> (its input, token): recompute
        # the attention function knows a layer by its self_attn.layer_idx: key the maps by that
        self._layer_ids = [getattr(self.text.layers[i].self_attn, "layer_idx", i) for i in layers]
        self._handles = [
            self.text.layers[i].register_forward_pre_hook(partial(self._pre_hook, idx), with_kwargs=True)
            for i, idx in zip(layers, self._layer_ids)
        ]

    def _pre_hook(self, layer_idx, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        last = self._last.get(layer_idx)
        if last is not None and hidden is not None and last[0]() is hidden:
            token = last[1]  # a checkpoint recompute of the forward that got this token
        elif self._session is None:
            return None
        else:
            token = _Token(self._session, layer_idx, self.chunk_size, self.impl)
            if isinstance(hidden, torch.Tensor):
                self._last[layer_idx] = (weakref.ref(hidden), token)
        kwargs[_TOKEN_KEY] = token
        return args, kwargs

    @contextlib.contextmanager
    def record(self, vis_pos: torch.Tensor, valid: torch.Tensor | None = None, key_len: int | None = None):
        """Collect maps of the forwards run inside the block (the last forward wins per layer).

        ``vis_pos`` [B, n] long (-1 padding), ``valid`` [B] bool, ``key_len`` an optional host int
        >= max(vis_pos) + 1 known at collate time (see ``visual_attention_probs``)."""
        impl = getattr(self.text.config, "_attn_implementation", None)
        if not (isinstance(impl, str) and impl.startswith(_PREFIX)):
            raise RuntimeError(
                f"the text model uses attention implementation {impl!r}; call distill.attention.install(model) "
                "before capturing"
            )
        if self._session is not None:
            raise RuntimeError("record() is already active on this AttentionCapture")
        if vis_pos.dim() != 2:
            raise ValueError(f"vis_pos must be [B, n], got shape {tuple(vis_pos.shape)}")
        if valid is not None and (valid.dim() != 1 or valid.shape[0] != vis_pos.shape[0]):
            raise ValueError(f"valid must be [B]={vis_pos.shape[0]} bool, got shape {tuple(valid.shape)}")
        session = _Session(vis_pos=vis_pos.long(), valid=None if valid is None else valid.bool(), key_len=key_len)
        self._session = session
        try:
            yield Recording(session, self._layer_ids)
        finally:
            self._session = None

    def remove(self) -> None:
        """Remove the hooks (the model keeps the fused attention)."""
        for h in self._handles:
            h.remove()
        self._handles = []

