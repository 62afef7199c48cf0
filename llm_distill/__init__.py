"""llm-distill: make a large Hugging Face language model's knowledge usable in a small, fast one.

The public API. The package is laid out as building blocks (losses/, trainer, data, models, student_init,
offline_kd, pruning, importance, evaluation, speculative, generation/, distributed, launch, cross_tokenizer/), the embedded offline
default (embedded/) and the jobs users run (jobs/: distill, generate, prune, store_logits, distillspec,
bench_speculative), each also a verb of the ``llm-distill`` console command (``llm_distill.console``).
"""

from llm_distill.config import ConfigError, DataArguments, DistillationConfig, ModelArguments, parse_args_and_config
from llm_distill.data import DataValidationError, DistillationCollator, load_rows, prepare_dataset
from llm_distill.distributed import prepare_teacher
from llm_distill.evaluation import evaluate_models
from llm_distill.generation import GenerateArguments
from llm_distill.jobs.generate import run_generation
from llm_distill.losses import (
    LOSS_TYPES,
    DistillationLossOutput,
    LossWeights,
    chunked_distillation_loss,
    distillation_loss,
    hidden_state_loss,
    token_divergence,
    topk_divergence,
    triple_loss,
)
from llm_distill.models import VocabularyMismatchError, check_tokenizers_compatible, check_vocab_compatible
from llm_distill.student_init import select_teacher_layers, student_from_teacher
from llm_distill.importance import activation_importance, block_influence, build_plan, gradient_importance
from llm_distill.pruning import (
    PruningPlan,
    PruningPlanError,
    check_plan,
    drop_layers,
    load_pruned,
    prune,
    prune_heads,
    prune_mlp,
    save_pruned,
)
from llm_distill.speculative import (
    SpeculativeDecoder,
    SpeculativeOutput,
    SpeculativeStats,
    expected_accepted_length,
    expected_speedup,
    optimal_gamma,
)
from llm_distill.offline_kd import TopKCollator, load_teacher_logits, store_teacher_logits
from llm_distill.trainer import DistillationTrainer
# feature-level distillation (issue 17)
from llm_distill.ensemble import EnsembleLM
from llm_distill.features import (
    FeatureCapture,
    FeatureDistiller,
    FeatureSettings,
    attention_map_loss,
    attention_relation_loss,
    hidden_map_loss,
    rkd_loss,
)
from llm_distill.sparsity import GradualPruningCallback, magnitude_mask, scheduled_sparsity, sparsity_report
from llm_distill.quantization import prepare_qat, quantize_pretrained
from llm_distill.export import OnnxCausalLM, export_onnx
# GGUF models (issue 19): a .gguf file dequantized once into a plain HF folder
from llm_distill.gguf import dequantize_gguf, is_gguf, load_gguf, resolve_gguf
# on-policy distillation (GKD)
from llm_distill.on_policy import RolloutSampler, split_prompts, teacher_nll
# hardening (issue 18): user errors, the shared row reader, the held-out builder, per-row seeded sampling
from llm_distill.errors import ModelLoadError, UserError
from llm_distill.evaluation import heldout_set
from llm_distill.generation.sampling import RowSampler, row_seed
from llm_distill.jsonl import read_jsonl
# cross-tokenizer distillation (issue 15)
from llm_distill.cross_tokenizer import (
    CROSS_TOKENIZER_MODES,
    CrossTokenizerCollator,
    VocabularyMap,
    align,
    cross_tokenizer_loss,
    hybrid_divergence,
    perplexity_per_byte,
    prepare_cross_dataset,
    uld_divergence,
)

__version__ = "0.1.0"

__all__ = [
    # distillation
    "DistillationConfig",
    "DistillationTrainer",
    "ModelArguments",
    "DataArguments",
    "prepare_teacher",
    # losses
    "LOSS_TYPES",
    "DistillationLossOutput",
    "chunked_distillation_loss",
    "distillation_loss",
    "token_divergence",
    "topk_divergence",
    "LossWeights",
    "hidden_state_loss",
    "triple_loss",
    # data
    "DataValidationError",
    "DistillationCollator",
    "load_rows",
    "prepare_dataset",
    # offline KD (stored teacher top-k)
    "TopKCollator",
    "load_teacher_logits",
    "store_teacher_logits",
    # models
    "VocabularyMismatchError",
    "check_tokenizers_compatible",
    "check_vocab_compatible",
    "select_teacher_layers",
    "student_from_teacher",
    # response distillation
    "GenerateArguments",
    "run_generation",
    # pruning
    "PruningPlan",
    "PruningPlanError",
    "check_plan",
    "prune",
    "prune_heads",
    "prune_mlp",
    "drop_layers",
    "save_pruned",
    "load_pruned",
    "gradient_importance",
    "activation_importance",
    "block_influence",
    "build_plan",
    # speculative decoding
    "SpeculativeDecoder",
    "SpeculativeOutput",
    "SpeculativeStats",
    "expected_accepted_length",
    "expected_speedup",
    "optimal_gamma",
    # evaluation, config
    "evaluate_models",
    "ConfigError",
    "parse_args_and_config",
    # feature-level distillation, born-again ensembles
    "FeatureCapture",
    "FeatureDistiller",
    "FeatureSettings",
    "attention_map_loss",
    "attention_relation_loss",
    "hidden_map_loss",
    "rkd_loss",
    "EnsembleLM",
    # compression: gradual sparsity, quantization, ONNX export (issue 16)
    "GradualPruningCallback",
    "magnitude_mask",
    "scheduled_sparsity",
    "sparsity_report",
    "prepare_qat",
    "quantize_pretrained",
    "OnnxCausalLM",
    "export_onnx",
    # GGUF models (issue 19)
    "dequantize_gguf",
    "is_gguf",
    "load_gguf",
    "resolve_gguf",
    # on-policy distillation (GKD)
    "RolloutSampler",
    "split_prompts",
    "teacher_nll",
    # hardening (issue 18)
    "UserError",
    "ModelLoadError",
    "heldout_set",
    "RowSampler",
    "row_seed",
    "read_jsonl",
    # cross-tokenizer distillation
    "CROSS_TOKENIZER_MODES",
    "CrossTokenizerCollator",
    "VocabularyMap",
    "align",
    "cross_tokenizer_loss",
    "hybrid_divergence",
    "perplexity_per_byte",
    "prepare_cross_dataset",
    "uld_divergence",
]
