"""Counts of samples the loader skipped, by reason (reported by the trainer)."""

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
    "shard_read_error": "a shard could not be read (count of read errors, not of samples)",
    "shard_short": "samples missing from a shard compared with its manifest (truncated file)",
}


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
            log.warning("data: skipped sample (%s, #%d)%s", reason, c, f": {detail}" if detail else "")

    def drain(self) -> dict:
        """Counts added since the last drain (shipped with each batch from worker processes)."""
        out = dict(self._pending)
        self._pending.clear()
        return out

    def update(self, delta: dict) -> None:
        self.counts.update(delta)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"SkipStats(yielded={self.yielded}, skipped={self.as_dict()})"

    def summary(self) -> str:
        if not self.counts:
            return f"data: {self.yielded} samples, none skipped"
        parts = ", ".join(f"{k}={v}" for k, v in self.counts.most_common())
        return f"data: {self.yielded} samples, {self.total} skipped ({parts})"
