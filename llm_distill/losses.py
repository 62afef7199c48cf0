"""Distillation losses as pure functions: per-token divergences, masking, normalisation.

Shapes: ``B`` batch, ``S`` sequence, ``V`` vocabulary, ``N`` valid (non ``-100``) token positions.

All divergences are computed in fp32 whatever the models' dtype (bf16 softmax over 150k entries loses
the tail mass that distillation is about), at temperature ``T`` on *both* distributions, and scaled by
``T**2`` so that gradient magnitudes do not shrink as ``T`` grows (Hinton et al. 2015, sec. 2).

Notation: ``p`` = teacher distribution, ``q`` = student distribution (both at temperature T).

==================  ==============================================  ===============================
``loss_type``       per-token divergence                            reference
==================  ==============================================  ===============================
forward_kl          KL(p || q) = sum p (log p - log q)              Hinton et al. 2015
reverse_kl          KL(q || p)  (mode seeking)                      MiniLLM, Gu et al. 2023
jsd                 b KL(p || m) + (1-b) KL(q || m), m = b p + (1-b) q   GKD, Agarwal et al. 2023
                    (b = ``jsd_beta``; b=0 is forward KL, b=1 reverse KL, as in GKD / TRL)
skew_forward_kl     KL(p || l p + (1-l) q)   (l = ``skew_lambda``)  DistiLLM, Ko et al. 2024
skew_reverse_kl     KL(q || (1-l) p + l q)                          DistiLLM, Ko et al. 2024
tvd                 1/2 sum |p - q|                                 DistiLLM / Wen et al. 2023
==================  ==============================================  ===============================

The final loss is ``alpha * kd + (1 - alpha) * ce``, both terms a *sum over valid tokens divided by the
number of valid tokens in the whole (accumulated, all-rank) batch*: ``Trainer`` passes that count as
``num_items_in_batch``, which is what makes 2 micro-batches of 4 exactly equal to 1 batch of 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

_NEG_LIMIT = torch.finfo(torch.float32).min / 4  # keeps 0 * (log 0 - x) at 0 instead of NaN


def _kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities, (N, V) x2 -> (N,)."""
    logp = logp.clamp_min(_NEG_LIMIT)
    logq = logq.clamp_min(_NEG_LIMIT)
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1-w) q), computed stably in log space. (N, V) x2 -> (N, V)."""
    if weight_p <= 0.0:
        return logq
    if weight_p >= 1.0:
        return logp
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
) -> torch.Tensor:
    """Divergence between teacher and student next-token distributions, one value per row.

    Args:
        student_logits: ``(N, V)`` any float dtype.
        teacher_logits: ``(N, V)`` same vocabulary as the student (slice padded vocabularies first).
    Returns:
        ``(N,)`` fp32, already multiplied by ``temperature**2``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of {LOSS_TYPES}")
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)

    if loss_type == "forward_kl" or (loss_type == "jsd" and jsd_beta == 0.0):
        div = _kl_from_logprobs(logp, logq)
    elif loss_type == "reverse_kl" or (loss_type == "jsd" and jsd_beta == 1.0):
        div = _kl_from_logprobs(logq, logp)
    elif loss_type == "jsd":
        logm = _log_mixture(logp, logq, jsd_beta)
        div = jsd_beta * _kl_from_logprobs(logp, logm) + (1.0 - jsd_beta) * _kl_from_logprobs(logq, logm)
    elif loss_type == "skew_forward_kl":
        div = _kl_from_logprobs(logp, _log_mixture(logp, logq, skew_lambda))
    elif loss_type == "skew_reverse_kl":
        div = _kl_from_logprobs(logq, _log_mixture(logp, logq, 1.0 - skew_lambda))
    else:  # tvd
        div = 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    return div * temperature**2


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with label t+1: (B, S, V), (B, S) -> (B, S-1, V), (B, S-1)."""
    return logits[:, :-1, :], labels[:, 1:]


@dataclass
class DistillationLossOutput:
    """The combined loss and each term, normalised by the same token count (for logging)."""

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor
    num_tokens: torch.Tensor  # valid positions in this micro-batch (the local denominator)


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
    """
    if shift_labels:
        student_logits, labels_s = shift_for_causal_lm(student_logits, labels)
        if teacher_logits is not None:
            teacher_logits = teacher_logits[:, :-1, :]
    else:
        labels_s = labels
    valid = labels_s != IGNORE_INDEX  # (B, S')
    num_tokens = valid.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=student_logits.device, dtype=torch.float32).clamp_min(1.0)

    s = student_logits[valid]  # (N, Vs) only valid positions are ever computed
    targets = labels_s[valid]  # (N,)
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
        ce = F.cross_entropy(s.float(), targets, reduction="sum") / denom

    if teacher_logits is None or alpha == 0.0:
        kd = torch.zeros((), device=s.device)
    else:
        t = teacher_logits[valid]  # (N, Vt)
        vocab = min(s.shape[-1], t.shape[-1])
        div = token_divergence(s[:, :vocab], t[:, :vocab], loss_type, temperature, jsd_beta, skew_lambda)
        kd = div.sum() / denom
    loss = alpha * kd + (1.0 - alpha) * ce
    return DistillationLossOutput(loss=loss, kd_loss=kd.detach(), ce_loss=ce.detach(), num_tokens=num_tokens)
