"""Job: distil a teacher into a student. Config -> models -> data -> train -> held-out report.

    accelerate launch scripts/distill.py [--config configs/X.yaml] [--key value ...]
    llm-distill distill [--config configs/X.yaml] [--key value ...]

:func:`run_distillation` is the typed entry (the three arguments dataclasses in, the results dict out); other jobs
call it directly. :func:`main` parses an argv list into those dataclasses and calls it: ``scripts/distill.py``,
the ``llm-distill distill`` verb, the tests and the benchmarks all go through it, so the command users run is the
code that is tested.

Causal and masked LMs take the same path; a masked-LM teacher (BERT, DistilBERT ... - see
``llm_distill.models.lm_kind``) switches three things: the models load with ``AutoModelForMaskedLM``, training
batches are masked by ``DataCollatorForLanguageModeling`` (``mlm_probability``, seeded), and the held-out set is
masked once, deterministically, so that teacher / student-before / student-after are scored on identical masks
(masked-token perplexity and accuracy).

With ``cross_tokenizer: uld | hybrid`` the teacher keeps its own tokenizer (``teacher_tokenizer``): training rows
are tokenized by both and aligned (``llm_distill.cross_tokenizer``), the vocabulary check is skipped, and the
held-out report scores the student only (the teacher cannot read the student's ids; per-byte figures that compare
across tokenizers are ``scripts/bench_cross_tokenizer.py``'s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import set_seed

from llm_distill.config import ConfigError, DataArguments, DistillationConfig, ModelArguments, parse_args_and_config
from llm_distill.cross_tokenizer import CrossTokenizerCollator, prepare_cross_dataset
from llm_distill.data import (
    DataValidationError,
    DistillationCollator,
    Fields,
    for_masked_lm,
    load_rows,
    masked_lm_collator,
    prepare_dataset,
    validate_json,
    validate_jsonl,
)
from llm_distill.distributed import gathered_for_forward, is_sharded, shutdown_distributed
from llm_distill.embedded import resolve
from llm_distill.evaluation import evaluate_models, heldout_set
from llm_distill.models import (
    apply_lora,
    check_tokenizers_compatible,
    check_vocab_compatible,
    fresh_lm,
    lm_kind,
    load_lm,
    load_tokenizer,
)
from llm_distill.jobs import with_base
from llm_distill.offline_kd import load_teacher_logits
from llm_distill.quantization import QAT_METHOD, prepare_qat, quantize_pretrained
from llm_distill.sparsity import GradualPruningCallback, sparsity_report
from llm_distill.student_init import check_teacher_layers, select_teacher_layers, student_from_teacher
from llm_distill.trainer import DistillationTrainer

logger = logging.getLogger("llm_distill")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


INPUTS = ("teacher_model", "student_model", "dataset", "eval_dataset", "tokenizer", "teacher_logits")


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, DistillationConfig]:
    """Parse argv on its base (:func:`~llm_distill.jobs.with_base`): ``--config``; else the embedded demo config
    when no model or data of the user's is given; else the dataclass defaults."""
    return parse_args_and_config((ModelArguments, DataArguments, DistillationConfig), with_base(argv, DEFAULT_CONFIG,
                                                                                                INPUTS))


def check_inputs(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig) -> None:
    """The models and data the run needs are named (the dataclass defaults name none), and the user's own data files
    are valid: checked before any ``embedded:`` name is built and before any weights are loaded."""
    demo = "(or run with no model / data arguments for the embedded demo, configs/default.yaml)"
    if not model_args.teacher_model and not args.teacher_logits:
        raise ConfigError(f"teacher_model is not set: pass --teacher_model <hub id or folder> {demo}.")
    if model_args.student_init != "teacher_layers" and not model_args.student_model:
        raise ConfigError(f"student_model is not set (required with student_init={model_args.student_init}): pass "
                          "--student_model <hub id or folder>, or --student_init teacher_layers to build the student "
                          f"from the teacher's layers {demo}.")
    if not data_args.dataset and not args.teacher_logits:
        raise ConfigError(f"dataset is not set: pass --dataset <file.jsonl, folder or hub dataset> {demo}.")
    fields = Fields.from_args(data_args)
    for name in ("dataset", "eval_dataset"):
        path = Path(getattr(data_args, name) or "")
        if path.suffix in (".jsonl", ".json") and not (name == "dataset" and args.teacher_logits):
            if not path.is_file():
                raise DataValidationError(f"{name}: data file {path} does not exist.")
            (validate_jsonl if path.suffix == ".jsonl" else validate_json)(path, fields)


def build_student(model_args: ModelArguments, teacher, seed: int):
    if model_args.student_init == "teacher_layers":
        n_teacher = teacher.config.num_hidden_layers
        if model_args.student_layers:
            layers = check_teacher_layers(model_args.student_layers, n_teacher)
        else:
            n_student = model_args.student_num_layers or max(1, n_teacher // 2)
            layers = select_teacher_layers(n_teacher, n_student, model_args.student_layer_strategy)
        logger.info("Student: %d of the teacher's %d layers %s", len(layers), n_teacher, layers)
        student = student_from_teacher(teacher, layers).float()
    elif model_args.student_init == "fresh":
        student = fresh_lm(model_args.student_model, seed, model_args.student_dtype, model_args.trust_remote_code)
    else:
        student = load_lm(model_args.student_model, model_args.student_dtype, model_args.attn_implementation,
                          model_args.trust_remote_code)
    return student


def resolve_names(model_args: ModelArguments, data_args: DataArguments) -> tuple[ModelArguments, DataArguments]:
    """Copies of the arguments with every ``embedded:`` name replaced by its local path (built once, on rank 0
    first: the other ranks then find it cached)."""
    with PartialState().main_process_first():
        model_args = dataclasses.replace(model_args, **{
            name: resolve(getattr(model_args, name))
            for name in ("teacher_model", "student_model", "tokenizer", "teacher_tokenizer")})
        data_args = dataclasses.replace(data_args, **{
            name: resolve(getattr(data_args, name)) for name in ("dataset", "eval_dataset")})
    return model_args, data_args


def load_everything(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig):
    """Models, tokenizer and tokenised data, with every compatibility check before any training step.

    Takes local paths or hub ids (``resolve_names`` first for ``embedded:`` names)."""
    state = PartialState()
    tokenizer_src = model_args.tokenizer or (
        model_args.student_model if model_args.student_init != "teacher_layers" else model_args.teacher_model
    )
    tokenizer = load_tokenizer(tokenizer_src, model_args.trust_remote_code)
    teacher_tokenizer = load_teacher_tokenizer(model_args, args)  # cross-tokenizer distillation only (else None)
    if teacher_tokenizer is None and tokenizer_src != model_args.teacher_model and args.needs_teacher():
        check_tokenizers_compatible(load_tokenizer(model_args.teacher_model, model_args.trust_remote_code), tokenizer)
    kind = "causal" if args.teacher_logits else lm_kind(model_args.teacher_model, model_args.trust_remote_code)

    # Data first: a bad row should fail in seconds, before gigabytes of weights are loaded.
    fields = Fields.from_args(data_args)
    with state.main_process_first():
        if args.teacher_logits:  # offline KD: the store holds the tokenised rows with their teacher top-k
            train_ds = load_teacher_logits(args.teacher_logits)
        else:
            train_rows, fmt = load_rows(data_args.dataset, data_args.dataset_split, data_args.dataset_config, fields)
            train_ds = (prepare_dataset(train_rows, fmt, tokenizer, data_args, data_args.max_train_samples, args.seed,
                                        "train") if teacher_tokenizer is None else
                        prepare_cross_dataset(train_rows, fmt, tokenizer, teacher_tokenizer, data_args,
                                              data_args.max_train_samples, args.seed, "train"))
            if kind == "masked":
                train_ds = for_masked_lm(train_ds, fmt, data_args.dataset)
        eval_ds = None
        if data_args.eval_dataset:  # the same held-out builder as every job's (prune: same file, same figure)
            eval_ds = heldout_set(data_args.eval_dataset, tokenizer, data_args, data_args.max_eval_samples, args.seed,
                                  kind == "masked", args.mlm_probability)

    if args.teacher_logits:  # offline KD: no teacher in memory at all
        if model_args.student_init == "teacher_layers":
            raise ConfigError("student_init=teacher_layers needs the teacher's weights, but teacher_logits is set "
                             "(offline KD loads no teacher): use student_init=pretrained or fresh.")
        return tokenizer, None, build_student(model_args, None, args.seed), train_ds, eval_ds
    teacher = load_lm(model_args.teacher_model, model_args.teacher_dtype, model_args.attn_implementation,
                      model_args.trust_remote_code)
    student = build_student(model_args, teacher, args.seed)
    if lm_kind(student.config) != kind:
        raise ConfigError(f"The teacher is a {kind} LM but the student is a {lm_kind(student.config)} LM: distillation "
                         "compares their predictions position by position, so both must be of the same kind (e.g. "
                         "BERT -> a smaller BERT / DistilBERT, or use student_init: teacher_layers).")
    if teacher_tokenizer is None:
        check_vocab_compatible(teacher, student, tokenizer)
    return tokenizer, teacher, student, train_ds, eval_ds


def load_teacher_tokenizer(model_args: ModelArguments, args: DistillationConfig):
    """The teacher's own tokenizer with ``cross_tokenizer: uld | hybrid`` (``teacher_tokenizer``, default the teacher's
    folder), else ``None``. Both must be fast tokenizers (byte offsets); checked when the rows are tokenized."""
    if args.cross_tokenizer == "none":
        return None
    return load_tokenizer(model_args.teacher_tokenizer or model_args.teacher_model, model_args.trust_remote_code)


def main(argv: list[str]) -> dict:
    """``scripts/distill.py`` / ``llm-distill distill``: parse ``argv`` and run (the report is printed on rank 0)."""
    results = run_distillation(*parse(argv))
    if os.environ.get("LLM_DISTILL_PRINT_JSON"):
        print(json.dumps(results))
    return results


def run_distillation(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig,
                     teacher_override=None) -> dict:
    """Train ``args.output_dir``'s student and return the held-out report (also written to
    ``<output_dir>/distill_results.json``). ``teacher_override``: a ready teacher module that replaces the loaded
    ``teacher_model`` (e.g. a born-again ensemble; ``teacher_model`` still names the tokenizer / model kind)."""
    if args.include_num_input_tokens_seen in ("no", False):
        args.include_num_input_tokens_seen = "non_padding"  # for the tokens/s figure in the report
    check_inputs(model_args, data_args, args)
    set_seed(args.seed)
    start = time.time()
    tokenizer, teacher, student, train_ds, eval_ds = load_everything(*resolve_names(model_args, data_args), args)
    if teacher_override is not None:
        teacher = teacher_override
    if model_args.use_peft:
        student = apply_lora(student, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                             model_args.lora_target_modules)
    masked = teacher is not None and lm_kind(teacher.config) == "masked"
    collator = DistillationCollator(tokenizer)  # held-out rows are already labelled (masked once for masked LMs)
    teacher_tokenizer = load_teacher_tokenizer(model_args, args)
    train_collator = (masked_lm_collator(tokenizer, args.mlm_probability, args.seed) if masked else
                      collator if teacher_tokenizer is None else CrossTokenizerCollator(tokenizer, teacher_tokenizer))
    callbacks = compression_callbacks(student, args)
    trainer = DistillationTrainer(
        callbacks=callbacks, model=student, teacher_model=teacher if args.needs_teacher() or eval_ds is not None else None, args=args,
        train_dataset=train_ds, processing_class=tokenizer, data_collator=train_collator,
        teacher_processing_class=teacher_tokenizer,
    )
    eval_bs = args.per_device_eval_batch_size

    def evaluate(include_teacher: bool) -> dict:
        models = {"student": _student_for_eval(trainer)}
        if include_teacher and trainer.teacher_model is not None:
            models["teacher"] = trainer.teacher_model
        with gathered_for_forward(models["student"]):  # ZeRO-3 partitions the student at load, before any engine
            return evaluate_models(models, eval_ds, collator, eval_bs, shift_labels=trainer._shift_labels)

    same_vocab = teacher_tokenizer is None  # across tokenizers the teacher cannot read the student's held-out ids
    before = evaluate(include_teacher=same_vocab) if eval_ds is not None else {}
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    after = evaluate(include_teacher=same_vocab) if eval_ds is not None else {}
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        save_quantized(args, tokenizer)

    results = _results(model_args, args, trainer, train_result, student, masked, start, before, after)
    if trainer.is_world_process_zero():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "distill_results.json").write_text(json.dumps(results, indent=2))
        print(format_report(results))
    shutdown_distributed(trainer)  # DDP's reducer first: see its docstring (a hang at exit otherwise)
    return results


def _results(model_args: ModelArguments, args: DistillationConfig, trainer, train_result, student, masked: bool,
             start: float, before: dict, after: dict) -> dict:
    """The run's report: settings, training figures and (with held-out data) before / after scores."""
    runtime = train_result.metrics.get("train_runtime", float("nan"))
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
    results = {
        "teacher": model_args.teacher_model,
        "student": model_args.student_model if model_args.student_init != "teacher_layers" else "teacher_layers",
        "objective": "masked_lm" if masked else "causal_lm",
        "loss_type": args.loss_type, "alpha": args.alpha, "temperature": args.temperature,
        "cross_tokenizer": args.cross_tokenizer,
        "loss_weights": dataclasses.asdict(args.loss_weights()), "kd_positions": args.kd_positions,
        "steps": trainer.state.global_step,
        "train_loss": train_result.training_loss,
        "train_tokens": tokens_seen,
        "train_tokens_per_second": tokens_seen / runtime if tokens_seen and runtime else None,
        "train_runtime_s": runtime,
        "wall_time_s": time.time() - start,
        "world_size": PartialState().num_processes,
        **({"sparsity": sparsity_report(student, args.sparsity_scope)["sparsity"]} if args.target_sparsity else {}),
        **({"qat": args.qat, "quantized_dir": str(Path(args.output_dir) / "quantized")} if args.qat else {}),
    }
    if after:
        results.update({
            "teacher_perplexity": after.get("teacher", {}).get("perplexity"),
            "student_perplexity_before": before["student"]["perplexity"],
            "student_perplexity_after": after["student"]["perplexity"],
            "teacher_accuracy": after.get("teacher", {}).get("accuracy"),
            "student_accuracy_before": before["student"]["accuracy"],
            "student_accuracy_after": after["student"]["accuracy"],
            "top1_agreement_before": before["student"].get("top1_agreement"),
            "top1_agreement_after": after["student"].get("top1_agreement"),
            "eval_tokens": after["student"]["tokens"],
        })
    return results


def compression_callbacks(student, args: DistillationConfig) -> list:
    """Compression while distilling: fake-quantize the student for QAT (in place) and return the gradual-pruning
    callback when ``target_sparsity`` is set (see ``llm_distill.sparsity`` / ``llm_distill.quantization``)."""
    if (args.qat or args.target_sparsity) and hasattr(student, "peft_config"):
        raise ValueError("target_sparsity / qat change the student's own weights, but use_peft freezes them and trains "
                         "an adapter: set use_peft false to prune or quantize-aware train the student.")
    if args.qat:
        prepare_qat(student, args.qat)
        logger.info("QAT: the student's linear layers are fake-quantized (%s)", QAT_METHOD[args.qat])
    if not args.target_sparsity:
        return []
    callback = GradualPruningCallback(student, args.target_sparsity, args.sparsity_start_step, args.sparsity_end_step,
                                      args.sparsity_every, args.sparsity_pattern, args.sparsity_scope)
    if isinstance(args.resume_from_checkpoint, str) and os.path.isdir(args.resume_from_checkpoint):
        callback.resume_dir = args.resume_from_checkpoint
    return [callback]


def save_quantized(args: DistillationConfig, tokenizer) -> None:
    """QAT: convert the saved fp32 student to the int8 model it was trained for, in ``<output_dir>/quantized``."""
    if args.qat:
        quantize_pretrained(args.output_dir, Path(args.output_dir) / "quantized", QAT_METHOD[args.qat])
        tokenizer.save_pretrained(Path(args.output_dir) / "quantized")


def format_report(r: dict) -> str:
    lines = ["", "=== llm-distill: held-out results ==="]
    if "student_perplexity_after" in r:
        if r.get("objective") == "masked_lm":
            lines.append(f"(masked-LM: perplexity and accuracy on the {r['eval_tokens']} masked held-out tokens, same "
                         "masks for every model)")
        lines += [
            f"{'model':<18}{'perplexity':>12}{'accuracy':>10}{'top-1 agree':>14}",
            f"{'teacher':<18}{r['teacher_perplexity']:>12.2f}{_fmt(r['teacher_accuracy']):>10}{'1.000':>14}"
            if r["teacher_perplexity"] else "",
            f"{'student (before)':<18}{r['student_perplexity_before']:>12.2f}{_fmt(r['student_accuracy_before']):>10}"
            f"{_fmt(r['top1_agreement_before']):>14}",
            f"{'student (after)':<18}{r['student_perplexity_after']:>12.2f}{_fmt(r['student_accuracy_after']):>10}"
            f"{_fmt(r['top1_agreement_after']):>14}",
        ]
    tps = r["train_tokens_per_second"]
    lines.append(f"steps {r['steps']}, train tokens/s {tps:,.0f}" if tps else f"steps {r['steps']}")
    lines.append(f"train time {r['train_runtime_s']:.1f}s, wall time {r['wall_time_s']:.1f}s, "
                 f"processes {r['world_size']}")
    return "\n".join(line for line in lines if line)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _student_for_eval(trainer) -> torch.nn.Module:
    """The student as it can run a forward on this rank: the sharded wrapper under FSDP / ZeRO-3 (unwrapping
    FSDP1 would leave flat shards), else the plain module, moved to the device (under FSDP / DeepSpeed
    Trainer places the student only when ``train()`` prepares it)."""
    if is_sharded(trainer.model_wrapped):
        return trainer.model_wrapped
    student = trainer.accelerator.unwrap_model(trainer.model)
    return student if is_sharded(student) else student.to(trainer.args.device)
