"""Does a model answer the A/B protocol's question from the image, or from a letter prior?

Scores the first single-turn two-option questions of a training set (``data_prep synth
--choice-questions``) with the A/B protocol's letter read-out (`distill.eval.ab.score_letters`) and
prints how often the model prefers "B", its accuracy against the trained answers, and the first
log-probability margins log p(A) - log p(B).

    python docs/results/ab_probe.py runs/tiny_teacher/teacher_hf runs/tiny_teacher/data/instruct [N]
"""
import json
import sys

from PIL import Image

from distill.eval.ab import letter_token_ids, score_letters
from distill.eval.common import load_model_and_processor


def main(model_dir: str, data_dir: str, n: int = 48) -> None:
    model, proc = load_model_and_processor(model_dir, device="cpu")
    records = json.load(open(f"{data_dir}/data.json"))
    picked = [r for r in records if len(r["conversations"]) == 2
              and r["conversations"][1]["value"] in ("A", "B")][:n]
    if not picked:
        raise SystemExit(f"{data_dir}/data.json holds no single-turn A/B question (synth --choice-questions)")
    images = [Image.open(f"{data_dir}/images/{r['image']}").convert("RGB") for r in picked]
    questions = [r["conversations"][0]["value"].replace("<image>\n", "") for r in picked]
    answers = [r["conversations"][1]["value"] for r in picked]
    scores = score_letters(model, proc, images, questions, letter_token_ids(proc)).tolist()
    pred = ["A" if a > b else "B" for a, b in scores]
    print(f"{len(picked)} questions; trained answer A for {answers.count('A')}")
    print(f"model prefers B: {pred.count('B')}/{len(pred)}; accuracy {sum(p == a for p, a in zip(pred, answers)) / len(pred):.3f}")
    margins = [a - b for a, b in scores]
    print(f"log p(A) - log p(B): min {min(margins):.3f} max {max(margins):.3f}; first 10 {[round(m, 3) for m in margins[:10]]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 48)
