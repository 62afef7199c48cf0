"""llm-distill: make a large Hugging Face language model's knowledge usable in a small, fast one."""

from llm_distill.cli import ConfigError, parse_args_and_config
from llm_distill.config import DataArguments, DistillationConfig, ModelArguments
from llm_distill.data import DataValidationError, DistillationCollator, load_rows, prepare_dataset
from llm_distill.distributed import prepare_teacher
from llm_distill.evaluation import evaluate_models
from llm_distill.generation import GenerateArguments, run_generation
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
from llm_distill.models import (
    VocabularyMismatchError,
    check_tokenizers_compatible,
    check_vocab_compatible,
    select_teacher_layers,
    student_from_teacher,
)
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
from llm_distill.teacher_logits import TopKCollator, load_teacher_logits, store_teacher_logits
from llm_distill.trainer import DistillationTrainer

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
]
