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
import dataclasses
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

    teacher_scenes: int  # synthetic scenes per training split the teacher trains on
    student_scenes: int  # the first of those scenes, which the student sees (fewer: distillation matters)
    test_scenes: int  # held-out compositional scenes (and Q/A records)
    teacher_steps: int  # phase 1: captions only
    teacher_qa_steps: int  # phase 2: captions + Q/A
    stage1_steps: int
    stage2_steps: int
    stage3_steps: int
    ablation_steps: int  # the one stage-3 run of each ablation variant
    eval_limit: int | None  # cap on evaluated samples
    tower_steps: int = 6000  # the teacher's vision tower, pre-trained before any LM step (distill.models.tower_pretrain)
    tower_scenes: int = 12000  # rendered for it from a seed stream of its own (the last 500 held out)
    ablation_lr: float = 1e-3  # that run's peak rate
    teacher_lr: float = 3e-4  # higher rates let the random-init teacher learn the text alone and ignore the image
    patch_size: int = 8  # 48 px / 8 = a 6 x 6 grid: 36 image tokens, an object covers about 2 x 2 of them
    batch_size: int = 8  # per rank and micro-batch (2 ranks)


FULL = Budget(teacher_scenes=8000, student_scenes=400, test_scenes=96, teacher_steps=1000, teacher_qa_steps=400,
              stage1_steps=40, stage2_steps=60, stage3_steps=120, ablation_steps=400, eval_limit=None)
QUICK = Budget(teacher_scenes=32, student_scenes=16, test_scenes=8, teacher_steps=4, teacher_qa_steps=2,
               stage1_steps=2, stage2_steps=2, stage3_steps=3, ablation_steps=2, eval_limit=8, batch_size=2,
               tower_steps=2, tower_scenes=40)
DATA_FLAGS = ("--cell-words", "--all-relations", "--choice-questions")
"""Every demo data set names each shape's grid cell, states one true relation per ordered pair of
shapes and asks two-option caption questions among its Q/A (``python -m data_prep synth``); the
student's data are the first scenes of the teacher's."""
TEACHER_ZERO_STAGE = 2
"""The teacher's own training (stage 2 without a teacher) runs ZeRO-2; see :func:`train_teacher`."""
VARIANTS = {"sft": (0.0, 0.0), "kd": (1.0, 0.0), "kd_attn": (1.0, 1.0)}
"""Ablation variants: (loss.kd_weight, loss.attn_weight); the LM weight is 1 in all three."""


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
            print(f"{stamp} {title}: already done ({os.path.relpath(done, self.out)}), skipping", flush=True)
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

    def synth(self, title: str, out: Path, num: int, seed: int, num_test: int, shard_size: int) -> Path:
        """``python -m data_prep synth`` into ``out`` (done once its splits are sharded); returns ``out``."""
        self.step(title, [self.py, "-m", "data_prep", "synth", "--out", str(out), "--num", str(num), "--seed",
                          str(seed), "--num-test", str(num_test), "--quiet", "--shard-size", str(shard_size),
                          *DATA_FLAGS],
                  done=out / "compositional" / "shards" / "manifest.json")
        return out

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
    common = [f"model.teacher={teacher}", "run.save_every=0", f"data.batch_size={b.batch_size}",
              "deepspeed.grad_accum=1"]
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
                            f"data.shards=[{data / 'caption' / 'shards'},{data / 'instruct' / 'shards'}]",
                            f"loss.kd_weight={kd}", f"loss.attn_weight={attn}"],
                  done=o / "final")
    return export(run, o / "final", out / "student_hf")


def export(run: Runner, checkpoint: Path, out: Path) -> Path:
    run.step(f"export {out.name} to an HF LLaVA folder",
             [run.py, "-m", "distill.export", "--checkpoint", str(checkpoint), "--out", str(out)],
             done=out / "config.json")
    return out


def ablation_student(run: Runner, b: Budget, teacher: Path, student0: Path, data: Path, out: Path, seed: int,
                     kd: float, attn: float, num_layers: int | None = None) -> Path:
    """One ablation variant: a single stage-3 run from the untrained student on the student's captions
    and Q/A (the same budget for every variant; only the loss weights differ). Returns the export."""
    o = out / "train"
    run.deepspeed(f"ablation {out.parent.name}/{out.name}: stage 3 with kd_weight={kd}, attn_weight={attn}", 3,
                  CONFIGS / "tiny_stage3.yaml",
                  [f"run.output_dir={o}", f"model.student={student0}", f"model.teacher={teacher}", "run.save_every=0",
                   f"run.seed={seed}", f"run.steps={b.ablation_steps}", f"data.batch_size={b.batch_size}",
                   "deepspeed.grad_accum=1", f"deepspeed.lr={b.ablation_lr}",
                   f"data.shards=[{data / 'caption' / 'shards'},{data / 'instruct' / 'shards'}]",
                   f"loss.kd_weight={kd}", f"loss.attn_weight={attn}",
                   *([f"loss.num_layers={num_layers}"] if num_layers is not None else [])],
                  done=o / "final")
    return export(run, o / "final", out / "student_hf")


def evaluate(run: Runner, b: Budget, name: str, model: Path, test: Path, out: Path,
             teacher: Path | None = None) -> dict:
    """Held-out compositional accuracy under both protocols (likelihood ranking; the reference's A/B
    question), held-out VQA and, given the ``teacher``, the student-teacher visual-attention similarity.
    Results land in ``out`` (``compositional.json``, ``compositional_ab.json``, ``vqa.json``,
    ``attn_similarity.json``)."""
    comp, qa = test / "compositional" / "shards", test / "instruct" / "shards"
    model_args = ["--model", str(model)]
    tasks = [("compositional", ["compositional", *model_args, "--data", str(comp)]),
             ("compositional_ab", ["compositional", "--protocol", "ab", *model_args, "--data", str(comp)]),
             ("vqa", ["vqa", *model_args, "--data", str(qa)])]
    if teacher is not None:
        tasks.append(("attn_similarity", ["attn_similarity", "--teacher", str(teacher), "--student", str(model),
                                          "--data", str(comp)]))
    res = {}
    for stem, task in tasks:
        cmd = [run.py, "-m", "distill.eval", *task, "--out", str(out), "--device", "cpu", "--no-progress"]
        if b.eval_limit:
            cmd += ["--limit", str(b.eval_limit)]
        run.step(f"eval {stem}: {name}", cmd, done=out / f"{stem}.json")
        res[stem] = json.loads((out / f"{stem}.json").read_text())
    return res


def _export_lines(out: Path) -> list[str]:
    """Which export path each exported student took (from its distill_export.json)."""
    from distill.export import EXPORT_INFO, describe

    return [f"Export `{f.parent.relative_to(out)}`: {describe(json.loads(f.read_text()))}."
            for f in sorted(out.glob(f"**/student_hf/{EXPORT_INFO}"))] or ["Export: no distill_export.json found."]


def report(out: Path, results: dict[str, dict], images: dict[str, Path], budget: Budget, elapsed: float) -> str:
    """Write report.md and return the headline table."""
    cats = sorted({c for r in results.values() for c in r["compositional"].get("per_category", {})})
    head = ("| model | compositional overall | " + " | ".join(cats) +
            " | A/B overall | VQA exact match | attention cosine |")
    lines = [head, "|---" * (5 + len(cats)) + "|"]
    for name, r in results.items():
        comp = r["compositional"]
        per = comp.get("per_category", {})
        cells = [f"{100 * comp['overall']['accuracy']:.1f}"] + [
            f"{100 * per[c]['accuracy']:.1f}" if c in per else "-" for c in cats]
        cells.append(f"{100 * r['compositional_ab']['overall']['accuracy']:.1f}")
        cells.append(f"{100 * r['vqa']['overall']['accuracy']:.1f}")
        sim = r.get("attn_similarity")
        cells.append(f"{sim['mean']:.4f}" if sim else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    n_comp = next(iter(results.values()))["compositional"]["overall"]["total"]
    body = [
        "# Demo report", "",
        f"Tiny offline teacher/student pair, synthetic compositional data (the teacher trained on "
        f"{budget.teacher_scenes} scenes per split, the student sees the first {budget.student_scenes}; "
        f"{n_comp} held-out compositional samples); the student's stages under DeepSpeed ZeRO-3 on 2 CPU ranks "
        f"(the teacher's own training ZeRO-{TEACHER_ZERO_STAGE}). Wall time {elapsed / 60:.1f} min.",
        "", *_export_lines(out),
        "", "Accuracy (%) on held-out data. Compositional (likelihood) = the positive caption must out-score every hard "
        "negative (replace attribute / replace relation / swap attributes / swap objects); a category column = the "
        "positive out-scores that category's negatives (chance 50 %). A/B = the reference's protocol: an A/B question "
        "asked twice with the order swapped (chance 50 %). Attention cosine = the student-teacher cosine of the "
        "filtered visual-attention column profiles (`python -m distill.eval attn_similarity`), mean over the matched "
        "layers and held-out images.", "",
        table, "",
    ]
    for title, path in images.items():
        if path.exists():
            body += [f"## {title}", "", f"![{title}]({os.path.relpath(path, out)})", ""]
    (out / "report.md").write_text("\n".join(body))
    return table


def _recipe(b: Budget, seed: int) -> dict:
    return {"teacher_scenes": b.teacher_scenes, "teacher_steps": b.teacher_steps, "teacher_qa_steps": b.teacher_qa_steps,
            "teacher_lr": b.teacher_lr, "tower_steps": b.tower_steps, "tower_scenes": b.tower_scenes,
            "data_flags": list(DATA_FLAGS),
            "patch_size": b.patch_size, "batch_size": b.batch_size, "seed": seed, "zero_stage": TEACHER_ZERO_STAGE,
            "version": 5}


def train_teacher(run: Runner, b: Budget, root: Path, seed: int) -> tuple[Path, Path]:
    """The tiny teacher: its vision tower pre-trained on what each image token shows, then frozen while
    the projector and the LLM train on captions and Q/A of ``teacher_scenes`` scenes (LM loss, no
    teacher of its own). Kept in ``root`` with the recipe it was trained with
    and reused by later runs with the same recipe (another recipe retrains it). Returns (teacher HF
    folder, teacher training data)."""
    recipe = _recipe(b, seed)
    stamp = root / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) != recipe:
        print(f"[demo] {root} holds a teacher of another recipe; training a new one", flush=True)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe, indent=1) + "\n")
    models = root / "models"
    data = run.synth("synthetic training data (the teacher's scenes)", root / "data", b.teacher_scenes, seed, 1,
                     max(2, b.teacher_scenes // 16))
    run.step("tiny teacher (random weights)", [run.py, "-m", "distill.models.tiny", "--out", str(models), "--seed",
                                               str(seed), "--patch-size", str(b.patch_size),
                                               "--vision-position-init", "sincos"],
             done=models / "teacher" / "config.json")
    # The tower learns what each image token shows (colour, shape, the scene's relations) before any LM
    # step, and stays frozen after: a thousand LM steps cannot train a tower from the captions alone
    # (docs/results/2026-12-02-teacher-position.md). Its own scenes, not the pipeline's.
    tower = models / "teacher_tower"
    run.step("vision tower pre-training (what each image token shows; distill.models.tower_pretrain)",
             [run.py, "-m", "distill.models.tower_pretrain", "--model", str(models / "teacher"), "--out", str(tower),
              "--steps", str(b.tower_steps), "--scenes", str(b.tower_scenes), "--seed", str(seed),
              "--held-out", str(min(500, b.tower_scenes // 4))],
             done=tower / "tower_pretrain.json")
    # Phase 1 on captions alone: a random-init model fed Q/A from the start (or at higher rates) learns the
    # text and learns to ignore the image (measured: held-out loss with shuffled images equal to 1e-5).
    # Phase 2 adds the Q/A once the captions have taught it to look.
    # ZeRO-2 here: a model of a few million parameters needs no parameter sharding, and ZeRO-3's per-module
    # gathers cost this loop 1.7x on 2 CPU ranks (same weights to 3e-6 after 60 steps); the student's
    # stages, the product's path, stay ZeRO-3.
    common = ["model.teacher=null", "model.adapter_fetch=false", "model.llm=full", "model.train_vision=false",
              f"deepspeed.zero_stage={TEACHER_ZERO_STAGE}", "run.save_every=0", f"run.seed={seed}", "run.log_every=25",
              f"data.batch_size={b.batch_size}", "deepspeed.grad_accum=1", f"deepspeed.lr={b.teacher_lr}"]
    prev = tower
    for phase, steps, splits, what in ((1, b.teacher_steps, ("caption",), "captions"),
                                       (2, b.teacher_qa_steps, ("caption", "instruct"), "captions + Q/A")):
        o = root / f"train{phase}"
        shards = ",".join(str(data / sp / "shards") for sp in splits)
        run.deepspeed(f"teacher training, phase {phase}: {what}, projector and LLM (stage 2 without a teacher)",
                      2, CONFIGS / "tiny_stage2.yaml",
                      common + [f"run.output_dir={o}", f"model.student={prev}", f"run.steps={steps}",
                                f"deepspeed.warmup_steps={20 if phase == 1 else 0}", f"data.shards=[{shards}]"],
                      done=o / "final")
        prev = o / "final"
    return export(run, prev, root / "teacher_hf"), data


def student_data(run: Runner, b: Budget, out: Path, seed: int) -> Path:
    """The student's training data: the first ``student_scenes`` of the teacher's scenes (same seed)."""
    return run.synth("the student's training data (the first scenes of the teacher's)", out / "data_student",
                     b.student_scenes, seed, 1, max(2, b.student_scenes // 8))


def untrained_student(run: Runner, b: Budget, teacher: Path, out: Path, seed: int) -> Path:
    """A random tiny student sharing the teacher's trained vision tower (as real pairs share theirs)."""
    run.step(f"tiny student (random weights, seed {seed}, the teacher's vision tower)",
             [run.py, "-m", "distill.models.tiny", "--out", str(out), "--seed", str(seed), "--patch-size",
              str(b.patch_size), "--vision-from", str(teacher)], done=out / "student" / "config.json")
    return out / "student"


def ablation_variants(attn_weights: list[float]) -> dict[str, tuple[float, float]]:
    """:data:`VARIANTS` with kd_attn at each of ``attn_weights`` (1 keeps the name kd_attn; another
    weight w adds kd_attn_w<w>), in the order given."""
    out = {k: v for k, v in VARIANTS.items() if k != "kd_attn"}
    for w in attn_weights:
        if w <= 0:
            raise SystemExit(f"--attn-weights: each weight must be > 0, got {w:g}")
        out["kd_attn" if w == 1 else f"kd_attn_w{w:g}"] = (1.0, float(w))
    return out


def layer_variants(attn_layers: list[int]) -> dict[str, int]:
    """kd_attn (weight 1) aligning each of ``attn_layers`` student layers instead of the derived default
    (``loss.num_layers``; the teacher windows follow from the depths): ``{"kd_attn_L<n>": n}``."""
    out = {}
    for n in attn_layers:
        if n < 1:
            raise SystemExit(f"--attn-layers: each count must be >= 1, got {n}")
        out[f"kd_attn_L{n}"] = int(n)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="End-to-end CompoDistill demo on tiny offline models (2 CPU ranks).")
    ap.add_argument("--out", default="runs/demo", help="output folder (report.md lands here)")
    ap.add_argument("--quick", action="store_true", help="a much smaller run (CI)")
    ap.add_argument("--ablation", action="store_true",
                    help="train the student three ways (sft; kd; kd_attn) over --seeds and write ablation.json")
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (processes)")
    ap.add_argument("--seed", type=int, default=0, help="data, teacher and (demo) student seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--ablation: student seeds")
    ap.add_argument("--attn-weights", type=float, nargs="+", default=[1.0],
                    help="--ablation: loss.attn_weight of the kd_attn variant; each weight other than 1 adds a "
                         "variant kd_attn_w<weight> (e.g. --attn-weights 1 1000)")
    ap.add_argument("--attn-layers", type=int, nargs="+", default=[],
                    help="--ablation: also train kd_attn aligning N student layers (loss.num_layers=N; default: "
                         "depth // 4) as a variant kd_attn_L<N>, for each N given (e.g. --attn-layers 2 4)")
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                    help="--ablation: train and evaluate only these variants (the others' folders are left as they "
                         "are; ablation.json also keeps every other variant already evaluated on every seed)")
    ap.add_argument("--teacher-dir", default=None,
                    help="where the trained teacher is kept and reused (default OUT/teacher; `make demo` and "
                         "`make ablation` share runs/tiny_teacher)")
    ap.add_argument("--ablation-steps", type=int, default=None,
                    help=f"--ablation: steps of each variant's stage-3 run (default {FULL.ablation_steps})")
    ap.add_argument("--ablation-lr", type=float, default=None,
                    help=f"--ablation: its peak learning rate (default {FULL.ablation_lr:g})")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (the --teacher-dir is kept)")
    args = ap.parse_args(argv)
    b = QUICK if args.quick else FULL
    if args.ablation_steps is not None or args.ablation_lr is not None:
        if not args.ablation:
            raise SystemExit("--ablation-steps / --ablation-lr apply to --ablation only")
        if args.ablation_steps is not None and args.ablation_steps < 1:
            raise SystemExit(f"--ablation-steps must be >= 1, got {args.ablation_steps}")
        if args.ablation_lr is not None and not args.ablation_lr > 0:
            raise SystemExit(f"--ablation-lr must be > 0, got {args.ablation_lr}")
        b = dataclasses.replace(b, ablation_steps=args.ablation_steps or b.ablation_steps,
                                ablation_lr=args.ablation_lr or b.ablation_lr)
    # the ablation's variants (kd_weight, attn_weight, loss.num_layers), checked before anything runs
    variants = {k: (kd, attn, None) for k, (kd, attn) in ablation_variants(args.attn_weights).items()}
    variants.update({k: (1.0, 1.0, n) for k, n in layer_variants(args.attn_layers).items()})
    everything = list(variants)
    if args.only is not None:
        unknown = [v for v in args.only if v not in variants]
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {', '.join(unknown)}; the variants are {', '.join(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ablation:  # finished runs are reused by folder: never mix two budgets in one --out
        stamp, budget = out / "ablation_budget.json", {"steps": b.ablation_steps, "lr": b.ablation_lr}
        if stamp.exists() and json.loads(stamp.read_text()) != budget:
            raise SystemExit(f"{out} holds ablation runs of another budget ({stamp.read_text().strip()}, asked "
                             f"{json.dumps(budget)}); use another --out or --fresh")
        stamp.write_text(json.dumps(budget) + "\n")
    run = Runner(out, args.ranks)
    t0 = time.time()

    teacher, _ = train_teacher(run, b, Path(args.teacher_dir).resolve() if args.teacher_dir else out / "teacher",
                               args.seed)
    test = run.synth("held-out test data (another seed)", out / "data_test", b.test_scenes, args.seed + 1000,
                     b.test_scenes, 64)
    data = student_data(run, b, out, args.seed)

    results: dict[str, dict] = {}
    images: dict[str, Path] = {}
    if args.ablation:
        from distill.eval.ablation import collect_ablation, write_ablation

        evaluate(run, b, "teacher", teacher, test, out / "teacher" / "eval")
        for seed in args.seeds:
            student0 = untrained_student(run, b, teacher, out / f"seed{seed}" / "models", seed)
            for variant, (kd, attn, layers) in variants.items():
                vdir = out / f"seed{seed}" / variant
                student = ablation_student(run, b, teacher, student0, data, vdir, seed, kd, attn, layers)
                evaluate(run, b, f"seed {seed} {variant}", student, test, vdir / "eval", teacher=teacher)
        collected = list(variants)
        if args.only is not None:  # the table also keeps every other variant already evaluated on every seed
            collected = [v for v in everything if v in variants or all(
                (out / f"seed{s}" / v / "eval" / "attn_similarity.json").exists() for s in args.seeds)]
        result = collect_ablation(out, args.seeds, collected)
        _, md = write_ablation(out, result)
        table = md.read_text()
        print(f"\n[demo] ablation done in {(time.time() - t0) / 60:.1f} min; {out / 'ablation.json'}\n\n{table}\n",
              flush=True)
        return

    student0 = untrained_student(run, b, teacher, out / "models", args.seed)
    student = train_student(run, b, teacher, student0, data, out)
    results["teacher"] = evaluate(run, b, "teacher", teacher, test, out / "eval" / "teacher")
    results["student (untrained)"] = evaluate(run, b, "student_base", student0, test, out / "eval" / "student_base",
                                              teacher=teacher)
    results["student (distilled)"] = evaluate(run, b, "student", student, test, out / "eval" / "student",
                                              teacher=teacher)

    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    image = sorted((test / "compositional" / "images").glob("*.png"))[0]
    images["Teacher vs student visual attention"] = figs / "attention.png"
    run.step("attention maps", [run.py, "-m", "distill.viz", "attention", "--teacher", str(teacher), "--student",
                                str(student), "--image", str(image), "--prompt", "Describe the image briefly.",
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
