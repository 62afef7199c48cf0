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

DistilBERT's triple loss (Sanh et al. 2019) generalises the weights - ``LossWeights``:
``kd * KD + ce * CE + cos * COS [+ mse * MSE]``, where COS is the cosine-embedding loss ``1 - cos(h_s, h_t)``
between the student's and the teacher's last hidden states at every non-padded position and MSE their mean
squared error (``hidden_state_loss``; a learned projection maps the student's width to the teacher's when they
differ). ``alpha`` is the special case ``LossWeights(kd=alpha, ce=1 - alpha)``.
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
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.ce > 0.0):
        ce = F.cross_entropy(s.float(), targets, reduction="sum") / denom

    if teacher_logits is None or weights.kd == 0.0:
        kd = torch.zeros((), device=s.device)
    else:
        s_kd = s if kd_mask is None else student_logits[kd_valid]  # (N_kd, Vs)
        t = teacher_logits[kd_valid]  # (N_kd, Vt)
        vocab = min(s_kd.shape[-1], t.shape[-1])
        div = token_divergence(s_kd[:, :vocab], t[:, :vocab], loss_type, temperature, jsd_beta, skew_lambda)
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


# ----------------------------------------------------------------------------- memory-lean (chunked / fused) path
#
# The plain path above holds the full (N, V) logits of both models plus several fp32 copies of them for
# backward (log_softmax, exp, the KL product...). The chunked path below computes the same numbers ``chunk_size``
# rows at a time, in fp32 per chunk, and computes each chunk's gradient *during the forward* (as Liger-kernel's
# fused-linear losses do), so autograd never stores a per-token tensor of width V. Given hidden states and the
# ``lm_head`` weight instead of logits ("fused linear"), the full logits are never built at all: peak memory is
# O(chunk_size x V) instead of O(N x V). Each chunk's gradient is in closed form for a live teacher (every
# ``loss_type``: ``_divergence_and_h``) and autograd over ``token_divergence`` / ``topk_divergence`` otherwise; the
# parity tests hold both to the plain path's losses and gradients.


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
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
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
    return token_divergence(logq_b, logp_b, loss_type, 1.0, jsd_beta, skew_lambda) * temperature**2


TAIL_MASS_FLOOR = 1e-6  # smallest teacher mass outside the stored top-k (see topk_divergence)


@dataclass(frozen=True)
class ChunkedLossOptions:
    """The non-tensor arguments of the chunked loss (one object so ``autograd.Function`` stays readable)."""

    loss_type: str = "forward_kl"
    temperature: float = 1.0
    kd_weight: float = 0.5
    ce_weight: float = 0.5
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    chunk_size: int = 1024


def _project(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Rows of hidden states -> fp32 logits through ``lm_head`` (``weight=None``: ``x`` already holds logits)."""
    if weight is None:
        return x.detach().float()  # a leaf: the chunk objective is differentiated w.r.t. it
    return F.linear(x, weight, bias).float()  # matmul in the model's dtype, as its own lm_head would do


def _chunk_objective(logits, teacher, targets, opts: ChunkedLossOptions, kd_rows=None):
    """(c, Vs) fp32 student logits -> (kd_sum, ce_sum) over the chunk; ``teacher`` is (c, Vt) logits,
    a ``(topk_ids, topk_logprobs)`` pair, or ``None``. ``targets`` is -100 on rows that get only the KD term and
    ``kd_rows`` (c,) selects the rows that get it (``None``: all)."""
    ce = F.cross_entropy(logits, targets, reduction="sum")  # ignore_index=-100: a sum over the label rows only
    if kd_rows is not None and torch.is_tensor(teacher):
        logits, teacher = logits[kd_rows], teacher[kd_rows]
    if teacher is None or opts.kd_weight == 0.0:
        kd = logits.new_zeros(())
    elif isinstance(teacher, tuple):
        kd = topk_divergence(logits, *teacher, opts.loss_type, opts.temperature, opts.jsd_beta, opts.skew_lambda).sum()
    else:
        vocab = min(logits.shape[-1], teacher.shape[-1])  # padded embedding matrices: compare the shared ids only
        kd = token_divergence(logits[:, :vocab], teacher[:, :vocab], opts.loss_type, opts.temperature,
                              opts.jsd_beta, opts.skew_lambda).sum()
    return kd, ce


def _forward_kl_chunk(logits, teacher, targets, temperature: float, kd_scale: float, ce_scale: float,
                      need_grad: bool):
    """The default objective (forward KL + CE) of one chunk, with its gradient w.r.t. the logits in closed form.

    Same numbers as ``_chunk_objective`` + autograd for ``forward_kl`` (the parity tests compare them), in about
    half the V-wide passes, which is most of a KD step's cost beyond the two models' forwards:
    ``d/ds [T^2 KL(p_T || q_T)] = T (q_T - p_T)`` and ``d/ds CE = q - onehot(target)``; with T = 1 and no padded
    vocabulary the student's log-softmax is shared by both terms. ``logits`` ``(c, Vs)`` and ``teacher`` ``(c, Vt)``
    (or ``None``) are fp32; returns ``(kd_sum, ce_sum, grad (c, Vs) or None)``, the gradient already weighted
    (``kd_scale`` = weight / KD denominator, ``ce_scale`` likewise)."""
    logq = F.log_softmax(logits, dim=-1)  # (c, Vs)
    ce, label_rows = _ce_sum(logq, targets)
    q = logq.exp() if need_grad else None
    kd, q_t, p_t, vocab = logits.new_zeros(()), None, None, logits.shape[-1]
    if teacher is not None:
        vocab = min(logits.shape[-1], teacher.shape[-1])  # padded embedding matrices: the shared ids only
        if temperature == 1.0 and vocab == logits.shape[-1]:
            logq_t, q_t = logq, q
        else:
            logq_t = F.log_softmax(logits[:, :vocab] / temperature, dim=-1)
            q_t = logq_t.exp() if need_grad else None
        t = teacher[:, :vocab]
        logp_t = F.log_softmax(t if temperature == 1.0 else t / temperature, dim=-1)
        p_t = logp_t.exp()
        kd = (p_t * (logp_t - logq_t)).sum() * temperature**2
    if not need_grad:
        return kd, ce, None
    kd_t = kd_scale * temperature if teacher is not None else 0.0
    if q_t is q:  # shared: grad = q * (kd_t + ce_scale [label row]) - kd_t * p - ce_scale * onehot, two passes
        grad = q.mul_((kd_t + ce_scale * label_rows).unsqueeze(1)).sub_(p_t, alpha=kd_t)
    else:
        grad = q.mul_((ce_scale * label_rows).unsqueeze(1))  # (c, Vs), in place: q is not needed any more
        if teacher is not None:
            grad[:, :vocab].add_(q_t.sub_(p_t), alpha=kd_t)
    _subtract_onehot(grad, targets, label_rows, ce_scale)
    return kd, ce, grad


def _ce_sum(logq: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of a chunk from the student's log-softmax ``(c, V)``, and the rows that have a label ``(c,)``."""
    label_rows = targets != IGNORE_INDEX
    picked = logq.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)  # (c,)
    return -(picked * label_rows).sum(), label_rows


def _subtract_onehot(grad: torch.Tensor, targets: torch.Tensor, label_rows: torch.Tensor, ce_scale: float) -> None:
    """CE's ``- onehot(target)``: ``- ce_scale`` at each label row's target, 0 on KD-only rows (a scatter, not
    ``nonzero()``: no host sync per chunk on a GPU)."""
    grad.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), (label_rows * -ce_scale).to(grad.dtype).unsqueeze(1))


def _divergence_and_h(logq: torch.Tensor, q: torch.Tensor | None, logp: torch.Tensor, opts: ChunkedLossOptions):
    """Per-row divergence ``(c,)`` at temperature (before the T^2 factor), as ``token_divergence`` computes it, and
    ``h = q * dL/dq`` ``(c, V)``: through the softmax, ``dL/dz = h - q * sum(h)`` for the scaled logits ``z = s / T``.
    ``q = exp(logq)`` is passed in when the gradient is wanted (the caller shares it); ``None``: no ``h``.

    ``dL/dq`` per divergence (``m`` the mixture; derivations in docs/memory-lean-loss.md):
    reverse KL ``log q - log p (+1)``; JSD ``(1 - beta) (log q - log m)``; skew forward KL ``-(1 - lam) p / m``;
    skew reverse KL ``log q - log m - lam q / m (+1)``; TVD ``sign(q - p) / 2`` (constants cancel in ``h - q sum h``).
    """
    kind, beta, lam = opts.loss_type, opts.jsd_beta, opts.skew_lambda
    if kind == "jsd" and beta in (0.0, 1.0):  # the endpoints token_divergence maps to the two KLs
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    need_h, h = q is not None, None
    if kind == "forward_kl":
        div = _kl_from_logprobs(logp, logq)
        h = -logp.exp() if need_h else None
    elif kind == "reverse_kl":
        div = _kl_from_logprobs(logq, logp)
        h = q * (logq.clamp_min(_NEG_LIMIT) - logp.clamp_min(_NEG_LIMIT)) if need_h else None
    elif kind == "jsd":
        logm = _log_mixture(logp, logq, beta)
        div = beta * _kl_from_logprobs(logp, logm) + (1.0 - beta) * _kl_from_logprobs(logq, logm)
        h = (1.0 - beta) * q * (logq - logm) if need_h else None
    elif kind == "skew_forward_kl":
        logm = _log_mixture(logp, logq, lam)
        div = _kl_from_logprobs(logp, logm)
        h = -(1.0 - lam) * (logp + logq - logm).exp() if need_h else None
    elif kind == "skew_reverse_kl":
        logm = _log_mixture(logp, logq, 1.0 - lam)
        div = _kl_from_logprobs(logq, logm)
        h = q * (logq - logm - lam * (logq - logm).exp()) if need_h else None
    else:  # tvd
        p = logp.exp()
        div = 0.5 * (p - (q if need_h else logq.exp())).abs().sum(-1)
        h = 0.5 * q * torch.sign(q - p) if need_h else None
    return div, h


def _divergence_chunk(logits, teacher, targets, opts: ChunkedLossOptions, kd_scale: float, ce_scale: float,
                      need_grad: bool):
    """Any divergence + CE of one chunk with its gradient w.r.t. the logits in closed form (no autograd graph):
    the same contract as ``_forward_kl_chunk``, which stays the fused fast path of the default."""
    if opts.loss_type == "forward_kl" or teacher is None:
        return _forward_kl_chunk(logits, teacher, targets, opts.temperature, kd_scale, ce_scale, need_grad)
    temperature = opts.temperature
    logq = F.log_softmax(logits, dim=-1)  # (c, Vs) at T = 1, for CE
    ce, label_rows = _ce_sum(logq, targets)
    vocab = min(logits.shape[-1], teacher.shape[-1])  # padded embedding matrices: the shared ids only
    shared = temperature == 1.0 and vocab == logits.shape[-1]  # one student softmax serves both terms
    logq_t = logq if shared else F.log_softmax(logits[:, :vocab] / temperature, dim=-1)
    q = logq.exp() if need_grad else None  # (c, Vs), computed once
    q_t = q if shared or q is None else logq_t.exp()
    t = teacher[:, :vocab]
    logp_t = F.log_softmax(t if temperature == 1.0 else t / temperature, dim=-1)
    div, h = _divergence_and_h(logq_t, q_t, logp_t, opts)
    kd = div.sum() * temperature**2
    if not need_grad:
        return kd, ce, None
    kd_grad = h.sub_(q_t * h.sum(-1, keepdim=True))  # d/dz; taken before q is overwritten in place (q_t may be q)
    grad = q.mul_((ce_scale * label_rows).unsqueeze(1))  # (c, Vs): CE's q part
    _subtract_onehot(grad, targets, label_rows, ce_scale)
    grad[:, :vocab].add_(kd_grad, alpha=kd_scale * temperature)  # d/ds [T^2 L(q_T)] = T (h - q_T sum h)
    return kd, ce, grad


class _ChunkedDistillationFunction(torch.autograd.Function):
    """Loss and its gradients, ``chunk_size`` rows at a time; gradients are computed in ``forward`` and only
    scaled by the incoming scalar in ``backward`` (the objective is linear in that scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, topk_ids, topk_logprobs, targets, denom,
                kd_rows, kd_denom, opts: ChunkedLossOptions):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        use_kd = opts.kd_weight > 0.0 and (t_hidden is not None or topk_ids is not None)
        use_ce = opts.ce_weight > 0.0
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        # a live teacher or none: closed-form gradients (every divergence); stored top-k or KD on a subset of the
        # rows (kd_positions: all): autograd per chunk
        closed_form = topk_ids is None and kd_rows is None
        if closed_form:  # the weights over the denominators, read once (not a device sync per chunk)
            kd_scale = float(opts.kd_weight / kd_denom) if use_kd else 0.0
            ce_scale = float(opts.ce_weight / denom) if use_ce else 0.0
        for start in range(0, hidden.shape[0], opts.chunk_size):
            rows = slice(start, start + opts.chunk_size)
            logits = _project(hidden[rows], weight, bias)  # (c, Vs) fp32: the only V-wide tensors live per chunk
            if t_hidden is not None:
                teacher = _project(t_hidden[rows], t_weight, t_bias)  # (c, Vt)
            elif topk_ids is not None:
                teacher = (topk_ids[rows], topk_logprobs[rows])  # (c, k) x2
            else:
                teacher = None
            need_grad = need_h or need_w or need_b
            if closed_form:
                kd, ce, g = _divergence_chunk(logits, teacher if use_kd else None, targets[rows], opts, kd_scale,
                                              ce_scale, need_grad and (use_kd or use_ce))
            elif need_grad:
                logits.requires_grad_(True)
                with torch.enable_grad():
                    kd, ce = _chunk_objective(logits, teacher, targets[rows], opts, _rows(kd_rows, rows))
                    objective = ((opts.kd_weight * kd / kd_denom if use_kd else 0.0)
                                 + (opts.ce_weight * ce / denom if use_ce else 0.0))
                    (g,) = torch.autograd.grad(objective, logits) if torch.is_tensor(objective) else (None,)
            else:
                kd, ce = _chunk_objective(logits, teacher, targets[rows], opts, _rows(kd_rows, rows))
                g = None
            if need_grad and g is not None:
                g = g.to(hidden.dtype if weight is None else weight.dtype)  # (c, Vs), as the plain backward casts
                if weight is None:
                    grad_h[rows] = g
                else:
                    if need_h:
                        grad_h[rows] = g @ weight  # (c, H)
                    if need_w:
                        grad_w += (g.t() @ hidden[rows]).float()  # (Vs, H), accumulated in fp32
                    if need_b:
                        grad_b += g.float().sum(0)
            kd_total += kd.detach()
            ce_total += ce.detach()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        kd_loss, ce_loss = kd_total / kd_denom, ce_total / denom
        loss = (opts.kd_weight * kd_loss if use_kd else 0.0) + opts.ce_weight * ce_loss
        ctx.mark_non_differentiable(kd_loss, ce_loss)
        return loss, kd_loss, ce_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        # The usual call is loss.backward() (grad_loss == 1): hand the saved gradients over as they are instead of
        # allocating a scaled copy - at V=152k, H=896 that copy of dW alone is 545 MB (Liger-kernel does the same).
        scale = None if bool(grad_loss == 1) else grad_loss
        grads = [None if g is None else (g if scale is None else g * scale).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def _rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if mask is None else mask[rows]


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    chunk_size: int = 1024,
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
) -> DistillationLossOutput:
    """``distillation_loss``'s result, computed ``chunk_size`` valid tokens at a time (memory-lean path).

    Fused-linear use (the full logits are never built): ``student_hidden`` ``(B, S, Hs)`` = the student's final
    (post-norm) hidden states and ``student_weight`` ``(Vs, Hs)`` = its ``lm_head`` weight; likewise the teacher
    ``(B, S, Ht)`` / ``(Vt, Ht)``. Logits use: pass logits ``(B, S, V)`` as the ``*_hidden`` tensors and ``None``
    weights. Offline use: ``teacher_hidden=None`` and ``topk_ids`` / ``topk_logprobs`` ``(N, k)``: the stored
    teacher distribution of the ``N`` valid positions in row-major order (see ``topk_divergence``).

    Only the ``N`` valid positions (``labels != -100`` after the causal shift, plus the ``kd_mask`` positions) are
    projected and differentiated. Normalisation, ``num_items_in_batch`` / ``num_kd_items`` semantics, ``weights``,
    padded-vocabulary slicing and the returned terms are exactly those of ``distillation_loss``; gradients flow to
    ``student_hidden``, ``student_weight`` and ``student_bias``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of {LOSS_TYPES}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (use distillation_loss for the unchunked path).")
    if kd_mask is not None and topk_ids is not None:
        raise ValueError("kd_mask needs a live teacher: stored top-k teacher logits cover the label positions only.")
    weights = weights or LossWeights.from_alpha(alpha)
    if shift_labels:
        student_hidden, labels_s = student_hidden[:, :-1], labels[:, 1:]
        teacher_hidden = teacher_hidden[:, :-1] if teacher_hidden is not None else None
        kd_mask = kd_mask[:, 1:] if kd_mask is not None else None
    else:
        labels_s = labels
    valid = labels_s != IGNORE_INDEX  # (B, S')
    num_tokens = valid.sum()
    denom = _denominator(num_items_in_batch, num_tokens)
    rows, kd_rows, kd_denom = valid, None, denom
    if kd_mask is not None:  # KD on its own positions: the chunks run over the union, CE ignores the KD-only rows
        kd_mask = kd_mask.bool()
        rows = valid | kd_mask
        kd_rows, kd_denom = kd_mask[rows], _denominator(num_kd_items, kd_mask.sum())
    use_teacher = teacher_hidden is not None and weights.kd > 0
    h = student_hidden[rows]  # (N, Hs)
    th = teacher_hidden[rows] if use_teacher else None  # (N, Ht)
    if topk_ids is not None and topk_ids.shape[0] != h.shape[0]:
        raise ValueError(f"Stored teacher logits cover {topk_ids.shape[0]} positions but the batch has {h.shape[0]} "
                         "valid ones: the stored dataset and the training rows are out of sync (re-run "
                         "scripts/store_teacher_logits.py with the same data settings).")
    opts = ChunkedLossOptions(loss_type, temperature, weights.kd, weights.ce, jsd_beta, skew_lambda, chunk_size)
    loss, kd, ce = _ChunkedDistillationFunction.apply(
        h, student_weight, student_bias, th, teacher_weight if th is not None else None, teacher_bias,
        topk_ids if th is None and weights.kd > 0 else None, topk_logprobs, labels_s[rows], denom, kd_rows, kd_denom,
        opts,
    )
    return DistillationLossOutput(loss=loss, kd_loss=kd, ce_loss=ce, num_tokens=num_tokens)
