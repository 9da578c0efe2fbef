"""Multi-rank test worker (started by tests with tests/_launch.py, 2 CPU ranks).

    python tests/_ds_worker.py MODE[,MODE...] OUT_DIR PATHS_JSON

Several trainings share one launch to amortise process start-up. Each rank writes
``OUT_DIR/result_{MODE}_rank{r}.json``; the pytest side asserts on them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from distill import engine as E
from distill import train as T
from distill.config import load_config


def _cfg(paths, stage, overrides):
    return load_config(paths[f"yaml{stage}"], overrides, stage=stage)


def _partition_report(module) -> dict:
    """Counts of parameters this rank holds only a shard of (ds_tensor vs ds_numel)."""
    ps = list(module.parameters())
    world = torch.distributed.get_world_size()
    big = [p for p in ps if p.ds_numel >= world]  # every parameter large enough to split
    return {
        "n_params": len(ps),
        "n_splittable": len(big),
        "n_partitioned": sum(int(p.ds_tensor.numel() < p.ds_numel) for p in big),
        "local_numel": sum(p.ds_tensor.numel() for p in ps),
        "full_numel": sum(p.ds_numel for p in ps),
    }


def mode_chain(paths, out: Path, rank: int) -> dict:
    """Stages 1 -> 2 -> 3, each starting from the previous final/ folder (as the YAMLs chain)."""
    res = {}
    prev = None
    for stage in (1, 2, 3):
        ov = list(paths["common"]) + [f"run.output_dir={out / f'stage{stage}'}"] + list(paths[f"extra{stage}"])
        if prev is not None:
            ov.append(f"model.student={prev}")
        cfg = _cfg(paths, stage, ov)
        run = T.setup(cfg)
        summary = T.finalize(T.fit(run))
        eng = run.engines
        r = {"final": summary["final"], "last": summary["last"],
             "student": _partition_report(eng.student_model),
             "teacher": _partition_report(eng.teacher_model) if eng.teacher is not None else None,
             "zero_stage": eng.student_config["zero_optimization"]["stage"]}
        res[f"stage{stage}"] = r
        prev = summary["final"]
        del summary, eng, run
    return res


def _reference_grad_norm(cfg, world) -> float:
    """Plain PyTorch (no DeepSpeed) gradient norm of step 1 over every rank's micro-batches."""
    from transformers.integrations import deepspeed as hf_ds

    from distill.data import build_loader, count_targets
    from distill.models import build_student, build_teacher, load_processor, select_trainable
    from distill.objective import DistillObjective

    hf_ds.unset_hf_deepspeed_config()
    m = cfg.model
    student = build_student(m.student, teacher_path=m.teacher, adapter_fetch=m.adapter_fetch, dtype=m.torch_dtype)
    select_trainable(student, m)
    teacher = build_teacher(m.teacher, dtype=m.torch_dtype) if m.teacher else None
    obj = DistillObjective(cfg.loss, student, teacher)
    proc = load_processor(m.student)
    batches = []
    for r in range(world):
        it = iter(build_loader(cfg.data, proc, rank=r, world_size=world, seed=cfg.run.seed))
        batches += [next(it) for _ in range(cfg.deepspeed.grad_accum)]
    n_tok = sum(count_targets(b)[0] for b in batches).clamp(min=1)
    n_img = sum(count_targets(b)[1] for b in batches).clamp(min=1)
    total = {k: 0.0 for k in T.LOSS_TERMS}
    student.zero_grad()
    for b in batches:
        o = obj(student, (lambda **kw: teacher(**kw)) if teacher is not None else None, b,
                num_tokens=n_tok, num_images=n_img)
        o["loss"].backward()
        for k in total:
            total[k] += float(o[k])
    gn = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in student.parameters() if p.grad is not None))
    return float(gn), total


def mode_accum(paths, out: Path, rank: int) -> dict:
    """accum 2 x micro 1 vs micro 2 x accum 1 (one optimizer step), + plain reference grad norm;
    then the non-finite skip/abort paths."""
    res = {}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 2
    for name, ov in (("accum2_micro1", ["deepspeed.grad_accum=2", "data.batch_size=1"]),
                     ("accum1_micro2", ["deepspeed.grad_accum=1", "data.batch_size=2"]),
                     ("zero2_accum1_micro2", ["deepspeed.grad_accum=1", "data.batch_size=2",
                                              "deepspeed.zero_stage=2"])):
        cfg = _cfg(paths, 3, list(paths["common"]) + ov + [f"run.output_dir={out / name}", "run.steps=1",
                                                         "deepspeed.warmup_steps=0", "run.log_every=1"])
        summary = T.train(cfg)
        res[name] = {"last": summary["last"], "final": summary["final"]}
        del summary
    if rank == 0:
        cfg = _cfg(paths, 3, list(paths["common"]) + ["deepspeed.grad_accum=1", "data.batch_size=2"])
        gn, terms = _reference_grad_norm(cfg, world)
        res["reference"] = {"grad_norm": gn, **terms}
    E.barrier()

    # ---- non-finite handling: NaN injected on ONE rank only; every rank must skip the same step
    from distill.objective import DistillObjective

    orig = DistillObjective.__call__
    state = {"calls": 0, "nan_steps": set(), "nan_rank": 0, "accum": 1}

    def poisoned(self, *a, **k):
        outp = orig(self, *a, **k)
        step = state["calls"] // state["accum"] + 1
        state["calls"] += 1
        if step in state["nan_steps"] and rank == state["nan_rank"]:
            outp = dict(outp)
            outp["loss"] = outp["loss"] * float("nan")
        return outp

    DistillObjective.__call__ = poisoned
    try:
        state.update(calls=0, nan_steps={2}, nan_rank=0, accum=1)
        cfg = _cfg(paths, 3, list(paths["common"]) + [f"run.output_dir={out / 'nan_skip'}", "run.steps=3",
                                                     "deepspeed.grad_accum=1", "run.log_every=1",
                                                     "run.max_nonfinite_in_row=1"])
        summary = T.train(cfg)
        lines = [json.loads(x) for x in (out / "nan_skip" / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
        res["nan_skip"] = {"nonfinite_total": summary["nonfinite_total"], "metrics": lines}
        del summary
        state.update(calls=0, nan_steps={1, 2}, nan_rank=1, accum=1)
        cfg = _cfg(paths, 3, list(paths["common"]) + [f"run.output_dir={out / 'nan_abort'}", "run.steps=4",
                                                     "deepspeed.grad_accum=1", "run.max_nonfinite_in_row=1"])
        try:
            T.train(cfg)
            res["nan_abort"] = {"raised": False}
        except T.NonFiniteAbort as e:
            res["nan_abort"] = {"raised": True, "message": str(e)}
    finally:
        DistillObjective.__call__ = orig
    return res


def mode_attn(paths, out: Path, rank: int) -> dict:
    """Stage-3 attention term on a fixed batch: present, and decreasing when it is trained."""
    from distill.data import add_placeholder_image, build_loader, count_targets

    cfg = _cfg(paths, 3, list(paths["common"]) + ["loss.lm_weight=1e-4", "loss.kd_weight=0", "loss.attn_weight=1",
                                                 "deepspeed.lr=2e-4", "deepspeed.grad_clip=0",
                                                 "deepspeed.grad_accum=1", "run.steps=8",
                                                 f"run.output_dir={out / 'attn'}"])
    run = T.setup(cfg)
    d, eng, obj, proc = run.dist, run.engines, run.objective, run.processor
    batch = next(iter(build_loader(cfg.data, proc, rank=rank, world_size=d.world_size, seed=0)))
    batch = add_placeholder_image(batch, run.placeholder)
    attn = []
    for _ in range(cfg.run.steps):
        counts = torch.tensor([float(count_targets(batch)[0]), float(count_targets(batch)[1])], dtype=torch.float64)
        E.all_reduce_sum(counts)
        o = obj(eng.student, eng.teacher, batch, num_tokens=counts[0].clamp(min=1), num_images=counts[1].clamp(min=1))
        eng.backward(o["loss"])
        eng.step()
        a = o["attn"].detach().double().reshape(1)
        E.all_reduce_sum(a)
        attn.append(float(a))
    return {"attn": attn, "teacher": _partition_report(eng.teacher_model),
            "student": _partition_report(eng.student_model)}


def main():
    mode, out, cfg_json = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    paths = json.loads(Path(cfg_json).read_text())
    d = E.init_distributed()
    for m in mode.split(","):
        res = {"chain": mode_chain, "accum": mode_accum, "attn": mode_attn}[m](paths, out, d.rank)
        res["world_size"] = d.world_size
        (out / f"result_{m}_rank{d.rank}.json").write_text(json.dumps(res, default=str, indent=1))
        E.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
