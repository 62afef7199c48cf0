"""The memory-lean loss path: the plain path's numbers, ``chunk_size`` valid tokens at a time.

The plain path (``llm_distill.losses.reference``) holds the full (N, V) logits of both models plus several fp32
copies of them for backward (log_softmax, exp, the KL product...). This path computes the same numbers
``chunk_size`` rows at a time, in fp32 per chunk, and computes each chunk's gradient *during the forward* (as
Liger-kernel's fused-linear losses do), so autograd never stores a per-token tensor of width V. Given hidden
states and the ``lm_head`` weight instead of logits ("fused linear"), the full logits are never built at all: peak
memory is O(chunk_size x V) instead of O(N x V). Each chunk's gradient is in closed form for a live teacher (every
``loss_type``: ``_divergence_and_h``) and autograd over the per-token divergences otherwise; the parity tests hold
both to the plain path's losses and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_distill.losses.divergence import (
    _NEG_LIMIT,
    IGNORE_INDEX,
    Divergence,
    _kl_from_logprobs,
    _log_mixture,
    divergence_per_token,
    topk_divergence_per_token,
)
from llm_distill.losses.reference import DistillationLossOutput, LossWeights, _denominator


@dataclass(frozen=True)
class ChunkedLossOptions:
    """The non-tensor arguments of the chunked loss (one object so ``autograd.Function`` stays readable)."""

    divergence: Divergence
    kd_weight: float = 0.5
    ce_weight: float = 0.5
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
        kd = topk_divergence_per_token(logits, *teacher, opts.divergence).sum()
    else:
        vocab = min(logits.shape[-1], teacher.shape[-1])  # padded embedding matrices: compare the shared ids only
        kd = divergence_per_token(logits[:, :vocab], teacher[:, :vocab], opts.divergence).sum()
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
        kd = logp_t.sub_(logq_t).mul_(p_t).sum() * temperature**2  # p (log p - log q), in place: logp_t is done
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
    settings = opts.divergence
    kind, beta, lam = settings.effective_type, settings.jsd_beta, settings.skew_lambda  # JSD's endpoints are the two KLs
    need_h, h = q is not None, None
    if kind == "forward_kl":
        div = _kl_from_logprobs(logp, logq)
        h = -logp.exp() if need_h else None
    elif kind == "reverse_kl":
        if not need_h:
            return _kl_from_logprobs(logq, logp), None
        h = q * (logq.clamp_min(_NEG_LIMIT) - logp.clamp_min(_NEG_LIMIT))
        div = h.sum(-1)  # KL(q || p) is the row sum of h itself: no second V-wide pass for the loss
    elif kind == "jsd":
        logm = _log_mixture(logp, logq, beta)
        if not need_h:
            return beta * _kl_from_logprobs(logp, logm) + (1.0 - beta) * _kl_from_logprobs(logq, logm), None
        h = q * (logq.clamp_min(_NEG_LIMIT) - logm.clamp_min(_NEG_LIMIT))  # its row sum is KL(q || m)
        div = beta * _kl_from_logprobs(logp, logm) + (1.0 - beta) * h.sum(-1)
        h.mul_(1.0 - beta)
    elif kind == "skew_forward_kl":
        logm = _log_mixture(logp, logq, lam)
        div = _kl_from_logprobs(logp, logm)
        h = -(1.0 - lam) * (logp + logq - logm).exp() if need_h else None
    elif kind == "skew_reverse_kl":
        logm = _log_mixture(logp, logq, 1.0 - lam)
        if not need_h:
            return _kl_from_logprobs(logq, logm), None
        d = logq.clamp_min(_NEG_LIMIT) - logm.clamp_min(_NEG_LIMIT)  # log(q / m)
        h = q * d  # its row sum is KL(q || m)
        div = h.sum(-1)
        h.sub_(d.exp_().mul_(q), alpha=lam)  # q (log q - log m) - lam q^2 / m
    else:  # tvd
        diff = (q if need_h else logq.exp()) - logp.exp()  # q - p, once
        div = 0.5 * diff.abs().sum(-1)
        h = diff.sign_().mul_(q).mul_(0.5) if need_h else None
    return div, h


def _divergence_chunk(logits, teacher, targets, opts: ChunkedLossOptions, kd_scale: float, ce_scale: float,
                      need_grad: bool):
    """Any divergence + CE of one chunk with its gradient w.r.t. the logits in closed form (no autograd graph):
    the same contract as ``_forward_kl_chunk``, which stays the fused fast path of the default."""
    temperature = opts.divergence.temperature
    if opts.divergence.loss_type == "forward_kl" or teacher is None:
        return _forward_kl_chunk(logits, teacher, targets, temperature, kd_scale, ce_scale, need_grad)
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
    kd_grad = h.addcmul_(q_t, h.sum(-1, keepdim=True), value=-1.0)  # d/dz = h - q sum(h), fused, no (c, V) temporary;
    # taken before q is overwritten in place (q_t may be q)
    if ce_scale == 0.0 and vocab == logits.shape[-1]:  # alpha = 1 (the default): no CE part, two V-wide passes saved
        return kd, ce, kd_grad.mul_(kd_scale * temperature)
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
        product = None  # g^T @ hidden of a chunk, (Vs, H): one buffer for all chunks
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
                        _write_grad_h(grad_h, rows, g, weight)
                    if need_w:
                        if product is None:
                            product = torch.empty(weight.shape, dtype=g.dtype, device=g.device)
                        _accumulate_grad_w(grad_w, g, hidden[rows], product)
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


def _write_grad_h(grad_h: torch.Tensor, rows: slice, g: torch.Tensor, weight: torch.Tensor) -> None:
    """``grad_h[rows] = g @ weight`` ``(c, H)``, straight into those rows when the dtypes allow (no temporary)."""
    if g.dtype == weight.dtype == grad_h.dtype:
        torch.mm(g, weight, out=grad_h[rows])
    else:
        grad_h[rows] = g @ weight


def _accumulate_grad_w(grad_w: torch.Tensor, g: torch.Tensor, hidden: torch.Tensor, product: torch.Tensor) -> None:
    """``grad_w += g^T @ hidden`` ``(Vs, H)``, accumulated in fp32, the product in the weights' dtype as the plain
    backward computes it. ``product``: a reusable ``(Vs, H)`` buffer of that dtype. ``addmm(beta=0)`` into it gives
    ``g^T @ hidden`` to the bit, but on CPU ``mm`` copies the transposed ``g`` first and ``addmm`` does not
    (measured: about half the time of this product at c = 256, V = 4096)."""
    torch.addmm(product, g.t(), hidden, beta=0, out=product)
    grad_w += product if product.dtype == torch.float32 else product.float()


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
    divergence: Divergence | None = None,
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
    ``student_hidden``, ``student_weight`` and ``student_bias``. ``divergence``: as in ``distillation_loss``.
    """
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
    divergence = divergence or Divergence.unchecked(loss_type, temperature, jsd_beta, skew_lambda)
    opts = ChunkedLossOptions(divergence, weights.kd, weights.ce, chunk_size)
    loss, kd, ce = _ChunkedDistillationFunction.apply(
        h, student_weight, student_bias, th, teacher_weight if th is not None else None, teacher_bias,
        topk_ids if th is None and weights.kd > 0 else None, topk_logprobs, labels_s[rows], denom, kd_rows, kd_denom,
        opts,
    )
    return DistillationLossOutput(loss=loss, kd_loss=kd, ce_loss=ce, num_tokens=num_tokens)
