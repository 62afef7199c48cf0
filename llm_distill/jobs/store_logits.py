"""Job: store the teacher's top-k (or sampled) next-token distribution of the training data, for offline KD.

    python scripts/store_teacher_logits.py --teacher_logits outputs/teacher_topk [--top_k 64]
    llm-distill store-logits --teacher_logits outputs/teacher_topk

The same YAML (and flags) as ``scripts/distill.py`` select teacher, tokenizer, data, ``temperature`` and ``seed``,
so ``distill.py --teacher_logits <folder>`` trains on exactly these rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_distill.checks import check_field
from llm_distill.config import ConfigError, DataArguments, DistillationConfig, ModelArguments, parse_args_and_config
from llm_distill.data import DistillationCollator, Fields, load_rows, prepare_dataset
from llm_distill.embedded import resolve
from llm_distill.jobs import with_base
from llm_distill.jobs.distill import DEFAULT_CONFIG
from llm_distill.models import load_causal_lm, load_tokenizer
from llm_distill.offline_kd import LOGPROB_DTYPES, SELECTIONS, store_teacher_logits


@dataclass
class StoreArguments:
    """Settings of ``scripts/store_teacher_logits.py`` (the output folder is ``teacher_logits``)."""

    top_k: int = field(default=64, metadata={"help": "Teacher tokens kept per position (most likely first); with "
                                                     "selection=sample, the number of draws."})
    selection: str = field(
        default="top_k",
        metadata={"help": "top_k = the k most likely tokens + one tail bucket; sample = k draws from the teacher "
                          "(seeded by --seed), stored as the distinct tokens and their frequencies: an unbiased "
                          "estimate of the forward-KL gradient (train with loss_type forward_kl)."},
    )
    logprob_dtype: str = field(
        default="float16", metadata={"help": f"Storage dtype of the log-probabilities, one of {', '.join(LOGPROB_DTYPES)}."}
    )
    rows_per_shard: int = field(default=256, metadata={"help": "Sequences per parquet shard (the unit of resumption)."})
    overwrite: bool = field(default=False, metadata={"help": "Delete an existing store with other settings first."})

    def __post_init__(self):
        check_field(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1 (e.g. 64)")
        check_field(self.selection in SELECTIONS, "selection", self.selection, f"one of {', '.join(SELECTIONS)}")
        check_field(self.logprob_dtype in LOGPROB_DTYPES, "logprob_dtype", self.logprob_dtype,
                    f"one of {', '.join(LOGPROB_DTYPES)}")
        check_field(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "an integer >= 1")


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, DistillationConfig, StoreArguments]:
    """The distillation config's dataclasses plus ``StoreArguments``; no ``--config``: the embedded default."""
    argv = with_base(argv, DEFAULT_CONFIG, ("teacher_model", "dataset", "tokenizer"))
    return parse_args_and_config((ModelArguments, DataArguments, DistillationConfig, StoreArguments), argv)


def run_store(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig,
              store_args: StoreArguments) -> Path:
    """Tokenise the training data as the distillation job would and write the teacher's store; returns its folder."""
    if not args.teacher_logits:
        raise ConfigError("Set --teacher_logits <folder>: where the teacher's top-k logits are written.")
    if not model_args.teacher_model or not data_args.dataset:
        raise ConfigError("teacher_model and dataset must both be set: the teacher whose logits are stored, and the "
                          "rows it scores (or run with neither for the embedded demo).")
    torch.manual_seed(args.seed)
    teacher_path, dataset_path = resolve(model_args.teacher_model), resolve(data_args.dataset)
    tokenizer = load_tokenizer(resolve(model_args.tokenizer) or teacher_path, model_args.trust_remote_code)
    rows, fmt = load_rows(dataset_path, data_args.dataset_split, data_args.dataset_config, Fields.from_args(data_args))
    dataset = prepare_dataset(rows, fmt, tokenizer, data_args, data_args.max_train_samples, args.seed, "train")
    teacher = load_causal_lm(teacher_path, model_args.teacher_dtype, model_args.attn_implementation,
                             model_args.trust_remote_code)
    vocab = min(len(tokenizer), teacher.get_output_embeddings().weight.shape[0])  # real tokens only, no padding rows
    meta = {"teacher_model": model_args.teacher_model, "dataset": data_args.dataset,
            "max_length": data_args.max_length, "packing": data_args.packing,
            "max_train_samples": data_args.max_train_samples, "seed": args.seed}
    return store_teacher_logits(
        teacher, dataset, args.teacher_logits, DistillationCollator(tokenizer), top_k=store_args.top_k,
        temperature=args.temperature, vocab_size=vocab, batch_size=args.per_device_eval_batch_size,
        rows_per_shard=store_args.rows_per_shard, logprob_dtype=store_args.logprob_dtype,
        overwrite=store_args.overwrite, meta=meta, device="cpu" if args.use_cpu else None,
        selection=store_args.selection, seed=args.seed,
    )


def main(argv: list[str]) -> Path:
    out = run_store(*parse(argv))
    size = sum(f.stat().st_size for f in out.rglob("*.parquet"))
    print(f"stored teacher top-k logits in {out} ({size / 2**20:.1f} MiB)")
    return out
