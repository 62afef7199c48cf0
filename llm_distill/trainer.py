"""``DistillationTrainer``: ``transformers.Trainer`` with a frozen teacher and a KD loss.

It overrides as little as possible: ``compute_loss`` (teacher forward under ``no_grad`` + the loss from
``llm_distill.losses``) and ``log`` (to add each loss term). Everything else - optimiser, schedules,
mixed precision, gradient accumulation, checkpoints, Accelerate / DDP / FSDP / DeepSpeed - is Trainer's.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, Trainer

from llm_distill.config import DistillationConfig
from llm_distill.lm_head import LMHeadPath
from llm_distill.losses import chunked_distillation_loss, distillation_loss
from llm_distill.models import check_vocab_compatible, load_causal_lm
from llm_distill.teacher_logits import (
    TOPK_COLUMNS,
    TopKCollator,
    check_store_compatible,
    load_teacher_logits,
    read_manifest,
)

logger = logging.getLogger(__name__)


class DistillationTrainer(Trainer):
    """Distil ``teacher_model`` into ``model`` (the student).

    Args:
        model: the student (any causal LM; a ``peft`` model trains only its adapter).
        teacher_model: a model or a hub id / path. It is frozen, put in eval mode and prepared by Accelerate
            for the student's device and backend (never wrapped for training).
        args: a ``DistillationConfig``.
        peft_config: optional ``peft`` config; the student is wrapped with it (like TRL's trainers).
        **kwargs: anything ``Trainer`` accepts (``train_dataset``, ``data_collator``, ``processing_class``...).
    """

    def __init__(self, model=None, teacher_model: PreTrainedModel | str | None = None,
                 args: DistillationConfig | None = None, peft_config=None, **kwargs):
        if args is None:
            args = DistillationConfig(output_dir="outputs/distill")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
        if args.teacher_logits:  # offline KD: the stored top-k distributions replace the teacher
            if teacher_model is not None:
                raise ValueError("teacher_logits is set, so no teacher is needed: pass teacher_model=None (or unset "
                                 "teacher_logits to distil from a live teacher).")
            kwargs = _offline_kwargs(args, kwargs, model)
        elif teacher_model is None and args.alpha > 0:
            raise ValueError("teacher_model is required when alpha > 0 (set alpha=0 for plain fine-tuning, or "
                             "teacher_logits to distil from stored teacher logits).")
        if isinstance(teacher_model, str):
            teacher_model = load_causal_lm(teacher_model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.shared_vocab_size = (
            check_vocab_compatible(teacher_model, model, kwargs.get("processing_class"))
            if teacher_model is not None else None
        )
        super().__init__(model=model, args=args, **kwargs)
        # Our compute_loss normalises by num_items_in_batch, so Trainer must count it and not divide by GA again.
        self.model_accepts_loss_kwargs = True
        # Trainer already inspected the model's loss: causal LMs shift labels, masked LMs do not.
        self._shift_labels = bool(self._loss_shifts_labels)
        self.teacher_model = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        # Fused lm_head path or logits fallback, decided per model on the first batch (llm_distill.lm_head).
        self._lm_head_paths = {"student": LMHeadPath("student"), "teacher": LMHeadPath("teacher")}
        # Each loss term accumulated since the last log (detached; reduced across ranks at log time).
        self._term_sums = {"train": {}, "eval": {}}
        self._last_terms_step = 0

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.teacher_logits:  # keep the stored top-k columns: remove_unused_columns would drop them
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TOPK_COLUMNS]))

    # ------------------------------------------------------------------ teacher

    def _prepare_teacher(self, teacher: PreTrainedModel) -> torch.nn.Module:
        """Frozen, eval mode, on the student's device / backend: replicated without a DDP wrapper under DDP,
        sharded with ``fully_shard`` under FSDP2 and by a DeepSpeed inference engine under ZeRO-3, with the
        student's mixed precision (see ``llm_distill.distributed``)."""
        from llm_distill.distributed import prepare_teacher

        return prepare_teacher(teacher, self.accelerator)

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", *TOPK_COLUMNS)}
        args = self.args
        # Memory-lean path (default): chunked fp32 loss from final hidden states + lm_head, never the B x S x V
        # logits; offline KD (stored top-k teacher logits) always takes it. return_outputs callers want logits.
        if (args.loss_chunk_size > 0 or TOPK_COLUMNS[0] in inputs) and not return_outputs:
            out, outputs = self._memory_lean_loss(model, model_inputs, inputs, num_items_in_batch)
        else:
            outputs = model(**model_inputs)
            teacher_logits = None
            if self.teacher_model is not None and args.alpha > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher_model(**model_inputs).logits
            out = distillation_loss(
                outputs.logits, teacher_logits, labels,
                loss_type=args.loss_type, temperature=args.temperature, alpha=args.alpha,
                jsd_beta=args.jsd_beta, skew_lambda=args.skew_lambda,
                num_items_in_batch=num_items_in_batch, shift_labels=self._shift_labels,
            )
        loss = out.loss
        # Trainer's convention (see Trainer.compute_loss): with a global token count, DDP's gradient *mean*
        # must be undone by the world size so the result is the mean over all ranks' tokens.
        if args.average_tokens_across_devices and num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        self._record_terms(out, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _memory_lean_loss(self, model, model_inputs, inputs, num_items_in_batch):
        """``chunked_distillation_loss`` from the student's (and teacher's) final hidden states + lm_head weight,
        or from stored top-k teacher log-probabilities (offline KD); see ``llm_distill.lm_head`` for the fallback."""
        args = self.args
        student = self._lm_head_paths["student"](model, model_inputs)  # through the DDP wrapper
        teacher = None
        if self.teacher_model is not None and args.alpha > 0 and TOPK_COLUMNS[0] not in inputs:
            with torch.no_grad():
                teacher = self._lm_head_paths["teacher"](self.teacher_model, model_inputs)
        out = chunked_distillation_loss(
            student.features, student.weight,
            teacher.features if teacher else None, teacher.weight if teacher else None, inputs["labels"],
            student_bias=student.bias, teacher_bias=teacher.bias if teacher else None,
            topk_ids=inputs.get(TOPK_COLUMNS[0]), topk_logprobs=inputs.get(TOPK_COLUMNS[1]),
            chunk_size=args.loss_chunk_size or inputs["labels"].numel() or 1,
            loss_type=args.loss_type, temperature=args.temperature, alpha=args.alpha,
            jsd_beta=args.jsd_beta, skew_lambda=args.skew_lambda,
            num_items_in_batch=num_items_in_batch, shift_labels=self._shift_labels,
        )
        return out, student.outputs

    def _record_terms(self, out, num_items_in_batch) -> None:
        """Accumulate each term the way Trainer accumulates ``loss``, so that the logged values satisfy
        ``loss == alpha * kd_loss + (1 - alpha) * ce_loss``: a micro-batch term is already divided by the
        step's token count, so summing micro-batches gives the step's token mean; steps are then averaged."""
        mode = "train" if self.model.training else "eval"
        sums = self._term_sums[mode]
        # Eval batches are normalised by their own token count: weight them by it, so the logged eval terms are
        # the token mean over the whole eval set and all ranks (not a mean of batch or rank means).
        weight = out.num_tokens.float().detach() if mode == "eval" else 1.0
        for name, value in (("kd_loss", out.kd_loss), ("ce_loss", out.ce_loss)):
            if name == "kd_loss" and ((self.teacher_model is None and not self.args.teacher_logits) or self.args.alpha == 0):
                continue
            sums[name] = sums.get(name, 0.0) + value.float().detach() * weight
        sums["_batches"] = sums.get("_batches", 0.0) + 1.0
        if mode == "eval":
            sums["_tokens"] = sums.get("_tokens", 0.0) + weight
        # A global denominator (token count gathered over ranks) makes the rank values add up; a local one averages.
        self._terms_use_global_denominator = bool(num_items_in_batch is not None and self.args.average_tokens_across_devices)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        sums = self._term_sums[mode]
        if sums and (mode == "eval" or "loss" in logs):
            names = sorted(sums)
            stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.args.device) for k in names])
            stacked = self.accelerator.reduce(stacked, reduction="sum")
            totals = dict(zip(names, stacked.tolist()))
            totals.pop("_batches")
            tokens = totals.pop("_tokens", 0.0)
            world = self.accelerator.num_processes
            if mode == "train":
                steps = max(self.state.global_step - self._last_terms_step, 1)
                divisor = steps * (1 if getattr(self, "_terms_use_global_denominator", False) else world)
                self._last_terms_step = self.state.global_step
            else:  # token-weighted sums over all ranks (see _record_terms)
                divisor = max(tokens, 1.0)
            prefix = "eval_" if mode == "eval" else ""
            for name, total in totals.items():
                logs[f"{prefix}{name}"] = round(total / divisor, 6)
            self._term_sums[mode] = {}
        super().log(logs, start_time)


def _offline_kwargs(args: DistillationConfig, kwargs: dict, model) -> dict:
    """Offline KD: check the store against the student, train on its rows unless ``train_dataset`` is given, and
    collate its top-k columns (``TopKCollator``)."""
    from llm_distill.data import DistillationCollator

    check_store_compatible(read_manifest(args.teacher_logits), model, args.temperature)
    kwargs = dict(kwargs)
    if kwargs.get("train_dataset") is None:
        kwargs["train_dataset"] = load_teacher_logits(args.teacher_logits)
    base = kwargs.get("data_collator")
    if base is None:
        if kwargs.get("processing_class") is None:
            raise ValueError("Offline KD needs processing_class=tokenizer (or a data_collator) to pad the stored rows.")
        base = DistillationCollator(kwargs["processing_class"])
    if not isinstance(base, TopKCollator):
        kwargs["data_collator"] = TopKCollator(base)
    return kwargs
