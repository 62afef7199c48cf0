"""``DistillationTrainer``: ``transformers.Trainer`` with a frozen teacher and a KD loss.

It overrides as little as possible: ``compute_loss`` (teacher forward under ``no_grad`` + the loss from
``llm_distill.losses``) and ``log`` (to add each loss term). Everything else - optimiser, schedules,
mixed precision, gradient accumulation, checkpoints, Accelerate / DDP / FSDP / DeepSpeed - is Trainer's.

DistilBERT's triple loss (``alpha_kd`` / ``alpha_mlm`` | ``alpha_clm`` / ``alpha_cos`` / ``alpha_mse``) adds one
more thing to own when the student's hidden size differs from the teacher's: a learned projection of the student's
last hidden states. It lives on the trainer, not in the student (whose ``save_pretrained`` stays a plain HF
model): it is added to the optimiser (``create_optimizer``), clipped with the student (``_clip_grad_norm``),
synchronised by its own DDP wrapper, and saved / restored with each checkpoint (``_save_checkpoint`` /
``_load_from_checkpoint``, file ``hidden_projection.safetensors``).
"""

from __future__ import annotations

import logging
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llm_distill.config import DistillationConfig
from llm_distill.cross_tokenizer.objective import XTOK_COLUMNS, CrossTokenizerObjective
from llm_distill.data import DistillationCollator
from llm_distill.distributed import prepare_teacher
from llm_distill.head_features import LMHeadPath
from llm_distill.losses import chunked_distillation_loss, distillation_loss, hidden_state_loss, with_hidden_terms
from llm_distill.models import check_vocab_compatible, load_lm
from llm_distill.offline_kd import (
    TOPK_COLUMNS,
    TopKCollator,
    check_store_compatible,
    load_teacher_logits,
    read_manifest,
)

logger = logging.getLogger(__name__)

PROJECTION_FILE = "hidden_projection.safetensors"  # in checkpoint folders, next to the student's weights


class DistillationTrainer(Trainer):
    """Distil ``teacher_model`` into ``model`` (the student).

    Args:
        model: the student (a causal LM, or a masked LM such as BERT with a masked-LM teacher and
            ``DataCollatorForLanguageModeling`` batches; a ``peft`` model trains only its adapter).
        teacher_model: a model or a hub id / path. It is frozen, put in eval mode and prepared by Accelerate
            for the student's device and backend (never wrapped for training).
        args: a ``DistillationConfig``.
        peft_config: optional ``peft`` config; the student is wrapped with it (like TRL's trainers).
        teacher_processing_class: the teacher's tokenizer when ``args.cross_tokenizer`` is ``uld`` / ``hybrid`` (the
            teacher then reads its own tokens, see ``llm_distill.cross_tokenizer``; ``hybrid`` needs it).
        **kwargs: anything ``Trainer`` accepts (``train_dataset``, ``data_collator``, ``processing_class``...).
    """

    def __init__(self, model=None, teacher_model: PreTrainedModel | str | None = None,
                 args: DistillationConfig | None = None, peft_config=None, teacher_processing_class=None, **kwargs):
        if args is None:
            args = DistillationConfig(output_dir="outputs/distill")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
        if args.teacher_logits:  # offline KD: the stored top-k distributions replace the teacher
            if teacher_model is not None:
                raise ValueError("teacher_logits is set, so no teacher is needed: pass teacher_model=None (or unset "
                                 "teacher_logits to distil from a live teacher).")
            kwargs = _offline_kwargs(args, kwargs, model)
        elif teacher_model is None and args.needs_teacher():
            raise ValueError("teacher_model is required when alpha > 0 (or alpha_kd / alpha_cos / alpha_mse > 0): set "
                             "alpha=0 for plain fine-tuning, or teacher_logits to distil from stored teacher logits.")
        if isinstance(teacher_model, str):
            teacher_model = load_lm(teacher_model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        # Cross-tokenizer distillation (issue 15): a helper owns both forwards and the aligned loss.
        self.cross_tokenizer = None if args.cross_tokenizer == "none" else (
            CrossTokenizerObjective.for_models(args, model, teacher_model, kwargs.get("processing_class"),
                                               teacher_processing_class))
        self.shared_vocab_size = (
            check_vocab_compatible(teacher_model, model, kwargs.get("processing_class"))
            if teacher_model is not None and self.cross_tokenizer is None else None
        )
        super().__init__(model=model, args=args, **kwargs)
        # Our compute_loss normalises by num_items_in_batch, so Trainer must count it and not divide by GA again.
        self.model_accepts_loss_kwargs = True
        # Trainer already inspected the model's loss: causal LMs shift labels, masked LMs do not.
        self._shift_labels = bool(self._loss_shifts_labels)
        self.loss_weights = args.loss_weights()
        self.divergence = args.divergence  # loss type, temperature, JSD beta, skew lambda: one validated object
        self._check_label_weight_name()
        # Student hidden -> teacher hidden, learned, when the triple loss compares hidden states of different widths.
        self.hidden_projection, self._projection = self._make_projection(model, teacher_model)
        # Denominators of the terms not normalised by the label count, per optimiser step (get_batch_samples).
        self._position_counts = None
        self.teacher_model = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        # Fused lm_head path or logits fallback, decided per model on the first batch (llm_distill.head_features).
        self._lm_head_paths = {"student": LMHeadPath("student"), "teacher": LMHeadPath("teacher")}
        # Each loss term accumulated since the last log (detached; reduced across ranks at log time).
        self._term_sums = {"train": {}, "eval": {}}
        self._last_terms_step = 0

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.teacher_logits:  # keep the stored top-k columns: remove_unused_columns would drop them
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TOPK_COLUMNS]))
        if self.cross_tokenizer is not None:  # the teacher's ids and the alignment, likewise
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *XTOK_COLUMNS]))

    # ------------------------------------------------------------------ teacher

    def _prepare_teacher(self, teacher: PreTrainedModel) -> torch.nn.Module:
        """Frozen, eval mode, on the student's device / backend: replicated without a DDP wrapper under DDP,
        sharded with ``fully_shard`` under FSDP2 and by a DeepSpeed inference engine under ZeRO-3, with the
        student's mixed precision (see ``llm_distill.distributed``)."""
        return prepare_teacher(teacher, self.accelerator)

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.cross_tokenizer is not None:
            return self._cross_tokenizer_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", *TOPK_COLUMNS)}
        args, weights = self.args, self.loss_weights
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(labels)
        # Global (accumulated, all-rank) counts for the KD-on-all-positions and hidden-state denominators, like
        # num_items_in_batch for the label terms; None (e.g. in evaluation) = each batch's own counts.
        counts = self._position_counts if self.model.training and num_items_in_batch is not None else None
        kd_kwargs = dict(kd_mask=attention_mask if args.kd_positions == "all" else None,
                         num_kd_items=counts[0] if counts is not None else None,
                         num_items_in_batch=num_items_in_batch, shift_labels=self._shift_labels,
                         divergence=self.divergence)
        # Memory-lean path (default): chunked fp32 loss from final hidden states + lm_head, never the B x S x V
        # logits; offline KD (stored top-k teacher logits) always takes it. return_outputs callers want logits.
        if (args.loss_chunk_size > 0 or TOPK_COLUMNS[0] in inputs) and not return_outputs:
            out, outputs, hidden = self._memory_lean_loss(model, model_inputs, inputs, kd_kwargs)
        else:
            out, outputs, hidden = self._plain_loss(model, model_inputs, labels, kd_kwargs)
        if weights.uses_hidden:  # the triple loss's cosine / MSE terms on the last hidden states
            out = with_hidden_terms(out, hidden_state_loss(
                *hidden, attention_mask, cos_weight=weights.cos, mse_weight=weights.mse, projection=self._projection,
                num_items_in_batch=counts[1] if counts is not None else None), weights)
        loss = out.loss
        # Trainer's convention (see Trainer.compute_loss): with a global token count, DDP's gradient *mean*
        # must be undone by the world size so the result is the mean over all ranks' tokens.
        if args.average_tokens_across_devices and num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        self._record_terms(out, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _cross_tokenizer_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """Teacher and student on their own tokens, the KD term on the aligned groups (``llm_distill.cross_tokenizer``)."""
        out, outputs = self.cross_tokenizer(model, self.teacher_model, inputs, self._lm_head_paths, num_items_in_batch)
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # as in compute_loss: undo DDP's mean over ranks
        self._record_terms(out, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _run_teacher(self) -> bool:
        return self.teacher_model is not None and (self.loss_weights.kd > 0 or self.loss_weights.uses_hidden)

    def _plain_loss(self, model, model_inputs, labels, kd_kwargs):
        """The readable reference: full logits of both models (``loss_chunk_size: 0``)."""
        hidden_kwargs = {"output_hidden_states": True} if self.loss_weights.uses_hidden else {}
        outputs = model(**model_inputs, **hidden_kwargs)
        teacher_outputs = None
        if self._run_teacher():
            with torch.no_grad():
                teacher_outputs = self.teacher_model(**model_inputs, **hidden_kwargs)
        teacher_logits = teacher_outputs.logits if teacher_outputs is not None and self.loss_weights.kd > 0 else None
        out = distillation_loss(outputs.logits, teacher_logits, labels, weights=self.loss_weights, **kd_kwargs)
        return out, outputs, (_last_hidden(outputs), _last_hidden(teacher_outputs))

    def _memory_lean_loss(self, model, model_inputs, inputs, kd_kwargs):
        """``chunked_distillation_loss`` from the student's (and teacher's) final hidden states + lm_head weight,
        or from stored top-k teacher log-probabilities (offline KD); see ``llm_distill.head_features`` for the fallback."""
        need_hidden = self.loss_weights.uses_hidden
        student = self._lm_head_paths["student"](model, model_inputs, need_hidden)  # through the DDP wrapper
        teacher = None
        if self._run_teacher() and TOPK_COLUMNS[0] not in inputs:
            with torch.no_grad():
                teacher = self._lm_head_paths["teacher"](self.teacher_model, model_inputs, need_hidden)
        kd_teacher = teacher if teacher is not None and self.loss_weights.kd > 0 else None
        out = chunked_distillation_loss(
            student.features, student.weight,
            kd_teacher.features if kd_teacher else None, kd_teacher.weight if kd_teacher else None, inputs["labels"],
            student_bias=student.bias, teacher_bias=kd_teacher.bias if kd_teacher else None,
            topk_ids=inputs.get(TOPK_COLUMNS[0]), topk_logprobs=inputs.get(TOPK_COLUMNS[1]),
            chunk_size=self.args.loss_chunk_size or inputs["labels"].numel() or 1, weights=self.loss_weights,
            **kd_kwargs,
        )
        return out, student.outputs, (student.hidden, teacher.hidden if teacher else None)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._position_counts = (self._count_positions(batch_samples, device)
                                 if num_items_in_batch is not None else None)
        if self.cross_tokenizer is not None:  # the KD term's denominator: aligned groups of the whole step
            groups = self.cross_tokenizer.count_kd_groups(batch_samples)
            if groups is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
                groups = self.accelerator.gather(groups.to(device)[None]).sum()
            self.cross_tokenizer.num_kd_groups = groups
        return batch_samples, num_items_in_batch

    def _count_positions(self, batch_samples: list, device) -> torch.Tensor | None:
        """``(kd positions, hidden-state positions)`` of this optimiser step's micro-batches (all ranks when Trainer
        counts ``num_items_in_batch`` over all ranks): the denominators of the KD term with ``kd_positions=all`` and
        of the cosine / MSE terms, so that they too are exact token means under gradient accumulation and DDP."""
        if self.args.kd_positions == "labels" and not self.loss_weights.uses_hidden:
            return None
        kd_positions = hidden_positions = 0
        for batch in batch_samples:  # tensor sums: no host sync per micro-batch
            mask = batch.get("attention_mask")
            mask = torch.ones_like(batch["labels"]) if mask is None else mask
            kd_positions = kd_positions + (mask[..., 1:] if self._shift_labels else mask).sum()  # labels' frame
            hidden_positions = hidden_positions + mask.sum()
        counts = torch.stack([torch.as_tensor(kd_positions), torch.as_tensor(hidden_positions)]).long().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)  # (world, 2) -> (2,)
        return counts

    def _record_terms(self, out, num_items_in_batch) -> None:
        """Accumulate each term the way Trainer accumulates ``loss``, so that the logged values satisfy
        ``loss == alpha * kd_loss + (1 - alpha) * ce_loss`` (with the triple loss: ``alpha_kd * kd_loss +
        alpha_mlm|clm * ce_loss + alpha_cos * cos_loss + alpha_mse * mse_loss``): a micro-batch term is already
        divided by the step's token count, so summing micro-batches gives the step's token mean; steps are then
        averaged."""
        mode = "train" if self.model.training else "eval"
        sums = self._term_sums[mode]
        # Eval batches are normalised by their own token count: weight them by it, so the logged eval terms are
        # the token mean over the whole eval set and all ranks (not a mean of batch or rank means).
        weight = out.num_tokens.float().detach() if mode == "eval" else 1.0
        terms = (("kd_loss", out.kd_loss), ("ce_loss", out.ce_loss), ("cos_loss", out.cos_loss),
                 ("mse_loss", out.mse_loss))
        for name, value in terms:
            if value is None or (name == "kd_loss" and ((self.teacher_model is None and not self.args.teacher_logits)
                                                        or self.loss_weights.kd == 0)):
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


    # ------------------------------------------------------------------ triple loss: checks and the projection

    def _check_label_weight_name(self) -> None:
        """alpha_mlm weights a masked-LM loss and alpha_clm a causal one: refuse the name that does not fit."""
        args = self.args
        if args.alpha_mlm is not None and self._shift_labels:
            raise ValueError(f"alpha_mlm={args.alpha_mlm} weights the masked-LM loss, but the student is a causal LM "
                             "(its labels are shifted): set alpha_clm instead.")
        if args.alpha_clm is not None and not self._shift_labels:
            raise ValueError(f"alpha_clm={args.alpha_clm} weights the causal-LM loss, but the student is a masked LM: "
                             "set alpha_mlm instead.")

    def _make_projection(self, student, teacher) -> tuple[torch.nn.Linear | None, torch.nn.Module | None]:
        """``(projection, the module to call)``: a ``Linear(Hs, Ht, bias=False)`` when the hidden-state terms are
        on and the widths differ (the module to call is its DDP wrapper on several processes), else ``(None, None)``."""
        if teacher is None or not self.loss_weights.uses_hidden:
            return None, None
        hs, ht = student.config.hidden_size, teacher.config.hidden_size
        if hs == ht:
            return None, None
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(f"Student hidden size {hs} != teacher hidden size {ht}: the learned projection that "
                             "alpha_cos / alpha_mse then need is supported on one device and under DDP, not under "
                             "FSDP / DeepSpeed. Use a student of the teacher's width (student_init: teacher_layers), "
                             "or unset alpha_cos / alpha_mse.")
        projection = torch.nn.Linear(hs, ht, bias=False).to(self.args.device)  # seeded: Trainer set the seed
        logger.info("Triple loss: student hidden size %d != teacher's %d, training a linear projection (saved in "
                    "checkpoints as %s, not in the student).", hs, ht, PROJECTION_FILE)
        if self.accelerator.num_processes == 1:
            return projection, projection
        device = self.accelerator.device
        ids = [device.index if device.index is not None else self.accelerator.local_process_index] \
            if device.type == "cuda" else None
        return projection, torch.nn.parallel.DistributedDataParallel(projection, device_ids=ids)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        proj = self.hidden_projection
        if proj is not None and not any(p is proj.weight for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": list(proj.parameters()), "weight_decay": self.args.weight_decay})
            # Trainer zeroes only the student's gradients after each step (model.zero_grad()): zero ours too.
            optimizer.register_step_post_hook(lambda *_: proj.zero_grad(set_to_none=True))
        return optimizer

    def _clip_grad_norm(self, model):
        if self.hidden_projection is None:
            return super()._clip_grad_norm(model)
        params = [*model.parameters(), *self.hidden_projection.parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.hidden_projection is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_file({k: v.contiguous() for k, v in self.hidden_projection.state_dict().items()},
                      os.path.join(folder, PROJECTION_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.hidden_projection is None:
            return
        path = os.path.join(resume_from_checkpoint, PROJECTION_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: this run trains a hidden-state projection (alpha_cos / "
                                    "alpha_mse with different hidden sizes) but the checkpoint was saved without one. "
                                    "Resume with the settings that wrote it, or start a fresh run.")
        self.hidden_projection.load_state_dict(load_file(path, device=str(self.args.device)))


def _last_hidden(outputs) -> torch.Tensor | None:
    hidden_states = getattr(outputs, "hidden_states", None) if outputs is not None else None
    return hidden_states[-1] if hidden_states else None


def _offline_kwargs(args: DistillationConfig, kwargs: dict, model) -> dict:
    """Offline KD: check the store against the student, train on its rows unless ``train_dataset`` is given, and
    collate its top-k columns (``TopKCollator``)."""
    check_store_compatible(read_manifest(args.teacher_logits), model, args.temperature, args.loss_type)
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
