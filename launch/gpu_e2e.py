"""The DeepSpeed path end to end at real shapes, in one call (issue 19).

On one H100 / H200 (about 5-8 minutes; the GPU image needs the carried wheels, see
``launch/gpu/README.md``)::

    python launch/gpu_e2e.py --out runs/gpu_e2e

CPU dry run of every phase at tiny shapes, through the same launcher and the same files (what
``tests/test_gpu_e2e.py`` runs; ``DS_ACCELERATOR=cpu``, gloo, float32)::

    python launch/gpu_e2e.py --out /tmp/e2e --dry-run

Phases, in order; each is a subprocess with its log under ``OUT/logs`` and a time limit, and a
failure is recorded in the JSON (the phases that need its output are then skipped):

``models``   ``python -m distill.models.tiny --preset real --device cuda``: a Qwen1.5-1.8B-class
             student and a 4B-class teacher with a SigLIP-so400m tower, random bf16 weights
             (the tiny pair in the dry run).
``data``     ``python -m data_prep synth --size 384``: synthetic instruct shards at 384 px.
``attn``     ``deepspeed --num_gpus 1 launch/stage3.py`` (ZeRO-3 student and teacher, bf16,
             gradient checkpointing, LM + logit KD + visual-attention alignment on the fused
             capture), ``--steps`` steps logged one by one, a checkpoint at ``--save-at``; the
             run SIGKILLs itself inside its final save (``DISTILL_FAULTS=kill_in_save``), after
             every step has been logged, so its log is the uninterrupted run.
``resume``   The same command again: it must resume from the ``--save-at`` checkpoint (the
             killed save left only a ``.tmp`` folder), train the remaining steps and write
             ``final/``. Its per-step losses are compared with the first life's.
``no_attn``  The same run without the attention term (``loss.attn_weight=0``), for the timings.
``export``   ``python -m distill.export`` of ``final/`` (exact; custom projector, the teacher is
             wider than the student).
``reload``   ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` of the export
             (``trust_remote_code``) and a greedy ``generate`` on a data image.

Reported (``OUT/e2e.json``, ``OUT/e2e.md``): step time, tokens/s (labelled and input tokens),
MFU, peak accelerator memory, with and without the attention term; the resume check; the export
and reload. MFU = (6 N_student + 2 N_teacher) x input tokens/s / peak bf16 FLOP/s, N the text
decoders' parameters (lm_head included, embeddings excluded); vision towers, the recompute of
gradient checkpointing and attention's T^2 term are not counted (the usual convention).
Big files (models, shards, checkpoints) go under ``--work`` (default ``/tmp/distill-e2e``), never
under ``--out``. Checkpoints need about 12 bytes per trainable parameter each (two at once):
``--ckpt-dir`` puts them elsewhere (on the GPU image: ``/dev/shm`` when the work disk is short).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TERMS = ("loss", "lm", "kd", "attn")


# ------------------------------------------------------------------------------------ helpers

def _run(cmd, log: Path, timeout: float, env=None) -> dict:
    """Run ``cmd`` (output to ``log``); ``{"rc", "seconds", "log"}``; the group is killed on timeout."""
    from distill.subproc import run_logged

    return run_logged(cmd, log, timeout, env=env, cwd=ROOT)


def _tail(path, n=3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def deepspeed_cmd() -> list[str]:
    """The ``deepspeed`` launcher: on PATH, beside this Python, or its module."""
    for cand in (shutil.which("deepspeed"), Path(sys.executable).with_name("deepspeed")):
        if cand and Path(cand).exists():
            return [str(cand)]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def text_params(folder: Path) -> int:
    """Parameters of the folder's text decoder + lm_head, embeddings excluded (counted on meta)."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        m = LlavaForConditionalGeneration(cfg)
    lm = m.model.language_model
    total = sum(p.numel() for p in lm.parameters()) + m.lm_head.weight.numel()
    return total - lm.embed_tokens.weight.numel()


def stage_config(args, work: Path, models: Path, shards: Path) -> Path:
    """The stage-3 YAML of the runs (overrides pick the run folder and the attention weight)."""
    import yaml

    cfg = {
        "stage": 3,
        "run": {"output_dir": str(work / "run_attn"), "seed": 0, "steps": args.steps, "save_every": args.save_at,
                "keep_last": 1, "log_every": 1, "progress_bar": False},
        "model": {"student": str(models / "student"), "teacher": str(models / "teacher"), "adapter_fetch": True,
                  "dtype": args.dtype, "train_projector": True, "llm": "full",
                  "gradient_checkpointing": True},
        "data": {"shards": [str(shards)], "batch_size": args.batch_size, "max_length": args.max_length,
                 "num_workers": 0 if args.dry_run else 2, "shuffle_buffer": 64, "resampled": True,
                 "samples_per_epoch": 4096},
        "loss": {"lm_weight": 1.0, "kd_weight": 1.0, "kd_kind": "forward_kl", "attn_weight": 1.0,
                 "attn_kind": "filtered_cosine", "backend": "auto"},
        "deepspeed": {"zero_stage": 3, "grad_accum": args.grad_accum, "lr": 1e-5, "warmup_steps": 2,
                      "grad_clip": 1.0},
    }
    path = work / "stage3.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_metrics(path: Path) -> list[list[dict]]:
    """metrics.jsonl split into lives: a new life starts where the step number goes back."""
    lives: list[list[dict]] = []
    if not path.exists():
        return lives
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "step" not in rec:
            continue
        if not lives or rec["step"] <= lives[-1][-1]["step"]:
            lives.append([])
        lives[-1].append(rec)
    return lives


def timing(life: list[dict], warmup: int, n_student: int, n_teacher: int, tflops: float | None) -> dict:
    """Steady-state figures of one life (its first ``warmup`` steps left out)."""
    rows = life[warmup:] or life
    step = statistics.median(r["step_time_s"] for r in rows)
    out = {"steps_timed": [rows[0]["step"], rows[-1]["step"]], "step_time_s": step,
           "label_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
           "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
           "peak_accelerator_mb": max((r.get("peak_accelerator_mb", 0.0) for r in life), default=0.0),
           "peak_rss_mb": max(r["peak_rss_mb"] for r in life)}
    if all("input_tokens_per_s" in r for r in rows):
        tok = statistics.median(r["input_tokens_per_s"] for r in rows)
        out["input_tokens_per_s"] = tok
        flops = (6 * n_student + 2 * n_teacher) * tok
        out["model_tflops_per_s"] = flops / 1e12
        out["mfu"] = flops / (tflops * 1e12) if tflops else None
    return out


def compare_lives(first: list[dict], second: list[dict], rtol: float) -> dict:
    """Per-step losses of the resumed life against the uninterrupted one on the steps both have."""
    a = {r["step"]: r for r in first}
    rows, worst = [], 0.0
    for r in second:
        ref = a.get(r["step"])
        if ref is None:
            continue
        diff = {k: abs(r[k] - ref[k]) / max(abs(ref[k]), 1e-8) for k in TERMS if k in r and k in ref}
        worst = max([worst, *diff.values()])
        rows.append({"step": r["step"], **{k: [ref[k], r[k]] for k in diff}, "max_rel_diff": max(diff.values())})
    ok = bool(rows) and worst <= rtol and all(math.isfinite(r["loss"][1]) for r in rows)
    return {"ok": ok, "rtol": rtol, "max_rel_diff": worst, "steps": [r["step"] for r in rows], "rows": rows}


def reload_and_generate(export: Path, image_dir: Path, device: str, dtype: str) -> dict:
    """Stock Auto classes load the export; a greedy generate on one data image."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True, dtype=tdtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    load_s = time.perf_counter() - t0
    image_path = next(p for p in sorted(image_dir.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(tdtype)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return {"class": type(model).__name__, "load_s": round(load_s, 1), "logits_finite": bool(torch.isfinite(logits).all()),
            "new_tokens": int(new.numel()), "text": processor.tokenizer.decode(new), "image": str(image_path)}


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="report folder (e2e.json, e2e.md, logs/)")
    ap.add_argument("--work", default=None, help="models, shards, runs (default /tmp/distill-e2e; OUT/work in the dry run)")
    ap.add_argument("--ckpt-dir", default=None, help="where the resumable checkpoints go (default: in the run folder, "
                                                     "or /dev/shm when the work disk lacks the room)")
    ap.add_argument("--dry-run", action="store_true", help="CPU (DS_ACCELERATOR=cpu), tiny pair, float32")
    ap.add_argument("--steps", type=int, default=None, help="steps of the attention run (default 20; 4 dry)")
    ap.add_argument("--save-at", type=int, default=None, help="checkpoint step (default steps // 2)")
    ap.add_argument("--no-attn-steps", type=int, default=None, help="steps of the run without the attention term "
                                                                    "(default 10; 3 dry; 0 skips it)")
    ap.add_argument("--batch-size", type=int, default=None, help="micro-batch (default 4; 2 dry)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=None, help="data.max_length (default 2048; 256 dry)")
    ap.add_argument("--samples", type=int, default=None, help="synthetic scenes (default 400; 24 dry)")
    ap.add_argument("--rtol", type=float, default=None,
                    help="resume check: max relative loss difference (default 1e-2 on GPU, where backward "
                         "kernels are not bitwise deterministic; 1e-6 dry)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default by device name)")
    ap.add_argument("--phase-timeout", type=float, default=None, help="seconds per phase (default 420; 900 dry)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (4 if dry else 20)
    args.save_at = args.save_at or args.steps // 2
    args.no_attn_steps = (3 if dry else 10) if args.no_attn_steps is None else args.no_attn_steps
    args.batch_size = args.batch_size or (2 if dry else 4)
    args.max_length = args.max_length or (256 if dry else 2048)
    args.samples = args.samples or (24 if dry else 400)
    args.rtol = args.rtol if args.rtol is not None else (1e-6 if dry else 1e-2)
    args.phase_timeout = args.phase_timeout or (900.0 if dry else 420.0)
    args.dtype = "float32" if dry else "bfloat16"
    if not 0 < args.save_at < args.steps:
        ap.error(f"--save-at must be in 1..{args.steps - 1}, got {args.save_at}")
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else (out / "work" if dry else Path("/tmp/distill-e2e"))
    logs = out / "logs"
    for d in (out, work, logs):
        d.mkdir(parents=True, exist_ok=True)

    import torch

    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --dry-run")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if dry:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    device_name = "cpu" if dry else torch.cuda.get_device_name(0)
    optimizer = "torch AdamW (CPU accelerator)"
    if not dry:  # what distill.engine will choose for the student (it falls back when FusedAdam cannot build)
        from distill.engine import fused_adam_status

        ok, why = fused_adam_status()
        optimizer = f"DeepSpeed FusedAdam ({why})" if ok else f"torch AdamW ({why})"
    report = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": dry, "device": device_name,
                       "torch": torch.__version__, "python": sys.version.split()[0], "optimizer": optimizer,
                       "args": {k: v for k, v in vars(args).items()}},
              "phases": {}}
    phases = report["phases"]

    def phase(name, cmd, **kw):
        res = _run(cmd, logs / f"{name}.log", args.phase_timeout, env=kw.get("env", env))
        phases[name] = res
        print(f"[e2e] {name}: rc={res['rc']} in {res['seconds']} s", flush=True)
        return res

    def write():
        (out / "e2e.json").write_text(json.dumps(report, indent=2))
        (out / "e2e.md").write_text(render_markdown(report))

    try:
        _pipeline(args, work, phase, phases, report, env, device_name)
    finally:
        write()
    print(render_markdown(report))
    return 0 if report.get("ok") else 1


def _pipeline(args, work, phase, phases, report, env, device_name):
    dry = args.dry_run
    py = sys.executable
    models = work / "models"
    if not (models / "student" / "config.json").exists():
        cmd = [py, "-m", "distill.models.tiny", "--out", models, "--seed", "0"]
        if not dry:
            cmd += ["--preset", "real", "--device", "cuda"]
        if phase("models", cmd)["rc"] != 0:
            return
    data = work / "data"
    if phase("data", [py, "-m", "data_prep", "synth", "--out", data, "--num", args.samples, "--num-test", 1,
                      "--size", 48 if dry else 384, "--quiet"])["rc"] != 0:
        return
    shards = data / "instruct" / "shards"
    n_student, n_teacher = text_params(models / "student"), text_params(models / "teacher")
    report["models"] = {"student_text_params": n_student, "teacher_text_params": n_teacher}
    from distill.metrics import peak_bf16_tflops

    tflops = None if dry else (args.peak_tflops or peak_bf16_tflops(device_name))
    report["meta"]["peak_bf16_tflops"] = tflops

    run_attn, run_none = work / "run_attn", work / "run_noattn"
    for d in (run_attn, run_none):
        shutil.rmtree(d, ignore_errors=True)
    # two resumable checkpoints exist at once (the --save-at one and the killed final one)
    student_bytes = sum(p.stat().st_size for p in (models / "student").glob("*.safetensors"))
    need = 2 * 6 * student_bytes  # 12 bytes per bf16 parameter (fp32 master + Adam moments), twice
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else None
    if ckpt_dir is None and not dry and free_bytes(work) < need + (8 << 30) and Path("/dev/shm").is_dir() \
            and free_bytes(Path("/dev/shm")) > need:
        ckpt_dir = Path("/dev/shm/distill-e2e-ckpt")
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True)
        run_attn.mkdir(parents=True)
        (run_attn / "checkpoints").symlink_to(ckpt_dir, target_is_directory=True)
    report["meta"]["checkpoint_dir"] = str(ckpt_dir or run_attn / "checkpoints")
    report["meta"]["checkpoint_bytes_needed"] = need

    cfg = stage_config(args, work, models, shards)
    launch = [*deepspeed_cmd(), "--num_gpus", "1", ROOT / "launch" / "stage3.py", "--config", cfg]
    kill_env = dict(env, DISTILL_FAULTS=f"kill_in_save={args.steps}@0")
    first = phase("attn", launch, env=kill_env)
    lives = read_metrics(run_attn / "metrics.jsonl")
    if not lives or lives[0][-1]["step"] != args.steps:
        first["error"] = "the attention run did not log every step\n" + _tail(first["log"])
        return
    ckpts = run_attn / "checkpoints"
    first["checkpoints_after_kill"] = sorted(p.name for p in ckpts.glob("step*"))
    # the kill leaves the --save-at checkpoint and the final save's .tmp folder, nothing else
    first["killed_in_final_save"] = first["rc"] != 0 and first["checkpoints_after_kill"] == [
        f"step{args.save_at:08d}", f"step{args.steps:08d}.tmp"]
    resumed = phase("resume", launch)
    lives = read_metrics(run_attn / "metrics.jsonl")
    warmup = min(2, args.steps // 4)
    report["attn"] = timing(lives[0], warmup, n_student, n_teacher, tflops)
    resumed["resumed_from_step"] = lives[1][0]["step"] - 1 if len(lives) > 1 else None
    if resumed["rc"] != 0 or len(lives) < 2:
        resumed["error"] = _tail(resumed["log"])
        return
    report["resume_check"] = compare_lives(lives[0], lives[1], args.rtol)
    report["resume_check"]["resumed_from_step"] = resumed["resumed_from_step"]

    if args.no_attn_steps:
        r = phase("no_attn", [*launch, f"run.output_dir={run_none}", "loss.attn_weight=0",
                              f"run.steps={args.no_attn_steps}", "run.save_every=0"])
        lives_none = read_metrics(run_none / "metrics.jsonl")
        if r["rc"] == 0 and lives_none:
            report["no_attn"] = timing(lives_none[0], min(warmup, args.no_attn_steps - 1), n_student, n_teacher, tflops)
            report["attn_over_no_attn_step_time"] = report["attn"]["step_time_s"] / report["no_attn"]["step_time_s"]
        shutil.rmtree(run_none, ignore_errors=True)  # its end-of-run checkpoint is only disk

    export = work / "export"
    shutil.rmtree(export, ignore_errors=True)
    if phase("export", [py, "-m", "distill.export", "--checkpoint", run_attn / "final", "--out", export])["rc"] != 0:
        return
    t0 = time.perf_counter()
    try:
        report["reload"] = reload_and_generate(export, work / "data" / "instruct" / "images",
                                               "cpu" if dry else "cuda", args.dtype)
        phases["reload"] = {"rc": 0, "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # recorded, not raised: the report is the product of this script
        phases["reload"] = {"rc": 1, "error": f"{type(e).__name__}: {e}"}
        return
    rc_ok = all(p["rc"] == 0 for k, p in phases.items() if k != "attn")
    report["ok"] = bool(rc_ok and first["killed_in_final_save"] and report["resume_check"]["ok"]
                        and report["resume_check"]["resumed_from_step"] == args.save_at
                        and report["reload"]["logits_finite"] and report["reload"]["new_tokens"] > 0)


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def render_markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# DeepSpeed end to end ({'CPU dry run' if m['dry_run'] else m['device']}, {m['date']})", "",
             f"torch {m['torch']}; optimizer: {m['optimizer']}; overall: **{'ok' if report.get('ok') else 'FAILED'}**", "",
             "| phase | rc | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v.get('rc')} | {v.get('seconds', '-')} |" for k, v in report["phases"].items()]
    rows = [(k, report[k]) for k in ("attn", "no_attn") if k in report]
    if rows:
        lines += ["", "| run | step time (s) | input tok/s | labelled tok/s | samples/s | MFU | peak accel (MiB) |",
                  "|---|---|---|---|---|---|---|"]
        for k, t in rows:
            mfu = t.get("mfu")
            lines.append(f"| {k} | {_fmt(t['step_time_s'])} | {_fmt(t.get('input_tokens_per_s'), '.0f')} | "
                         f"{_fmt(t['label_tokens_per_s'], '.0f')} | {_fmt(t['samples_per_s'])} | "
                         f"{'-' if mfu is None else f'{100 * mfu:.1f} %'} | {_fmt(t['peak_accelerator_mb'], '.0f')} |")
        if "attn_over_no_attn_step_time" in report:
            lines.append(f"\nstep time with / without the attention term: {report['attn_over_no_attn_step_time']:.3f}x")
    rc = report.get("resume_check")
    if rc:
        lines += ["", f"Resume from step {rc['resumed_from_step']}: steps {rc['steps'][0]}-{rc['steps'][-1]}, "
                      f"max relative loss difference {rc['max_rel_diff']:.2e} (tolerance {rc['rtol']:.0e}): "
                      f"{'ok' if rc['ok'] else 'MISMATCH'}"]
    if "reload" in report:
        r = report["reload"]
        lines += ["", f"Export reload: {r['class']}, logits finite: {r['logits_finite']}, generated {r['new_tokens']} "
                      f"tokens: {r['text']!r}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
