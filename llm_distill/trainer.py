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

Feature-level KD (``llm_distill.features``: hidden-layer maps, MiniLMv2 relations, TinyBERT attention maps, RKD) is
one composed object, ``FeatureDistiller``: its hooks record both models' features during the forwards of
``compute_loss`` and it returns the extra terms; its per-layer projections are one more trainer-owned module
(``_trainer_owned``) handled like the triple loss's, in ``feature_projections.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from llm_distill.features import FeatureDistiller
from llm_distill.head_features import LMHeadPath
from llm_distill.losses import chunked_distillation_loss, distillation_loss, hidden_state_loss, with_hidden_terms
from llm_distill.models import check_vocab_compatible, load_lm
from llm_distill.on_policy import ROLLOUT_KEY, RolloutSampler, prompt_lengths, teacher_nll
from llm_distill.offline_kd import (
    TOPK_COLUMNS,
    TopKCollator,
    check_store_compatible,
    load_teacher_logits,
    read_manifest,
)

logger = logging.getLogger(__name__)

PROJECTION_FILE = "hidden_projection.safetensors"  # in checkpoint folders, next to the student's weights
FEATURE_PROJECTION_FILE = "feature_projections.safetensors"  # the hidden-layer map's projections (features/)


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
        # Feature-level KD (hidden-layer map, attention relations / maps, RKD): hooks + its own learned projections.
        self.feature_distiller = self._make_feature_distiller(model)
        # Fused lm_head path or logits fallback, decided per model on the first batch (llm_distill.head_features).
        self._lm_head_paths = {"student": LMHeadPath("student"), "teacher": LMHeadPath("teacher")}
        # Each loss term accumulated since the last log (detached; reduced across ranks at log time).
        self._term_sums = {"train": {}, "eval": {}}
        self._last_terms_step = 0
        # On-policy distillation (GKD): with probability lmbda a micro-batch's completions are the student's own
        # samples (seq_kd: the teacher's), drawn before the step (get_batch_samples; llm_distill.on_policy).
        self.rollouts = self._make_rollouts(args, kwargs.get("processing_class"))
        self._scoring_rollout = False  # the micro-batch in compute_loss is a sampled one

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
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", ROLLOUT_KEY, *TOPK_COLUMNS)}
        self._scoring_rollout = (self.rollouts is not None and inputs.get(ROLLOUT_KEY) is not None
                                 and self.model.training)
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
        with self.feature_distiller.capturing() if self.feature_distiller is not None else contextlib.nullcontext():
            if (args.loss_chunk_size > 0 or TOPK_COLUMNS[0] in inputs) and not return_outputs:
                out, outputs, hidden = self._memory_lean_loss(model, model_inputs, inputs, kd_kwargs)
            else:
                out, outputs, hidden = self._plain_loss(model, model_inputs, labels, kd_kwargs)
        if weights.uses_hidden:  # the triple loss's cosine / MSE terms on the last hidden states
            out = with_hidden_terms(out, hidden_state_loss(
                *hidden, attention_mask, cos_weight=weights.cos, mse_weight=weights.mse, projection=self._projection,
                num_items_in_batch=counts[1] if counts is not None else None), weights)
        feature_terms = {}
        if self.feature_distiller is not None:  # per-position terms share the hidden-state denominator
            extra, feature_terms = self.feature_distiller(attention_mask, counts[1] if counts is not None else None)
            out = dataclasses.replace(out, loss=out.loss + extra)
        loss = out.loss
        # Trainer's convention (see Trainer.compute_loss): with a global token count, DDP's gradient *mean*
        # must be undone by the world size so the result is the mean over all ranks' tokens.
        if args.average_tokens_across_devices and num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        self._record_terms(out, num_items_in_batch, feature_terms)
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
        return self.teacher_model is not None and (self.loss_weights.kd > 0 or self.loss_weights.uses_hidden
                                                   or self.feature_distiller is not None)

    def _plain_loss(self, model, model_inputs, labels, kd_kwargs):
        """The readable reference: full logits of both models (``loss_chunk_size: 0``)."""
        hidden_kwargs = {"output_hidden_states": True} if self.loss_weights.uses_hidden else {}
        outputs = model(**model_inputs, **hidden_kwargs)
        teacher_outputs = None
        if self._run_teacher():
            with torch.no_grad():
                teacher_outputs = self.teacher_model(**model_inputs, **hidden_kwargs)
        teacher_logits = teacher_outputs.logits if teacher_outputs is not None and self.loss_weights.kd > 0 else None
        if teacher_outputs is not None:
            self._score_rollout(teacher_outputs.logits, None, None, labels)
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
        if teacher is not None:
            self._score_rollout(teacher.features, teacher.weight, teacher.bias, inputs["labels"])
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
        if self.rollouts is not None and batch_samples:
            batch_samples = self.rollouts.prepare(batch_samples, self.state.global_step, self.args.process_index,
                                                  self.accelerator.unwrap_model(self.model_wrapped), self.teacher_model)
            if num_items_in_batch is not None:  # Trainer counted the dataset's labels: count the trained-on ones
                num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
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
        if self.args.kd_positions == "labels" and not self.loss_weights.uses_hidden and self.feature_distiller is None:
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

    def _record_terms(self, out, num_items_in_batch, feature_terms: dict | None = None) -> None:
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
                 ("mse_loss", out.mse_loss), *(feature_terms or {}).items())
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
        for callback in self.callback_handler.callbacks:  # e.g. GradualPruningCallback's sparsity
            logs.update(getattr(callback, "extra_logs", dict)())
        if self.rollouts is not None and mode == "train" and "loss" in logs:
            logs.update(self.rollouts.pop_metrics(self.accelerator, self.args.device))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ on-policy distillation (GKD)

    def _make_rollouts(self, args: DistillationConfig, tokenizer) -> RolloutSampler | None:
        if not args.samples_completions():
            return None
        if not self._shift_labels:
            raise ValueError("On-policy distillation (lmbda > 0 or seq_kd) samples completions, which a masked LM "
                             "cannot do: set lmbda=0 and seq_kd=false for a masked-LM student.")
        if args.seq_kd and self.teacher_model is None:
            raise ValueError("seq_kd=true samples completions from the teacher: pass teacher_model.")
        first = _first_row(self.train_dataset)
        if first is not None and "labels" in first:  # 'text' rows have no prompt: refuse them now, not at step 1
            prompt_lengths(torch.as_tensor([first["labels"]]))
        return RolloutSampler(args, tokenizer, self.accelerator.unwrap_model(self.model))

    def _score_rollout(self, features, weight, bias, labels) -> None:
        """Teacher NLL per token of a sampled batch's completions (logged as rollout_teacher_nll), from the
        teacher's forward that the loss runs anyway."""
        if self._scoring_rollout:
            self.rollouts.meter.add_nll(*teacher_nll(features, weight, bias, labels, self.args.loss_chunk_size or 1024))


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
        self._check_projection_backend(f"Student hidden size {hs} != teacher hidden size {ht}: the learned "
                                       "projection that alpha_cos / alpha_mse then need", "alpha_cos / alpha_mse")
        projection = torch.nn.Linear(hs, ht, bias=False).to(self.args.device)  # seeded: Trainer set the seed
        logger.info("Triple loss: student hidden size %d != teacher's %d, training a linear projection (saved in "
                    "checkpoints as %s, not in the student).", hs, ht, PROJECTION_FILE)
        return projection, self._for_ddp(projection)

    def _make_feature_distiller(self, student) -> FeatureDistiller | None:
        """The feature-KD terms (``llm_distill.features``) when any of their weights is > 0, else ``None`` (no hook,
        no projection: the run is exactly the one without them)."""
        settings = self.args.feature_settings()
        if self.teacher_model is None or not settings.active:
            return None
        distiller = FeatureDistiller(settings, student, self.teacher_model, causal=self._shift_labels)
        if distiller.projections is not None:
            self._check_projection_backend("The hidden-layer map pairs layers of different widths: its learned "
                                           "projections", "alpha_hidden")
            distiller.projections.to(self.args.device)
            distiller.project = self._for_ddp(distiller.projections)
            logger.info("Feature KD: training projections for student layers %s (saved in checkpoints as %s, not in "
                        "the student).", list(distiller.projections.maps), FEATURE_PROJECTION_FILE)
        return distiller

    def _check_projection_backend(self, what: str, weights: str) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(f"{what} are supported on one device and under DDP, not under FSDP / DeepSpeed. Use a "
                             f"student of the teacher's width (student_init: teacher_layers), or set {weights} to 0.")

    def _for_ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` itself on one process, else its own DDP wrapper (gradients averaged like the student's)."""
        if self.accelerator.num_processes == 1:
            return module
        device = self.accelerator.device
        ids = [device.index if device.index is not None else self.accelerator.local_process_index] \
            if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _trainer_owned(self) -> dict[str, torch.nn.Module]:
        """Modules trained with the student but not part of it: checkpoint file name -> module."""
        owned = {PROJECTION_FILE: self.hidden_projection}
        distiller = getattr(self, "feature_distiller", None)
        owned[FEATURE_PROJECTION_FILE] = distiller.projections if distiller is not None else None
        return {name: module for name, module in owned.items() if module is not None}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        for module in self._trainer_owned().values():
            params = list(module.parameters())
            if any(p is q for g in optimizer.param_groups for p in g["params"] for q in params):
                continue
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
            # Trainer zeroes only the student's gradients after each step (model.zero_grad()): zero ours too.
            optimizer.register_step_post_hook(lambda *_, m=module: m.zero_grad(set_to_none=True))
        return optimizer

    def _clip_grad_norm(self, model):
        owned = self._trainer_owned()
        if not owned:
            return super()._clip_grad_norm(model)
        params = [*model.parameters(), *(p for m in owned.values() for p in m.parameters())]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        for name, module in self._trainer_owned().items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, os.path.join(folder, name))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, module in self._trainer_owned().items():
            path = os.path.join(resume_from_checkpoint, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: this run trains a projection (alpha_cos / alpha_mse, or "
                                        "alpha_hidden, with different hidden sizes) that the checkpoint was saved "
                                        "without. Resume with the settings that wrote it, or start a fresh run.")
            module.load_state_dict(load_file(path, device=str(self.args.device)))


def _first_row(dataset) -> dict | None:
    try:
        return dataset[0] if dataset is not None and len(dataset) else None
    except (TypeError, KeyError, IndexError, NotImplementedError):  # an iterable dataset: checked at the first batch
        return None


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
