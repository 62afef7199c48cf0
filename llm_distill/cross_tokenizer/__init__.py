"""Distillation across tokenizers: a teacher and a student that do not share a vocabulary (issue 15).

``alignment`` (byte-offset groups of the two tokenizations), ``losses`` (``uld`` / ``hybrid`` divergences over
different vocabularies), ``data`` (each row tokenized by both sides, aligned, padded) and ``objective`` (the batch
loss and the trainer's helper) are one idea each. ``docs/cross-tokenizer.md`` is the user guide.
"""

from llm_distill.cross_tokenizer.alignment import Alignment, align, byte_spans, compared_positions, cut_points
from llm_distill.cross_tokenizer.data import (
    CrossTokenizerCollator,
    SideEncoding,
    cross_tokenize,
    encode_messages,
    encode_prompt_response,
    encode_row,
    encode_text,
    prepare_cross_dataset,
    split_text,
)
from llm_distill.cross_tokenizer.evaluation import perplexity_per_byte
from llm_distill.cross_tokenizer.losses import (
    CROSS_TOKENIZER_MODES,
    VocabularyMap,
    cross_tokenizer_divergence,
    hybrid_divergence,
    uld_divergence,
)
from llm_distill.cross_tokenizer.objective import (
    XTOK_COLUMNS,
    CrossTokenizerObjective,
    cross_tokenizer_kd_sum,
    cross_tokenizer_loss,
)

__all__ = [
    "Alignment", "align", "byte_spans", "compared_positions", "cut_points", "CrossTokenizerCollator", "SideEncoding",
    "cross_tokenize", "encode_messages", "encode_prompt_response", "encode_row", "encode_text",
    "prepare_cross_dataset", "split_text", "CROSS_TOKENIZER_MODES", "VocabularyMap", "cross_tokenizer_divergence",
    "hybrid_divergence", "uld_divergence", "XTOK_COLUMNS", "CrossTokenizerObjective", "cross_tokenizer_kd_sum",
    "cross_tokenizer_loss", "perplexity_per_byte",
]
