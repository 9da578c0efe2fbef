"""``BatchStream``: the endless micro-batches of one rank, with the data position to checkpoint."""
from __future__ import annotations

__all__ = ["BatchStream"]


class BatchStream:
    """Endless micro-batches of one rank, epoch after epoch of a ``distill.data`` loader.

    The loader keeps the data position (``state_dict``: epoch, batches handed out) and advances
    the epoch when one is exhausted; every rank gets the same number of batches per epoch."""

    def __init__(self, loader, rank: int):
        self.loader = loader
        self.rank = rank
        self._it = None

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError(f"rank {self.rank}: the data loader yields no batches "
                           "(no shards for this rank, or every sample was skipped)")

    @property
    def skipped(self) -> dict[str, int]:
        """Counts of this rank by reason (cumulative over epochs and resumes): skipped samples,
        shard read errors and truncated samples alike (see ``distill.data.stats``)."""
        stats = getattr(self.loader, "stats", None)
        return stats.as_dict() if stats is not None else {}

    def data_counts(self) -> tuple[int, int, int]:
        """(skipped samples, shard read errors, samples truncated at max_length) of this rank."""
        stats = getattr(self.loader, "stats", None)
        return (stats.total, stats.read_errors, stats.truncated) if stats is not None else (0, 0, 0)

    def state(self) -> dict:
        return {"loader": self.loader.state_dict(), "skipped": self.skipped}

    def load_state(self, st: dict):
        self.loader.load_state_dict(st["loader"])
        self._it = None
        stats = getattr(self.loader, "stats", None)
        if stats is not None and st.get("skipped"):
            stats.counts.clear()
            stats.update(st["skipped"])
