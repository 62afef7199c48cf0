"""Refill decoding (continuous batching) for transformers causal LMs: a finished row's slot goes to the next prompt.

A static batch (one ``model.generate`` per batch) keeps every row until the batch's longest is done and starts the
next batch only then. :class:`RefillDecoder` keeps up to ``max_rows`` rows decoding together on one left-padded
``DynamicCache``. At each step it

1. prefills the next prompts, as many as there are free slots, in left-padded batches of alike lengths, and joins
   their caches to the running one (the shorter side left-padded, so every row's last token sits in the last column);
2. picks every row's next token from its logits;
3. drops the rows that finished (EOS or ``max_new_tokens``) from the cache and crops the leading columns no
   remaining row uses;
4. runs one decode step for the rows still going.

Each row sees what a one-prompt ``model.generate`` gives it: positions counted from its own first real token,
padding masked out of attention, the repetition penalty over its own tokens only (``RepetitionPenaltyLogitsProcessor``
ignores ids >= the vocabulary, which is what rows are padded with) and, when sampling, its own ``torch.Generator``
with one draw per generated token (:meth:`RowSampler.draw`). Greedy rows therefore equal one-at-a-time greedy
decoding, and sampled rows depend on their seed only (tests/test_generation.py).

transformers' own continuous batching (``model.generate_batch``) is not used: it runs on CPU and its greedy tokens
match, but it cannot take a per-row sampler or return top-k log-probabilities, and it was slower than this loop on
the embedded teacher (docs/hardening.md, "Generation throughput").

Needs a cache whose layers are all full-attention ``DynamicLayer`` s (:func:`supports_refill`); models with
sliding-window, hybrid or recurrent caches use the static path.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from llm_distill.generation.sampling import RowSampler


@dataclass
class Row:
    """One sequence to decode: the caller's key and prompt, then what was generated for it."""

    key: Any
    input_ids: list[int]
    generator: torch.Generator | None = None   # with sampling: this row's own generator (row_generator)
    tokens: list[int] = field(default_factory=list)           # generated, without EOS
    finish_reason: str | None = None                          # "eos" or "length" once finished
    top_ids: list[list[int]] = field(default_factory=list)    # with logprobs: top-k per kept token
    top_logprobs: list[list[float]] = field(default_factory=list)


def supports_refill(model) -> bool:
    """True when the model is a decoder-only LM whose forward takes ``position_ids``, ``cache`` and ``logits_to_keep``
    and whose cache is full-attention ``DynamicLayer`` s only (no sliding window, no recurrent state): those are the
    caches :class:`RefillDecoder` can cut and join by batch row."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    if not {"position_ids", "cache", "logits_to_keep"} <= set(inspect.signature(model.forward).parameters):
        return False  # older remote code: its forward does not take what this decoder passes
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config DynamicCache cannot read: not a model this decoder knows
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` with spare columns: a decode step writes its keys / values into them, where
    ``DynamicLayer`` concatenates, copying the whole cache every step (40% of the refill loop's time on the embedded
    teacher, batch 32, in the profile that led here). ``keys`` / ``values`` stay views of the filled columns."""

    spare = 64  # columns added whenever the buffer is full

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        buffer = getattr(self, "_buffers", None)
        if (length == 0 or buffer is None or buffer[0].shape[-2] < length + new
                or buffer[0].data_ptr() != self.keys.data_ptr()):  # empty, full, or keys set from outside
            keys = torch.cat([self.keys, key_states], dim=-2) if length else key_states
            values = torch.cat([self.values, value_states], dim=-2) if length else value_states
            self.store(keys, values)
        else:
            buffer[0][:, :, length : length + new] = key_states
            buffer[1][:, :, length : length + new] = value_states
            self.keys, self.values = buffer[0][:, :, : length + new], buffer[1][:, :, : length + new]
        return self.keys, self.values

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``keys`` / ``values`` ``(B, H, L, D)`` in new buffers of ``L + spare`` columns."""
        batch, heads, length, dim = keys.shape
        self._buffers = (keys.new_empty((batch, heads, length + self.spare, dim)),
                         values.new_empty((batch, heads, length + self.spare, values.shape[-1])))
        self._buffers[0][:, :, :length], self._buffers[1][:, :, :length] = keys, values
        self.keys, self.values = self._buffers[0][:, :, :length], self._buffers[1][:, :, :length]


def spare_cache(config) -> DynamicCache:
    """An empty cache for :class:`RefillDecoder`: a ``DynamicCache`` of :class:`SpareLayer` s."""
    cache = DynamicCache(config=config)
    cache.layers = [SpareLayer() for _ in cache.layers]
    return cache


class RefillDecoder:
    """Decode many rows with at most ``max_rows`` in flight, refilling finished slots (see the module docstring)."""

    def __init__(self, model, *, max_rows: int, max_new_tokens: int, eos_ids, pad_id: int,
                 repetition_penalty: float = 1.0, sampler: RowSampler | None = None, logprobs: int = 0):
        if max_rows < 1 or max_new_tokens < 1:
            raise ValueError(f"max_rows ({max_rows}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        self.model, self.max_rows, self.max_new_tokens = model, max_rows, max_new_tokens
        self.eos_ids, self.pad_id, self.sampler, self.logprobs = set(eos_ids), pad_id, sampler, logprobs
        self.penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(self, rows: Iterable[Row]) -> Iterator[Row]:
        """Decode every row; yield each one as soon as it finishes (finish order, not input order)."""
        waiting = iter(rows)
        active: list[Row] = []
        cache = mask = logits = None  # the running cache, its (B, L) attention mask, the (B, V) next-token logits
        while True:
            new = list(islice(waiting, self.max_rows - len(active)))
            for group in length_groups(new):  # 1. prefill the newcomers, alike lengths together; join them
                group_logits, group_cache, group_mask = self._prefill(group)
                cache, mask = join_caches(cache, mask, group_cache, group_mask)
                logits = group_logits if logits is None else torch.cat([logits, group_logits])
                active += group
            if not active:
                return
            tokens = self._choose(active, logits)                      # 2. (B,)
            keep = []
            for i, (row, token) in enumerate(zip(active, tokens.tolist())):
                if self._append(row, token):
                    yield row
                else:
                    keep.append(i)
            if not keep:  # every row finished: start afresh with the next prompts
                active, cache, mask, logits = [], None, None, None
                continue
            if len(keep) < len(active):  # 3. cut the finished rows out
                active, tokens = [active[i] for i in keep], tokens[keep]
                cache, mask = drop_rows(cache, mask, keep)
            logits, mask = self._decode(tokens, cache, mask)           # 4.

    def _prefill(self, rows: list[Row]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """The newcomers' prompts as one left-padded batch: ``(k, V)`` last-token logits, their cache, ``(k, P)`` mask."""
        input_ids, attention_mask = left_pad([r.input_ids for r in rows], self.pad_id, self.device)  # (k, P)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # as generate: 0 at each row's first real token
        cache = spare_cache(self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), cache, attention_mask

    def _decode(self, tokens: torch.Tensor, cache: DynamicCache, mask: torch.Tensor):
        """One step for the rows in flight: feed each row's last token at its own next position."""
        position_ids = mask.sum(-1, keepdim=True)                       # (B, 1): real tokens so far
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        return out.logits[:, -1].float(), mask

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Every row's next token ``(B,)``: the repetition penalty over the row's own tokens, then the row's own
        draw (sampling) or the argmax (greedy). Top-k log-probabilities are of the raw logits, as in the static path."""
        if self.logprobs:
            top = torch.log_softmax(logits, dim=-1).topk(self.logprobs, dim=-1)
            for row, ids, values in zip(rows, top.indices.tolist(), top.values.tolist()):
                row.top_ids.append(ids)
                row.top_logprobs.append([round(v, 5) for v in values])
        history = self._history(rows, logits.shape[-1]) if self.penalty is not None else None
        scores = self.penalty(history, logits) if self.penalty is not None else logits
        if self.sampler is None:
            return scores.argmax(dim=-1)
        return self.sampler.draw(history, scores, [r.generator for r in rows])

    def _history(self, rows: list[Row], vocab_size: int) -> torch.Tensor:
        """``(B, S)`` prompt + generated ids per row, right-padded with ``vocab_size`` (an id the penalty ignores)."""
        seqs = [r.input_ids + r.tokens for r in rows]
        history = torch.full((len(seqs), max(map(len, seqs))), vocab_size, dtype=torch.long)
        for i, s in enumerate(seqs):
            history[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        return history.to(self.device)

    def _append(self, row: Row, token: int) -> bool:
        """Record ``token`` for ``row``; True when the row has finished."""
        if token in self.eos_ids:
            row.finish_reason = "eos"
        else:
            row.tokens.append(token)
            if len(row.tokens) == self.max_new_tokens:
                row.finish_reason = "length"
        if self.logprobs:  # keep the top-k of kept tokens only (the EOS step's is dropped, as in the static path)
            del row.top_ids[len(row.tokens):], row.top_logprobs[len(row.tokens):]
        return row.finish_reason is not None


# ------------------------------------------------------------------ cache surgery by batch row


def length_groups(rows: list[Row], max_padding: float = 0.25) -> list[list[Row]]:
    """``rows`` sorted longest first and cut wherever the group's longest prompt would exceed ``1 + max_padding``
    times a row's own: each prefill batch wastes at most that fraction on padding (one batch of prompts from 26 to
    130 tokens would be 45% padding), for a few more, smaller forward calls."""
    groups: list[list[Row]] = []
    for row in sorted(rows, key=lambda r: -len(r.input_ids)):
        if groups and len(groups[-1][0].input_ids) <= (1 + max_padding) * len(row.input_ids):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``(B, P)``, left-padded: a decoder-only batch generates from its last column."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, longest - len(s):] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, longest - len(s):] = 1
    return input_ids.to(device), attention_mask.to(device)


def join_caches(cache: DynamicCache | None, mask: torch.Tensor | None, joining: DynamicCache,
                joining_mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of ``joining`` appended after those of ``cache``; the shorter side is left-padded (masked zeros), so
    both end in the same column. Returns the joined cache (``cache``, changed in place) and its ``(B, L)`` mask."""
    if cache is None:
        return joining, joining_mask
    length = max(mask.shape[1], joining_mask.shape[1])
    for old, new in zip(cache.layers, joining.layers):  # keys / values: (B, H, L, D)
        old.store(torch.cat([_pad_left(old.keys, length, dim=-2), _pad_left(new.keys, length, dim=-2)]),
                  torch.cat([_pad_left(old.values, length, dim=-2), _pad_left(new.values, length, dim=-2)]))
    return cache, torch.cat([_pad_left(mask, length, dim=-1), _pad_left(joining_mask, length, dim=-1)])


def drop_rows(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Keep only the rows ``keep`` of ``cache`` (in place) and of its ``(B, L)`` mask, then crop the leading columns
    no kept row uses."""
    mask = mask[torch.as_tensor(keep, device=mask.device)]
    first = int(mask.any(dim=0).long().argmax())  # the first column some kept row attends to
    for layer in cache.layers:
        layer.store(layer.keys[keep, :, first:], layer.values[keep, :, first:])
    return cache, mask[:, first:]


def _pad_left(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``x`` zero-padded on the left of ``dim`` (-1 or -2) to ``length``."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    return F.pad(x, (missing, 0) if dim == -1 else (0, 0, missing, 0))
