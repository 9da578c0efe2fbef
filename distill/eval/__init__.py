"""Evaluation: compositional caption ranking (SugarCrepe-style) and VQA exact match.

CLI: ``python -m distill.eval {compositional,vqa} --model DIR --data ...`` (see ``--help``).
Library: `score_captions`, `compositional_accuracy`, `evaluate_compositional`, `load_compositional`,
`evaluate_compositional_ab`, `ab_accuracy`, `score_letters`, `letter_token_ids` (the A/B protocol),
`vqa_accuracy`, `evaluate_vqa`, `load_vqa`, `normalize_answer`, `generate_answers`.
"""

from distill.eval.ab import (
    DEFAULT_AB_PROMPT,
    ab_accuracy,
    ab_question,
    evaluate_compositional_ab,
    letter_token_ids,
    pair_score,
    score_letters,
)
from distill.eval.common import DEFAULT_CAPTION_PROMPT, EvalDataError, ImageRef
from distill.eval.compositional import (
    CompoSample,
    CompoSamples,
    compositional_accuracy,
    evaluate_compositional,
    load_compositional,
    load_sugarcrepe,
    load_synthetic,
    markdown_table,
)
from distill.eval.scoring import build_caption_batch, score_captions, token_logprobs
from distill.eval.vqa import VQASample, evaluate_vqa, generate_answers, load_vqa, normalize_answer, vqa_accuracy

__all__ = [
    "DEFAULT_CAPTION_PROMPT", "EvalDataError", "ImageRef", "CompoSample", "CompoSamples", "compositional_accuracy",
    "DEFAULT_AB_PROMPT", "ab_accuracy", "ab_question", "evaluate_compositional_ab", "letter_token_ids", "pair_score",
    "score_letters",
    "evaluate_compositional", "load_compositional", "load_sugarcrepe", "load_synthetic", "markdown_table",
    "build_caption_batch", "score_captions", "token_logprobs", "VQASample", "evaluate_vqa", "generate_answers",
    "load_vqa", "normalize_answer", "vqa_accuracy",
]
