"""The demo's teacher cache: reused under the same recipe, retrained under another (no subprocesses)."""
import json

import pytest

from distill import demo


class _Recorder(demo.Runner):
    """demo.Runner that records each step and creates its `done` marker instead of running it."""

    def __init__(self, out):
        super().__init__(out, ranks=2)
        self.titles = []

    def step(self, title, cmd, done=None):
        if done is not None and done.exists():
            return
        self.titles.append(title)
        if done is not None:
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text("{}")

    def deepspeed(self, title, stage, config, overrides, done):
        assert stage == 2 and "model.teacher=null" in overrides and "model.train_vision=false" in overrides
        assert f"deepspeed.zero_stage={demo.TEACHER_ZERO_STAGE}" in overrides  # the teacher's own training: ZeRO-2
        self.starts = getattr(self, "starts", []) + [o for o in overrides if o.startswith("model.student=")]
        self.step(title, overrides, done)


def test_teacher_reused_by_recipe_retrained_otherwise(tmp_path):
    root = tmp_path / "teacher"
    run = _Recorder(tmp_path)
    teacher, _ = demo.train_teacher(run, demo.QUICK, root, seed=0)
    assert teacher == root / "teacher_hf"
    assert [t.split(",")[0] for t in run.titles if t.startswith("teacher training")] == [
        "teacher training", "teacher training"]  # phase 1 (captions) and phase 2 (captions + Q/A)
    assert json.loads((root / "recipe.json").read_text()) == demo._recipe(demo.QUICK, 0)
    # the tower is pre-trained before any LM step, and phase 1 starts from that folder
    tower_steps = [i for i, t in enumerate(run.titles) if t.startswith("vision tower pre-training")]
    first_lm = next(i for i, t in enumerate(run.titles) if t.startswith("teacher training"))
    assert len(tower_steps) == 1 and tower_steps[0] < first_lm
    assert run.starts[0] == f"model.student={root / 'models' / 'teacher_tower'}"

    again = _Recorder(tmp_path)
    demo.train_teacher(again, demo.QUICK, root, seed=0)
    assert again.titles == []  # same recipe: every step is already done

    (root / "marker").write_text("old")
    other = _Recorder(tmp_path)
    demo.train_teacher(other, demo.QUICK, root, seed=1)  # another recipe: the old teacher goes
    assert not (root / "marker").exists()
    assert any(t.startswith("teacher training") for t in other.titles)
    assert json.loads((root / "recipe.json").read_text())["seed"] == 1


def test_runner_skips_a_step_done_outside_its_folder(tmp_path, capsys):
    """The teacher folder may live outside --out (make demo / make ablation share one): a finished
    step there is skipped, not run, and named relative to --out."""
    out, shared = tmp_path / "demo", tmp_path / "tiny_teacher"
    out.mkdir()
    (shared / "teacher_hf").mkdir(parents=True)
    (shared / "teacher_hf" / "config.json").write_text("{}")
    demo.Runner(out, ranks=2).step("export", ["false"], done=shared / "teacher_hf" / "config.json")
    assert "already done (../tiny_teacher/teacher_hf/config.json)" in capsys.readouterr().out


def test_ablation_variants_by_attention_weight():
    assert demo.ablation_variants([1.0]) == {"sft": (0.0, 0.0), "kd": (1.0, 0.0), "kd_attn": (1.0, 1.0)}
    assert list(demo.ablation_variants([1.0, 1000.0])) == ["sft", "kd", "kd_attn", "kd_attn_w1000"]
    assert demo.ablation_variants([1e4])["kd_attn_w10000"] == (1.0, 1e4)


def test_layer_variants_name_each_count():
    assert demo.layer_variants([2, 4]) == {"kd_attn_L2": 2, "kd_attn_L4": 4}
    with pytest.raises(SystemExit, match="--attn-layers"):
        demo.layer_variants([0])


def test_unknown_only_variant_fails_before_anything_runs(tmp_path):
    out = tmp_path / "ablation"
    with pytest.raises(SystemExit, match="unknown variant.*nope.*kd_attn_L2"):
        demo.main(["--ablation", "--attn-layers", "2", "--only", "kd_attn_L2", "nope", "--out", str(out)])
    assert not out.exists()  # nothing created, no teacher trained


def test_ablation_budget_flags_checked_before_any_step(tmp_path):
    with pytest.raises(SystemExit, match="apply to --ablation only"):
        demo.main(["--out", str(tmp_path / "d"), "--ablation-steps", "10"])
    with pytest.raises(SystemExit, match="--ablation-lr must be > 0"):
        demo.main(["--out", str(tmp_path / "d"), "--ablation", "--ablation-lr", "0"])
    with pytest.raises(SystemExit, match="--ablation-steps must be >= 1"):
        demo.main(["--out", str(tmp_path / "d"), "--ablation", "--ablation-steps", "0"])
    # a folder of runs under another budget is refused, not silently reused
    out = tmp_path / "abl"
    out.mkdir()
    (out / "ablation_budget.json").write_text(json.dumps({"steps": 400, "lr": 1e-3}) + "\n")
    with pytest.raises(SystemExit, match="another budget"):
        demo.main(["--out", str(out), "--ablation", "--ablation-steps", "800", "--ablation-lr", "3e-4"])
    assert not (out / "demo.log").exists() and json.loads((out / "ablation_budget.json").read_text())["steps"] == 400
