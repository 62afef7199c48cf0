"""Distillation losses as pure functions: per-token divergences, masking, normalisation.

``divergence`` (the per-token divergences and their settings), ``reference`` (the plain full-logits path and the
triple loss's hidden-state terms) and ``chunked`` (the memory-lean path, same numbers) are one idea each.

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

from llm_distill.losses.chunked import ChunkedLossOptions, chunked_distillation_loss
from llm_distill.losses.divergence import (
    IGNORE_INDEX,
    LOSS_TYPES,
    TAIL_MASS_FLOOR,
    Divergence,
    divergence_per_token,
    token_divergence,
    topk_divergence,
    topk_divergence_per_token,
)
from llm_distill.losses.reference import (
    DistillationLossOutput,
    HiddenStateLossOutput,
    LossWeights,
    distillation_loss,
    hidden_state_loss,
    shift_for_causal_lm,
    triple_loss,
    with_hidden_terms,
)

__all__ = [
    "IGNORE_INDEX", "LOSS_TYPES", "TAIL_MASS_FLOOR", "Divergence", "divergence_per_token", "token_divergence",
    "topk_divergence", "topk_divergence_per_token", "DistillationLossOutput", "HiddenStateLossOutput", "LossWeights",
    "distillation_loss", "hidden_state_loss", "shift_for_causal_lm", "triple_loss", "with_hidden_terms",
    "ChunkedLossOptions", "chunked_distillation_loss",
]
