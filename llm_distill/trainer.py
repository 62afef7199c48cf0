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
from llm_distill.losses import distillation_loss
from llm_distill.models import check_vocab_compatible, load_causal_lm

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
        if teacher_model is None and args.alpha > 0:
            raise ValueError("teacher_model is required when alpha > 0 (set alpha=0 for plain fine-tuning).")
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
        # Token-weighted sums of each term since the last log (detached; reduced across ranks at log time).
        self._term_sums = {"train": {}, "eval": {}}
        self._last_terms_step = 0

    # ------------------------------------------------------------------ teacher

    def _prepare_teacher(self, teacher: PreTrainedModel) -> torch.nn.Module:
        """Frozen, eval mode, on the student's device / backend (sharded under FSDP / DeepSpeed ZeRO-3)."""
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from llm_distill.distributed import prepare_deepspeed_teacher

            return prepare_deepspeed_teacher(teacher, self.accelerator)
        # evaluation_mode=True: no DDP wrapper (nothing to synchronise), FSDP shards it for inference.
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)
        args = self.args
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

    def _record_terms(self, out, num_items_in_batch) -> None:
        """Accumulate each term the way Trainer accumulates ``loss``, so that the logged values satisfy
        ``loss == alpha * kd_loss + (1 - alpha) * ce_loss``: a micro-batch term is already divided by the
        step's token count, so summing micro-batches gives the step's token mean; steps are then averaged."""
        mode = "train" if self.model.training else "eval"
        sums = self._term_sums[mode]
        for name, value in (("kd_loss", out.kd_loss), ("ce_loss", out.ce_loss)):
            if name == "kd_loss" and (self.teacher_model is None or self.args.alpha == 0):
                continue
            sums[name] = sums.get(name, 0.0) + value.float().detach()
        sums["_batches"] = sums.get("_batches", 0.0) + 1.0
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
            batches = totals.pop("_batches")
            world = self.accelerator.num_processes
            if mode == "train":
                steps = max(self.state.global_step - self._last_terms_step, 1)
                divisor = steps * (1 if getattr(self, "_terms_use_global_denominator", False) else world)
                self._last_terms_step = self.state.global_step
            else:  # eval batches are each normalised by their own tokens: average them
                divisor = max(batches, 1.0)
            prefix = "eval_" if mode == "eval" else ""
            for name, total in totals.items():
                logs[f"{prefix}{name}"] = round(total / divisor, 6)
            self._term_sums[mode] = {}
        super().log(logs, start_time)
