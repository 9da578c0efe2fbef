"""Stage 1 (DPT): distillation pre-training on caption data; the projector path trains with LM + logit KD.

    deepspeed launch/stage1.py --config launch/configs/tiny_stage1.yaml [section.key=value ...]

The stage is defined by its YAML (data, trainable parts, loss weights, teacher); this file only
picks the stage number for :func:`distill.train.main`.
"""
import sys

from distill.train import main

if __name__ == "__main__":
    sys.exit(main(stage=1))
