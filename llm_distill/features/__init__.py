"""Feature-level distillation: intermediate layers, attention relations, attention maps, relational KD.

``losses`` (pure functions, shapes in docstrings), ``capture`` (forward hooks recording hidden states and the Q/K/V
the attention uses), ``layer_map`` (student:teacher layer pairs) and ``distiller`` (``FeatureDistiller``: the terms of
one student / teacher pair and the learned projections it owns; the trainer calls it). See docs/feature-kd.md.
"""

from llm_distill.features.capture import QKV, FeatureCapture, attention_module, transformer_blocks
from llm_distill.features.distiller import FeatureDistiller, FeatureSettings, LayerProjections
from llm_distill.features.layer_map import parse_pairs, resolve_pairs
from llm_distill.features.losses import (
    HIDDEN_LOSSES,
    attention_map_loss,
    attention_probs,
    attention_relation_loss,
    hidden_map_loss,
    pooled_embeddings,
    relation_log_probs,
    rkd_loss,
)

__all__ = [
    "QKV", "FeatureCapture", "attention_module", "transformer_blocks", "FeatureDistiller", "FeatureSettings",
    "LayerProjections", "parse_pairs", "resolve_pairs", "HIDDEN_LOSSES", "attention_map_loss", "attention_probs",
    "attention_relation_loss", "hidden_map_loss", "pooled_embeddings", "relation_log_probs", "rkd_loss",
]
