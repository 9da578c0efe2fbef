"""Stage 2 (SFT): supervised fine-tuning on instruct data; LLM + projector train with the LM loss (teacher optional).

    deepspeed launch/stage2.py --config launch/configs/tiny_stage2.yaml [section.key=value ...]

The stage is defined by its YAML (data, trainable parts, loss weights, teacher); this file only
picks the stage number for :func:`distill.train.main`.
"""
import sys

from distill.train import main

if __name__ == "__main__":
    sys.exit(main(stage=2))
