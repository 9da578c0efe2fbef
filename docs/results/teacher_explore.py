"""How fast the tiny teacher learns the synthetic compositional task: a plain single-process loop.

Not the product's training path (that is ``launch/stage2.py`` under DeepSpeed); a quicker loop to
compare teacher recipes on 2 CPU cores. Every ``--eval-every`` steps it prints the held-out
compositional accuracy per category (``distill.eval``'s likelihood protocol) and a grounding probe:
next-token accuracy on held-out captions for the grid-cell words of ``--cell-words`` listings
("in the top *left*") and for the relation words ("to the *left* of", "*above*"), with the right
images and with the images rolled by one sample in the batch. A word the model reads from the
image is better with the right image; equal accuracies mean the word comes from the text alone.

    python -m data_prep synth --out D --num 10000 --seed 0 --num-test 1 --cell-words
    python -m data_prep synth --out T --num 300 --seed 1000 --num-test 96 --cell-words
    python -m distill.models.tiny --out M --patch-size 8 --vision-position-init sincos
    python docs/results/teacher_explore.py --model M/teacher --data D --test T --steps 4000

With a pre-trained tower (``python -m distill.models.tower_pretrain --model M/teacher --out MT/teacher``)
add ``--freeze-tower``. Results: ``docs/results/2026-12-02-teacher-position.md``,
``docs/results/2026-12-03-teacher-relations.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CELL_WORDS = {"top", "middle", "bottom", "left", "right", "center"}
RELATION_WORDS = {"left", "right", "above", "below"}


def grounding(model, tokenizer, batches) -> dict[str, float]:
    """Next-token accuracy on cell words and relation words, right images vs rolled images."""
    hits = collections.defaultdict(lambda: [0, 0])
    with torch.no_grad():
        for b in batches:
            for rolled in (False, True):
                pv = b["pixel_values"].float()
                pv = pv.roll(1, 0) if rolled else pv
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pv).logits
                pred, labels, ids = logits[:, :-1].argmax(-1), b["labels"][:, 1:], b["input_ids"][:, 1:]
                for i in range(ids.shape[0]):
                    words = [tokenizer.decode([t]).strip() for t in ids[i].tolist()]
                    for j, w in enumerate(words):
                        if labels[i, j] < 0 or w not in CELL_WORDS | RELATION_WORDS:
                            continue
                        nxt = words[j + 1] if j + 1 < len(words) else ""
                        kind = "relation" if w in ("above", "below") or nxt == "of" else "cell"
                        key = f"{kind} {'rolled' if rolled else 'right'}"
                        hits[key][0] += int(pred[i, j] == labels[i, j])
                        hits[key][1] += 1
    return {k: round(h / n, 3) for k, (h, n) in sorted(hits.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an HF LLaVA folder (e.g. distill.models.tiny's teacher)")
    ap.add_argument("--data", required=True, help="a data_prep synth folder to train on")
    ap.add_argument("--test", required=True, help="a held-out data_prep synth folder (compositional + captions)")
    ap.add_argument("--splits", default="caption", help="training splits until --switch")
    ap.add_argument("--splits2", default="", help="training splits from --switch on (default: the same)")
    ap.add_argument("--switch", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4, help="peak rate: 20 warm-up steps, then cosine to 0")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--limit", type=int, default=96, help="held-out compositional samples")
    ap.add_argument("--save", default=None, help="save the model here every --eval-every steps (DIR/sN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--freeze-tower", action="store_true", help="train the projector and the LLM only")
    args = ap.parse_args()

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from distill.data import build_loader
    from distill.eval.compositional import evaluate_compositional, load_compositional

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    proc = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    if args.freeze_tower:
        model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]  # the whole model unless --freeze-tower
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def loader(splits: str, seed: int, root: str = args.data, bs: int = args.batch_size, buffer: int = 64):
        shards = [f"{root}/{s}/shards" for s in splits.split(",")]
        return build_loader(dict(shards=shards, batch_size=bs, max_length=256, num_workers=0, shuffle_buffer=buffer),
                            proc, rank=0, world_size=1, seed=seed)

    samples = load_compositional([f"{args.test}/compositional/shards"], None, limit=args.limit)
    probe = []
    for b in loader("caption", 0, root=args.test, bs=32, buffer=1):
        probe.append(b)
        if len(probe) == 4:
            break

    def evaluate(step: int) -> None:
        model.eval()
        res, _ = evaluate_compositional(model, proc, samples, batch_size=16, progress=False)
        row = {"step": step, "overall": round(res["overall"]["accuracy"], 3),
               **{k: round(v["accuracy"], 3) for k, v in sorted(res["per_category"].items())},
               "grounding": grounding(model, proc.tokenizer, probe)}
        print("EVAL " + json.dumps(row), flush=True)
        model.train()
        if args.save:
            model.save_pretrained(f"{args.save}/s{step}")
            proc.save_pretrained(f"{args.save}/s{step}")

    it = iter(loader(args.splits, args.seed))
    t0, step, losses = time.time(), 0, []
    while step < args.steps:
        if args.splits2 and step == args.switch:
            it = iter(loader(args.splits2, args.seed + 1))
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader(args.splits2 if args.splits2 and step >= args.switch else args.splits, args.seed + step))
            b = next(it)
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"].float(),
                    labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {sum(losses[-50:]) / 50:.3f} {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)


if __name__ == "__main__":
    main()
