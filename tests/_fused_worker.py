"""2-rank ZeRO-3 step with the fused chunked LM + KD loss vs one process with the old full-logits
objective (started by tests/test_fused_zero3.py with tests/_launch.py).

    python tests/_fused_worker.py OUT_DIR PATHS_JSON CHUNK KD_KIND TEMPERATURE

Every rank takes its own micro-batch (different labelled counts, so a different number of loss
chunks per rank), runs one ZeRO-3 step and writes ``OUT_DIR/result_rank{r}.json``; rank 0 also
computes the single-process reference on all ranks' micro-batches.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from distill import engine as E
from distill import train as T
from distill.config import load_config
from distill.losses import logit_kd_loss


def _old_lm_kd(student, teacher, batch, cfg, n_tok):
    """LM + KD as the objective computed them before the fused path: full [B, T, V] logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    s_logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    v = s_logits.shape[-1]
    lm = F.cross_entropy(s_logits.float().reshape(-1, v), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    kd = logit_kd_loss(s_logits, t_logits, tgt, cfg.kd_kind, cfg.kd_temperature, beta=cfg.kd_beta, reduction="sum")
    return lm / n_tok, kd / n_tok


def _head_grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def main():
    out, paths = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    chunk, kind, temp = int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    from transformers.integrations import deepspeed as hf_ds

    from distill.data import add_placeholder_image, build_loader, count_targets
    from distill.models import build_student, build_teacher, select_trainable

    ov = list(paths["common"]) + ["loss.attn_weight=0", "loss.lm_weight=0.7", "loss.kd_weight=1.3",
                                  f"loss.kd_kind={kind}", f"loss.kd_temperature={temp}",
                                  f"loss.logits_chunk_size={chunk}", "deepspeed.grad_clip=0",
                                  "deepspeed.grad_accum=1", "data.batch_size=2", "run.steps=1",
                                  f"run.output_dir={out / 'run'}"]
    cfg = load_config(paths["yaml3"], ov, stage=3)
    run = T.setup(cfg)
    d, eng, obj, proc, m = run.dist, run.engines, run.objective, run.processor, cfg.model

    def batch_of(rank):
        return add_placeholder_image(next(iter(build_loader(cfg.data, proc, rank=rank, world_size=d.world_size,
                                                            seed=cfg.run.seed))), run.placeholder)

    batch = batch_of(d.rank)
    counts = torch.tensor([float(count_targets(batch)[0]), float(count_targets(batch)[1])], dtype=torch.float64)
    E.all_reduce_sum(counts)
    o = obj(eng.student, lambda **kw: eng.teacher(**kw), batch,
            num_tokens=counts[0].clamp(min=1), num_images=counts[1].clamp(min=1))
    eng.backward(o["loss"])
    from deepspeed.utils import safe_get_full_grad

    grads = {n: safe_get_full_grad(p) for n, p in eng.student_model.named_parameters() if p.requires_grad}
    eng.step()
    terms = torch.stack([o[k].detach().double() for k in ("loss", "lm", "kd")])
    E.all_reduce_sum(terms)
    res = {"rank": d.rank, "num_targets": batch["num_targets"], "chunks": -(-batch["num_targets"] // chunk),
           "loss": terms.tolist(), "grad_norm": eng.grad_norm(),
           "lm_head_grad_norm": float(grads["lm_head.weight"].double().norm())}
    if d.rank == 0:
        torch.save({n: g.detach().clone() for n, g in grads.items() if g is not None}, out / "ds_grads.pt")
        hf_ds.unset_hf_deepspeed_config()
        student = build_student(m.student, teacher_path=m.teacher, adapter_fetch=m.adapter_fetch, dtype=m.torch_dtype)
        select_trainable(student, m)
        teacher = build_teacher(m.teacher, dtype=m.torch_dtype)
        batches = [batch_of(r) for r in range(d.world_size)]
        n_tok = sum(count_targets(b)[0] for b in batches).clamp(min=1)
        ref = torch.zeros(3, dtype=torch.float64)
        for b in batches:
            lm, kd = _old_lm_kd(student, teacher, b, cfg.loss, n_tok)
            loss = cfg.loss.lm_weight * lm + cfg.loss.kd_weight * kd
            loss.backward()
            ref += torch.stack([loss.detach(), lm.detach(), kd.detach()]).double()
        ref_g = _head_grads(student)
        ds_g = torch.load(out / "ds_grads.pt")
        res["reference"] = {
            "loss": ref.tolist(),
            "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref_g.values()))),
            "lm_head_grad_norm": float(ref_g["lm_head.weight"].double().norm()),
            "max_rel_grad_diff": {n: float((ds_g[n].double() - g.double()).abs().max() / g.double().abs().max().clamp(min=1e-12))
                                  for n, g in ref_g.items() if n in ds_g},
        }
    (out / f"result_rank{d.rank}.json").write_text(json.dumps(res, indent=1))
    E.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
