"""End-to-end demo on the tiny offline pair: data → teacher → stages 1-3 → export → eval → report.

    python -m distill.demo --out runs/demo            # what `make demo` runs
    python -m distill.demo --out runs/demo --quick    # a smaller run (CI uses this)
    python -m distill.demo --out runs/ablation --ablation

Every step is the command a user would type (the data-prep CLI, the tiny-model CLI, the
``deepspeed`` launcher on ``launch/stageN.py`` with 2 ranks, ``python -m distill.export``,
``python -m distill.eval``, ``python -m distill.viz``), run as a subprocess with its output
streamed, so the demo exercises exactly the product's entry points. Steps whose outputs already
exist are skipped (rerun to resume after an interruption; ``--fresh`` starts over).

The teacher is the tiny teacher fine-tuned on the synthetic instruction data first (SFT, stage 2
without a teacher), so there is something worth distilling. The student then runs distilled
pre-training (stage 1), SFT (stage 2) and attention-distilled fine-tuning (stage 3), is exported to
a stock HF LLaVA folder, and teacher, untrained student and distilled student are evaluated on
the held-out compositional split and held-out Q/A. ``report.md`` gathers the table, loss curves and
teacher-vs-student attention maps.

``--ablation`` trains the same student three ways with the same budget (SFT only; logit KD;
logit KD + attention alignment) and reports compositional accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "launch" / "configs"


@dataclass
class Budget:
    """Sizes of one demo run."""

    scenes: int  # synthetic scenes per training split
    test_scenes: int  # held-out compositional scenes (and Q/A records)
    teacher_steps: int
    stage1_steps: int
    stage2_steps: int
    stage3_steps: int
    eval_limit: int | None  # cap on evaluated samples


FULL = Budget(scenes=384, test_scenes=96, teacher_steps=160, stage1_steps=40, stage2_steps=60, stage3_steps=60,
              eval_limit=None)
QUICK = Budget(scenes=32, test_scenes=8, teacher_steps=4, stage1_steps=2, stage2_steps=2, stage3_steps=3,
               eval_limit=8)


class Runner:
    """Runs the demo's commands with streamed output, timing and skip-if-done."""

    def __init__(self, out: Path, ranks: int):
        self.out = out
        self.ranks = ranks
        self.t0 = time.time()
        self.log = out / "demo.log"
        self.py = sys.executable
        self.env = dict(os.environ)
        self.env.setdefault("DS_ACCELERATOR", "cpu")
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))

    def step(self, title: str, cmd: list[str], done: Path | None = None) -> None:
        stamp = f"[demo {time.time() - self.t0:6.0f}s]"
        if done is not None and done.exists():
            print(f"{stamp} {title}: already done ({done.relative_to(self.out)}), skipping", flush=True)
            return
        print(f"{stamp} {title}\n    $ {' '.join(cmd)}", flush=True)
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            tail: list[str] = []
            last_bar = 0.0
            for line in proc.stdout:
                log.write(line)
                if "%|" in line:  # progress bars: one line every few seconds is enough here
                    if time.time() - last_bar < 10 and "100%|" not in line:
                        continue
                    last_bar = time.time()
                if _interesting(line):
                    print("    " + line.rstrip()[:200], flush=True)
                tail = (tail + [line])[-30:]
            rc = proc.wait()
        if rc != 0:
            sys.stderr.write("".join(tail))
            raise SystemExit(f"demo step '{title}' failed with exit code {rc}; full log: {self.log}")

    def deepspeed(self, title: str, stage: int, config: Path, overrides: list[str], done: Path) -> None:
        launcher = shutil.which("deepspeed", path=str(Path(self.py).parent)) or shutil.which("deepspeed")
        if launcher is None:
            raise SystemExit("the `deepspeed` launcher is not on PATH; install the project (make install)")
        cmd = [launcher, "--num_gpus", str(self.ranks), "--master_port", str(_free_port()),
               str(REPO / "launch" / f"stage{stage}.py"), "--config", str(config), *overrides]
        self.step(title, cmd, done)


def _interesting(line: str) -> bool:
    """Which lines of a child's output the console shows (everything goes to demo.log)."""
    low = line.lower()
    if "warning" in low and "error" not in low:
        return False
    keys = ("[distill]", "step ", "loss", "error", "accuracy", "wrote", "saved", "| ", "traceback", "exported",
            "records", "rejects", "%|")
    return any(k in low for k in keys) and "[launch.py" not in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_student(run: Runner, b: Budget, teacher: Path, student0: Path, data: Path, out: Path,
                  kd: float = 1.0, attn: float = 1.0, stage1: bool = True) -> Path:
    """Stages 1-3 on the student; returns the exported HF folder."""
    prev = student0
    common = [f"model.teacher={teacher}", "run.save_every=0"]
    if stage1:
        o = out / "stage1"
        run.deepspeed("stage 1: distilled pre-training (captions, LM + logit KD)", 1, CONFIGS / "tiny_stage1.yaml",
                      common + [f"run.output_dir={o}", f"model.student={prev}", f"run.steps={b.stage1_steps}",
                                f"data.shards=[{data / 'caption' / 'shards'}]", f"loss.kd_weight={kd}"],
                      done=o / "final")
        prev = o / "final"
    o = out / "stage2"
    run.deepspeed("stage 2: SFT (instructions, LM)", 2, CONFIGS / "tiny_stage2.yaml",
                  common + [f"run.output_dir={o}", f"model.student={prev}", f"run.steps={b.stage2_steps}",
                            f"data.shards=[{data / 'instruct' / 'shards'}]"],
                  done=o / "final")
    prev = o / "final"
    o = out / "stage3"
    run.deepspeed("stage 3: attention-distilled fine-tuning (LM + KD + visual attention)", 3,
                  CONFIGS / "tiny_stage3.yaml",
                  common + [f"run.output_dir={o}", f"model.student={prev}", f"run.steps={b.stage3_steps}",
                            f"data.shards=[{data / 'instruct' / 'shards'}]", f"loss.kd_weight={kd}",
                            f"loss.attn_weight={attn}"],
                  done=o / "final")
    exported = out / "student_hf"
    run.step("export the student to a stock HF LLaVA folder",
             [run.py, "-m", "distill.export", "--checkpoint", str(o / "final"), "--out", str(exported)],
             done=exported / "config.json")
    return exported


def evaluate(run: Runner, b: Budget, name: str, model: Path, test: Path, out: Path) -> dict:
    """Compositional accuracy + held-out VQA of one model folder."""
    res = {}
    for task, data in (("compositional", test / "compositional" / "shards"), ("vqa", test / "instruct" / "shards")):
        o = out / "eval" / name
        cmd = [run.py, "-m", "distill.eval", task, "--model", str(model), "--data", str(data), "--out", str(o),
               "--device", "cpu", "--no-progress"]
        if b.eval_limit:
            cmd += ["--limit", str(b.eval_limit)]
        run.step(f"eval {task}: {name}", cmd, done=o / f"{task}.json")
        res[task] = json.loads((o / f"{task}.json").read_text())
    return res


def _export_lines(out: Path) -> list[str]:
    """Which export path each exported student took (from its distill_export.json)."""
    from distill.export import EXPORT_INFO, describe

    return [f"Export `{f.parent.relative_to(out)}`: {describe(json.loads(f.read_text()))}."
            for f in sorted(out.glob(f"**/student_hf/{EXPORT_INFO}"))] or ["Export: no distill_export.json found."]


def report(out: Path, results: dict[str, dict], images: dict[str, Path], budget: Budget, elapsed: float) -> str:
    """Write report.md and return the headline table."""
    cats = sorted({c for r in results.values() for c in r["compositional"].get("per_category", {})})
    head = "| model | compositional overall | " + " | ".join(cats) + " | VQA exact match |"
    lines = [head, "|---" * (3 + len(cats)) + "|"]
    for name, r in results.items():
        comp = r["compositional"]
        per = comp.get("per_category", {})
        cells = [f"{100 * comp['overall']['accuracy']:.1f}"] + [
            f"{100 * per[c]['accuracy']:.1f}" if c in per else "-" for c in cats]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r['vqa']['overall']['accuracy']:.1f} |")
    table = "\n".join(lines)
    n_comp = next(iter(results.values()))["compositional"]["overall"]["total"]
    body = [
        "# Demo report", "",
        f"Tiny offline teacher/student pair, synthetic compositional data ({budget.scenes} training scenes per split, "
        f"{n_comp} held-out compositional samples), DeepSpeed ZeRO-3 on 2 CPU ranks. Wall time {elapsed / 60:.1f} min.",
        "", *_export_lines(out),
        "", "Accuracy (%) on held-out data; compositional = the positive caption must out-score every hard negative "
        "(replace attribute / replace relation / swap attributes / swap objects); a category column = the positive "
        "out-scores that category's negatives.", "", table, "",
    ]
    for title, path in images.items():
        if path.exists():
            body += [f"## {title}", "", f"![{title}]({path.relative_to(out)})", ""]
    (out / "report.md").write_text("\n".join(body))
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="End-to-end CompoDistill demo on tiny offline models (2 CPU ranks).")
    ap.add_argument("--out", default="runs/demo", help="output folder (report.md lands here)")
    ap.add_argument("--quick", action="store_true", help="a much smaller run (CI)")
    ap.add_argument("--ablation", action="store_true",
                    help="train the student three ways (SFT only; +KD; +KD+attention) and compare")
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (processes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    b = QUICK if args.quick else FULL
    run = Runner(out, args.ranks)
    t0 = time.time()

    data, test, models = out / "data", out / "data_test", out / "models"
    run.step("synthetic training data", [run.py, "-m", "data_prep", "synth", "--out", str(data), "--num",
                                         str(b.scenes), "--seed", str(args.seed), "--num-test", "1", "--quiet",
                                         "--shard-size", str(max(2, b.scenes // 16))],
             done=data / "instruct" / "shards" / "manifest.json")
    run.step("held-out test data (another seed)",
             [run.py, "-m", "data_prep", "synth", "--out", str(test), "--num", str(b.test_scenes), "--num-test",
              str(b.test_scenes), "--seed", str(args.seed + 1000), "--quiet", "--shard-size", "64"],
             done=test / "compositional" / "shards" / "manifest.json")
    run.step("tiny teacher and student", [run.py, "-m", "distill.models.tiny", "--out", str(models), "--seed",
                                          str(args.seed)], done=models / "student" / "config.json")

    # A teacher worth distilling: SFT of the tiny teacher on the instruction data (no teacher of its own).
    o = out / "teacher_sft"
    run.deepspeed("teacher SFT (stage 2 without a teacher)", 2, CONFIGS / "tiny_stage2.yaml",
                  [f"run.output_dir={o}", f"model.student={models / 'teacher'}", "model.teacher=null",
                   "model.adapter_fetch=false", "model.llm=full", f"run.steps={b.teacher_steps}", "run.save_every=0",
                   f"data.shards=[{data / 'instruct' / 'shards'}]", "deepspeed.lr=1e-3"],
                  done=o / "final")
    teacher = out / "teacher_hf"
    run.step("export the teacher", [run.py, "-m", "distill.export", "--checkpoint", str(o / "final"), "--out",
                                    str(teacher)], done=teacher / "config.json")

    results: dict[str, dict] = {}
    images: dict[str, Path] = {}
    if args.ablation:
        variants = {"SFT only": (0.0, 0.0), "logit KD": (1.0, 0.0), "logit KD + attention": (1.0, 1.0)}
        results["teacher"] = evaluate(run, b, "teacher", teacher, test, out)
        for name, (kd, attn) in variants.items():
            slug = name.replace(" ", "_").replace("+", "plus")
            student = train_student(run, b, teacher, models / "student", data, out / slug, kd=kd, attn=attn)
            results[f"student ({name})"] = evaluate(run, b, slug, student, test, out)
    else:
        student = train_student(run, b, teacher, models / "student", data, out)
        results["teacher (SFT)"] = evaluate(run, b, "teacher", teacher, test, out)
        results["student (untrained)"] = evaluate(run, b, "student_base", models / "student", test, out)
        results["student (distilled)"] = evaluate(run, b, "student", student, test, out)

        figs = out / "figures"
        figs.mkdir(exist_ok=True)
        image = sorted((test / "compositional" / "images").glob("*.png"))[0]
        images["Teacher vs student visual attention"] = figs / "attention.png"
        run.step("attention maps", [run.py, "-m", "distill.viz", "attention", "--teacher", str(teacher), "--student",
                                    str(student), "--image", str(image), "--prompt", "Describe the image.",
                                    "--out", str(figs / "attention.png"), "--device", "cpu", "--visible-rows"],
                 done=figs / "attention.png")
        for stage in ("stage1", "stage2", "stage3"):
            metrics = out / stage / "metrics.jsonl"
            if metrics.exists():
                images[f"Loss curves, {stage}"] = figs / f"curves_{stage}.png"
                run.step(f"loss curves {stage}", [run.py, "-m", "distill.viz", "curves", str(metrics), "--out",
                                                  str(figs / f"curves_{stage}.png")],
                         done=figs / f"curves_{stage}.png")

    table = report(out, results, images, b, time.time() - t0)
    print(f"\n[demo] done in {(time.time() - t0) / 60:.1f} min; report: {out / 'report.md'}\n\n{table}\n", flush=True)


if __name__ == "__main__":
    main()
