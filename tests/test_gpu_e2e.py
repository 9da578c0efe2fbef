"""launch/gpu_e2e.py: the real-shape pair's configs, the report's arithmetic, and the CPU dry run of
every phase (deepspeed launcher, ZeRO-3 stage 3 killed inside its final save, resume, the run
without the attention term, export, stock reload + generate) at tiny shapes."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _e2e():
    spec = importlib.util.spec_from_file_location("gpu_e2e", ROOT / "launch" / "gpu_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_preset_shapes_and_pair_check(tmp_path):
    """The real preset's configs: Qwen1.5-1.8B / 4B-class text decoders, 729 image tokens from a
    384-px SigLIP-so400m/14, Qwen's vocabulary rows; the folders pass the pair check with adapter
    fetch (config-only folders, no weights written)."""
    from transformers import LlavaForConditionalGeneration
    from PIL import Image

    from distill.models import check_pair, tiny

    processor, s_cfg, t_cfg = tiny.real_configs()
    counts = {}
    for role, cfg in (("student", s_cfg), ("teacher", t_cfg)):
        with torch.device("meta"):
            m = LlavaForConditionalGeneration(cfg)
        counts[role] = sum(p.numel() for p in m.model.language_model.parameters()) + m.lm_head.weight.numel()
        assert cfg.text_config.vocab_size == 151936 and cfg.image_seq_length == 729
        cfg.save_pretrained(tmp_path / role)
        processor.save_pretrained(tmp_path / role)
    assert 1.7e9 < counts["student"] < 2.0e9, counts
    assert 3.8e9 < counts["teacher"] < 4.2e9, counts
    ids = processor(images=Image.new("RGB", (384, 256)), text="<image> hi", return_tensors="pt")["input_ids"]
    assert int((ids == s_cfg.image_token_index).sum()) == 729
    summary = check_pair(tmp_path / "student", tmp_path / "teacher", adapter_fetch=True)
    assert summary["num_image_tokens"] == 729


def test_real_preset_cli_rejects_tiny_only_flag(tmp_path):
    p = subprocess.run([sys.executable, "-m", "distill.models.tiny", "--preset", "real", "--teacher-hidden", "64",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "--teacher-hidden applies to the tiny preset only" in p.stderr


def test_metrics_lives_resume_compare_and_mfu():
    e2e = _e2e()
    import tempfile

    rows = [{"step": s, "loss": 1.0 / s, "lm": 1.0, "kd": 0.5, "attn": 0.1, "tokens_per_s": 10.0,
             "samples_per_s": 1.0, "step_time_s": 2.0, "peak_rss_mb": 5.0, "input_tokens_per_s": 100.0}
            for s in (1, 2, 3, 4)]
    again = [dict(r) for r in rows[2:]]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in [*rows, {"event": "x"}, *again]) + "\n")
        lives = e2e.read_metrics(path)
    assert [[r["step"] for r in life] for life in lives] == [[1, 2, 3, 4], [3, 4]]
    assert e2e.compare_lives(lives[0], lives[1], 1e-6)["ok"]
    lives[1][1]["kd"] = 0.5 * (1 + 1e-3)
    bad = e2e.compare_lives(lives[0], lives[1], 1e-6)
    assert not bad["ok"] and bad["max_rel_diff"] == pytest.approx(1e-3)
    t = e2e.timing(lives[0], 1, n_student=10, n_teacher=20, tflops=1e-9)
    # (6 N_s + 2 N_t) x input tokens/s = (60 + 40) x 100 FLOP/s; peak 1e-9 TFLOP/s = 1e3 FLOP/s
    assert t["model_tflops_per_s"] == pytest.approx(1e4 / 1e12)
    assert t["mfu"] == pytest.approx(10.0)
    assert t["steps_timed"] == [2, 4] and t["step_time_s"] == 2.0


def test_dry_run_end_to_end(tiny_models, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    shutil.copytree(tiny_models.root, work / "models")  # the models phase is the tiny CLI (tested in test_models)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_e2e.py"), "--out", str(out), "--work", str(work),
                        "--dry-run", "--no-attn-steps", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    report = json.loads((out / "e2e.json").read_text())
    logs = "\n".join(Path(v["log"]).read_text()[-2000:] for v in report["phases"].values() if "log" in v)
    assert p.returncode == 0 and report["ok"], (report["phases"], p.stdout[-2000:], logs)
    ph = report["phases"]
    assert list(ph) == ["data", "attn", "resume", "no_attn", "export", "reload"]
    # killed inside the final save: the step-2 checkpoint and the step-4 .tmp, nothing else
    assert ph["attn"]["rc"] != 0 and ph["attn"]["checkpoints_after_kill"] == ["step00000002", "step00000004.tmp"]
    rc = report["resume_check"]
    assert rc["resumed_from_step"] == 2 and rc["steps"] == [3, 4] and rc["max_rel_diff"] == 0.0
    assert report["attn"]["input_tokens_per_s"] > report["attn"]["label_tokens_per_s"] > 0
    assert report["no_attn"]["step_time_s"] > 0
    assert report["reload"]["logits_finite"] and report["reload"]["new_tokens"] > 0
    assert report["reload"]["class"] == "DistillLlavaForConditionalGeneration"  # the exact custom-projector export
    md = (out / "e2e.md").read_text()
    assert "overall: **ok**" in md and "Resume from step 2" in md
