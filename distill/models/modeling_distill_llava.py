# Written by distill (python -m distill.export): a LLaVA model whose projector keeps its
# true inner width. Shipped in exported folders as `modeling_distill_llava.py` and registered
# through config.json's `auto_map`, so that
#
#     AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
#
# loads it. It imports only torch and transformers. It is transformers' own
# LlavaForConditionalGeneration with one change: the projector
#
#     linear_2(act(linear_1(x))),  linear_1: V -> I,  linear_2: I -> H
#
# has an inner width I = config.projector_intermediate_size (the teacher's hidden size for a
# student trained with teacher-adapter fetch; stock LLaVA fixes I = H, the student's hidden
# size). Without `projector_intermediate_size` in the config it is exactly the stock model.
"""LLaVA with a projector of inner width ``config.projector_intermediate_size`` (distill export)."""

from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.activations import ACT2FN


def projector_inner_width(config) -> int:
    """Inner width of the projector: ``projector_intermediate_size``, else the text hidden size."""
    inner = getattr(config, "projector_intermediate_size", None)
    return int(inner) if inner else int(config.text_config.hidden_size)


class DistillLlavaMultiModalProjector(nn.Module):
    """``LlavaMultiModalProjector`` (same parameter names) with inner width ``I``.

    image features ``[..., V]`` -> ``linear_2(act(linear_1(x)))`` ``[..., H]``.
    """

    def __init__(self, config):
        super().__init__()
        layers = config.vision_feature_layer
        num_feature_layers = 1 if isinstance(layers, int) else len(layers)
        inner = projector_inner_width(config)
        bias = config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num_feature_layers, inner, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(inner, config.text_config.hidden_size, bias=bias)

    def forward(self, image_features):
        return self.linear_2(self.act(self.linear_1(image_features)))


class DistillLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose projector is :class:`DistillLlavaMultiModalProjector`."""

    def __init__(self, config):
        super().__init__(config)
        self.model.multi_modal_projector = DistillLlavaMultiModalProjector(config)
        self.post_init()


class DistillLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` whose projector is :class:`DistillLlavaMultiModalProjector`
    (LLaVA-OneVision's projector has LLaVA's layout and parameter names; ``image_newline`` is unchanged)."""

    def __init__(self, config):
        super().__init__(config)
        self.model.multi_modal_projector = DistillLlavaMultiModalProjector(config)
        self.post_init()


WIDE_CLASSES = {
    "llava": DistillLlavaForConditionalGeneration,
    "llava_onevision": DistillLlavaOnevisionForConditionalGeneration,
}
"""model_type -> the class with a projector of inner width ``projector_intermediate_size``."""


def _register_llava_key_renames() -> None:
    """Give this class transformers' LLaVA checkpoint key renames (legacy ``language_model.lm_head``
    etc.), which transformers applies to its own classes only. Folders written by distill.export
    use the native key layout and need none; this covers legacy-layout folders (and, in
    transformers versions that register a remote class for every LLaVA config of the process,
    stock LLaVA folders loaded through the auto classes afterwards)."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older/newer transformers without the registry: native layout still loads
        return
    for model_type, cls in WIDE_CLASSES.items():
        renames = get_checkpoint_conversion_mapping(model_type)
        if renames:
            register_checkpoint_conversion_mapping(cls.__name__, renames, overwrite=True)


_register_llava_key_renames()
