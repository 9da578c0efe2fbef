"""launch/gpu_check.py --dry-run: its sections run on CPU at tiny shapes and write the report.

One subprocess (the script sets TRITON_INTERPRET=1 for itself, so the triton path runs in the
interpreter there and never in this process).  The real run needs a GPU; this only proves the
plumbing (both impls through the parity / timing / sync sections, the JSON and markdown
writers).  The ``bench`` and ``pytest`` sections only wrap subprocesses and are left out to keep
this test short (launch/bench.py's CPU children alone take a minute or more on this machine);
``python launch/gpu_check.py --out DIR --dry-run --sections bench pytest`` checks the flags they
pass (run when the script was written).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    sections = ["versions", "parity", "op_timing", "sync_debug"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "gpu_check.py"), "--out", str(out), "--dry-run",
                           "--sections", *sections], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    secs = report["sections"]
    assert list(secs) == sections
    bad = {k: v.get("error") or v.get("result") for k, v in secs.items() if v["status"] != "ok"}
    assert not bad and proc.returncode == 0, (bad, proc.stderr[-3000:])
    assert secs["versions"]["result"]["impl_triton"] == "triton"  # the interpreter path was exercised
    impls = {c["case"].split()[-2] for c in secs["parity"]["result"]["cases"]}
    assert impls == {"torch", "triton"}
    assert any("agreement" in r for r in secs["op_timing"]["result"]["rows"])
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Versions", "## Parity", "## Op time per layer", "## Host syncs"):
        assert heading in md
