"""The plain (reference) loss path: full logits, masked KD + CE, the hidden-state terms of the triple loss.

The chunked path (``llm_distill.losses.chunked``) computes the same numbers without the full logits; the parity
tests hold it to this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_distill.losses.divergence import IGNORE_INDEX, Divergence, divergence_from_log_probs, log_softmax_at


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with label t+1: (B, S, V), (B, S) -> (B, S-1, V), (B, S-1)."""
    return logits[:, :-1, :], labels[:, 1:]


@dataclass(frozen=True)
class LossWeights:
    """``loss = kd * kd_loss + ce * ce_loss + cos * cos_loss + mse * mse_loss`` (all >= 0).

    DistilBERT's distiller (huggingface/transformers ``examples/research_projects/distillation``, README training
    command) used ``kd=5.0`` (its ``--alpha_ce``), ``ce=2.0`` (``--alpha_mlm``), ``cos=1.0`` (``--alpha_cos``).
    """

    kd: float = 0.5
    ce: float = 0.5
    cos: float = 0.0
    mse: float = 0.0

    @classmethod
    def from_alpha(cls, alpha: float, cos: float = 0.0, mse: float = 0.0) -> LossWeights:
        return cls(kd=alpha, ce=1.0 - alpha, cos=cos, mse=mse)

    @property
    def uses_hidden(self) -> bool:
        """Whether the hidden-state terms (cosine / MSE) are part of the loss."""
        return self.cos > 0.0 or self.mse > 0.0


@dataclass
class DistillationLossOutput:
    """The combined loss and each term (for logging); ``loss`` is exactly the weighted sum of the terms."""

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor
    num_tokens: torch.Tensor  # valid positions in this micro-batch (the local denominator)
    cos_loss: torch.Tensor | None = None  # set when the hidden-state terms are used (``with_hidden_terms``)
    mse_loss: torch.Tensor | None = None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: bool = True,
    weights: LossWeights | None = None,
    kd_mask: torch.Tensor | None = None,
    num_kd_items: int | torch.Tensor | None = None,
    divergence: Divergence | None = None,
) -> DistillationLossOutput:
    """Masked KD + CE over the valid positions of a batch (the plain reference path).

    Args:
        student_logits: ``(B, S, Vs)``.
        teacher_logits: ``(B, S, Vt)`` or ``None`` (CE only, e.g. ``alpha == 0``). When ``Vs != Vt`` (padded
            embedding matrices) both are sliced to ``min(Vs, Vt)`` for the KD term; the caller has checked that
            every real token id lies below that.
        labels: ``(B, S)`` with ``-100`` on prompt / padding positions.
        num_items_in_batch: valid tokens in the whole accumulated batch (``Trainer`` passes it); ``None``
            normalises by this micro-batch's own count.
        shift_labels: ``True`` for causal LMs (logits at t predict label t+1), ``False`` for masked LMs.
        weights: explicit KD / CE weights (``LossWeights.kd`` / ``.ce``; ``alpha`` is then ignored). The hidden-state
            weights are ``hidden_state_loss``'s business.
        kd_mask: ``(B, S)`` positions that get the KD term, in the labels' frame (shifted like them for causal
            LMs), e.g. the attention mask for DistilBERT's KD on every non-padded position; ``None`` = the label
            positions (for a masked LM: only the masked tokens).
        num_kd_items: ``kd_mask`` positions in the whole accumulated batch (the KD denominator, like
            ``num_items_in_batch`` for CE); ``None`` normalises by this micro-batch's own count.
        divergence: the divergence settings as one validated object (the trainer passes
            ``DistillationConfig.divergence``); when given, ``loss_type`` / ``temperature`` / ``jsd_beta`` /
            ``skew_lambda`` are not read.
    """
    weights = weights or LossWeights.from_alpha(alpha)
    if shift_labels:
        student_logits, labels_s = shift_for_causal_lm(student_logits, labels)
        if teacher_logits is not None:
            teacher_logits = teacher_logits[:, :-1, :]
        kd_mask = kd_mask[:, 1:] if kd_mask is not None else None
    else:
        labels_s = labels
    valid = labels_s != IGNORE_INDEX  # (B, S')
    num_tokens = valid.sum()
    denom = _denominator(num_items_in_batch, num_tokens)
    kd_valid, kd_denom = (valid, denom) if kd_mask is None else (kd_mask.bool(), _denominator(num_kd_items, kd_mask.sum()))

    s = student_logits[valid]  # (N, Vs) only valid positions are ever computed
    targets = labels_s[valid]  # (N,)
    divergence = divergence or Divergence.unchecked(loss_type, temperature, jsd_beta, skew_lambda)
    use_kd = teacher_logits is not None and weights.kd > 0.0
    # CE is log_softmax + NLL; when the KD term needs the very same log_softmax (T = 1, the same rows, no padded
    # vocabulary to slice off) it is computed once for both: F.cross_entropy is exactly nll_loss(log_softmax(.)).
    shared = (use_kd and kd_mask is None and divergence.temperature == 1.0
              and teacher_logits.shape[-1] >= s.shape[-1])
    logq = log_softmax_at(s, 1.0) if shared else None  # (N, Vs)
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.ce > 0.0):
        ce = (F.nll_loss(logq, targets, reduction="sum") if shared
              else F.cross_entropy(s.float(), targets, reduction="sum")) / denom

    if not use_kd:
        kd = torch.zeros((), device=s.device)
    else:
        s_kd = s if kd_mask is None else student_logits[kd_valid]  # (N_kd, Vs)
        t = teacher_logits[kd_valid]  # (N_kd, Vt)
        vocab = min(s_kd.shape[-1], t.shape[-1])
        logp = log_softmax_at(t[:, :vocab], divergence.temperature)  # (N_kd, V)
        div = divergence_from_log_probs(
            logq if shared else log_softmax_at(s_kd[:, :vocab], divergence.temperature), logp, divergence)
        kd = div.sum() / kd_denom
    loss = weights.kd * kd + weights.ce * ce
    return DistillationLossOutput(loss=loss, kd_loss=kd.detach(), ce_loss=ce.detach(), num_tokens=num_tokens)


def _denominator(count: int | torch.Tensor | None, local: torch.Tensor) -> torch.Tensor:
    """The normaliser of a summed term: the global count when given (gradient accumulation / all ranks), else the
    local one; at least 1, so an all-masked batch gives 0 and no NaN."""
    count = count if count is not None else local
    return torch.as_tensor(count, device=local.device, dtype=torch.float32).clamp_min(1.0)


# ----------------------------------------------------------------------------- hidden-state terms (triple loss)


@dataclass
class HiddenStateLossOutput:
    """``loss = cos_weight * cos_loss + mse_weight * mse_loss``; the terms are detached (for logging)."""

    loss: torch.Tensor
    cos_loss: torch.Tensor
    mse_loss: torch.Tensor
    num_positions: torch.Tensor  # valid positions in this micro-batch (the local denominator)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    cos_weight: float = 1.0,
    mse_weight: float = 0.0,
    projection: torch.nn.Module | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> HiddenStateLossOutput:
    """Align the student's last hidden states with the teacher's on the valid positions (DistilBERT's ``loss_cos``).

    ``cos_loss`` = sum over valid positions of ``1 - cos(h_s, h_t)``; ``mse_loss`` = sum over valid positions of
    ``mean_d (h_s - h_t)**2``; both divided by the number of valid positions (``num_items_in_batch`` when given: the
    whole accumulated, all-rank batch). DistilBERT's distiller computes its cosine term with
    ``nn.CosineEmbeddingLoss(reduction="mean")`` (target 1) over every position where ``attention_mask`` is 1 -
    masked-LM targets or not - which is what this does. (Its ``alpha_mse`` is an MSE between *logits*; here the MSE
    is between hidden states, as in TinyBERT's hidden-state loss.)

    Args:
        student_hidden: ``(B, S, Hs)``.
        teacher_hidden: ``(B, S, Ht)``, no gradient.
        attention_mask: ``(B, S)``, 1 on real tokens (``None``: every position).
        projection: maps ``(N, Hs) -> (N, Ht)`` (a learned ``nn.Linear`` when the widths differ); applied to the
            student's valid rows only.
        num_items_in_batch: valid positions in the whole accumulated batch; ``None`` = this batch's own count.
    """
    if attention_mask is None:
        attention_mask = torch.ones(student_hidden.shape[:2], dtype=torch.bool, device=student_hidden.device)
    valid = attention_mask.bool()  # (B, S)
    num_positions = valid.sum()
    denom = _denominator(num_items_in_batch, num_positions)
    s = student_hidden[valid]  # (N, Hs)
    if projection is not None:
        s = projection(s.to(next(projection.parameters()).dtype))  # (N, Ht)
    t = teacher_hidden[valid].detach().float()  # (N, Ht)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"Student hidden size {s.shape[-1]} != teacher hidden size {t.shape[-1]}: pass a projection "
                         "(DistillationTrainer creates a learned one when alpha_cos / alpha_mse > 0).")
    s = s.float()
    zero = s.new_zeros(())
    cos = (1.0 - F.cosine_similarity(s, t, dim=-1)).sum() / denom if cos_weight > 0.0 else zero
    mse = (s - t).pow(2).mean(-1).sum() / denom if mse_weight > 0.0 else zero
    loss = cos_weight * cos + mse_weight * mse
    return HiddenStateLossOutput(loss=loss, cos_loss=cos.detach(), mse_loss=mse.detach(), num_positions=num_positions)


def with_hidden_terms(out: DistillationLossOutput, hidden: HiddenStateLossOutput, weights: LossWeights
                      ) -> DistillationLossOutput:
    """The triple loss: KD + CE from ``out`` plus the hidden-state terms (only those whose weight is > 0 are
    reported, so that the reported terms combine exactly into ``loss``)."""
    return DistillationLossOutput(
        loss=out.loss + hidden.loss, kd_loss=out.kd_loss, ce_loss=out.ce_loss, num_tokens=out.num_tokens,
        cos_loss=hidden.cos_loss if weights.cos > 0.0 else None,
        mse_loss=hidden.mse_loss if weights.mse > 0.0 else None,
    )


def triple_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    student_hidden: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    *,
    weights: LossWeights,
    projection: torch.nn.Module | None = None,
    num_hidden_items: int | torch.Tensor | None = None,
    **kd_kwargs,
) -> DistillationLossOutput:
    """DistilBERT's loss, plain path: ``weights.kd * KD + weights.ce * CE + weights.cos * COS + weights.mse * MSE``.

    ``student_logits`` / ``teacher_logits`` / ``labels`` and ``kd_kwargs`` (``loss_type``, ``temperature``,
    ``kd_mask``, ``num_items_in_batch``, ``num_kd_items``, ``shift_labels`` ...) go to ``distillation_loss``; the
    ``(B, S, H)`` hidden states, ``attention_mask``, ``projection`` and ``num_hidden_items`` to
    ``hidden_state_loss`` (skipped when ``weights.cos == weights.mse == 0``).
    """
    out = distillation_loss(student_logits, teacher_logits, labels, weights=weights, **kd_kwargs)
    if not weights.uses_hidden:
        return out
    hidden = hidden_state_loss(student_hidden, teacher_hidden, attention_mask, cos_weight=weights.cos,
                               mse_weight=weights.mse, projection=projection, num_items_in_batch=num_hidden_items)
    return with_hidden_terms(out, hidden, weights)


