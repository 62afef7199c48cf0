"""The cross-tokenizer KD + CE loss of a batch, and the trainer's helper that runs both models for it.

The batch (``CrossTokenizerCollator``) carries the student's ``input_ids`` / ``labels``, the teacher's own
``teacher_input_ids`` / ``teacher_attention_mask``, and per row the aligned groups' compared positions
(``xtok_student_pos`` / ``xtok_teacher_pos``, ``(B, G)``) with ``xtok_kd`` (``(B, G)``: the group is in the KD term).

Memory. The KD term only ever projects the ``N`` compared positions (one per group in the KD mask), never the
``B x S x V`` logits: the final hidden states at those positions go through each model's ``lm_head``
``chunk_size`` rows at a time, and each chunk is recomputed in backward (activation checkpointing) instead of being
stored, so the KD term's peak is O(``chunk_size`` x (Vs + Vt)) fp32 (ULD sorts both rows: about 4 such buffers).
The CE term is the memory-lean chunked CE of ``llm_distill.losses.chunked``. Where a model's head cannot be fused
(``llm_distill.head_features`` falls back to logits: a quantised / LoRA-wrapped head, logit soft-capping ...) its
full ``(B, S, V)`` logits exist anyway and the loss reads rows from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llm_distill.cross_tokenizer.losses import VocabularyMap, cross_tokenizer_divergence
from llm_distill.losses import DistillationLossOutput, Divergence, LossWeights, chunked_distillation_loss

XTOK_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "xtok_student_pos", "xtok_teacher_pos", "xtok_kd")


def _rows(features: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``features`` (B, S, D) at ``positions`` (B, G) where ``keep`` (B, G): -> (N, D), row-major."""
    batch = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
    return features[batch[keep], positions[keep]]


def _project(rows, weight, bias):
    return rows.float() if weight is None else F.linear(rows, weight, bias).float()


def cross_tokenizer_kd_sum(student_rows, student_weight, teacher_rows, teacher_weight, *, mode: str,
                           divergence: Divergence, vocab_map: VocabularyMap | None = None, chunk_size: int = 256,
                           student_bias=None, teacher_bias=None) -> torch.Tensor:
    """Sum over ``N`` compared positions of the cross-tokenizer divergence.

    ``student_rows`` ``(N, Hs)`` hidden states with ``student_weight`` ``(Vs, Hs)`` (or ``(N, Vs)`` logits and
    ``None``); the teacher likewise (no gradient). Chunks of ``chunk_size`` rows, each recomputed in backward."""
    def chunk(s_rows, t_rows):
        with torch.no_grad():
            t_logits = _project(t_rows, teacher_weight, teacher_bias)
        s_logits = _project(s_rows, student_weight, student_bias)
        return cross_tokenizer_divergence(mode, s_logits, t_logits, divergence, vocab_map).sum()

    total = student_rows.new_zeros((), dtype=torch.float32)
    for start in range(0, student_rows.shape[0], max(1, chunk_size)):
        s_rows, t_rows = student_rows[start:start + chunk_size], teacher_rows[start:start + chunk_size]
        if torch.is_grad_enabled() and s_rows.requires_grad:
            total = total + checkpoint(chunk, s_rows, t_rows, use_reentrant=False)
        else:
            total = total + chunk(s_rows, t_rows)
    return total


def cross_tokenizer_loss(student, teacher, inputs: dict, *, mode: str, divergence: Divergence, weights: LossWeights,
                         vocab_map: VocabularyMap | None = None, chunk_size: int = 256,
                         num_items_in_batch=None, num_kd_items=None) -> DistillationLossOutput:
    """``weights.kd * KD + weights.ce * CE`` for a cross-tokenizer batch.

    ``student`` / ``teacher``: ``(features, weight, bias)`` triples - ``(B, S, H)`` final hidden states with the
    ``lm_head`` weight, or ``(B, S, V)`` logits with ``None``. CE is the student's usual causal-LM cross-entropy on
    ``inputs["labels"]`` (normalised by ``num_items_in_batch``); KD is the sum over the groups in ``xtok_kd`` of the
    ``mode`` divergence between the compared positions' distributions, normalised by ``num_kd_items`` (the groups
    in the whole accumulated batch; ``None``: this batch's count)."""
    features, weight, bias = student
    ce_out = chunked_distillation_loss(
        features, weight, None, None, inputs["labels"], student_bias=bias, chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch, weights=LossWeights(kd=0.0, ce=weights.ce),
        divergence=divergence)
    keep = inputs["xtok_kd"].bool()
    if teacher is None or weights.kd == 0.0:
        kd = features.new_zeros((), dtype=torch.float32)
    else:
        kd_sum = cross_tokenizer_kd_sum(
            _rows(features, inputs["xtok_student_pos"], keep), weight,
            _rows(teacher[0], inputs["xtok_teacher_pos"], keep), teacher[1], mode=mode, divergence=divergence,
            vocab_map=vocab_map, chunk_size=chunk_size, student_bias=bias, teacher_bias=teacher[2])
        count = num_kd_items if num_kd_items is not None else keep.sum()
        kd = kd_sum / torch.as_tensor(count, device=kd_sum.device, dtype=torch.float32).clamp_min(1.0)
    loss = weights.kd * kd + ce_out.loss  # ce_out.loss = weights.ce * CE (its graph only when weights.ce > 0)
    return DistillationLossOutput(loss=loss, kd_loss=kd.detach(), ce_loss=ce_out.ce_loss,
                                  num_tokens=ce_out.num_tokens)


class CrossTokenizerObjective:
    """What ``DistillationTrainer`` delegates to when ``cross_tokenizer`` is ``uld`` or ``hybrid``: run the student
    on its ids and the teacher (no grad) on *its* ids, then :func:`cross_tokenizer_loss`.

    Composed into the trainer rather than subclassing it, so the same-tokenizer path stays untouched. Batches come
    from ``CrossTokenizerCollator``; a batch without the alignment columns (e.g. Trainer's own evaluation on
    student-only rows) gets the CE term only.
    """

    def __init__(self, mode: str, divergence: Divergence, weights: LossWeights, chunk_size: int,
                 vocab_map: VocabularyMap | None = None):
        self.mode, self.divergence, self.weights = mode, divergence, weights
        self.chunk_size, self.vocab_map = chunk_size, vocab_map
        self.num_kd_groups = None  # this optimiser step's KD groups, all micro-batches (set by the trainer)

    @classmethod
    def for_models(cls, args, student, teacher, student_tokenizer, teacher_tokenizer) -> CrossTokenizerObjective:
        """From a ``DistillationConfig``; the vocabulary map (hybrid) from the tokenizers and the models' head sizes.
        Without a teacher (alpha 0: CE only on the student's side of the rows) there is no KD term and no map."""
        vocab_map = None
        if args.cross_tokenizer == "hybrid" and teacher is not None and args.loss_weights().kd > 0:
            if student_tokenizer is None or teacher_tokenizer is None:
                raise ValueError("cross_tokenizer=hybrid needs both tokenizers: pass processing_class= the student's "
                                 "tokenizer and teacher_processing_class= the teacher's to DistillationTrainer.")
            size = lambda m: m.get_output_embeddings().weight.shape[0]  # noqa: E731
            vocab_map = VocabularyMap.build(student_tokenizer, teacher_tokenizer, size(student), size(teacher))
        return cls(args.cross_tokenizer, args.divergence, args.loss_weights(), args.loss_chunk_size or 256, vocab_map)

    @staticmethod
    def count_kd_groups(batch_samples: list) -> torch.Tensor | None:
        """KD groups of an optimiser step's micro-batches: the KD denominator under gradient accumulation."""
        if not batch_samples or "xtok_kd" not in batch_samples[0]:
            return None
        return sum(batch["xtok_kd"].sum() for batch in batch_samples)

    def __call__(self, model, teacher_model, inputs: dict, head_paths: dict, num_items_in_batch=None):
        """``(DistillationLossOutput, student outputs)`` for one micro-batch."""
        student_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        student = head_paths["student"](model, student_inputs)
        teacher = None
        has_alignment = "xtok_kd" in inputs
        if teacher_model is not None and self.weights.kd > 0 and has_alignment:
            with torch.no_grad():
                t = head_paths["teacher"](teacher_model, {"input_ids": inputs["teacher_input_ids"],
                                                          "attention_mask": inputs["teacher_attention_mask"]})
            teacher = (t.features, t.weight, t.bias)
        if self.vocab_map is not None and self.vocab_map.student_ids.device != student.features.device:
            self.vocab_map = self.vocab_map.to(student.features.device)
        batch = inputs if has_alignment else {**inputs, **{k: inputs["labels"][:, :0] for k in XTOK_COLUMNS[2:]}}
        out = cross_tokenizer_loss(
            (student.features, student.weight, student.bias), teacher, batch, mode=self.mode,
            divergence=self.divergence, weights=self.weights, vocab_map=self.vocab_map, chunk_size=self.chunk_size,
            num_items_in_batch=num_items_in_batch,
            num_kd_items=self.num_kd_groups if model.training and num_items_in_batch is not None else None)
        return out, student.outputs
