"""llm-distill: make a large Hugging Face language model's knowledge usable in a small, fast one."""

from llm_distill.cli import ConfigError, parse_args_and_config
from llm_distill.config import DataArguments, DistillationConfig, ModelArguments
from llm_distill.data import DataValidationError, DistillationCollator, load_rows, prepare_dataset
from llm_distill.evaluation import evaluate_models
from llm_distill.losses import LOSS_TYPES, DistillationLossOutput, distillation_loss, token_divergence
from llm_distill.models import (
    VocabularyMismatchError,
    check_tokenizers_compatible,
    check_vocab_compatible,
    select_teacher_layers,
    student_from_teacher,
)
from llm_distill.trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataArguments",
    "DataValidationError",
    "DistillationCollator",
    "DistillationConfig",
    "DistillationLossOutput",
    "DistillationTrainer",
    "LOSS_TYPES",
    "ModelArguments",
    "VocabularyMismatchError",
    "check_tokenizers_compatible",
    "check_vocab_compatible",
    "distillation_loss",
    "evaluate_models",
    "load_rows",
    "parse_args_and_config",
    "prepare_dataset",
    "select_teacher_layers",
    "student_from_teacher",
    "token_divergence",
]
