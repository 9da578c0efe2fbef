"""Run a child command with its output in a log file and a wall-clock limit that kills its whole
process group (a ``deepspeed`` launcher's ranks included), for the GPU check scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def run_logged(cmd, log: str | os.PathLike, timeout: float, env=None, cwd=None) -> dict:
    """Run ``cmd`` with stdout and stderr to ``log``; returns ``{"rc", "seconds", "log"}``.

    ``rc`` is the exit status, or ``"timeout"`` once ``timeout`` seconds (at least 1) have passed, at
    which point the child's whole process group has been killed."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        p = subprocess.Popen([str(c) for c in cmd], cwd=None if cwd is None else str(cwd), env=env, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": str(log)}
