"""Feature-level distillation losses as pure functions: hidden-layer maps, attention relations, attention maps, RKD.

Shapes: ``B`` batch, ``S`` sequence, ``H`` heads, ``d`` head width, ``W`` a projection's width (``H * d``), ``R``
relation heads, ``D`` a hidden size. ``attention_mask`` is ``(B, S)``, 1 on real tokens.

Normalisation follows the logit terms (``llm_distill.losses``): a per-position term is *summed* over the valid
positions and divided by ``num_items_in_batch`` - the valid positions of the whole accumulated, all-rank batch - so
that two micro-batches of 4 give exactly the loss and gradient of one batch of 8; ``None`` divides by this
micro-batch's own count; an all-masked batch gives 0, never NaN. Every term is computed in fp32.

==========================  ==========================================================  ==========================
function                    per valid position                                          paper
==========================  ==========================================================  ==========================
``hidden_map_loss``         mean over mapped layers of ``mean_D (P h_s - h_t)**2`` or   FitNets (Romero et al.
                            ``1 - cos(P h_s, h_t)`` (``P``: learned projection)          2015), TinyBERT
``attention_relation_loss`` sum over Q-Q, K-K, V-V of the mean over ``R`` relation      MiniLMv2 (Wang et al. 2021)
                            heads of ``KL(rel_t || rel_s)`` (one query row)
``attention_map_loss``      mean over heads of ``sum_keys (A_s - A_t)**2`` (one row)     TinyBERT (Jiao et al. 2020)
``rkd_loss``                (per batch) Huber on normalised distances + angle_weight x   RKD (Park et al. 2019)
                            Huber on angles between pooled sequence embeddings
==========================  ==========================================================  ==========================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llm_distill.losses import hidden_state_loss

HIDDEN_LOSSES = ("mse", "cosine")


def _valid(attention_mask: torch.Tensor | None, shape, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return attention_mask.bool()


def _denominator(count, local: torch.Tensor) -> torch.Tensor:
    count = count if count is not None else local
    return torch.as_tensor(count, device=local.device, dtype=torch.float32).clamp_min(1.0)


def hidden_map_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None,
    *,
    loss: str = "mse",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the mapped layer pairs of the per-layer hidden-state loss (``losses.hidden_state_loss``).

    Args:
        student_states: one ``(B, S, Dt)`` tensor per mapped student layer, *already projected* to the teacher's
            width when the widths differ (``FeatureDistiller`` owns the learned projections).
        teacher_states: the paired ``(B, S, Dt)`` teacher states (no gradient).
        attention_mask: ``(B, S)``; padded positions are left out.
        loss: ``mse`` (mean over the hidden dimension of the squared error) or ``cosine`` (``1 - cos``).
        num_items_in_batch: valid positions of the accumulated batch (``None``: this batch's own count).

    Averaging over the pairs (not summing, as TinyBERT does) keeps ``alpha_hidden``'s meaning when the map grows.
    """
    if loss not in HIDDEN_LOSSES:
        raise ValueError(f"hidden_loss={loss!r}: use one of {', '.join(HIDDEN_LOSSES)}.")
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"{len(student_states)} student and {len(teacher_states)} teacher states: pass one pair "
                         "per mapped layer (at least one).")
    weights = {"cos_weight": 1.0, "mse_weight": 0.0} if loss == "cosine" else {"cos_weight": 0.0, "mse_weight": 1.0}
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        total = total + hidden_state_loss(s, t, attention_mask, num_items_in_batch=num_items_in_batch, **weights).loss
    return total / len(student_states)


def relation_log_probs(x: torch.Tensor, num_heads: int, key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """MiniLMv2 self-attention relation: ``log_softmax(x_r x_r^T / sqrt(W / R))`` per relation head ``r``.

    Args:
        x: ``(B, S, W)`` - the queries, keys or values of one layer, all attention heads concatenated.
        num_heads: ``R``, the relation heads ``x`` is re-split into (must divide ``W``): this is what lets a
            student with other head counts and widths match the teacher's relations.
        key_mask: ``(B, S)`` bool, True on the keys that may be attended (real tokens).
        causal: a decoder's relations: query ``i`` relates only to keys ``j <= i``.

    Returns ``(B, R, S, S)`` fp32 log-probabilities over the keys; masked keys hold a large negative number.
    """
    B, S, W = x.shape
    if W % num_heads:
        raise ValueError(f"relation_heads={num_heads} does not divide the attention width {W}: pick a divisor of both "
                         "the student's and the teacher's num_heads x head_dim.")
    xr = x.float().view(B, S, num_heads, W // num_heads).transpose(1, 2)  # (B, R, S, W/R)
    scores = xr @ xr.transpose(-1, -2) / (W // num_heads) ** 0.5  # (B, R, S, S)
    allowed = key_mask.bool()[:, None, None, :].expand(B, 1, S, S)  # (B, 1, S, S)
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).log_softmax(-1)


def attention_relation_loss(
    student_qkv: Sequence[torch.Tensor],
    teacher_qkv: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None,
    *,
    relation_heads: int,
    causal: bool = False,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2's self-attention relation distillation (Wang et al. 2021, eq. 4-6), at the valid query positions.

    Args:
        student_qkv: ``(q, k, v)``, each ``(B, S, Ws)`` (all heads concatenated; any width divisible by ``R``).
        teacher_qkv: ``(q, k, v)``, each ``(B, S, Wt)``.
        attention_mask: ``(B, S)``: padded positions are neither queries nor keys.
        relation_heads: ``R``.
        causal: decoder relations (key ``j <= i``).

    Per valid query row: ``sum over (Q-Q, K-K, V-V) of mean over R of KL(rel_teacher || rel_student)``, summed over
    the rows and divided by ``num_items_in_batch`` (or this batch's valid positions).
    """
    valid = _valid(attention_mask, student_qkv[0].shape[:2], student_qkv[0].device)  # (B, S)
    denom = _denominator(num_items_in_batch, valid.sum())
    total = student_qkv[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_qkv, teacher_qkv, strict=True):
        log_q = relation_log_probs(s, relation_heads, valid, causal)  # (B, R, S, S)
        log_p = relation_log_probs(t.detach(), relation_heads, valid, causal)
        kl = (log_p.exp() * (log_p - log_q)).masked_fill(~valid[:, None, None, :], 0.0).sum(-1)  # (B, R, S)
        total = total + kl.mean(1)[valid].sum()
    return total / denom


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, causal: bool,
                    scaling: float | None = None) -> torch.Tensor:
    """The attention map ``softmax(q k^T * scaling + mask)``: ``q, k`` ``(B, H, S, d)`` -> ``(B, H, S, S)`` fp32.

    What eager attention computes (before dropout) for the standard dot-product attention of Llama-family, GPT-2
    and BERT models, recomputed from the captured queries and keys so that SDPA / flash kernels need not return it."""
    S = q.shape[-2]
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling  # (B, H, S, S)
    allowed = key_mask.bool()[:, None, None, :].expand(q.shape[0], 1, S, S)
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)


def attention_map_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """TinyBERT's attention-based distillation (Jiao et al. 2020, eq. 3) on attention *probabilities*.

    Args:
        student_attn, teacher_attn: ``(B, H, S, S)`` maps with the same number of heads ``H`` (TinyBERT pairs head
            ``h`` with head ``h``; use ``attention_relation_loss`` when the head counts differ).
        attention_mask: ``(B, S)``.

    Per valid query row: mean over heads of ``sum over valid keys (A_s - A_t)**2``; summed and normalised as above.
    """
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"Attention maps {tuple(student_attn.shape)} (student) and {tuple(teacher_attn.shape)} "
                         "(teacher) differ: TinyBERT's attention-map loss pairs heads one to one, so it needs the "
                         "same number of heads; use alpha_attn_relation (MiniLMv2) instead, which does not.")
    valid = _valid(attention_mask, student_attn.shape[:1] + student_attn.shape[-1:], student_attn.device)  # (B, S)
    denom = _denominator(num_items_in_batch, valid.sum())
    sq = (student_attn.float() - teacher_attn.detach().float()).pow(2)
    sq = sq.masked_fill(~valid[:, None, None, :], 0.0).sum(-1).mean(1)  # (B, S)
    return sq[valid].sum() / denom


def pooled_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(B, S, D)`` hidden states over each row's valid positions -> ``(B, D)`` fp32."""
    valid = _valid(attention_mask, hidden.shape[:2], hidden.device).float()[..., None]  # (B, S, 1)
    return (hidden.float() * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, *, distance_weight: float = 1.0,
             angle_weight: float = 2.0) -> torch.Tensor:
    """Relational KD (Park et al. 2019): the student's examples keep the teacher's distances and angles.

    Args:
        student: ``(N, Ds)`` embeddings of ``N`` examples (e.g. ``pooled_embeddings``); any width.
        teacher: ``(N, Dt)``.

    distance: ``mean over pairs i != j of huber(|s_i - s_j| / mu_s, |t_i - t_j| / mu_t)``, ``mu`` the mean pairwise
    distance; angle: ``mean over triplets (i, j, k), j != i, k of huber(<e_ij, e_kj>_s, <e_ij, e_kj>_t)`` with
    ``e_ij = (x_i - x_j) / |x_i - x_j|`` (the cosine of the angle at ``j``). Huber = ``smooth_l1`` with beta 1;
    defaults are the paper's weights (1, 2). ``N < 2`` gives 0 (no pairs), ``N < 3`` no angle term.
    """
    s, t = student.float(), teacher.detach().float()
    n = s.shape[0]
    loss = s.new_zeros(())
    if n < 2:
        return loss + 0.0 * s.sum()  # keeps the graph connected
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)  # (N, N) pairs i != j

    def distances(x):
        d = torch.cdist(x, x)[off]  # (N*(N-1),)
        return d / d.mean().clamp_min(1e-12)

    loss = loss + distance_weight * F.smooth_l1_loss(distances(s), distances(t))
    if n >= 3 and angle_weight:
        def angles(x):
            e = F.normalize(x[:, None, :] - x[None, :, :], dim=-1)  # (N, N, D): e[i, j] = unit(x_i - x_j)
            cos = torch.einsum("ijd,kjd->ijk", e, e)  # (N, N, N): angle at j between i and k
            keep = off[:, :, None] & off.t()[None, :, :] & off[:, None, :]  # i != j, k != j, i != k
            return cos[keep]

        loss = loss + angle_weight * F.smooth_l1_loss(angles(s), angles(t))
    return loss
