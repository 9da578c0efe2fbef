"""Deterministic fault injection for tests: the run itself dies or stalls at a named point.

Off unless the environment variable ``DISTILL_FAULTS`` is set (never in production); its value is
a comma-separated list of ``point=value`` items, each scoped to one rank with ``@R``::

    DISTILL_FAULTS="kill_in_save=2@1"          rank 1 SIGKILLs itself inside the step-2 save
    DISTILL_FAULTS="slow_check=1.5@1"          rank 1 stalls (up to 1.5 s) before the visibility check

Points (``value`` is a step number unless said otherwise):

``kill_in_save``
    Inside the save of step N, after this rank wrote its part of ``stepN.tmp`` and before the
    check and rename, the rank sends itself SIGKILL (a ``kill -9`` in the middle of a save; the
    other ranks then wait at the save's barrier until the test kills them too).
``slow_check``
    In every save, before the visibility check, the rank waits until the final checkpoint folder
    exists or ``value`` seconds pass. With a correct save the rename cannot happen before every
    rank has checked, so the wait always runs out; a save that let rank 0 rename early would be
    caught every time (not sometimes).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "DISTILL_FAULTS"
POINTS = ("kill_in_save", "slow_check")


def _parse(spec: str) -> dict[tuple[str, int | None], str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition("=")
        value, _, rank = rest.partition("@")
        if name not in POINTS or not value:
            raise ValueError(f"{ENV}: bad item {item!r}; expected point=value[@rank], point in {POINTS}")
        out[(name, int(rank) if rank else None)] = value
    return out


def value(point: str, rank: int) -> str | None:
    """The configured value of ``point`` for ``rank``, or None (also when the variable is unset)."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    faults = _parse(spec)
    return faults.get((point, rank), faults.get((point, None)))


def in_save(step: int, rank: int) -> None:
    """``kill_in_save``: SIGKILL this process inside the save of ``step``."""
    v = value("kill_in_save", rank)
    if v is not None and int(v) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def before_check(rank: int, final: Path) -> None:
    """``slow_check``: stall this rank until ``final`` exists or the given seconds pass."""
    v = value("slow_check", rank)
    if v is None:
        return
    deadline = time.monotonic() + float(v)
    while not final.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
