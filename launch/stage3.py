"""Stage 3 (DFT): distillation fine-tuning on instruct data; LM + logit KD + visual-attention alignment.

    deepspeed launch/stage3.py --config launch/configs/tiny_stage3.yaml [section.key=value ...]

The stage is defined by its YAML (data, trainable parts, loss weights, teacher); this file only
picks the stage number for :func:`distill.train.main`.
"""
import sys

from distill.train import main

if __name__ == "__main__":
    sys.exit(main(stage=3))
