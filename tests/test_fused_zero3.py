"""The fused chunked LM + KD loss under ZeRO-3 on 2 CPU ranks equals one process with the old
full-logits objective: loss terms, gradient norm and every gradient (lm_head included). The ranks
have different labelled counts, hence different numbers of loss chunks (no collective mismatch:
each head is gathered once per loss call)."""
import json
import math

import pytest

from _dist_fixtures import REPO, make_inputs
import _launch

RANKS = 2


@pytest.mark.parametrize("chunk,kind,temp", [(2, "forward_kl", 1.0), (5, "jsd", 2.0)])
def test_zero3_fused_step_equals_single_process_full_logits(tiny_models, tmp_path, chunk, kind, temp):
    make_inputs(tmp_path, tiny_models)
    rc = _launch.run(REPO / "tests" / "_fused_worker.py", [tmp_path, tmp_path / "paths.json", chunk, kind, temp],
                     nprocs=RANKS, log_dir=tmp_path, timeout=600)
    assert rc == 0, (tmp_path / "rank0.log").read_text()[-4000:]
    res = [json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in range(RANKS)]
    assert res[0]["chunks"] != res[1]["chunks"], res  # different chunk counts per rank
    ref = res[0]["reference"]
    for r in res:
        for a, b in zip(r["loss"], ref["loss"]):  # all-reduced loss, lm, kd
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (r["loss"], ref["loss"])
    assert math.isclose(res[0]["grad_norm"], ref["grad_norm"], rel_tol=1e-4), (res[0]["grad_norm"], ref["grad_norm"])
    assert math.isclose(res[0]["lm_head_grad_norm"], ref["lm_head_grad_norm"], rel_tol=1e-5)
    assert ref["lm_head_grad_norm"] > 0 and "lm_head.weight" in ref["max_rel_grad_diff"]
    for name, diff in ref["max_rel_grad_diff"].items():
        assert diff < 1e-4, (name, diff)
