"""The README's main command, at a smaller size: data → teacher SFT → stages 1-3 (DeepSpeed, 2 CPU
ranks) → export → eval → report. Exercises every product entry point end to end."""
import json
import re
import subprocess
import sys

import pytest
import torch

from distill.demo import REPO



def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "distill.demo", "--out", str(out), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The report holds one table row per evaluated model, accuracies in [0, 100].
    report = (out / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| teacher") or ln.startswith("| student")]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher", "student (untrained)", "student (distilled)"]
    for r in rows:
        for cell in r.strip("|").split("|")[1:]:
            if cell.strip() != "-":
                assert 0.0 <= float(cell) <= 100.0
    for png in ("attention.png", "curves_stage1.png", "curves_stage3.png"):
        assert (out / "figures" / png).stat().st_size > 1000

    # Stage 3 logged every loss term, finite, with the attention term present.
    last = [json.loads(ln) for ln in (out / "stage3" / "metrics.jsonl").read_text().splitlines()][-1]
    for key in ("loss", "lm", "kd", "attn"):
        assert torch.isfinite(torch.tensor(last[key])), (key, last)
    assert last["attn"] > 0

    # The exported student loads with the stock auto classes (its teacher is wider, so the exact
    # export ships its projector class: trust_remote_code); the report says which export it took.
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(out / "student_hf", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out / "student_hf")
    assert model.config.text_config.num_hidden_layers < LlavaForConditionalGeneration.from_pretrained(
        out / "teacher" / "teacher_hf").config.text_config.num_hidden_layers
    assert "Export `student_hf`" in report
    assert re.search(r"<image>", processor.tokenizer.decode([model.config.image_token_id]))
