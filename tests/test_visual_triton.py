"""Triton visual-block kernels on CPU under TRITON_INTERPRET=1, against the torch path and an fp64
eager reference (full softmax, then the visual block).

The interpreter must be switched on before triton defines the kernels, so every check runs in one
subprocess (tests/_triton_visual_worker.py); this process never imports triton with the setting
and other test files are unaffected.  Shapes are small (T <= 72, D = 16, 16 x 16 tiles) but
cover several tiles, GQA 4/2, 6/1, 4/4, contiguous / two-image / ragged (-1 padded) / last-token
layouts, +inf lse rows, n = 0, fp32 / fp16 / bf16 (bf16 upcast under the interpreter), and
bitwise-equal reruns of the backward.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_triton_visual_worker.py")
CASES = [
    "fp32_gqa42_contiguous_mean",
    "fp32_gqa61_two_images_mean",
    "fp32_mha44_ragged_mean",
    "fp32_gqa42_ragged_perhead",
    "fp32_gqa42_last_token_perhead",
    "fp32_gqa42_two_images_inf_lse_mean",
    "fp16_gqa42_two_images_mean",
    "fp16_mha44_contiguous_perhead",
    "bf16_gqa42_two_images_mean",
    "n0",
    "deterministic_rerun",
]


@pytest.fixture(scope="module")
def worker_results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, WORKER, *CASES], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_triton_kernels_interpreted(worker_results, case):
    res = worker_results[case]
    assert res["ok"], res["msg"]


def test_resolve_impl(monkeypatch):
    import torch

    from distill.attention import resolve_impl

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_impl("torch", "cpu") == "torch"
    assert resolve_impl("auto", "cpu") == "torch"
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown visual attention impl"):
        resolve_impl("cuda_magic", "cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_impl("triton", "cpu")
