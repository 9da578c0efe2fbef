"""Models loaded under ZeRO-3 keep transformers' class wrappers, whatever was imported before.

DeepSpeed's ``zero.Init`` restores, on exit, the class-body ``__init__`` of every module class
defined while it was active. transformers (with the ``kernels`` package) wraps the attention
classes' ``__init__`` and ``forward``; when a text model's module is first imported inside
``zero.Init`` (a composite model builds it from its sub-config), every later instance of its
classes in that process (a teacher of the student's family, a second run) fails at its first
forward. ``load_vlm`` imports those modules first; this loads a model twice in a fresh
interpreter, where nothing else has imported them, and runs the second one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from _launch import REPO, free_port

_WORKER = r'''
import json, sys
import deepspeed, torch
from transformers.integrations import HfDeepSpeedConfig

deepspeed.init_distributed("gloo")
preloaded = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m)
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
keep = HfDeepSpeedConfig(cfg)
from distill.models.loading import load_vlm
first = load_vlm(sys.argv[1])  # e.g. the student; a second model of the same classes, e.g. the teacher:
model = load_vlm(sys.argv[1])
lm = model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model
with deepspeed.zero.GatheredParameters(list(lm.parameters())), torch.no_grad():
    hidden = lm(input_ids=torch.tensor([[1, 2, 3, 4]])).last_hidden_state  # runs every attention forward
print(json.dumps({"preloaded": preloaded, "lm": type(lm).__name__, "finite": bool(torch.isfinite(hidden).all()),
                  "partitioned": hasattr(next(model.parameters()), "ds_id")}))
'''


def test_load_vlm_under_zero3_whatever_was_imported_before(tiny_models, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    res = subprocess.run([sys.executable, str(script), str(tiny_models.student)], cwd=str(REPO), env=env,
                         capture_output=True, text=True, timeout=600)
    # before load_vlm imported the text model's module first, the second model failed in its forward
    # with "'LlamaAttention' object has no attribute '_kernel_funcs'" (transformers 5.25, kernels 0.19)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["partitioned"], "the model was not built under zero.Init"
    # the text model's module must not have been imported before load_vlm (else this proves nothing)
    assert not any(m.endswith(("modeling_llama", "modeling_qwen2")) for m in out["preloaded"]), out["preloaded"]
    assert out["finite"], out
