"""Config loading: YAML-relative paths, typed dotted overrides, errors naming the key, ZeRO dicts."""
import json
import os
from pathlib import Path

import pytest
import yaml

from distill.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def _write_yaml(folder: Path, stage=None, **sections) -> Path:
    """A stage YAML whose model/data paths are relative to ``folder``."""
    (folder / "models" / "student").mkdir(parents=True, exist_ok=True)
    (folder / "models" / "teacher").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "shards").mkdir(parents=True, exist_ok=True)
    doc = {
        "run": {"output_dir": "out", "steps": 3},
        "model": {"student": "models/student", "teacher": "models/teacher"},
        "data": {"shards": ["data/shards"], "batch_size": 2},
        "deepspeed": {"lr": 1e-3},
    }
    for k, v in sections.items():
        doc.setdefault(k, {}).update(v)
    if stage is not None:
        doc["stage"] = stage
    p = folder / "cfg" / "stage.yaml"
    p.parent.mkdir(exist_ok=True)
    # paths are relative to the YAML's folder (cfg/), so prefix ../
    doc["run"]["output_dir"] = "../" + doc["run"]["output_dir"]
    for k in ("student", "teacher"):
        if doc["model"].get(k):
            doc["model"][k] = "../" + doc["model"][k]
    doc["data"]["shards"] = ["../" + s for s in doc["data"]["shards"]]
    p.write_text(yaml.safe_dump(doc))
    return p


def test_paths_resolve_relative_to_yaml_not_cwd(tmp_path, monkeypatch):
    p = _write_yaml(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(p, [], stage=3)
    assert cfg.model.student == str((tmp_path / "models" / "student").resolve())
    assert cfg.model.teacher == str((tmp_path / "models" / "teacher").resolve())
    assert cfg.data.shards == [str((tmp_path / "data" / "shards").resolve())]
    assert cfg.run.output_dir == str((tmp_path / "out").resolve())
    # a CLI override path is relative to the working directory, like any CLI argument
    (elsewhere / "s2").mkdir()
    cfg = load_config(p, ["model.student=s2"], stage=3)
    assert cfg.model.student == str((elsewhere / "s2").resolve())
    # a file name relative to output_dir is not a path field, despite its ``_file`` suffix
    cfg = load_config(p, ["run.metrics_file=m.jsonl"], stage=3)
    assert cfg.run.metrics_file == "m.jsonl"


def test_overrides_are_typed(tmp_path):
    p = _write_yaml(tmp_path)
    cfg = load_config(p, ["deepspeed.lr=2e-5", "run.steps=7", "run.tensorboard=true", "deepspeed.betas=[0.8,0.9]",
                          "deepspeed.grad_clip=0", "model.llm=lora", "data.batch_size=4"], stage=3)
    assert cfg.deepspeed.lr == pytest.approx(2e-5) and isinstance(cfg.deepspeed.lr, float)
    assert cfg.run.steps == 7 and cfg.run.tensorboard is True
    assert cfg.deepspeed.betas == [0.8, 0.9]
    assert cfg.deepspeed.grad_clip == 0.0 and isinstance(cfg.deepspeed.grad_clip, float)
    assert cfg.model.llm == "lora" and cfg.data.batch_size == 4


@pytest.mark.parametrize("override, key", [
    ("run.stepz=3", "run.stepz"),
    ("run.steps=abc", "run.steps"),
    ("run.steps=1.5", "run.steps"),
    ("deepspeed.lr=fast", "deepspeed.lr"),
    ("run.tensorboard=maybe", "run.tensorboard"),
    ("deepspeed.zero_stage=1", "deepspeed.zero_stage"),
    ("model.llm=half", "model.llm"),
    ("model.dtype=int8", "model.dtype"),
    ("nosection.key=1", "nosection"),
    ("data.batch_size=0", "data.batch_size"),
    ("model.student=/does/not/exist", "model.student"),
    ("deepspeed.config=/does/not/exist.json", "deepspeed.config"),
    ("data.shards=[/no/such/shards]", "data.shards"),
    ("model.teacher=null", "model.teacher"),
    ("loss.kd_weight=0", "loss.lm_weight"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    p = _write_yaml(tmp_path)
    extra = ["loss.lm_weight=0", "loss.attn_weight=1"] if override.startswith("loss.kd_weight") else []
    with pytest.raises(ConfigError) as e:
        load_config(p, [override] + extra, stage=3)
    assert key in str(e.value)


def test_teacher_optional_only_where_the_stage_allows(tmp_path):
    p = _write_yaml(tmp_path)
    for stage in (1, 3):
        with pytest.raises(ConfigError, match="model.teacher"):
            load_config(p, ["model.teacher=null"], stage=stage)
    cfg = load_config(p, ["model.teacher=null"] + _zero_teacher_weights(), stage=2)
    assert cfg.model.teacher is None and not cfg.needs_teacher()


def _zero_teacher_weights():
    return ["loss.kd_weight=0", "loss.attn_weight=0"]


def test_stage_mismatch_and_yaml_errors(tmp_path):
    p = _write_yaml(tmp_path, stage=1)
    with pytest.raises(ConfigError, match="stage"):
        load_config(p, [], stage=3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2]\n")
    with pytest.raises(ConfigError, match="run"):
        load_config(bad, [], stage=3)
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "missing.yaml", [], stage=3)


def test_shipped_configs_parse():
    for n in (1, 2, 3):
        for name in (f"tiny_stage{n}.yaml", f"qwen_pair_stage{n}.yaml"):
            cfg = load_config(REPO / "launch" / "configs" / name, [], stage=n, check_paths=False)
            assert cfg.stage == n
            # every path is absolute and anchored at the YAML's folder
            assert Path(cfg.model.student).is_absolute()
    tiny3 = load_config(REPO / "launch/configs/tiny_stage3.yaml", [], stage=3, check_paths=False)
    tiny1 = load_config(REPO / "launch/configs/tiny_stage1.yaml", [], stage=1, check_paths=False)
    # stage 3 starts from stage 2's output and stage 2 from stage 1's
    assert tiny3.model.student.startswith(str(Path(tiny1.run.output_dir).parent))


def test_deepspeed_dicts_fill_auto_from_yaml(tmp_path):
    from distill.engine import student_ds_config, teacher_ds_config

    p = _write_yaml(tmp_path)
    cfg = load_config(p, ["deepspeed.grad_accum=3", "deepspeed.lr=3e-4", "model.dtype=bfloat16"], stage=3)
    h = 96
    s = student_ds_config(cfg, h, world_size=2)
    flat = json.dumps(s)
    assert '"auto"' not in flat
    z = s["zero_optimization"]
    assert z["stage"] == 3
    assert z["reduce_bucket_size"] == h * h
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert z["stage3_param_persistence_threshold"] == 10 * h
    assert s["train_micro_batch_size_per_gpu"] == 2 and s["gradient_accumulation_steps"] == 3
    assert s["train_batch_size"] == 2 * 3 * 2
    assert s["optimizer"]["params"]["lr"] == pytest.approx(3e-4)
    assert s["bf16"]["enabled"] is True and s["fp16"]["enabled"] is False
    t = teacher_ds_config(cfg, 128, world_size=2)
    assert t["zero_optimization"]["stage"] == 3 and "optimizer" not in t
    assert t["zero_optimization"]["reduce_bucket_size"] == 128 * 128

    z2 = student_ds_config(load_config(p, ["deepspeed.zero_stage=2"], stage=3), h, 2)
    assert z2["zero_optimization"]["stage"] == 2
    off = student_ds_config(load_config(p, ["deepspeed.offload=true"], stage=3), h, 2)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"

    # a user JSON with an "auto" the trainer does not know names the key
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 3}, "mystery": {"knob": "auto"}}))
    with pytest.raises(ConfigError, match="mystery.knob"):
        student_ds_config(load_config(p, [f"deepspeed.config={custom}"], stage=3), h, 2)
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        student_ds_config(load_config(p, [f"deepspeed.config={custom}"], stage=3), h, 2)


def test_cli_config_errors_fail_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """``main`` reports a bad key with exit code 2 and never reaches model building."""
    import distill.engine
    import distill.models
    from distill import train

    def boom(*a, **k):
        raise AssertionError("a model/engine was built despite a config error")

    monkeypatch.setattr(distill.models, "build_student", boom)
    monkeypatch.setattr(distill.models, "build_teacher", boom)
    monkeypatch.setattr(distill.engine, "build_engines", boom)
    monkeypatch.setattr(distill.engine, "init_distributed", boom)
    p = _write_yaml(tmp_path)
    for override, key in [("run.stepz=1", "run.stepz"), ("model.teacher=null", "model.teacher"),
                          ("deepspeed.lr=-1", "deepspeed.lr")]:
        rc = train.main(stage=3, argv=["--config", str(p), override])
        assert rc == train.EXIT_CONFIG
        assert key in capsys.readouterr().err
    os.environ.pop("RANK", None)


def test_tensorboard_without_package_fails_at_load(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    p = _write_yaml(tmp_path)
    with pytest.raises(ConfigError, match="run.tensorboard.*pip install tensorboard"):
        load_config(p, ["run.tensorboard=true"], stage=3)
    assert load_config(p, ["run.tensorboard=false"], stage=3).run.tensorboard is False


def test_teacher_engine_only_when_a_loss_term_reads_it(tmp_path):
    """``runs_teacher`` (what decides whether a teacher engine is built): only a kd or attention
    weight > 0 needs teacher outputs; stages 1 and 3 with both weights 0 keep the teacher path
    (adapter fetch) but never run the teacher."""
    p = _write_yaml(tmp_path)
    assert load_config(p, ["loss.kd_weight=1"], stage=3).runs_teacher()
    assert load_config(p, ["loss.attn_weight=1"], stage=1).runs_teacher()
    assert load_config(p, ["loss.kd_weight=1"], stage=2).runs_teacher()
    for stage in (1, 2, 3):
        cfg = load_config(p, ["loss.kd_weight=0", "loss.attn_weight=0"], stage=stage)
        assert cfg.model.teacher is not None and not cfg.runs_teacher()
    assert not load_config(p, ["model.teacher=null"], stage=2).runs_teacher()


def test_one_validation_pass_reports_every_problem(tmp_path):
    """Problems in several sections (a type, a value, an unknown key, a missing path) come back in
    one ConfigError, a line each, each naming its key."""
    p = _write_yaml(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["run.steps=abc", "deepspeed.lr=-1", "loss.kd_kind=kl", "data.batch_size=0",
                        "model.lora_rr=4"], stage=3)
    lines = str(e.value).splitlines()
    for key in ("run.steps", "deepspeed.lr", "loss.kd_kind", "data.batch_size", "model.lora_rr"):
        assert sum(line.startswith(key + ":") for line in lines) == 1, (key, lines)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["model.student=/does/not/exist", "deepspeed.config=/does/not/exist.json"], stage=3)
    assert "model.student" in str(e.value) and "deepspeed.config" in str(e.value)


def test_student_adam_on_cuda_falls_back_to_torch_adam_when_fused_cannot_build(tmp_path, monkeypatch, capsys):
    """On a CUDA accelerator the student keeps DeepSpeed's FusedAdam when it is prebuilt or
    JIT-buildable; a deepspeed built without ops on a machine without nvcc gets torch's AdamW
    (and says why) instead of a compiler traceback inside deepspeed.initialize; a JSON that sets
    torch_adam itself is left alone."""
    import types

    import deepspeed.accelerator
    import deepspeed.git_version_info
    import shutil

    from distill import engine
    from distill.engine import fused_adam_status, student_ds_config

    p = _write_yaml(tmp_path)
    cfg = load_config(p, [], stage=3)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: types.SimpleNamespace(device_name=lambda: "cuda"))
    monkeypatch.setattr(engine, "fused_adam_status", lambda: (False, "no FusedAdam here"))
    s = student_ds_config(cfg, 64, 1)
    assert s["optimizer"]["params"]["torch_adam"] is True
    assert "no FusedAdam here" in capsys.readouterr().out
    monkeypatch.setattr(engine, "fused_adam_status", lambda: (True, "prebuilt"))
    assert "torch_adam" not in student_ds_config(cfg, 64, 1)["optimizer"]["params"]
    custom = tmp_path / "own.json"
    ds = json.loads((engine.ds_configs_dir() / "zero3.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = False
    custom.write_text(json.dumps(ds))
    monkeypatch.setattr(engine, "fused_adam_status", lambda: (False, "no FusedAdam here"))
    own = student_ds_config(load_config(p, [f"deepspeed.config={custom}"], stage=3), 64, 1)
    assert own["optimizer"]["params"]["torch_adam"] is False

    # the probe itself: prebuilt op; no op and no compiler; no op but nvcc + ninja
    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {"fused_adam": True})
    assert fused_adam_status()[0] is True
    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {"fused_adam": False})
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    ok, why = fused_adam_status()
    assert not ok and "nvcc and ninja" in why
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert fused_adam_status() == (True, "FusedAdam is JIT-built with /usr/bin/nvcc")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "internvl", "qwen3_vl"])
def test_family_pair_configs_load(family):
    """The shipped real-pair stage-3 configs of the families parse and validate (paths are the
    user's placeholders, so path existence is not checked here)."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "launch" / "configs" / f"{family}_stage3.yaml", [],
                      stage=3, check_paths=False)
    assert cfg.stage == 3 and cfg.loss.attn_weight == 1.0 and cfg.loss.kd_weight == 1.0
    assert cfg.model.gradient_checkpointing and cfg.deepspeed.zero_stage == 3
    assert cfg.runs_teacher()
