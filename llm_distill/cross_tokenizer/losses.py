"""Divergences between next-token distributions over *different* vocabularies: ``uld`` and ``hybrid``.

* ``uld`` - Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
  Universal Logit Distillation Loss"): sort each distribution's probabilities in decreasing order, pad the smaller
  vocabulary with zeros, and take the L1 distance of the sorted vectors (the closed form of the Wasserstein-1
  distance they use). No vocabulary map at all: it matches the *shape* of the teacher's distribution (how peaked,
  how long the tail), not which token gets the mass.
* ``hybrid`` - TRL's GOLD recipe: tokens whose strings exist in both vocabularies (an exact-match map,
  :class:`VocabularyMap`) are compared token by token with the configured divergence (``loss_type``, forward KL by
  default), and the rest with ULD. Exactly: both distributions are coarsened to ``C + 1`` outcomes - the ``C``
  common tokens plus one bucket holding all other mass (the same "other bucket" as offline KD's
  ``topk_divergence``) - and the divergence of that pair is added to ULD on the non-common tokens' probabilities
  (full-vocabulary softmax, not renormalised). With one tokenizer on both sides every token is common, there is no
  bucket and no ULD part, and the value is *exactly* the same-vocabulary divergence (same code path, same numbers).

All values are fp32, at temperature ``T`` on both sides and multiplied by ``T**2`` like every KD term here.
Shapes: ``N`` compared positions (one per aligned group, ``llm_distill.cross_tokenizer.alignment``), ``Vs`` / ``Vt``
the student's / teacher's vocabularies (model output sizes, padding rows included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_distill.losses import Divergence, divergence_per_token

CROSS_TOKENIZER_MODES = ("none", "uld", "hybrid")


def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """L1 distance of the decreasingly sorted rows of ``p`` (N, A) and ``q`` (N, B), the shorter zero-padded."""
    p = p.sort(dim=-1, descending=True).values
    q = q.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def uld_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD per row: ``(N, Vs)``, ``(N, Vt)`` -> ``(N,)`` fp32, times ``T**2``. In [0, 2 T**2]; 0 iff the sorted
    probability vectors agree (a permutation of the teacher's distribution costs nothing)."""
    q = F.softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return _sorted_l1(p, q) * temperature**2


@dataclass(frozen=True)
class VocabularyMap:
    """The exact-match map between two vocabularies: ``student_ids[i]`` and ``teacher_ids[i]`` are the same token
    string; ``student_rest`` / ``teacher_rest`` are every other id below each model's output size."""

    student_ids: torch.Tensor  # (C,) long, increasing
    teacher_ids: torch.Tensor  # (C,) long
    student_rest: torch.Tensor  # (Vs - C,) long
    teacher_rest: torch.Tensor  # (Vt - C,) long

    @classmethod
    def build(cls, student_tokenizer, teacher_tokenizer, student_size: int, teacher_size: int) -> VocabularyMap:
        """Common strings of the two tokenizers' vocabularies (``get_vocab()``), ids below the model sizes only."""
        vs, vt = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        pairs = sorted((i, vt[tok]) for tok, i in vs.items() if tok in vt and i < student_size and vt[tok] < teacher_size)
        s_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        t_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
        return cls(s_ids, t_ids, _complement(s_ids, student_size), _complement(t_ids, teacher_size))

    @property
    def num_common(self) -> int:
        return int(self.student_ids.numel())

    def to(self, device) -> VocabularyMap:
        return VocabularyMap(*(t.to(device) for t in (self.student_ids, self.teacher_ids, self.student_rest,
                                                     self.teacher_rest)))


def _complement(ids: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().flatten()


def _with_other_bucket(logits: torch.Tensor, common: torch.Tensor, rest: torch.Tensor, temperature: float,
                       bucket: bool) -> torch.Tensor:
    """Logits of the coarsened distribution: the common tokens' logits + one logit carrying all other mass at ``T``
    (``T * logsumexp(rest / T)``, so that softmax at ``T`` gives the bucket exactly that mass). (N, V) -> (N, C[+1])."""
    out = logits.index_select(-1, common)
    if not bucket:
        return out
    if rest.numel() == 0:  # this side has no other tokens: an (almost) empty bucket
        other = out.new_full((out.shape[0], 1), torch.finfo(out.dtype).min / 4)
    else:
        other = temperature * torch.logsumexp(logits.index_select(-1, rest) / temperature, -1, keepdim=True)
    return torch.cat([out, other], -1)


def hybrid_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_map: VocabularyMap,
                      divergence: Divergence) -> torch.Tensor:
    """GOLD's hybrid per row: ``divergence`` on the common tokens + an other-bucket, plus ULD on the other tokens.

    ``(N, Vs)``, ``(N, Vt)`` -> ``(N,)`` fp32, times ``T**2``."""
    temperature = divergence.temperature
    s, t = student_logits.float(), teacher_logits.float()
    bucket = vocab_map.student_rest.numel() > 0 or vocab_map.teacher_rest.numel() > 0
    value = divergence_per_token(_with_other_bucket(s, vocab_map.student_ids, vocab_map.student_rest, temperature, bucket),
                                 _with_other_bucket(t, vocab_map.teacher_ids, vocab_map.teacher_rest, temperature, bucket),
                                 divergence)
    if bucket:
        q = F.softmax(s / temperature, dim=-1).index_select(-1, vocab_map.student_rest)
        p = F.softmax(t / temperature, dim=-1).index_select(-1, vocab_map.teacher_rest)
        value = value + _sorted_l1(p, q) * temperature**2
    return value


def cross_tokenizer_divergence(mode: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               divergence: Divergence, vocab_map: VocabularyMap | None = None) -> torch.Tensor:
    """``uld`` or ``hybrid`` per row (``(N, Vs)``, ``(N, Vt)`` -> ``(N,)``); ``hybrid`` needs ``vocab_map``."""
    if mode == "uld":
        return uld_divergence(student_logits, teacher_logits, divergence.temperature)
    if mode == "hybrid":
        if vocab_map is None:
            raise ValueError("cross_tokenizer=hybrid needs the vocabulary map of the two tokenizers (VocabularyMap.build).")
        return hybrid_divergence(student_logits, teacher_logits, vocab_map, divergence)
    raise ValueError(f"cross_tokenizer={mode!r} has no divergence; use one of uld, hybrid.")
