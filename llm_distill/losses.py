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


# ----------------------------------------------------------------------------- memory-lean (chunked / fused) path
#
# The plain path above holds the full (N, V) logits of both models plus several fp32 copies of them for
# backward (log_softmax, exp, the KL product...). The chunked path below computes the same numbers ``chunk_size``
# rows at a time, in fp32 per chunk, and computes each chunk's gradient *during the forward* (as Liger-kernel's
# fused-linear losses do), so autograd never stores a per-token tensor of width V. Given hidden states and the
# ``lm_head`` weight instead of logits ("fused linear"), the full logits are never built at all: peak memory is
# O(chunk_size x V) instead of O(N x V). Each chunk reuses ``token_divergence``, so every ``loss_type`` has the
# plain path's math by construction.


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
        p_other = (1.0 - logp_k.exp().sum(-1, keepdim=True)).clamp_min(0.0)  # fp16 rounding can overshoot 1
        logq_b, logp_b = torch.cat([logq_k, logq_other], -1), torch.cat([logp_k, p_other.log()], -1)
    else:
        logq_b, logp_b = logq_k, logp_k
    # The buckets are already log-probabilities: token_divergence's log_softmax at T=1 only removes rounding drift.
    return token_divergence(logq_b, logp_b, loss_type, 1.0, jsd_beta, skew_lambda) * temperature**2


@dataclass(frozen=True)
class ChunkedLossOptions:
    """The non-tensor arguments of the chunked loss (one object so ``autograd.Function`` stays readable)."""

    loss_type: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    chunk_size: int = 1024


def _project(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Rows of hidden states -> fp32 logits through ``lm_head`` (``weight=None``: ``x`` already holds logits)."""
    if weight is None:
        return x.detach().float()  # a leaf: the chunk objective is differentiated w.r.t. it
    return F.linear(x, weight, bias).float()  # matmul in the model's dtype, as its own lm_head would do


def _chunk_objective(logits, teacher, targets, opts: ChunkedLossOptions):
    """(c, Vs) fp32 student logits -> (kd_sum, ce_sum) over the chunk; ``teacher`` is (c, Vt) logits,
    a ``(topk_ids, topk_logprobs)`` pair, or ``None``."""
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if teacher is None or opts.alpha == 0.0:
        kd = logits.new_zeros(())
    elif isinstance(teacher, tuple):
        kd = topk_divergence(logits, *teacher, opts.loss_type, opts.temperature, opts.jsd_beta, opts.skew_lambda).sum()
    else:
        vocab = min(logits.shape[-1], teacher.shape[-1])  # padded embedding matrices: compare the shared ids only
        kd = token_divergence(logits[:, :vocab], teacher[:, :vocab], opts.loss_type, opts.temperature,
                              opts.jsd_beta, opts.skew_lambda).sum()
    return kd, ce


class _ChunkedDistillationFunction(torch.autograd.Function):
    """Loss and its gradients, ``chunk_size`` rows at a time; gradients are computed in ``forward`` and only
    scaled by the incoming scalar in ``backward`` (the objective is linear in that scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, topk_ids, topk_logprobs, targets, denom,
                opts: ChunkedLossOptions):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        use_kd = opts.alpha > 0.0 and (t_hidden is not None or topk_ids is not None)
        use_ce = opts.alpha < 1.0
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], opts.chunk_size):
            rows = slice(start, start + opts.chunk_size)
            logits = _project(hidden[rows], weight, bias)  # (c, Vs) fp32: the only V-wide tensors live per chunk
            if t_hidden is not None:
                teacher = _project(t_hidden[rows], t_weight, t_bias)  # (c, Vt)
            elif topk_ids is not None:
                teacher = (topk_ids[rows], topk_logprobs[rows])  # (c, k) x2
            else:
                teacher = None
            if need_h or need_w or need_b:
                logits.requires_grad_(True)
                with torch.enable_grad():
                    kd, ce = _chunk_objective(logits, teacher, targets[rows], opts)
                    objective = (opts.alpha * kd if use_kd else 0.0) + ((1.0 - opts.alpha) * ce if use_ce else 0.0)
                    (g,) = torch.autograd.grad(objective / denom, logits) if torch.is_tensor(objective) else (None,)
                if g is not None:
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
            else:
                kd, ce = _chunk_objective(logits, teacher, targets[rows], opts)
            kd_total += kd.detach()
            ce_total += ce.detach()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        kd_loss, ce_loss = kd_total / denom, ce_total / denom
        loss = (opts.alpha * kd_loss if use_kd else 0.0) + (1.0 - opts.alpha) * ce_loss
        ctx.mark_non_differentiable(kd_loss, ce_loss)
        return loss, kd_loss, ce_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


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
) -> DistillationLossOutput:
    """``distillation_loss``'s result, computed ``chunk_size`` valid tokens at a time (memory-lean path).

    Fused-linear use (the full logits are never built): ``student_hidden`` ``(B, S, Hs)`` = the student's final
    (post-norm) hidden states and ``student_weight`` ``(Vs, Hs)`` = its ``lm_head`` weight; likewise the teacher
    ``(B, S, Ht)`` / ``(Vt, Ht)``. Logits use: pass logits ``(B, S, V)`` as the ``*_hidden`` tensors and ``None``
    weights. Offline use: ``teacher_hidden=None`` and ``topk_ids`` / ``topk_logprobs`` ``(N, k)``: the stored
    teacher distribution of the ``N`` valid positions in row-major order (see ``topk_divergence``).

    Only the ``N`` valid positions (``labels != -100`` after the causal shift) are projected and differentiated.
    Normalisation, ``num_items_in_batch`` semantics, padded-vocabulary slicing and the returned terms are exactly
    those of ``distillation_loss``; gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; choose one of {LOSS_TYPES}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (use distillation_loss for the unchunked path).")
    if shift_labels:
        student_hidden, labels_s = student_hidden[:, :-1], labels[:, 1:]
        teacher_hidden = teacher_hidden[:, :-1] if teacher_hidden is not None else None
    else:
        labels_s = labels
    valid = labels_s != IGNORE_INDEX  # (B, S')
    num_tokens = valid.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else num_tokens
    denom = torch.as_tensor(denom, device=student_hidden.device, dtype=torch.float32).clamp_min(1.0)
    h = student_hidden[valid]  # (N, Hs)
    th = teacher_hidden[valid] if teacher_hidden is not None and alpha > 0 else None  # (N, Ht)
    if topk_ids is not None and topk_ids.shape[0] != h.shape[0]:
        raise ValueError(f"Stored teacher logits cover {topk_ids.shape[0]} positions but the batch has {h.shape[0]} "
                         "valid ones: the stored dataset and the training rows are out of sync (re-run "
                         "scripts/store_teacher_logits.py with the same data settings).")
    opts = ChunkedLossOptions(loss_type, temperature, alpha, jsd_beta, skew_lambda, chunk_size)
    loss, kd, ce = _ChunkedDistillationFunction.apply(
        h, student_weight, student_bias, th, teacher_weight if th is not None else None, teacher_bias,
        topk_ids if th is None and alpha > 0 else None, topk_logprobs, labels_s[valid], denom, opts,
    )
    return DistillationLossOutput(loss=loss, kd_loss=kd, ce_loss=ce, num_tokens=num_tokens)
