"""Speculative decoding: a small draft proposes tokens, the target verifies them, the output stays the target's.

Leviathan, Kalman & Matias 2022, "Fast Inference from Transformers via Speculative Decoding"
(arXiv:2211.17192) and Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling" (arXiv:2302.01318). One step, per sequence:

1. the draft proposes ``gamma`` tokens d_1..d_gamma autoregressively (its own KV cache, gamma cheap calls);
2. the target scores the pending token(s) + all drafts in ONE forward pass (its KV cache), giving
   p_1..p_{gamma+1};
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (greedy: iff d_i == argmax p_i); at the
   first rejection a token is sampled from norm(max(0, p_i - q_i)) (greedy: argmax p_i), and when all gamma
   are accepted a bonus token is sampled from p_{gamma+1}. Every step emits between 1 and gamma + 1 tokens
   and the emitted sequence is distributed exactly as target-only sampling (Leviathan et al., Theorem 1);
4. both KV caches are rolled back to the accepted prefix; the prefix is never encoded again.

Batches with ragged acceptance (Hugging Face's assisted generation refuses batch > 1). All rows share one
*column layout*: column j of the KV caches holds the same step for every row, and a boolean ``valid`` mask
says which columns are real tokens of a row. Left padding of the prompts and the drafts a row rejected
are simply invalid columns ("holes"): they stay in the cache but are masked out of attention, and each
row's position ids count only its valid columns, so RoPE sees a contiguous sequence. Columns that no row
accepted are cropped from both caches (``DynamicCache.crop``). Nothing is re-fed, and the causal mask that
``transformers`` builds from the 2-D mask + cache length is exact. When holes pile up (more than
``compact_threshold`` columns wasted in every row) both caches are compacted: each row's valid columns are
gathered to the right (left padding again). Keys are cached *after* RoPE, so moving them is exact.
Finished rows (EOS or ``max_new_tokens``) leave the batch (``DynamicCache.batch_select_indices``).

``SpeculativeDecoder.generate(..., gamma=0)`` runs the same loop with the target alone: the
autoregressive baseline with a KV cache that the benchmark compares against.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from llm_distill.models import VocabularyMismatchError, cache_kwarg

logger = logging.getLogger(__name__)


def expected_accepted_length(alpha: float, gamma: int) -> float:
    """Expected tokens emitted per target call, (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al. eq. 1)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Expected walltime improvement over target-only decoding (Leviathan et al. Theorem 3.8).

    ``cost_ratio`` is c = (time of one draft call) / (time of one target call).
    """
    return expected_accepted_length(alpha, gamma) / (gamma * cost_ratio + 1.0)


def optimal_gamma(alpha: float, cost_ratio: float, max_gamma: int) -> int:
    """The gamma in [1, max_gamma] that maximises :func:`expected_speedup`."""
    alpha = min(max(alpha, 0.0), 0.99)
    return max(range(1, max_gamma + 1), key=lambda g: expected_speedup(alpha, g, cost_ratio))


@dataclass
class SpeculativeStats:
    """Counters of one ``generate`` call (vLLM's spec-decode metrics plus Leviathan's alpha and c)."""

    gamma: int
    batch_size: int = 0
    drafted_tokens: int = 0          # draft tokens proposed (gamma per active row per step)
    accepted_tokens: int = 0         # of those, accepted by the target
    emitted_tokens: int = 0          # accepted + one correction/bonus token per row-step (before EOS/max cut)
    new_tokens: int = 0              # tokens returned (after cutting at EOS / max_new_tokens)
    row_steps: int = 0               # sum over verification calls of the rows in the batch
    rejected_steps: int = 0          # row-steps that ended in a rejection (fewer than gamma accepted)
    target_calls: int = 0            # verification forward passes (prefill not counted)
    draft_calls: int = 0             # draft forward passes (prefill not counted)
    position_drafted: list = field(default_factory=list)   # [i] = row-steps that drafted position i
    position_accepted: list = field(default_factory=list)  # [i] = row-steps that accepted positions 0..i
    gammas: list = field(default_factory=list)             # gamma used at each step (adaptive gamma)
    compactions: int = 0
    prefill_time_s: float = 0.0
    target_time_s: float = 0.0
    draft_time_s: float = 0.0
    wall_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (vLLM's draft acceptance rate)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else float("nan")

    @property
    def alpha(self) -> float:
        """Per-token acceptance probability (Leviathan's alpha), maximum-likelihood under i.i.d. acceptance.

        Drafts after the first rejection are never judged, so accepted / drafted underestimates alpha;
        accepted / (accepted + rejections) does not.
        """
        judged = self.accepted_tokens + self.rejected_steps
        return self.accepted_tokens / judged if judged else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target call and row, bonus/correction token included (1 .. gamma + 1)."""
        return self.emitted_tokens / self.row_steps if self.row_steps else float("nan")

    @property
    def per_position_acceptance(self) -> list[float]:
        """[i] = fraction of drafts whose first i + 1 tokens were all accepted."""
        return [a / d if d else float("nan") for a, d in zip(self.position_accepted, self.position_drafted)]

    @property
    def cost_ratio(self) -> float:
        """Measured c = mean draft call time / mean target (verification) call time."""
        if not self.draft_calls or not self.target_calls or not self.target_time_s:
            return float("nan")
        return (self.draft_time_s / self.draft_calls) / (self.target_time_s / self.target_calls)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("acceptance_rate", "alpha", "mean_accepted_length", "per_position_acceptance", "cost_ratio",
                     "tokens_per_second"):
            d[name] = getattr(self, name)
        return d


@dataclass
class SpeculativeOutput:
    sequences: torch.LongTensor   # (B, S + longest generation): the prompts as given + new tokens, pad-filled
    generated: list               # per row, the new token ids (EOS included when it was produced)
    stats: SpeculativeStats


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def check_same_vocabulary(target, draft, tokenizer=None) -> int:
    """Return the vocabulary size the two models share, or raise with both sizes and the fix."""
    v_t, v_d = _vocab_size(target), _vocab_size(draft)
    if v_t == v_d:
        return v_t
    shared = min(v_t, v_d)
    if tokenizer is not None and len(tokenizer) <= shared:
        return shared  # embedding matrices padded differently; ids >= len(tokenizer) are never real tokens
    raise VocabularyMismatchError(
        f"Target vocabulary size {v_t} != draft vocabulary size {v_d}"
        + (f" and the tokenizer has {len(tokenizer)} tokens" if tokenizer is not None else "")
        + ". Speculative decoding compares the two next-token distributions id by id, so both models need the "
        "same tokenizer: use a draft from the target's family (e.g. Qwen2.5-7B -> Qwen2.5-0.5B) or distil one "
        "(scripts/distill.py, then scripts/distillspec.py). If the sizes differ only by embedding padding, pass "
        "tokenizer= so the shared vocabulary can be checked."
    )


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Softmax of ``logits`` (..., V) after temperature, top-k and top-p (nucleus), in float32.

    The same function processes the target's and the draft's logits: the rejection rule is then exact
    for the *processed* target distribution, which is what target-only sampling would draw from.
    """
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def _new_cache(model) -> DynamicCache:
    config = getattr(model, "config", None)
    return DynamicCache(config=config) if isinstance(config, PretrainedConfig) else DynamicCache()


def _crop(cache: DynamicCache, length: int, new_length: int) -> None:
    if new_length < length:
        cache.crop(new_length - length)  # transformers 5: a negative count removes that many trailing columns


class _Batch:
    """The active rows: the shared column layout, both caches and what each row still may generate."""

    def __init__(self, tokens, valid, rows, remaining, target_cache, draft_cache):
        self.tokens, self.valid = tokens, valid  # (B, W) long, (B, W) bool
        self.rows, self.remaining = rows, remaining  # (B,) original row index, (B,) tokens still allowed
        self.target_cache, self.draft_cache = target_cache, draft_cache
        self.target_len = self.draft_len = 0  # columns already in each cache; the rest are pending

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def append(self, column: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, column[:, None]], dim=1)
        self.valid = torch.cat([self.valid, torch.ones_like(column, dtype=torch.bool)[:, None]], dim=1)

    def select(self, keep: torch.Tensor) -> None:
        self.tokens, self.valid = self.tokens[keep], self.valid[keep]
        self.rows, self.remaining = self.rows[keep], self.remaining[keep]
        for cache in (self.target_cache, self.draft_cache):
            cache.batch_select_indices(keep)

    def compact(self) -> bool:
        """Gather each row's valid cached columns to the right of a narrower layout (left padding)."""
        caches = [(self.target_cache, self.target_len), (self.draft_cache, self.draft_len)]
        if not all(type(layer) is DynamicLayer for cache, _ in caches for layer in cache.layers):
            return False  # sliding-window / quantised layers: keep the holes (still exact, only wider)
        c = min(self.target_len, self.draft_len)  # compact the columns both caches hold; the tail stays
        valid = self.valid[:, :c]
        n_valid = valid.sum(1)
        new_c = int(n_valid.max())
        if new_c == c:
            return False
        cols = torch.arange(c, device=valid.device)
        order = torch.argsort(valid.long() * c + cols, dim=1)[:, c - new_c:]  # holes first, then valid in order
        for cache, length in caches:
            for layer in cache.layers:
                if not layer.is_initialized or layer.keys.numel() == 0:
                    continue
                idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
                layer.keys = torch.cat([layer.keys[:, :, :c].gather(2, idx), layer.keys[:, :, c:length]], dim=2)
                layer.values = torch.cat([layer.values[:, :, :c].gather(2, idx), layer.values[:, :, c:length]], dim=2)
        self.tokens = torch.cat([self.tokens[:, :c].gather(1, order), self.tokens[:, c:]], dim=1)
        self.valid = torch.cat([valid.gather(1, order), self.valid[:, c:]], dim=1)
        self.target_len -= c - new_c
        self.draft_len -= c - new_c
        return True


@dataclass
class _GammaState:
    """The adaptive-gamma estimates carried from step to step."""

    gamma: int
    alpha: float
    cost: float | None


def check_gamma(gamma: int, allow_zero: bool = False) -> None:
    """The one rule for ``gamma`` (draft tokens per step): >= 1, or 0 where target-only decoding is meant."""
    if gamma < (0 if allow_zero else 1):
        raise ValueError(f"gamma={gamma} is invalid: expected an integer >= 1 draft tokens per step"
                         + (" (or 0 for target-only decoding)." if allow_zero else "."))


def _check_generate_args(max_new_tokens: int, gamma: int, do_sample: bool, temperature: float, top_k: int,
                         top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected an integer >= 1.")
    check_gamma(gamma, allow_zero=True)
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} is invalid with do_sample=True: expected > 0 "
                         "(use do_sample=False for greedy decoding).")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k={top_k} / top_p={top_p} are invalid: expected top_k >= 0 and 0 < top_p <= 1.")


class SpeculativeDecoder:
    """Lossless speculative decoding of ``target`` with a small ``draft`` that shares its vocabulary.

    Args:
        target: the model whose output distribution is reproduced (any causal LM with a ``DynamicCache``).
        draft: the proposal model; same tokenizer (checked here).
        tokenizer: optional; used for the vocabulary check when embedding sizes differ only by padding,
            and for its pad / EOS ids.
        gamma: draft tokens per step (>= 1); with ``adaptive_gamma`` the starting value.
        adaptive_gamma: choose gamma at every step as the argmax of Leviathan's expected speedup for the
            running acceptance estimate and the measured draft/target cost ratio (or ``cost_ratio``).
        max_gamma: upper bound for adaptive gamma.
        cost_ratio: fixed c for adaptive gamma instead of the measured one.
        compact_threshold: compact the KV caches when every row wastes at least this many columns.

    Example::

        decoder = SpeculativeDecoder(target, draft, tokenizer, gamma=4)
        out = decoder.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=64)
        out.sequences, out.stats.acceptance_rate, out.stats.mean_accepted_length
    """

    def __init__(self, target, draft, tokenizer=None, *, gamma: int = 4, adaptive_gamma: bool = False,
                 max_gamma: int = 16, cost_ratio: float | None = None, compact_threshold: int = 32):
        check_gamma(gamma)
        if max_gamma < gamma and adaptive_gamma:
            raise ValueError(f"max_gamma={max_gamma} is smaller than gamma={gamma}; raise max_gamma.")
        if cost_ratio is not None and cost_ratio <= 0:
            raise ValueError(f"cost_ratio={cost_ratio} is invalid: expected draft/target time per call > 0.")
        if compact_threshold < 1:
            raise ValueError(f"compact_threshold={compact_threshold} is invalid: expected an integer >= 1.")
        self.vocab_size = check_same_vocabulary(target, draft, tokenizer)
        self.target, self.draft, self.tokenizer = target.eval(), draft.eval(), tokenizer
        self.gamma, self.adaptive_gamma, self.max_gamma = gamma, adaptive_gamma, max_gamma
        self.fixed_cost_ratio, self.compact_threshold = cost_ratio, compact_threshold
        self._cache_kwarg = {id(m): cache_kwarg(m) for m in (target, draft)}

    # ------------------------------------------------------------------------------------------- helpers

    def _forward(self, model, cache, batch: _Batch, start: int, end: int) -> torch.Tensor:
        """Logits (B, end - start, V) for columns [start, end); columns [0, start) are already in ``cache``."""
        valid = batch.valid[:, :end]
        if bool(valid.all()):  # no padding and no holes (always so at batch 1): the plain causal fast path
            mask, position_ids = None, torch.arange(start, end, device=valid.device)[None].expand(valid.shape[0], -1)
        else:
            mask = valid.long()
            position_ids = (mask.cumsum(1) - 1).clamp_min(0)[:, start:end]  # count only this row's real tokens
        out = model(input_ids=batch.tokens[:, start:end], attention_mask=mask, position_ids=position_ids,
                    use_cache=True, **{self._cache_kwarg[id(model)]: cache})
        return out.logits[..., : self.vocab_size]

    def _sample(self, probs: torch.Tensor, generator) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @staticmethod
    def _accept_sampling(p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Accept draft i iff u_i < p_i(d_i) / q_i(d_i) (written multiplicatively: q_i(d_i) > 0 was sampled)."""
        return u * q_draft < p_draft

    def _prepare(self, input_ids, attention_mask, pad_token_id) -> tuple[list[list[int]], torch.Tensor]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.ndim == 1:
                input_ids = input_ids[None]
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}.")
            prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]
        else:
            prompts = [list(p) for p in input_ids]
            input_ids = None
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise ValueError(f"Prompt rows {empty[:5]} have no tokens (all masked); every row needs >= 1 token "
                             "(e.g. the BOS token).")
        if input_ids is None:
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts])
        return prompts, input_ids

    # ------------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None,
                 pad_token_id: int | None = None, gamma: int | None = None,
                 generator: torch.Generator | None = None) -> SpeculativeOutput:
        """Generate up to ``max_new_tokens`` per row; returns sequences, per-row new tokens and statistics.

        ``input_ids`` is a (B, S) tensor (left or right padded, with ``attention_mask``) or a list of token id
        lists. ``gamma=0`` decodes with the target alone (the autoregressive baseline, same code path).
        Greedy (``do_sample=False``) reproduces the target's greedy output; sampling reproduces the target's
        distribution after ``temperature`` / ``top_k`` / ``top_p``.
        """
        gamma = self.gamma if gamma is None else gamma
        _check_generate_args(max_new_tokens, gamma, do_sample, temperature, top_k, top_p)
        eos = self._eos_ids(eos_token_id)
        pad_token_id = self._pad_id(pad_token_id, eos)
        prompts, input_ids = self._prepare(input_ids, attention_mask, pad_token_id)
        stats = SpeculativeStats(gamma=gamma, batch_size=len(prompts))
        start_time = time.perf_counter()
        batch = self._prefill(prompts, pad_token_id, max_new_tokens, gamma > 0, stats)  # 0. layout + prompts
        generated: list[list[int]] = [[] for _ in prompts]
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else None
        adapt = _GammaState(gamma, alpha=0.7, cost=self.fixed_cost_ratio)
        while batch.rows.numel():
            # No point drafting past what the row with the most room left can still emit (bonus included).
            g = min(adapt.gamma, int(batch.remaining.max()) - 1) if gamma > 0 else 0
            n_batch = batch.rows.numel()
            q_probs, draft_time = self._draft(batch, g, sampling, generator, stats)            # 1. draft
            t0 = time.perf_counter()
            p_logits, drafts = self._verify(batch, g)                                           # 2. verify
            n, next_tok = self._accept(p_logits, drafts, q_probs, sampling, generator)          # 3. accept
            verify_time = time.perf_counter() - t0
            stats.target_time_s += verify_time
            stats.target_calls += 1
            self._roll_back(batch, g, n, next_tok)                                              # 4. roll back
            self._record(stats, g, n, n_batch)                                                  # 5. emit
            finished = self._emit(batch, drafts, n, next_tok, generated, eos)
            if finished.any():
                batch.select((~finished).nonzero().squeeze(1))
            if batch.rows.numel() and batch.width - int(batch.valid.sum(1).max()) >= self.compact_threshold:
                stats.compactions += int(batch.compact())
            if self.adaptive_gamma and g:                                                       # 6. adapt gamma
                self._adapt_gamma(adapt, g, n, draft_time, verify_time)
        stats.wall_time_s = time.perf_counter() - start_time
        return self._output(input_ids, generated, pad_token_id, stats)

    # ------------------------------------------------------------------------------------------- the steps

    def _prefill(self, prompts: list[list[int]], pad_token_id: int, max_new_tokens: int, use_draft: bool,
                 stats: SpeculativeStats) -> _Batch:
        """0. Prompts left-padded into shared columns; every column but the last goes into both caches (the last
        stays pending: it is fed with the first drafts)."""
        device = next(self.target.parameters()).device
        n_rows, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        batch = _Batch(tokens, valid, torch.arange(n_rows, device=device),
                       torch.full((n_rows,), max_new_tokens, device=device),
                       _new_cache(self.target), _new_cache(self.draft))
        if width > 1:
            t0 = time.perf_counter()
            self._forward(self.target, batch.target_cache, batch, 0, width - 1)
            if use_draft:
                self._forward(self.draft, batch.draft_cache, batch, 0, width - 1)
                batch.draft_len = width - 1
            batch.target_len = width - 1
            stats.prefill_time_s = time.perf_counter() - t0
        return batch

    def _draft(self, batch: _Batch, g: int, sampling: dict | None, generator, stats: SpeculativeStats):
        """1. Draft ``g`` tokens autoregressively; the draft's cache catches up on every pending column first.
        Returns the draft's distributions ``q`` (sampling only) and the time it took."""
        q_probs = []
        t0 = time.perf_counter()
        for _ in range(g):
            logits = self._forward(self.draft, batch.draft_cache, batch, batch.draft_len, batch.width)[:, -1]
            batch.draft_len = batch.width
            if sampling is not None:
                q = logits_to_probs(logits, **sampling)  # (B, V)
                q_probs.append(q)
                batch.append(self._sample(q, generator))
            else:
                batch.append(logits.argmax(-1))
        draft_time = time.perf_counter() - t0
        stats.draft_time_s += draft_time
        stats.draft_calls += g
        return q_probs, draft_time

    def _verify(self, batch: _Batch, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """2. One target call over its pending column(s) + the ``g`` drafts -> ``p_1 .. p_{g+1}`` ``(B, g+1, V)``
        (``p_logits[:, i]`` scores the token in column ``W-g+i``) and the drafts ``(B, g)``."""
        logits = self._forward(self.target, batch.target_cache, batch, batch.target_len, batch.width)
        batch.target_len = batch.width
        return logits[:, -(g + 1):], batch.tokens[:, batch.width - g:]

    def _accept(self, p_logits: torch.Tensor, drafts: torch.Tensor, q_probs: list, sampling: dict | None,
                generator) -> tuple[torch.Tensor, torch.Tensor]:
        """3. Accept or reject each draft: ``n[b]`` = the accepted prefix length, ``next_tok[b]`` = the correction
        (sampled from ``norm(max(0, p - q))`` at the first rejection) or the bonus token ``~ p_{g+1}``."""
        g, n_batch = drafts.shape[1], drafts.shape[0]
        if sampling is None:  # greedy: a draft is accepted iff it is the target's argmax
            target_tok = p_logits.argmax(-1)  # (B, g+1)
            n = (drafts == target_tok[:, :g]).long().cumprod(1).sum(1)  # (B,)
            return n, target_tok.gather(1, n[:, None]).squeeze(1)
        p = logits_to_probs(p_logits, **sampling)  # (B, g+1, V)
        if g:
            q = torch.stack(q_probs, 1)  # (B, g, V)
            p_d = p[:, :g].gather(-1, drafts[..., None]).squeeze(-1)
            q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
            u = torch.rand(p_d.shape, generator=generator, device=p_d.device)
            accept = self._accept_sampling(p_d, q_d, u)
            residual = (p[:, :g] - q).clamp_min(0)  # norm(max(0, p - q)) at a rejected position
            mass = residual.sum(-1, keepdim=True)
            residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[:, :g])
            dist = torch.cat([residual, p[:, g:]], 1)  # (B, g+1, V); the last entry is the bonus p_{g+1}
        else:
            accept = torch.zeros(n_batch, 0, dtype=torch.bool, device=p.device)
            dist = p
        n = accept.long().cumprod(1).sum(1)  # (B,)
        return n, self._sample(dist[torch.arange(n_batch, device=dist.device), n], generator)

    @staticmethod
    def _roll_back(batch: _Batch, g: int, n: torch.Tensor, next_tok: torch.Tensor) -> None:
        """4. Rejected drafts become holes; columns no row accepted leave both caches; ``next_tok`` is appended as
        the new pending column of both models."""
        if g:
            batch.valid[:, batch.width - g:] &= torch.arange(g, device=n.device) < n[:, None]
            keep = batch.width - g + int(n.max())
            batch.tokens, batch.valid = batch.tokens[:, :keep], batch.valid[:, :keep]
            _crop(batch.target_cache, batch.target_len, keep)
            _crop(batch.draft_cache, batch.draft_len, keep)
            batch.target_len, batch.draft_len = keep, min(batch.draft_len, keep)
        batch.append(next_tok)  # pending for both models: fed with the next drafts

    def _adapt_gamma(self, state: _GammaState, g: int, n: torch.Tensor, draft_time: float, verify_time: float):
        """6. Maximise Leviathan's expected speedup for the running acceptance rate and draft/target cost ratio."""
        judged = n.sum().item() + (n < g).sum().item()
        state.alpha = 0.8 * state.alpha + 0.2 * (n.sum().item() / max(judged, 1))
        if self.fixed_cost_ratio is None:
            c = (draft_time / g) / max(verify_time, 1e-9)
            state.cost = c if state.cost is None else 0.8 * state.cost + 0.2 * c
        state.gamma = optimal_gamma(state.alpha, state.cost, self.max_gamma)

    @staticmethod
    def _output(input_ids: torch.Tensor, generated: list[list[int]], pad_token_id: int,
                stats: SpeculativeStats) -> SpeculativeOutput:
        stats.new_tokens = sum(len(g) for g in generated)
        longest = max(len(g) for g in generated)
        new = torch.full((len(generated), longest), pad_token_id, dtype=input_ids.dtype)
        for i, g in enumerate(generated):
            new[i, : len(g)] = torch.tensor(g, dtype=input_ids.dtype)
        return SpeculativeOutput(torch.cat([input_ids.cpu(), new], 1), generated, stats)

    # ------------------------------------------------------------------------------------------- bookkeeping

    @staticmethod
    def _record(stats: SpeculativeStats, g: int, n: torch.Tensor, n_batch: int) -> None:
        stats.gammas.append(g)
        stats.row_steps += n_batch
        stats.drafted_tokens += g * n_batch
        stats.accepted_tokens += int(n.sum())
        stats.rejected_steps += int((n < g).sum())
        stats.emitted_tokens += int(n.sum()) + n_batch
        if len(stats.position_drafted) < g:
            grow = g - len(stats.position_drafted)
            stats.position_drafted += [0] * grow
            stats.position_accepted += [0] * grow
        counts = torch.bincount(n, minlength=g + 1).tolist()  # rows with exactly k accepted
        at_least = 0
        for i in range(g - 1, -1, -1):
            at_least += counts[i + 1]
            stats.position_drafted[i] += n_batch
            stats.position_accepted[i] += at_least

    @staticmethod
    def _emit(batch: _Batch, drafts, n, next_tok, generated, eos: set[int]) -> torch.Tensor:
        finished = torch.zeros(batch.rows.numel(), dtype=torch.bool)
        drafts, n, next_tok = drafts.tolist(), n.tolist(), next_tok.tolist()
        remaining = batch.remaining.tolist()
        for b, row in enumerate(batch.rows.tolist()):
            for tok in drafts[b][: n[b]] + [next_tok[b]]:
                generated[row].append(tok)
                remaining[b] -= 1
                if tok in eos or remaining[b] == 0:
                    finished[b] = True
                    break
        batch.remaining = torch.tensor(remaining, device=batch.remaining.device)
        return finished.to(batch.rows.device)

    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is None:
            gen_config = getattr(self.target, "generation_config", None)
            eos_token_id = getattr(gen_config, "eos_token_id", None)
            if eos_token_id is None and self.tokenizer is not None:
                eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return set()
        return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)

    def _pad_id(self, pad_token_id, eos: set[int]) -> int:
        if pad_token_id is not None:
            return pad_token_id
        for source in (self.tokenizer, getattr(self.target, "generation_config", None)):
            if getattr(source, "pad_token_id", None) is not None:
                return source.pad_token_id
        return min(eos) if eos else 0

