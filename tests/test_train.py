"""The three stages on 2 CPU ranks (ZeRO-3 student and teacher): chained through their final/
folders into an exported HF student; a rank killed (-9) inside a save, then the same command
resumes from the last complete checkpoint with per-step losses equal to the uninterrupted run;
throughput counted once over ranks."""
import json
import math

import pytest
import torch

from _dist_fixtures import REPO, make_inputs, metrics as _metrics
import _launch

RANKS = 2
TERMS = ("loss", "lm", "kd", "attn")


def _logs(root):
    return "\n".join((root / f"rank{r}.log").read_text()[-3000:] for r in range(RANKS) if (root / f"rank{r}.log").exists())


@pytest.fixture(scope="module")
def chain(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    paths = make_inputs(root, tiny_models)
    rc = _launch.run(REPO / "tests" / "_ds_worker.py", ["chain", root, root / "paths.json"], nprocs=RANKS,
                     log_dir=root, timeout=900)
    assert rc == 0, _logs(root)
    res = [json.loads((root / f"result_chain_rank{r}.json").read_text()) for r in range(RANKS)]
    return root, paths, res


def test_each_stage_runs_under_zero3_with_partitioned_models(chain):
    root, paths, res = chain
    for r in range(RANKS):
        for stage in (1, 2, 3):
            rep = res[r][f"stage{stage}"]
            assert rep["zero_stage"] == 3
            s = rep["student"]
            assert s["n_partitioned"] == s["n_splittable"] > 0, s
            t = rep["teacher"]
            if stage == 2:
                assert t is None  # SFT runs without a teacher
            else:  # every teacher parameter is a shard on this rank
                assert t["n_partitioned"] == t["n_splittable"] > 0, t
                assert t["local_numel"] <= t["full_numel"] // RANKS + t["n_params"], t
    assert list((root / "stage1" / "tb").glob("events.out.tfevents.*"))  # run.tensorboard=true in stage 1
    for stage, steps in ((1, 2), (2, 2), (3, 4)):
        m = _metrics(root / f"stage{stage}" / "metrics.jsonl")
        assert sorted(m) == list(range(1, steps + 1))
        for rec in m.values():
            assert all(math.isfinite(rec[k]) for k in TERMS), rec
            assert rec["tokens_per_s"] > 0 and rec["samples_per_s"] > 0 and rec["nonfinite_steps"] == 0
        kd = [rec["kd"] for rec in m.values()]
        attn = [rec["attn"] for rec in m.values()]
        assert (min(kd) > 0) == (stage != 2)
        assert (min(attn) > 0) == (stage == 3)  # the attention term only in stage 3


def test_stages_chain_and_export_a_stock_hf_student(chain, tmp_path):
    root, paths, res = chain
    cfg2 = json.loads((root / "stage2" / "config_stage2.json").read_text())
    cfg3 = json.loads((root / "stage3" / "config_stage3.json").read_text())
    assert cfg2["model"]["student"] == str(root / "stage1" / "final")
    assert cfg3["model"]["student"] == str(root / "stage2" / "final")
    # stage 2 trained LoRA adapters under ZeRO-3; its final/ holds merged plain weights
    from safetensors.torch import load_file

    assert cfg2["model"]["llm"] == "lora"
    sd2 = load_file(str(next((root / "stage2" / "final").glob("*.safetensors"))))
    assert sd2 and not any("lora_" in k or "base_layer" in k for k in sd2)
    # checkpoints: keep_last, latest pointer, no tmp leftovers
    ck = root / "stage3" / "checkpoints"
    assert (ck / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step00000002", "step00000004"]

    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    from distill.export import export_student

    # the teacher is wider than the student: the exact export ships its projector class (auto_map),
    # the --stock export fits a stock-shaped projector on the training shards' images
    exact, stock = tmp_path / "hf", tmp_path / "hf_stock"
    export_student(root / "stage3" / "final", exact)
    export_student(root / "stage3" / "final", stock, stock=True, fit_shards=[root / "synth" / "instruct" / "shards"],
                   fit_steps=50)
    models = [AutoModelForImageTextToText.from_pretrained(exact, dtype=torch.float32, trust_remote_code=True),
              LlavaForConditionalGeneration.from_pretrained(stock, dtype=torch.float32)]
    assert type(models[1].model.multi_modal_projector).__module__.startswith("transformers.")
    outs = []
    for model in models:
        cfg = model.eval().config
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        ids = torch.cat([torch.full((1, n), cfg.image_token_id), torch.arange(10, 20)[None]], 1)
        px = torch.zeros(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
        with torch.no_grad():
            outs.append(model(input_ids=ids, pixel_values=px).logits)
        assert torch.isfinite(outs[-1]).all()
    report = json.loads((stock / "distill_export.json").read_text())
    assert report["export"] == "stock-fit" and json.loads((exact / "distill_export.json").read_text())["export"] == "custom"
    fit = report["fit"]  # its bounds are tested in test_export_wide; here: reported, and no worse than its start
    assert math.isfinite(fit["rel_error_val"]) and fit["rel_error_val"] <= fit["rel_error_lstsq_val"]
    assert 0.0 <= fit["logits_val"]["top1_agreement"] <= 1.0


def _stage3_cmd(root, paths, out):
    ov = list(paths["common"]) + list(paths["extra3"]) + [f"model.student={root / 'stage2' / 'final'}",
                                                          f"run.output_dir={out}"]
    return REPO / "launch" / "stage3.py", ["--config", paths["yaml3"], *ov]


def test_kill9_inside_a_save_then_same_command_resumes_with_identical_losses(chain):
    """Rank 1 SIGKILLs itself inside the final save (step 4: its part of the folder written, the
    rename not yet done), signalled by the run itself (DISTILL_FAULTS), not by a timed kill."""
    root, paths, _ = chain
    out = root / "killed"
    script, args = _stage3_cmd(root, paths, out)
    logs = out / "logs"
    logs.mkdir(parents=True)
    procs = _launch.spawn(script, args, RANKS, logs, env={"DISTILL_FAULTS": "kill_in_save=4@1"})
    try:
        rc1 = procs[1].wait(timeout=600)
    finally:
        _launch.kill_group(procs, 9)  # rank 0 waits at the save's barrier until killed
    assert rc1 == -9, _logs(logs)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step00000002", _logs(logs)
    assert (ck / "step00000004.tmp").is_dir() and not (ck / "step00000004").exists()
    assert not (out / "final").exists()
    killed = _metrics(out / "metrics.jsonl")
    assert sorted(killed) == [1, 2, 3, 4]  # the kill came after step 4 was trained and logged

    rc = _launch.run(script, args, RANKS, logs, timeout=600)
    assert rc == 0, _logs(logs)
    assert "resumed from" in (logs / "rank0.log").read_text() and "at step 2" in (logs / "rank0.log").read_text()
    resumed, ref = _metrics(out / "metrics.jsonl"), _metrics(root / "stage3" / "metrics.jsonl")
    assert sorted(resumed) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        for k in TERMS:
            assert math.isclose(resumed[step][k], ref[step][k], rel_tol=1e-6, abs_tol=1e-9), (step, k, killed)
    assert (out / "final").is_dir() and not list(ck.glob("*.tmp"))


def test_throughput_counts_the_global_batch_once(chain, tiny_models):
    """samples/s x step time = the global batch (ranks x accum x batch size, no placeholder rows) and
    tokens/s x step time = the step's valid shifted labels over both ranks, and input tokens/s x
    step time = its non-padding input tokens (image tokens included), counted here independently
    from the same data stream each rank read."""
    from distill.config import load_config
    from distill.data import build_loader
    from distill.models import load_processor
    from distill.data import BatchStream

    root, paths, _ = chain
    ov = list(paths["common"]) + list(paths["extra3"]) + [f"model.student={root / 'stage2' / 'final'}",
                                                          f"run.output_dir={root / 'unused'}"]
    cfg = load_config(paths["yaml3"], ov, stage=3)
    accum, steps = cfg.deepspeed.grad_accum, cfg.run.steps
    processor = load_processor(cfg.model.student)
    want, want_in = [0] * steps, [0] * steps
    for r in range(RANKS):
        stream = BatchStream(build_loader(cfg.data, processor, rank=r, world_size=RANKS, seed=cfg.run.seed), r)
        for step in range(steps):
            for _ in range(accum):
                mb = next(stream)
                want[step] += int((mb["labels"][:, 1:] != -100).sum())
                want_in[step] += int((mb["input_ids"] != processor.tokenizer.pad_token_id).sum())
    m = _metrics(root / "stage3" / "metrics.jsonl")
    assert cfg.run.log_every == 1 and sorted(m) == list(range(1, steps + 1))
    for step, rec in m.items():
        assert math.isclose(rec["samples_per_s"] * rec["step_time_s"], RANKS * accum * cfg.data.batch_size,
                            rel_tol=1e-9), rec
        assert math.isclose(rec["tokens_per_s"] * rec["step_time_s"], want[step - 1], rel_tol=1e-9), (step, rec)
        assert math.isclose(rec["input_tokens_per_s"] * rec["step_time_s"], want_in[step - 1], rel_tol=1e-9), (step, rec)
        assert want_in[step - 1] > want[step - 1]
        assert rec["skipped_samples"] >= 0 and rec["shard_read_errors"] == 0 and "truncated_samples" in rec


def test_checkpoint_resolution_ignores_partial_saves(tmp_path):
    """Only renamed folders with meta.json count; a lagging ``latest`` pointer is overtaken by a
    newer complete checkpoint; an explicit folder must be complete."""
    from distill.checkpoint import CheckpointError, CheckpointManager

    ck = tmp_path / "checkpoints"
    m = CheckpointManager(ck, 0, RANKS)
    assert m.resolve("auto") is None and m.resolve("never") is None
    (ck / "step00000002").mkdir(parents=True)
    (ck / "step00000002" / "meta.json").write_text('{"step": 2, "world_size": 2}')
    (ck / "latest").write_text("step00000002")
    (ck / "step00000004.tmp").mkdir()  # killed mid-save
    (ck / "step00000006").mkdir()  # no meta.json: not complete
    assert m.resolve("auto").name == "step00000002"
    (ck / "step00000004").mkdir()
    (ck / "step00000004" / "meta.json").write_text('{"step": 4, "world_size": 2}')
    assert m.resolve("auto").name == "step00000004"  # killed between rename and pointer move
    assert m.resolve(str(ck)).name == "step00000002"  # a checkpoints folder follows its pointer
    with pytest.raises(CheckpointError, match="run.resume"):
        m.resolve(str(ck / "step00000006"))


def test_lora_merge_matches_peft_forward():
    """merge_lora_state_dict folds LoRA exactly like peft's own forward computes it."""
    from peft import LoraConfig, inject_adapter_in_model

    from distill.models import merge_lora_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    plain = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"]), net)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # peft starts B at 0; make the adapter matter
    merged = merge_lora_state_dict(net.state_dict(), scaling=6 / 2)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    plain.load_state_dict(merged)
    x = torch.randn(4, 8)
    torch.testing.assert_close(plain(x), net(x), rtol=1e-5, atol=1e-5)


def test_one_rank_with_unreadable_shards_stops_every_rank_before_weights_load(tiny_models, tmp_path):
    """One rank's only shard is garbage: both ranks end with exit 2 and that rank's message, before
    any model is built (no hang of the other rank in the first collective)."""
    import shutil

    paths = make_inputs(tmp_path, tiny_models)
    good = sorted((tmp_path / "synth" / "instruct" / "shards").glob("*.tar"))[0]
    shutil.copy(good, tmp_path / "a.tar")
    (tmp_path / "b.tar").write_bytes(b"this is not a tar archive" * 40)
    out = tmp_path / "run"
    args = ["--config", paths["yaml3"], *paths["common"], *paths["extra3"], f"run.output_dir={out}",
            f"data.shards=[{tmp_path / 'a.tar'},{tmp_path / 'b.tar'}]", "data.samples_per_epoch=4"]
    logs = tmp_path / "logs"
    logs.mkdir()
    rc = _launch.run(REPO / "launch" / "stage3.py", args, RANKS, logs, timeout=900)  # hang guard
    text = [(logs / f"rank{r}.log").read_text() for r in range(RANKS)]
    assert rc == 2, "\n".join(t[-2000:] for t in text)
    import re

    # split_by_node decides which rank reads b.tar; both ranks report that rank's message
    msgs = [re.search(r"config error: \[rank (\d)\] (.*)", t) for t in text]
    assert all(msgs) and msgs[0].group(0) == msgs[1].group(0), text
    assert "b.tar" in msgs[0].group(2) and "a.tar" not in msgs[0].group(2)
    assert "Traceback" not in text[0] + text[1]
    assert not (out / "checkpoints").exists()


def test_stage_without_teacher_terms_never_loads_the_teacher(tiny_models, tmp_path):
    """Stage 3 with kd_weight=0 and attn_weight=0 trains without building a teacher engine: the
    teacher folder here has its config and tokenizer but no weights, so loading it would fail."""
    import shutil

    paths = make_inputs(tmp_path, tiny_models)
    teacher = tmp_path / "teacher_without_weights"
    shutil.copytree(tiny_models.teacher, teacher, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    out = tmp_path / "run"
    args = ["--config", paths["yaml3"], *paths["common"], f"model.teacher={teacher}", "model.adapter_fetch=false",
            "loss.kd_weight=0", "loss.attn_weight=0", "run.steps=1", f"run.output_dir={out}"]
    logs = tmp_path / "logs"
    logs.mkdir()
    rc = _launch.run(REPO / "launch" / "stage3.py", args, 1, logs, timeout=900)  # hang guard
    assert rc == 0, (logs / "rank0.log").read_text()[-3000:]
    assert (out / "final").is_dir()
    rec = _metrics(out / "metrics.jsonl")[1]
    assert rec["kd"] == 0 and rec["attn"] == 0 and math.isfinite(rec["lm"])
