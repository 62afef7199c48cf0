"""Speculative decoding: lossless greedy and sampling, acceptance statistics, rollback, batching, errors."""

from __future__ import annotations

import copy
import itertools
import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
from conftest import make_llama

from llm_distill.models import cache_kwarg

from llm_distill.speculative import (
    SpeculativeDecoder,
    VocabularyMismatchError,
    expected_accepted_length,
    expected_speedup,
    logits_to_probs,
    optimal_gamma,
)


# ------------------------------------------------------------------------------------------------ stubs


class MarkovLM(torch.nn.Module):
    """A hand-built LM whose next-token logits depend only on the current token: ``table[token]`` (V, V).

    Its sequence distribution is known exactly, so sampling can be compared with the truth; it ignores the
    KV cache, so it also checks that the decoder's bookkeeping never relies on the cache's content.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=table.shape[0])
        self.calls = 0

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def successor_table(v: int, overrides: dict | None = None) -> torch.Tensor:
    """Greedy chain x -> x + 1 (mod v), with ``overrides`` {x: y} sending x to y instead."""
    table = torch.zeros(v, v)
    for x in range(v):
        table[x, (overrides or {}).get(x, (x + 1) % v)] = 5.0
    return table


def greedy_chain(table: torch.Tensor, start: int, n: int) -> list[int]:
    out, x = [], start
    for _ in range(n):
        x = int(table[x].argmax())
        out.append(x)
    return out


def noisy_copy(model, scale: float, seed: int = 0):
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return draft


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int, pad: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------- greedy: real models


@pytest.fixture(scope="module")
def llama_pair(tiny_tokenizer):
    target = make_llama(tiny_tokenizer, seed=2, num_hidden_layers=2)
    return target, {"noisy": noisy_copy(target, 0.1), "independent": make_llama(tiny_tokenizer, seed=7)}


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ["def fibonacci(n):\n    ", "import os\nimport sys\n\nclass Foo:", "x = [", "    return self._"]
    return [tiny_tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("draft_name", ["noisy", "independent"])
@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_greedy_equals_target_greedy_batch_1_and_batched(llama_pair, prompts, tiny_tokenizer, draft_name, gamma):
    target, drafts = llama_pair
    pad, max_new = tiny_tokenizer.pad_token_id, 24
    # An EOS the target really emits, first at its 5th+ greedy token for prompt 0 (gamma=8 drafts past it).
    free = hf_greedy(target, prompts[0], max_new, eos=-1, pad=pad)
    stop = next(i for i in range(4, max_new) if free[i] not in free[:i])
    eos = free[stop]
    reference = [hf_greedy(target, p, max_new, eos, pad) for p in prompts]
    assert reference[0] == free[: stop + 1]
    decoder = SpeculativeDecoder(target, drafts[draft_name], tiny_tokenizer, gamma=gamma)

    for i, p in enumerate(prompts):  # batch size 1
        assert decoder.generate([p], max_new_tokens=max_new, eos_token_id=eos).generated[0] == reference[i]
    out = decoder.generate(prompts, max_new_tokens=max_new, eos_token_id=eos)  # batch 4, ragged lengths
    assert out.generated == reference
    s = out.stats
    assert s.new_tokens == sum(len(r) for r in reference)
    assert 0.0 <= s.acceptance_rate <= 1.0 and 1.0 <= s.mean_accepted_length <= gamma + 1
    assert s.emitted_tokens == s.accepted_tokens + s.row_steps
    # sequences = the prompts, left-padded as passed, followed by the new tokens padded with pad_token_id
    width = max(map(len, prompts))
    for row, p, r in zip(out.sequences.tolist(), prompts, reference):
        assert row[width - len(p): width] == p and row[width: width + len(r)] == r
        assert all(t == pad for t in row[width + len(r):])


def test_noisy_draft_gives_partial_ragged_acceptance(llama_pair, prompts, tiny_tokenizer):
    target, drafts = llama_pair
    out = SpeculativeDecoder(target, drafts["noisy"], tiny_tokenizer, gamma=4).generate(prompts, max_new_tokens=32,
                                                                                        eos_token_id=-1)
    assert 0.1 < out.stats.acceptance_rate < 0.95  # the batch really mixes accepted and rejected drafts
    acc = out.stats.per_position_acceptance
    assert all(a >= b for a, b in zip(acc, acc[1:]))  # "first i+1 accepted" can only shrink with i


def test_tensor_input_left_or_right_padded_and_compaction_are_exact(llama_pair, prompts, tiny_tokenizer):
    target, drafts = llama_pair
    pad = tiny_tokenizer.pad_token_id
    decoder = SpeculativeDecoder(target, drafts["noisy"], tiny_tokenizer, gamma=3)
    expected = decoder.generate(prompts, max_new_tokens=20, eos_token_id=-1).generated
    width = max(map(len, prompts))
    right = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    assert decoder.generate(right, mask, max_new_tokens=20, eos_token_id=-1).generated == expected
    compacting = SpeculativeDecoder(target, drafts["noisy"], tiny_tokenizer, gamma=3, compact_threshold=1)
    out = compacting.generate(prompts, max_new_tokens=20, eos_token_id=-1)
    assert out.generated == expected and out.stats.compactions > 0


def test_gamma_zero_is_target_only_decoding(llama_pair, prompts, tiny_tokenizer):
    target, drafts = llama_pair
    pad = tiny_tokenizer.pad_token_id
    out = SpeculativeDecoder(target, drafts["noisy"], tiny_tokenizer).generate(prompts, max_new_tokens=12, gamma=0,
                                                                              eos_token_id=-1)
    assert out.generated == [hf_greedy(target, p, 12, -1, pad) for p in prompts]
    assert out.stats.draft_calls == 0 and out.stats.target_calls == 12


def test_max_new_tokens_respected_per_row(llama_pair, prompts, tiny_tokenizer):
    target, drafts = llama_pair
    for max_new in (1, 2, 5):
        out = SpeculativeDecoder(target, drafts["noisy"], tiny_tokenizer, gamma=8).generate(
            prompts, max_new_tokens=max_new, eos_token_id=-1)
        assert [len(g) for g in out.generated] == [max_new] * len(prompts)


# --------------------------------------------------------------------------------- acceptance: stubs


def test_target_as_its_own_draft_accepts_everything(llama_pair, prompts, tiny_tokenizer):
    target, _ = llama_pair
    gamma, max_new = 3, 16  # 16 = 4 steps of gamma + 1
    decoder = SpeculativeDecoder(target, target, tiny_tokenizer, gamma=gamma)
    for do_sample in (False, True):
        out = decoder.generate(prompts, max_new_tokens=max_new, eos_token_id=-1, do_sample=do_sample,
                               generator=torch.Generator().manual_seed(0))
        assert out.stats.acceptance_rate == 1.0 and out.stats.alpha == 1.0
        assert out.stats.mean_accepted_length == gamma + 1
        assert out.stats.target_calls == max_new // (gamma + 1)
        assert out.stats.per_position_acceptance == [1.0] * gamma


def test_cache_goes_under_the_name_each_forward_takes(llama_pair):
    """transformers 5.x's ``cache`` where the forward takes it (``past_key_values`` is deprecated, gone in 5.40), the
    old name for models that only know it (like the stub). HF forwards swallow unknown kwargs, so a wrong name would
    silently run without the cache."""
    import inspect

    target, _ = llama_pair
    if "cache" in inspect.signature(type(target).forward).parameters:  # transformers releases after the rename
        assert cache_kwarg(target) == "cache"
        with pytest.warns(FutureWarning, match="past_key_values"):  # what the old name costs on these releases
            target(input_ids=torch.tensor([[1, 2]]), past_key_values=None, use_cache=True)
    else:
        assert cache_kwarg(target) == "past_key_values"
    assert cache_kwarg(MarkovLM(successor_table(4))) == "past_key_values"


def test_stub_always_accept():
    table = successor_table(6)
    out = SpeculativeDecoder(MarkovLM(table), MarkovLM(table), gamma=4).generate([[0]], max_new_tokens=10,
                                                                                 eos_token_id=-1)
    assert out.generated[0] == greedy_chain(table, 0, 10)
    assert out.stats.acceptance_rate == 1.0 and out.stats.target_calls == 2  # 5 + 5 tokens


def test_stub_never_accept():
    target = successor_table(6)
    draft = successor_table(6, {x: x for x in range(6)})  # the draft always repeats: never the target's choice
    out = SpeculativeDecoder(MarkovLM(target), MarkovLM(draft), gamma=3).generate([[0], [2]], max_new_tokens=7,
                                                                                   eos_token_id=-1)
    assert out.generated == [greedy_chain(target, 0, 7), greedy_chain(target, 2, 7)]
    s = out.stats
    assert s.accepted_tokens == 0 and s.acceptance_rate == 0.0 and s.per_position_acceptance == [0.0] * 3
    assert s.target_calls == 7 and s.mean_accepted_length == 1.0  # one (corrected) token per target call


def test_stub_partial_acceptance_matches_reference_simulation():
    v, gamma, max_new = 7, 3, 20
    target = successor_table(v)
    draft = successor_table(v, {3: 0})  # the draft is wrong only after token 3
    starts = [0, 3, 5]

    def simulate(start):  # the algorithm by hand: accepted prefix of each step's drafts
        x, made, accepted, drafted, steps = start, 0, 0, 0, 0
        while made < max_new:
            g = min(gamma, max_new - made - 1)
            d, proposal = x, []
            for _ in range(g):
                d = int(draft[d].argmax())
                proposal.append(d)
            truth = greedy_chain(target, x, g + 1)
            n = next((i for i in range(g) if proposal[i] != truth[i]), g)
            accepted, drafted, steps, made, x = accepted + n, drafted + g, steps + 1, made + n + 1, truth[n]
        return accepted, drafted, steps

    for start in starts:  # batch 1: exact counters
        out = SpeculativeDecoder(MarkovLM(target), MarkovLM(draft), gamma=gamma).generate(
            [[start]], max_new_tokens=max_new, eos_token_id=-1)
        accepted, drafted, steps = simulate(start)
        assert out.generated[0] == greedy_chain(target, start, max_new)
        assert (out.stats.accepted_tokens, out.stats.drafted_tokens, out.stats.target_calls) == (accepted, drafted, steps)
        assert 0 < out.stats.acceptance_rate < 1
    out = SpeculativeDecoder(MarkovLM(target), MarkovLM(draft), gamma=gamma).generate(
        [[s] for s in starts], max_new_tokens=max_new, eos_token_id=-1)
    assert out.generated == [greedy_chain(target, s, max_new) for s in starts]


def test_eos_stops_each_row_and_drafts_past_it_are_dropped():
    table = successor_table(8)
    out = SpeculativeDecoder(MarkovLM(table), MarkovLM(table), gamma=6).generate(
        [[0], [4], [6]], max_new_tokens=10, eos_token_id=5)
    assert out.generated == [[1, 2, 3, 4, 5], [5], [7, 0, 1, 2, 3, 4, 5]]


# -------------------------------------------------------------------------------- sampling: lossless


def chi2_critical(dof: int, p_value: float = 1e-4) -> float:
    """Upper chi-square quantile (Wilson-Hilferty approximation, accurate to ~1% for dof >= 10)."""
    z = NormalDist().inv_cdf(1 - p_value)
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def sequence_distribution(table: torch.Tensor, start: int, length: int, **sampling) -> dict[tuple, float]:
    probs = logits_to_probs(table, **sampling)
    out = {}
    for seq in itertools.product(range(table.shape[0]), repeat=length):
        p, x = 1.0, start
        for t in seq:
            p, x = p * float(probs[x, t]), t
        out[seq] = p
    return out


def chi_square(samples: list[list[int]], exact: dict[tuple, float]) -> tuple[float, int]:
    n = len(samples)
    counts = {}
    for s in samples:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    if not set(counts) <= {k for k, p in exact.items() if p > 0}:
        return math.inf, 1  # a sequence the target gives probability 0 (top-k / top-p cut it) was sampled
    support = [k for k, p in exact.items() if p > 0]
    stat = sum((counts.get(k, 0) - n * exact[k]) ** 2 / (n * exact[k]) for k in support)
    return stat, len(support) - 1


class AlwaysAccept(SpeculativeDecoder):
    """Negative control: skips the rejection test, so it samples from the draft, not the target."""

    @staticmethod
    def _accept_sampling(p_draft, q_draft, u):
        return torch.ones_like(u, dtype=torch.bool)


SAMPLINGS = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=3, top_p=0.9)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["plain", "T0.7_k3_p0.9"])
@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_sampling_is_lossless_and_always_accept_is_not(sampling, gamma):
    gen = torch.Generator().manual_seed(0)
    v, n, length = 4, 20_000, 3
    target = torch.randn(v, v, generator=gen) * 1.5
    draft = torch.randn(v, v, generator=gen) * 1.5  # a poor draft: acceptance far from 1
    exact = sequence_distribution(target, 0, length, **sampling)
    batch = [[0]] * n  # 20k rows in one batch: ragged acceptance at every step
    for cls, should_pass in ((SpeculativeDecoder, True), (AlwaysAccept, False)):
        out = cls(MarkovLM(target), MarkovLM(draft), gamma=gamma).generate(
            batch, max_new_tokens=length, do_sample=True, eos_token_id=-1, generator=torch.Generator().manual_seed(1),
            **sampling)
        if should_pass:
            assert 0.05 < out.stats.acceptance_rate < 0.95
        stat, dof = chi_square(out.generated, exact)
        assert (stat < chi2_critical(dof)) == should_pass, (cls.__name__, stat, chi2_critical(dof))


def test_logits_to_probs_top_k_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert torch.allclose(logits_to_probs(logits), logits.softmax(-1))
    assert (logits_to_probs(logits, top_k=2) > 0).tolist() == [True, True, False, False]
    p = logits.softmax(-1)  # [0.61, 0.22, 0.14, 0.03]
    assert (logits_to_probs(logits, top_p=0.7) > 0).tolist() == [True, True, False, False]
    assert (logits_to_probs(logits, top_p=0.5) > 0).tolist() == [True, False, False, False]
    assert torch.allclose(logits_to_probs(logits, temperature=0.5), (logits / 0.5).softmax(-1))
    assert float(p[0]) > 0.5


# ------------------------------------------------------------------------------------- adaptive, formulas


def test_adaptive_gamma_is_exact_and_grows_with_a_perfect_draft(llama_pair, prompts, tiny_tokenizer):
    target, drafts = llama_pair
    pad = tiny_tokenizer.pad_token_id
    decoder = SpeculativeDecoder(target, drafts["noisy"], tiny_tokenizer, gamma=2, adaptive_gamma=True,
                                 max_gamma=6, cost_ratio=0.2)
    out = decoder.generate(prompts, max_new_tokens=24, eos_token_id=-1)
    assert out.generated == [hf_greedy(target, p, 24, -1, pad) for p in prompts]
    perfect = SpeculativeDecoder(target, target, tiny_tokenizer, gamma=1, adaptive_gamma=True, max_gamma=6,
                                 cost_ratio=0.05).generate(prompts[:1], max_new_tokens=40, eos_token_id=-1)
    assert perfect.stats.gammas[0] == 1 and max(perfect.stats.gammas) == 6


def test_leviathan_formulas():
    assert expected_accepted_length(0.0, 5) == 1.0 and expected_accepted_length(1.0, 5) == 6.0
    assert math.isclose(expected_accepted_length(0.5, 2), 1.75)
    assert math.isclose(expected_speedup(0.5, 2, 0.25), 1.75 / 1.5)
    assert optimal_gamma(0.9, 0.01, 20) > optimal_gamma(0.5, 0.01, 20) >= 1
    assert optimal_gamma(0.3, 1.0, 20) == 1


# ---------------------------------------------------------------------------------------------- errors


def test_vocabulary_mismatch_is_refused_with_the_fix(tiny_tokenizer):
    with pytest.raises(VocabularyMismatchError, match="same tokenizer"):
        SpeculativeDecoder(MarkovLM(torch.zeros(5, 5)), MarkovLM(torch.zeros(6, 6)))


def test_bad_arguments_fail_before_compute():
    table = successor_table(4)
    with pytest.raises(ValueError, match="gamma=0"):
        SpeculativeDecoder(MarkovLM(table), MarkovLM(table), gamma=0)
    decoder = SpeculativeDecoder(MarkovLM(table), MarkovLM(table))
    with pytest.raises(ValueError, match="temperature"):
        decoder.generate([[0]], do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate([[0]], max_new_tokens=0)
    with pytest.raises(ValueError, match="no tokens"):
        decoder.generate([[0], []])
    with pytest.raises(ValueError, match="top_p"):
        decoder.generate([[0]], top_p=0.0)


def test_bench_chat_prompts_apply_the_chat_template(tiny_tokenizer, tmp_path):
    """prompt_format='chat': each row's 'prompt' (or 'messages', the answer dropped) through the template, whole."""
    from llm_distill.jobs.bench_speculative import BenchArguments, load_prompt_ids

    from conftest import write_jsonl

    rows = [{"prompt": f"What is {i} + {i}?"} for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]})
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prompts = load_prompt_ids(str(path), tiny_tokenizer, 4, 48, seed=0, prompt_format="chat")
    expected = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                   return_dict=False)
                for c in [f"What is {i} + {i}?" for i in range(3)] + ["Name a colour."]]
    assert sorted(prompts) == sorted(expected)
    assert all(tiny_tokenizer.decode(p).endswith("<|assistant|>\n") for p in prompts)  # the answer's turn opened
    with pytest.raises(ValueError, match="row 1: prompt_format='chat' needs a 'prompt' or 'messages'"):
        load_prompt_ids(str(write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])), tiny_tokenizer, 1, 8, 0, "chat")
    with pytest.raises(ValueError, match="prompt_format='poem' is invalid"):
        BenchArguments(prompt_format="poem")
