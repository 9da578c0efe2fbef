"""CheckpointManager.save on 2 real gloo ranks: a slow rank can never see a half-renamed save,
and a filesystem that is not shared is diagnosed on every rank, naming who cannot see whom."""
import json

import _launch
from _dist_fixtures import REPO

WORKER = REPO / "tests" / "_ckpt_worker.py"


def _run(tmp_path, mode, faults=""):
    rc = _launch.run(WORKER, [tmp_path, mode], nprocs=2, log_dir=tmp_path, env={"DISTILL_FAULTS": faults},
                     timeout=300)
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-2000:] for r in range(2))
    assert rc == 0, logs
    return [json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in range(2)], logs


def test_slow_rank_checks_before_rank0_renames(tmp_path):
    # Rank 1 stalls before its check until the final folder appears (or 1.5 s pass). A save that
    # let rank 0 rename first would make rank 1 miss the train states on every save, every time.
    res, logs = _run(tmp_path, "shared", "slow_check=1.5@1")
    for r in res:
        assert "error" not in r, logs
        assert r["saved"] == ["step00000001", "step00000002", "step00000003"]
        assert r["newest"] == "step00000003"
    ck = tmp_path / "checkpoints"
    kept = sorted(d.name for d in ck.iterdir() if d.is_dir())
    assert kept == ["step00000002", "step00000003"]  # keep_last=2, no .tmp left behind
    for d in kept:
        assert sorted(p.name for p in (ck / d).glob("train_state_rank*.pt")) == [
            "train_state_rank0.pt", "train_state_rank1.pt"]
    assert (ck / "latest").read_text() == "step00000003"


def test_unshared_output_dir_fails_on_every_rank_with_the_diagnosis(tmp_path):
    res, logs = _run(tmp_path, "private")
    for r in res:
        assert r["saved"] == [], r
        msg = r["error"]
        assert "rank 0 cannot see the train state of ranks [1]" in msg, msg
        assert "rank 1 cannot see the train state of ranks [0]" in msg, msg
        assert "shared by all nodes" in msg
    for node in (0, 1):  # nothing was published as complete
        assert not list((tmp_path / f"node{node}" / "checkpoints").glob("step*[0-9]"))
