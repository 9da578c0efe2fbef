"""distill.subproc.run_logged: exit status and log, and a timeout that kills the whole process group."""

import sys
import time

from distill.subproc import run_logged


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (FileNotFoundError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def test_run_logged_status_and_log(tmp_path):
    r = run_logged([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], tmp_path / "logs" / "a.log", 60)
    assert r["rc"] == 3 and r["log"] == str(tmp_path / "logs" / "a.log")
    assert (tmp_path / "logs" / "a.log").read_text().strip() == "hello"


def test_run_logged_timeout_kills_grandchildren(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the child starts a grandchild (as the deepspeed launcher starts its ranks) and waits on it
    cmd = ["bash", "-c", f"sleep 600 & echo $! > {pid_file}; wait"]
    r = run_logged(cmd, tmp_path / "b.log", 1)
    assert r["rc"] == "timeout"
    pid = int(pid_file.read_text())
    for _ in range(100):  # the kill is sent before run_logged returns; reaping may take a moment
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "the grandchild outlived the timeout"
