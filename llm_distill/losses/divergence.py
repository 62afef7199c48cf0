"""Per-token divergences between a teacher and a student distribution, and their settings.

Notation: ``p`` = teacher distribution, ``q`` = student distribution (both at temperature T); every divergence is
computed in fp32 and multiplied by ``T**2`` (Hinton et al. 2015, sec. 2). The table of ``loss_type`` values is in
``llm_distill.losses``' docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from llm_distill.checks import check_field

IGNORE_INDEX = -100
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TAIL_MASS_FLOOR = 1e-6  # smallest teacher mass outside the stored top-k (see topk_divergence)

_NEG_LIMIT = torch.finfo(torch.float32).min / 4  # keeps 0 * (log 0 - x) at 0 instead of NaN


def _check_loss_type(loss_type: str) -> None:
    check_field(loss_type in LOSS_TYPES, "loss_type", loss_type, f"one of {', '.join(LOSS_TYPES)}")


@dataclass(frozen=True)
class Divergence:
    """The divergence settings, one object from the config to the innermost chunk: validated here, once.

    ``DistillationConfig.divergence`` builds it from the config's fields (so a bad value fails at parse time, naming
    the field); the trainer hands it to the plain and the chunked loss unchanged.
    """

    loss_type: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1

    def __post_init__(self):
        _check_loss_type(self.loss_type)
        check_field(self.temperature > 0, "temperature", self.temperature, "a number > 0 (e.g. 1.0 or 2.0)")
        check_field(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", self.jsd_beta, "a number in [0, 1]")
        check_field(0.0 <= self.skew_lambda < 1.0, "skew_lambda", self.skew_lambda, "a number in [0, 1)")

    @classmethod
    def unchecked(cls, loss_type: str, temperature: float, jsd_beta: float, skew_lambda: float) -> Divergence:
        """The settings as the functional API (``token_divergence``, ``distillation_loss`` ...) has always taken them:
        only ``loss_type`` is checked, so parameter endpoints outside the config's ranges (``skew_lambda=1``, which
        the gradient-parity tests use) stay computable."""
        _check_loss_type(loss_type)
        settings = object.__new__(cls)
        for name, value in zip(("loss_type", "temperature", "jsd_beta", "skew_lambda"),
                               (loss_type, temperature, jsd_beta, skew_lambda)):
            object.__setattr__(settings, name, value)
        return settings

    @property
    def effective_type(self) -> str:
        """``loss_type``, with the generalized JSD's endpoints mapped to the KLs they equal (beta 0 / 1)."""
        if self.loss_type == "jsd" and self.jsd_beta in (0.0, 1.0):
            return "forward_kl" if self.jsd_beta == 0.0 else "reverse_kl"
        return self.loss_type


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
    return divergence_per_token(student_logits, teacher_logits,
                                Divergence.unchecked(loss_type, temperature, jsd_beta, skew_lambda))


def log_softmax_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``log_softmax(logits / T)`` over the last dimension. At T = 1 the division is skipped: ``x / 1 == x``
    exactly, and it would cost a V-wide pass (and one more in backward) for nothing."""
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def divergence_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, div: Divergence) -> torch.Tensor:
    """``token_divergence`` with the settings already validated: ``(N, V)`` x2 -> ``(N,)`` fp32, times ``T**2``."""
    return divergence_from_log_probs(log_softmax_at(student_logits, div.temperature),
                                     log_softmax_at(teacher_logits, div.temperature), div)


def divergence_from_log_probs(logq: torch.Tensor, logp: torch.Tensor, div: Divergence) -> torch.Tensor:
    """``divergence_per_token`` from the student's and teacher's log-probabilities at temperature ``(N, V)`` x2 (as
    ``log_softmax_at`` gives them): the caller may share the student's with its CE term. ``(N,)`` fp32, times ``T**2``."""
    temperature, beta, lam = div.temperature, div.jsd_beta, div.skew_lambda
    kind = div.effective_type
    if kind == "forward_kl":
        value = _kl_from_logprobs(logp, logq)
    elif kind == "reverse_kl":
        value = _kl_from_logprobs(logq, logp)
    elif kind == "jsd":
        logm = _log_mixture(logp, logq, beta)
        value = beta * _kl_from_logprobs(logp, logm) + (1.0 - beta) * _kl_from_logprobs(logq, logm)
    elif kind == "skew_forward_kl":
        value = _kl_from_logprobs(logp, _log_mixture(logp, logq, lam))
    elif kind == "skew_reverse_kl":
        value = _kl_from_logprobs(logq, _log_mixture(logp, logq, 1.0 - lam))
    else:  # tvd
        value = 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    return value * temperature**2


def topk_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
) -> torch.Tensor:
    """Divergence against a *stored* teacher distribution known only on its top-k tokens (offline KD).

    Tail handling - an explicit "other" bucket: both distributions are coarsened to ``k + 1`` outcomes, the
    teacher's top-k tokens plus one bucket holding all remaining mass (teacher: ``1 - sum(exp(topk_logprobs))``;
    student: its exact softmax mass outside those ids). The divergence of the coarsened pair is exact (no
    renormalisation), it equals the full-vocabulary divergence when ``k = V``, and it is a lower bound of it for the
    f-divergences (data-processing inequality). Unlike renormalising the teacher over its top-k, it does not push
    the student to put *zero* mass outside the top-k: the student learns the teacher's tail mass, not a sharper
    distribution.

    Args:
        student_logits: ``(N, V)`` any float dtype (full student vocabulary, needed for its normaliser).
        topk_ids: ``(N, k)`` integer token ids (distinct per row), all ``< V``.
        topk_logprobs: ``(N, k)`` teacher log-probabilities *at this temperature* (as stored), any float dtype.
    Returns:
        ``(N,)`` fp32, multiplied by ``temperature**2`` like ``token_divergence``.
    """
    return topk_divergence_per_token(student_logits, topk_ids, topk_logprobs,
                                     Divergence.unchecked(loss_type, temperature, jsd_beta, skew_lambda))


def topk_divergence_per_token(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                              div: Divergence) -> torch.Tensor:
    """``topk_divergence`` with the settings already validated: ``(N, V)``, ``(N, k)`` x2 -> ``(N,)`` fp32."""
    temperature = div.temperature
    logq = log_softmax_at(student_logits, temperature)  # (N, V)
    ids = topk_ids.long()
    logq_k = logq.gather(-1, ids)  # (N, k)
    logp_k = topk_logprobs.float()
    if ids.shape[-1] < logq.shape[-1]:
        logq_other = logq.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1) exact, stable
        # The true tail mass is > 0 (a softmax is never exactly 0), but the fp16-stored top-k can sum to >= 1: floor
        # it, or every loss that takes log p_other under q (reverse KL, jsd near beta=1, skew_reverse_kl) is infinite.
        p_other = (1.0 - logp_k.exp().sum(-1, keepdim=True)).clamp_min(TAIL_MASS_FLOOR)
        logq_b, logp_b = torch.cat([logq_k, logq_other], -1), torch.cat([logp_k, p_other.log()], -1)
    else:
        logq_b, logp_b = logq_k, logp_k
    # The buckets are already log-probabilities: token_divergence's log_softmax at T=1 only removes rounding drift.
    return divergence_per_token(logq_b, logp_b, replace(div, temperature=1.0)) * temperature**2


