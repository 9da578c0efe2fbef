"""Start N local ranks of a Python script the way a launcher would (env vars), for CPU tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(script, args=(), nprocs: int = 2, log_dir=None, env=None) -> list[subprocess.Popen]:
    """Start ``nprocs`` ranks of ``python script args`` in one new process group (rank 0 leads).

    stdout/stderr of rank r go to ``log_dir/rank{r}.log`` when log_dir is given."""
    port = free_port()
    procs = []
    pgid = None
    for r in range(nprocs):
        e = dict(os.environ)
        e.update({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs),
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu",
                  "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
        e.update(env or {})
        out = open(Path(log_dir) / f"rank{r}.log", "ab") if log_dir else None
        p = subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=str(REPO), env=e,
                             stdout=out, stderr=subprocess.STDOUT if out else None,
                             process_group=0 if pgid is None else pgid)
        if pgid is None:
            pgid = p.pid
        procs.append(p)
    return procs


def run(script, args=(), nprocs: int = 2, log_dir=None, env=None, timeout: float = 600) -> int:
    """Run to completion; returns the worst exit code (kills the group on timeout)."""
    procs = spawn(script, args, nprocs, log_dir, env)
    rcs = []
    try:
        for p in procs:
            rcs.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        kill_group(procs)
        raise
    return max(rcs, key=abs)


def kill_group(procs, sig=9):
    try:
        os.killpg(procs[0].pid, sig)
    except ProcessLookupError:
        pass
    for p in procs:
        p.wait()
