"""Inputs shared by the multi-rank tests: tiny models, synthetic shards, stage overrides."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_inputs(root: Path, tiny) -> dict:
    """Synthetic shards under ``root/synth`` and the override lists that point the shipped tiny
    stage YAMLs at the test's models/data. Returns the ``paths`` dict of tests/_ds_worker.py."""
    from data_prep.synth import make_synthetic

    synth = root / "synth"
    if not (synth / "instruct" / "shards" / "manifest.json").exists():
        make_synthetic(str(synth), num=24, seed=0, size=48, shard_size=4)
    cfgs = REPO / "launch" / "configs"
    common = [f"model.teacher={tiny.teacher}", "run.progress_bar=false", "run.log_every=1",
              "data.num_workers=0", "data.max_length=192", "data.batch_size=1", "deepspeed.grad_accum=2",
              "deepspeed.warmup_steps=0"]
    paths = {
        "yaml1": str(cfgs / "tiny_stage1.yaml"), "yaml2": str(cfgs / "tiny_stage2.yaml"),
        "yaml3": str(cfgs / "tiny_stage3.yaml"),
        "common": common + [f"model.student={tiny.student}", f"data.shards=[{synth / 'instruct' / 'shards'}]"],
        "extra1": ["run.steps=2", "run.tensorboard=true", f"data.shards=[{synth / 'caption' / 'shards'}]"],
        "extra2": ["run.steps=2", "model.llm=lora", "model.lora_r=4"],  # LoRA under ZeRO-3, merged at save
        "extra3": ["run.steps=4", "run.save_every=2"],
    }
    (root / "paths.json").write_text(json.dumps(paths))
    return paths


def metrics(path: Path) -> dict:
    """``metrics.jsonl`` as step -> record; a resumed run re-logs steps, the last record wins."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out
