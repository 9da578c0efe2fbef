"""One LLaVA record -> ``input_ids``, ``labels``, ``pixel_values`` with the model's own processor.

Labels cover the assistant turns only. They are found without any token offset: the conversation
is rendered with the processor's chat template once per assistant turn boundary (prefix with the
generation prompt, prefix including the answer); the character span in between is the answer
(trailing whitespace excluded, end-of-turn marker included). The full rendering is tokenized once
with offsets, and a token is a label iff it starts inside an answer span. So any prefix-stable chat
template works (checked; a template that is not prefix-stable raises ``TemplateError``).

Families (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL; ``distill.data.families``, recognised from
the processor class): the conversation is rendered with the template's own image item (list
content; Qwen writes ``<|vision_start|><|image_pad|><|vision_end|>``), and the family's processor is
run on that full text with the image, so it expands the one placeholder to as many tokens as this
image needs; the expansion must leave every other token unchanged (checked, else ``TemplateError``)
and carries no labels. Its other outputs are kept in ``Encoded.extras`` (per-image keys as the
processor returns them for one image, per-token ones like ``mm_token_type_ids [L]``, zeros for a
text-only sample). Truncation keeps the whole image block including end markers right after it
(``<|vision_end|>``): a block past ``max_length`` is skipped as ``image_truncated``.

LLaVA images: the processor is run on the image with its bare image placeholder as text; the token
sequence it returns (e.g. 64 image tokens, plus any wrapper tokens a processor adds) replaces the
single placeholder token of the text. Visual positions are later read as
``input_ids == image_token_id``. Image bytes are decoded to 8-bit RGB by ``decode_image``, which
scales high-bit-depth modes (16-bit greyscale PNGs) instead of clipping them to white.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import torch

from data_prep.images import to_rgb
from data_prep.shards import IMAGE_EXTS

from distill.config import DataConfigError

from . import families as fam

IMAGE_PLACEHOLDER = "<image>"  # as written in LLaVA JSON
ROLE_MAP = {"human": "user", "gpt": "assistant"}
IGNORE_INDEX = -100
FAMILY_PROBE_SIZE = (32, 32)  # (w, h) of the image ``image_length_floor`` sizes a family's shortest sample with


class TemplateError(DataConfigError):
    """The processor / chat template cannot be used for training (configuration, not data)."""


class SkipSample(Exception):
    """A sample is unusable; ``reason`` is a key of ``stats.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Encoded:
    """One encoded sample. ``input_ids``/``labels``: ``[L] long``; ``pixel_values``: ``[3,H,W]`` or None."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    key: str = ""
    truncated: bool = False
    """Text after ``max_length`` was cut (the loader counts it as ``text_truncated``)."""
    extras: dict | None = None
    """Family samples only (``distill.data.families``): the image's other model inputs in their per-image
    form (e.g. ``image_grid_thw [1,3]``) and per-token ones (``mm_token_type_ids [L]``); None for LLaVA."""


def decode_image(data: bytes) -> Any:
    """Image bytes -> 8-bit RGB PIL image (high-bit-depth modes scaled, see ``data_prep.images``)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(im)  # convert("RGB") would clip 16-bit greyscale to almost pure white


class SampleEncoder:
    """Turns raw WebDataset samples (``{"__key__", "json": bytes, "<ext>": bytes}``) into ``Encoded``.

    Built once from the processor and checked eagerly (pad token, image token, chat template), so a
    misconfigured processor fails at ``build_loader`` time with a message, not inside a worker.
    """

    def __init__(self, processor: Any, max_length: int, drop_text_only: bool = False) -> None:
        self.processor = processor
        tok = getattr(processor, "tokenizer", None)
        if tok is None:
            raise TemplateError("the processor has no .tokenizer; pass the model's AutoProcessor")
        self.tokenizer = tok
        self.max_length = max_length
        self.drop_text_only = drop_text_only
        self.image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tok.unk_token_id:
            raise TemplateError(f"the tokenizer has no token for the image placeholder {self.image_token!r}")
        if tok.pad_token_id is None:
            raise TemplateError("the tokenizer has no pad token; set tokenizer.pad_token before training")
        self.pad_token_id = int(tok.pad_token_id)
        self.chat_template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
        if not self.chat_template:
            raise TemplateError("neither the processor nor the tokenizer has a chat_template")
        if not getattr(tok, "is_fast", False):
            raise TemplateError("a fast tokenizer (offset mapping) is required to mask labels")
        self._list_content = False  # decided by the probe below
        self.family = fam.family_of(processor)
        """None (LLaVA: fixed-size images, cached expansion) or a ``families.MODEL_INPUTS`` key: the
        processor expands the placeholder of the full rendered text itself (count depends on the image)."""
        self.model_inputs = fam.MODEL_INPUTS[self.family] if self.family else ("pixel_values",)
        self._end_markers = fam.end_marker_ids(processor) if self.family else set()
        self._expansions: dict[tuple[int, int], list[int]] = {}  # image size -> placeholder expansion
        self._probe()

    # ---- template ---------------------------------------------------------------------------------
    def _messages(self, conversations: list[dict]) -> list[dict]:
        msgs = []
        for turn in conversations:
            text = turn["value"].replace(IMAGE_PLACEHOLDER, self.image_token)
            if self._list_content:
                content = []
                for i, piece in enumerate(text.split(self.image_token)):
                    if i:
                        content.append({"type": "image"})
                    if piece:
                        content.append({"type": "text", "text": piece})
                text = content
            msgs.append({"role": ROLE_MAP[turn["from"]], "content": text})
        return msgs

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _probe(self) -> None:
        """Pick string vs list content (whichever renders the text and the placeholder), then check
        prefix stability on a two-turn conversation."""
        conv = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nprobe question"},
                {"from": "gpt", "value": "probe answer"},
                {"from": "human", "value": "second question"}, {"from": "gpt", "value": "second answer"}]
        errors = []
        # families: the template's own image item first (Qwen wraps it in vision start/end markers)
        for list_content in ((True, False) if self.family else (False, True)):
            self._list_content = list_content
            try:
                text = self.render(self._messages(conv), False)
            except Exception as e:  # template engines raise anything
                errors.append(f"{'list' if list_content else 'string'} content: {type(e).__name__}: {e}")
                continue
            if all(s in text for s in ("probe question", "probe answer", "second answer")) and text.count(self.image_token) == 1:
                self.answer_spans(self._messages(conv))  # raises TemplateError if not prefix-stable
                return
            errors.append(f"{'list' if list_content else 'string'} content: rendered text lacks the turns or the image token")
        raise TemplateError("the chat template cannot render LLaVA conversations: " + "; ".join(errors))

    def answer_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render ``messages``; return ``(text, [(start, end) char spans of assistant answers])``."""
        full = self.render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], True)
            after = self.render(messages[: i + 1], False)
            if not (full.startswith(after) and after.startswith(before)):
                raise TemplateError(
                    "the chat template is not prefix-stable (rendering a conversation prefix does not give a "
                    "prefix of the full rendering), so assistant turns cannot be located; use a template "
                    "without history-dependent rewriting"
                )
            end = len(after.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        return full, spans

    # ---- samples ------------------------------------------------------------------------------------
    def _image_inputs(self, image: Any) -> tuple[list[int], torch.Tensor]:
        """``(token expansion of one placeholder, pixel_values [3,H,W])`` for a PIL image.

        The expansion comes from the full processor (image + bare placeholder text) and is cached by
        the image's size, which is all it depends on; cached sizes only run the image processor."""
        expansion = self._expansions.get(image.size)
        if expansion is None or not hasattr(self.processor, "image_processor"):
            out = self.processor(images=[image], text=[self.image_token], add_special_tokens=False, return_tensors="pt")
            expansion = out["input_ids"][0].tolist()
            if self.image_token_id not in expansion:
                raise TemplateError("the processor's image expansion holds no image token")
            if len(self._expansions) < 4096:
                self._expansions[image.size] = expansion
            return expansion, out["pixel_values"][0]
        return expansion, self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def encode(self, raw: dict) -> Encoded:
        """Raw WebDataset sample -> ``Encoded``; raises ``SkipSample`` for unusable data."""
        try:
            rec = json.loads(raw["json"])
            conversations = rec["conversations"]
            messages = self._messages(conversations)
        except Exception as e:  # any malformation of the record
            raise SkipSample("bad_record", f"{raw.get('__key__')}: {type(e).__name__}: {e}") from None
        key = str(raw.get("__key__", ""))
        image = None
        if rec.get("image") is not None:
            data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
            if data is None:
                raise SkipSample("missing_image", key)
            try:
                image = decode_image(data)
            except Exception as e:
                raise SkipSample("image_decode_error", f"{key}: {type(e).__name__}: {e}") from None
        elif self.drop_text_only:
            raise SkipSample("text_only_dropped", key)
        return self.encode_messages(messages, image, key)

    def probe_image_size(self) -> tuple[int, int]:
        """``(width, height)`` the image processor is configured for (224x224 when it does not say)."""
        ip = getattr(self.processor, "image_processor", None)
        size = getattr(ip, "size", None) or {}
        get = size.get if hasattr(size, "get") else (lambda k: getattr(size, k, None))
        h = get("height") or get("shortest_edge") or 224
        w = get("width") or get("shortest_edge") or h
        return int(w), int(h)

    def image_length_floor(self) -> tuple[int, int, tuple[int, int]]:
        """``(image tokens, shortest image-sample length, probe size)`` for one image of the
        processor's configured size: the length is the template's tokens up to and including the
        image tokens plus one answer token, for a question that is only the image and a one-character
        answer. Any image sample needs at least that many tokens of ``max_length`` (the loader checks
        it at build time)."""
        from PIL import Image

        size = self.probe_image_size() if not self.family else FAMILY_PROBE_SIZE
        msgs = self._messages([{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": "a"}])
        text, spans = self.answer_spans(msgs)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        first_label = next(i for i, (start, _e) in enumerate(enc["offset_mapping"]) if any(s <= start < e for s, e in spans))
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if self.family:  # the smallest usual image: larger ones need more (skipped as image_truncated)
            new, k, _ = self._expand(text, ids, where[0], Image.new("RGB", size))
            n_image = sum(t == self.image_token_id for t in new)
            return n_image, first_label + (k - 1 if where[0] < first_label else 0) + 1, size
        expansion, _ = self._image_inputs(Image.new("RGB", size))
        n_image = sum(t == self.image_token_id for t in expansion)
        extra = len(expansion) - 1 if where and where[0] < first_label else 0
        return n_image, first_label + extra + 1, size

    def encode_messages(self, messages: list[dict], image: Any = None, key: str = "") -> Encoded:
        """Chat messages (+ optional PIL image) -> ``Encoded`` (see module docstring)."""
        text, spans = self.answer_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [
            tid if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tid, (start, _end) in zip(ids, enc["offset_mapping"])
        ]
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if self.family:
            return self._encode_family(text, ids, labels, where, image, key)
        pixel_values = None
        _check_image_tokens(where, image, key)
        if image is not None:
            try:
                expansion, pixel_values = self._image_inputs(image)
            except TemplateError:
                raise
            except Exception as e:
                raise SkipSample("image_processor_error", f"{key}: {type(e).__name__}: {e}") from None
            p = where[0]
            ids = ids[:p] + expansion + ids[p + 1:]
            labels = labels[:p] + [IGNORE_INDEX] * len(expansion) + labels[p + 1:]
            if p + len(expansion) > self.max_length:
                raise SkipSample("image_truncated", f"{key}: image tokens end at {p + len(expansion)} > max_length {self.max_length}")
        truncated = len(ids) > self.max_length
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise SkipSample("no_labels", f"{key}: no assistant token within max_length {self.max_length}")
        return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), pixel_values, key,
                       truncated)

    # ---- families (distill.data.families) -------------------------------------------------------------
    def _expand(self, text: str, ids: list[int], p: int, image: Any) -> tuple[list[int], int, dict]:
        """Run the family's processor on the full rendered ``text`` with ``image``; return ``(expanded
        ids, expansion length k, processor output)``: ``ids[p]`` (the one placeholder) became ``k``
        tokens, everything else is unchanged (checked)."""
        out = self.processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")
        new = out["input_ids"][0].tolist()
        k = len(new) - len(ids) + 1
        if k < 1 or new[:p] != ids[:p] or new[p + k:] != ids[p + 1:] or self.image_token_id not in new[p:p + k]:
            raise TemplateError(
                f"the {type(self.processor).__name__} expansion of the image placeholder changed tokens outside it "
                "(or holds no image token); the data layer cannot align labels with it"
            )
        return new, k, out

    def _encode_family(self, text: str, ids: list[int], labels: list[int], where: list[int], image: Any,
                       key: str) -> Encoded:
        """Family path of ``encode_messages``: the processor's own expansion of the image placeholder.

        The protected image block is the expansion plus any end markers right after it (Qwen's
        ``<|vision_end|>``; start markers precede it): a sample whose block ends past ``max_length`` is
        skipped (``image_truncated``), text after it is cut as in the LLaVA path."""
        keys = [k for k in self.model_inputs if k != "pixel_values"]
        extras: dict = {}
        pixel_values = None
        _check_image_tokens(where, image, key)
        if image is not None:
            p = where[0]
            try:
                ids, k, out = self._expand(text, ids, p, image)
            except TemplateError:
                raise
            except Exception as e:
                raise SkipSample("image_processor_error", f"{key}: {type(e).__name__}: {e}") from None
            labels = labels[:p] + [IGNORE_INDEX] * k + labels[p + 1:]
            end = p + k
            while end < len(ids) and ids[end] in self._end_markers:
                end += 1
            if end > self.max_length:
                raise SkipSample("image_truncated", f"{key}: image block ends at {end} > max_length {self.max_length}")
            pixel_values = fam.split_per_image(self.family, "pixel_values", out["pixel_values"])
            for name in keys:
                if name not in out:
                    raise TemplateError(f"{type(self.processor).__name__} returned no {name!r} (have {sorted(out)})")
                extras[name] = fam.split_per_image(self.family, name, out[name])
        for name in keys:
            if fam.LAYOUT[self.family][name] == "seq":
                seq = extras.get(name)
                extras[name] = (torch.zeros(len(ids), dtype=torch.long) if seq is None else seq.long())[: self.max_length]
        truncated = len(ids) > self.max_length
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise SkipSample("no_labels", f"{key}: no assistant token within max_length {self.max_length}")
        return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), pixel_values, key,
                       truncated, extras)


def _check_image_tokens(where: list[int], image, key: str) -> None:
    """One image placeholder for a sample with an image, none without: else a counted skip."""
    if image is None and where:
        raise SkipSample("image_token_mismatch", f"{key}: text-only sample with {len(where)} image tokens")
    if image is not None and len(where) != 1:
        raise SkipSample("image_token_mismatch", f"{key}: {len(where)} image placeholders (need 1)")
