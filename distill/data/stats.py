"""Counts of what the loader skipped or changed, by reason (reported by the trainer).

Three kinds, kept apart in every report: samples *skipped* (``SKIP_REASONS``), shard *read errors*
(``READ_ERRORS``: events, not samples) and samples kept but *truncated* by ``data.max_length``
(``TRUNCATED``: text after the limit is dropped, the sample still trains).
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("distill.data")

# reason -> what it means (shown in summaries)
SKIP_REASONS = {
    "bad_record": "the sample's .json record is missing or unparseable",
    "missing_image": "the record names an image but the sample has no image member",
    "image_decode_error": "the image bytes did not decode",
    "image_processor_error": "the processor failed on the image",
    "image_token_mismatch": "the encoded text does not hold exactly one image placeholder per image",
    "image_truncated": "max_length would cut the image tokens",
    "no_labels": "no assistant token left to learn from (after truncation)",
    "text_only_dropped": "text-only sample dropped (drop_text_only)",
}
READ_ERRORS = {
    "shard_read_error": "a shard could not be read (count of read errors, not of samples)",
    "shard_short": "samples missing from a shard compared with its manifest (truncated file)",
}
TRUNCATED = "text_truncated"
"""Reason key of samples kept with their text cut at ``data.max_length``."""


class SkipStats:
    """Counter of skipped samples by reason plus the number of samples yielded."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.yielded = 0
        self._pending: Counter = Counter()  # delta not yet shipped from a worker

    def add(self, reason: str, detail: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        self._pending[reason] += n
        c = self.counts[reason]
        if c <= 5 or c % 1000 == 0:  # rate-limited warning: first few, then every 1000th
            what = ("shard read error" if reason in READ_ERRORS else
                    "truncated sample" if reason == TRUNCATED else "skipped sample")
            log.warning("data: %s (%s, #%d)%s", what, reason, c, f": {detail}" if detail else "")

    def drain(self) -> dict:
        """Counts added since the last drain (shipped with each batch from worker processes)."""
        out = dict(self._pending)
        self._pending.clear()
        return out

    def update(self, delta: dict) -> None:
        self.counts.update(delta)

    @property
    def total(self) -> int:
        """Skipped samples (read errors and truncations are not samples lost)."""
        return sum(v for k, v in self.counts.items() if k not in READ_ERRORS and k != TRUNCATED)

    @property
    def read_errors(self) -> int:
        return sum(self.counts[k] for k in READ_ERRORS)

    @property
    def truncated(self) -> int:
        return self.counts[TRUNCATED]

    def as_dict(self) -> dict:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"SkipStats(yielded={self.yielded}, skipped={self.as_dict()})"

    def summary(self) -> str:
        def part(keys):
            return ", ".join(f"{k}={v}" for k, v in self.counts.most_common() if k in keys and v)

        skipped = [k for k in self.counts if k not in READ_ERRORS and k != TRUNCATED]
        out = f"data: {self.yielded} samples, {self.total} skipped" + (f" ({part(skipped)})" if self.total else "")
        if self.truncated:
            out += f", {self.truncated} truncated at max_length (kept)"
        if self.read_errors:
            out += f", {self.read_errors} shard read errors ({part(READ_ERRORS)})"
        return out
