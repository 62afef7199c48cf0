"""Per-row seeded sampling: a row's samples depend only on ``(seed, id, sample_index)``.

``model.generate(do_sample=True)`` draws every row of a batch from one global RNG, so a row's response depends on
which rows share its batch and in which order: a crash resumed with another ``batch_size``, or a run re-sharded over
another number of processes, would write different samples. :class:`RowSampler` is a logits processor that draws
each row's next token from that row's own ``torch.Generator`` (seeded by :func:`row_seed`) and hands ``generate``
a one-hot distribution, so ``generate`` runs greedy (``do_sample=False``) and picks exactly the drawn token. The
temperature / top-k / top-p warpers are transformers' own, applied here per row; the repetition penalty stays
``generate``'s (it runs before this processor). Each step draws once per row, finished or not, so a row's k-th draw
is its k-th token whatever the batch around it.
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def row_seed(seed: int, row_id, sample_index: int) -> int:
    """A 63-bit seed from ``(seed, id, sample_index)`` (stable across Python runs, unlike ``hash``)."""
    digest = hashlib.sha256(json.dumps([seed, row_id, sample_index]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RowSampler(LogitsProcessor):
    """Draw row ``i``'s next token from generator ``i`` (set per ``generate`` call with :meth:`start`)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        warpers = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.seeds: list[int] = []
        self.generators: list[torch.Generator] = []

    def start(self, seeds: list[int]) -> None:
        """One seed per row of the coming ``generate`` call, in its row order (prompt-major, then sample)."""
        self.seeds, self.generators = list(seeds), []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.seeds) != scores.shape[0]:
            raise RuntimeError(f"RowSampler has {len(self.seeds)} seeds for {scores.shape[0]} rows: call start() with "
                               "one seed per row before generate().")
        if not self.generators:  # created on the logits' device, on the first step
            self.generators = [row_generator(s, scores.device) for s in self.seeds]
        tokens = self.draw(input_ids, scores, self.generators)
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(1, tokens[:, None], 0.0)

    def draw(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, generators: list) -> torch.LongTensor:
        """Row ``i``'s next token ``(B,)``, drawn from the warped ``softmax(scores[i])`` with ``generators[i]``; the
        refill decoder calls this directly with the generators of the rows it holds at this step."""
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)  # (B, V)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def row_generator(seed: int, device="cpu") -> torch.Generator:
    """The ``torch.Generator`` a row draws its tokens from, seeded with its :func:`row_seed`."""
    return torch.Generator(device).manual_seed(seed)
