"""Job: the speculative-decoding benchmark: acceptance, measured vs predicted speedup, HF assisted generation.

    python scripts/bench_speculative.py [--key value ...]
    llm-distill bench-speculative [--key value ...]

This module holds the logic so tests and the DistillSpec recipe reuse it. All methods run in ONE process and are interleaved round by round (median of rounds), so
load from other processes hits them alike; only ratios measured within one run are compared.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm_distill.config import parse_args_and_config
from llm_distill.data import DataValidationError
from llm_distill.embedded import resolve
from llm_distill.jobs import check_demo_inputs
from llm_distill.jsonl import read_jsonl
from llm_distill.models import load_causal_lm, load_tokenizer
from llm_distill.speculative import SpeculativeDecoder, check_gamma, expected_speedup

logger = logging.getLogger(__name__)

DEFAULT_DRAFT = "outputs/spec_draft"
PROMPT_FORMATS = ("window", "chat")


@dataclass
class BenchArguments:
    target_model: str = field(default="embedded:teacher", metadata={"help": "Target: hub id, path or embedded:*."})
    draft_model: str = field(
        default="outputs/spec_draft",
        metadata={"help": "Draft with the target's tokenizer. Default: the KD student made by "
                          "`python scripts/distill.py --output_dir outputs/spec_draft`."},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the target's)."})
    prompts: str = field(default="embedded:heldout", metadata={"help": "JSONL with a 'text' or 'prompt' field."})
    prompt_format: str = field(
        default="window",
        metadata={"help": "'window': a window of prompt_tokens tokens from each row's text; 'chat': each row's "
                          "'prompt' (a user message) or 'messages' (a list of {role, content}) through the "
                          "tokenizer's chat template, whole, with the assistant turn opened."},
    )
    num_prompts: int = field(default=12, metadata={"help": "Prompts (windows of held-out files)."})
    prompt_tokens: int = field(default=48, metadata={"help": "Tokens per prompt."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per prompt."})
    gammas: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8], metadata={"help": "Draft lengths swept."})
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0],
                                      metadata={"help": "0 = greedy; > 0 = sampling at that temperature."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the batched runs (ours only; HF refuses > 1)."})
    rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds; medians are reported."})
    hf_assisted: bool = field(default=True, metadata={"help": "Also time transformers' assisted generation."})
    threads: int = field(default=1, metadata={"help": "torch threads (1 = steadier timings on a shared CPU)."})
    seed: int = field(default=0, metadata={"help": "Seed for prompt windows and sampling."})
    output: str = field(default="bench_results/speculative.json", metadata={"help": "JSON results."})
    plot: str = field(default="bench_results/speculative.png", metadata={"help": "PNG plot ('' to skip)."})

    def __post_init__(self):
        for name in ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size", "rounds", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an integer >= 1.")
        if not self.gammas:
            raise ValueError("gammas=[] is invalid: expected a list of integers >= 1.")
        for gamma in self.gammas:
            check_gamma(gamma)
        if any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures={self.temperatures} is invalid: expected values >= 0 (0 = greedy).")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={self.prompt_format!r} is invalid: choose one of {PROMPT_FORMATS}.")


def chat_prompt_ids(path: str, rows: list[dict], tokenizer, num_prompts: int) -> list[list[int]]:
    """The first ``num_prompts`` rows as chat prompts: the template applied, the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataValidationError(f"prompt_format='chat' needs a tokenizer with a chat template; {path}'s tokenizer has none. "
                         "Use prompt_format='window' or a chat model's tokenizer.")
    prompts = []
    for i, row in enumerate(rows[:num_prompts]):
        messages = row.get("messages") or ([{"role": "user", "content": row["prompt"]}] if "prompt" in row else None)
        if not messages:
            raise DataValidationError(f"{path} row {i + 1}: prompt_format='chat' needs a 'prompt' or 'messages' field, "
                             f"has {sorted(row)}.")
        if messages[-1].get("role") == "assistant":  # a finished conversation: prompt with everything before the answer
            messages = messages[:-1]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    if len(prompts) < num_prompts:
        raise DataValidationError(f"{path}: {len(prompts)} rows, num_prompts={num_prompts}; lower num_prompts.")
    return prompts


def load_prompt_ids(path: str, tokenizer, num_prompts: int, prompt_tokens: int, seed: int,
                    prompt_format: str = "window") -> list[list[int]]:
    """``num_prompts`` windows of ``prompt_tokens`` tokens, one per file/row, at seeded random offsets; or, with
    ``prompt_format="chat"``, ``num_prompts`` seeded rows as chat prompts (:func:`chat_prompt_ids`)."""
    rows = []
    for where, row in read_jsonl(path, DataValidationError):
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise DataValidationError(f"{where}: each line must be a JSON object, got {type(row).__name__}.")
        rows.append((where, row))
    rng = random.Random(seed)
    rng.shuffle(rows)
    if prompt_format == "chat":
        return chat_prompt_ids(path, [row for _, row in rows], tokenizer, num_prompts)
    prompts = []
    for where, row in rows:
        text = row.get("text") or row.get("prompt")
        if text is None:
            raise DataValidationError(f"{where}: needs a 'text' or 'prompt' field, has {sorted(row)}.")
        ids = tokenizer(text[:20_000])["input_ids"]
        if len(ids) < prompt_tokens + 16:
            continue
        start = rng.randrange(0, len(ids) - prompt_tokens - 16)
        prompts.append(ids[start: start + prompt_tokens])
        if len(prompts) == num_prompts:
            return prompts
    raise DataValidationError(f"{path}: only {len(prompts)} rows are longer than {prompt_tokens + 16} tokens; lower "
                     "num_prompts or prompt_tokens.")


def batches(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def sampling_kwargs(temperature: float) -> dict:
    return {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}


def run_ours(decoder: SpeculativeDecoder, prompts, gamma: int, temperature: float, batch_size: int, max_new: int,
             seed: int) -> dict:
    """Our decoder over all prompts; returns tokens/s and the merged statistics (gamma=0: target only)."""
    gen = torch.Generator().manual_seed(seed)
    agg, outputs, new_tokens, wall = {}, [], 0, 0.0
    for chunk in batches(prompts, batch_size):
        out = decoder.generate(chunk, max_new_tokens=max_new, gamma=gamma, generator=gen, **sampling_kwargs(temperature))
        s = out.stats
        outputs += out.generated
        new_tokens += s.new_tokens
        wall += s.wall_time_s
        for k in ("drafted_tokens", "accepted_tokens", "emitted_tokens", "row_steps", "rejected_steps", "target_calls",
                  "draft_calls", "target_time_s", "draft_time_s", "prefill_time_s"):
            agg[k] = agg.get(k, 0) + getattr(s, k)
        pos_d, pos_a = agg.setdefault("position_drafted", []), agg.setdefault("position_accepted", [])
        for i, (d, a) in enumerate(zip(s.position_drafted, s.position_accepted)):
            if i == len(pos_d):
                pos_d.append(0), pos_a.append(0)
            pos_d[i] += d
            pos_a[i] += a
    agg.update(new_tokens=new_tokens, wall_time_s=wall, tokens_per_second=new_tokens / wall, outputs=outputs)
    return agg


def run_hf(target, draft, prompts, gamma: int, temperature: float, max_new: int, pad_id: int, seed: int) -> dict:
    """transformers ``generate``: target-only (draft=None) or assisted generation with a fixed gamma, batch 1."""
    kwargs = sampling_kwargs(temperature)
    if draft is not None:
        draft.generation_config.num_assistant_tokens = gamma
        draft.generation_config.num_assistant_tokens_schedule = "constant"  # fixed gamma, no heuristic
        draft.generation_config.assistant_confidence_threshold = 0  # never stop drafting early
        kwargs["assistant_model"] = draft
    torch.manual_seed(seed)
    outputs, new_tokens, t0 = [], 0, time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, pad_token_id=pad_id,
                              **kwargs)
        outputs.append(out[0, len(p):].tolist())
        new_tokens += out.shape[1] - len(p)
    wall = time.perf_counter() - t0
    return {"new_tokens": new_tokens, "wall_time_s": wall, "tokens_per_second": new_tokens / wall, "outputs": outputs}


def summarise(agg: dict) -> dict:
    """Acceptance figures from merged counters (the same definitions as ``SpeculativeStats``)."""
    d, a = agg.get("drafted_tokens", 0), agg.get("accepted_tokens", 0)
    judged = a + agg.get("rejected_steps", 0)
    return {
        "acceptance_rate": a / d if d else None,
        "alpha": a / judged if judged else None,
        "mean_accepted_length": agg["emitted_tokens"] / agg["row_steps"] if agg.get("row_steps") else None,
        "per_position_acceptance": [x / y for x, y in zip(agg.get("position_accepted", []),
                                                          agg.get("position_drafted", [])) if y],
        "draft_call_s": agg["draft_time_s"] / agg["draft_calls"] if agg.get("draft_calls") else None,
        "verify_call_s": agg["target_time_s"] / agg["target_calls"] if agg.get("target_calls") else None,
    }


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run_benchmark(args: BenchArguments) -> dict:
    """Every method, interleaved round by round in this process; returns the results (``format_table`` prints them)."""
    check_demo_inputs(args, "target_model", ("draft_model", "prompts"))
    names, args = args, replace(args, **{name: resolve(getattr(args, name))
                                          for name in ("target_model", "draft_model", "tokenizer", "prompts")})
    torch.set_num_threads(args.threads)
    if args.draft_model == DEFAULT_DRAFT and not Path(DEFAULT_DRAFT).is_dir():
        raise FileNotFoundError(f"The default draft {DEFAULT_DRAFT} does not exist. Make it with `python "
                                "scripts/distill.py --output_dir outputs/spec_draft` (~2 min), or pass --draft_model.")
    tokenizer = load_tokenizer(args.tokenizer or args.target_model)
    prompts = load_prompt_ids(args.prompts, tokenizer, args.num_prompts, args.prompt_tokens, args.seed,
                              args.prompt_format)
    target = load_causal_lm(args.target_model, "float32").eval()
    draft = load_causal_lm(args.draft_model, "float32").eval()
    decoder = SpeculativeDecoder(target, draft, tokenizer)
    pad = tokenizer.pad_token_id
    results = {"config": asdict(names), "device": "cpu", "torch_threads": args.threads, "runs": []}

    # Warm up every code path once (allocator, kernels) before anything is timed.
    run_ours(decoder, prompts[:2], 2, 0.0, 2, 8, args.seed)
    run_hf(target, None, prompts[:1], 0, 0.0, 8, pad, args.seed)
    run_hf(target, draft, prompts[:1], 2, 0.0, 8, pad, args.seed)

    methods = []  # (name, gamma, temperature, batch_size, callable)
    for temp in args.temperatures:
        methods.append(("target_only", 0, temp, 1, lambda t=temp: run_ours(decoder, prompts, 0, t, 1, args.max_new_tokens, args.seed)))
        methods.append(("hf_target_only", 0, temp, 1, lambda t=temp: run_hf(target, None, prompts, 0, t, args.max_new_tokens, pad, args.seed)))
        methods.append(("target_only", 0, temp, args.batch_size, lambda t=temp: run_ours(decoder, prompts, 0, t, args.batch_size, args.max_new_tokens, args.seed)))
        for g in args.gammas:
            methods.append(("speculative", g, temp, 1, lambda g=g, t=temp: run_ours(decoder, prompts, g, t, 1, args.max_new_tokens, args.seed)))
            methods.append(("speculative", g, temp, args.batch_size, lambda g=g, t=temp: run_ours(decoder, prompts, g, t, args.batch_size, args.max_new_tokens, args.seed)))
            if args.hf_assisted:
                methods.append(("hf_assisted", g, temp, 1, lambda g=g, t=temp: run_hf(target, draft, prompts, g, t, args.max_new_tokens, pad, args.seed)))
    timings: dict[tuple, list[dict]] = {m[:4]: [] for m in methods}
    with tqdm(total=args.rounds * len(methods), desc="bench_speculative", dynamic_ncols=True) as bar:
        for r in range(args.rounds):  # interleave: every method once per round, in a rotated order
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for name, g, temp, bs, fn in order:
                timings[(name, g, temp, bs)].append(fn())
                bar.update(1)

    for (name, g, temp, bs), runs in timings.items():
        first = runs[0]
        entry = {"method": name, "gamma": g, "temperature": temp, "batch_size": bs,
                 "tokens_per_second": median_of(runs, "tokens_per_second"),
                 "tokens_per_second_rounds": [r["tokens_per_second"] for r in runs], "new_tokens": first["new_tokens"]}
        if name in ("speculative", "target_only"):
            merged = {k: sum(r[k] for r in runs) if not isinstance(first[k], list) else first[k]
                      for k in first if k not in ("outputs", "tokens_per_second")}
            merged["position_drafted"] = [sum(x) for x in zip(*(r["position_drafted"] for r in runs))] if g else []
            merged["position_accepted"] = [sum(x) for x in zip(*(r["position_accepted"] for r in runs))] if g else []
            entry.update(summarise(merged))
        results["runs"].append(entry)
    _derive(results, timings)
    return results


def _derive(results: dict, timings: dict) -> None:
    """Speedups vs target-only (same temperature and batch size), Leviathan's prediction, greedy equality."""
    base = {(r["temperature"], r["batch_size"]): r for r in results["runs"] if r["method"] == "target_only"}
    hf_base = {r["temperature"]: r for r in results["runs"] if r["method"] == "hf_target_only"}
    for r in results["runs"]:
        b = base[(r["temperature"], r["batch_size"])]
        r["speedup_vs_target_only"] = r["tokens_per_second"] / b["tokens_per_second"]
        if r["method"] == "hf_assisted":
            r["speedup_vs_hf_target_only"] = r["tokens_per_second"] / hf_base[r["temperature"]]["tokens_per_second"]
        if r["method"] == "speculative":
            # Leviathan's c: one draft call / one target decoding step (the target-only run at the same batch).
            c = r["draft_call_s"] / b["verify_call_s"]
            r["cost_ratio_c"] = c
            r["verify_cost_ratio"] = r["verify_call_s"] / b["verify_call_s"]  # (gamma+1)-token call / 1-token call
            r["predicted_speedup"] = expected_speedup(r["alpha"], r["gamma"], c)
            r["measured_over_predicted"] = r["speedup_vs_target_only"] / r["predicted_speedup"]
            hf = next((h for h in results["runs"] if h["method"] == "hf_assisted" and h["gamma"] == r["gamma"]
                       and h["temperature"] == r["temperature"]), None)
            if hf is not None and r["batch_size"] == 1:
                r["speedup_vs_hf_assisted"] = r["tokens_per_second"] / hf["tokens_per_second"]
            if r["temperature"] == 0:
                ref = timings[("target_only", 0, 0.0, 1)][0]["outputs"]
                r["greedy_matches_target_only"] = timings[("speculative", r["gamma"], 0.0, r["batch_size"])][0]["outputs"] == ref
    for r in results["runs"]:
        if r["method"] == "hf_assisted" and r["temperature"] == 0:
            ref = timings[("target_only", 0, 0.0, 1)][0]["outputs"]
            r["greedy_matches_target_only"] = timings[("hf_assisted", r["gamma"], 0.0, 1)][0]["outputs"] == ref


def format_table(results: dict) -> str:
    head = (f"{'method':<15}{'T':>4}{'bs':>4}{'γ':>3}{'tok/s':>9}{'speedup':>9}{'pred.':>7}{'meas/pred':>10}"
            f"{'accept':>8}{'alpha':>7}{'len':>6}{'c':>6}{'vs HF':>7}{'exact':>7}")
    lines = [head, "-" * len(head)]
    for r in results["runs"]:
        def f(key, fmt="{:.2f}"):
            v = r.get(key)
            return "-" if v is None else (str(v) if isinstance(v, bool) else fmt.format(v))
        lines.append(f"{r['method']:<15}{r['temperature']:>4.1f}{r['batch_size']:>4}{r['gamma']:>3}"
                     f"{r['tokens_per_second']:>9.1f}{f('speedup_vs_target_only'):>9}{f('predicted_speedup'):>7}"
                     f"{f('measured_over_predicted'):>10}{f('acceptance_rate'):>8}{f('alpha'):>7}"
                     f"{f('mean_accepted_length'):>6}{f('cost_ratio_c'):>6}{f('speedup_vs_hf_assisted'):>7}"
                     f"{f('greedy_matches_target_only'):>7}")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    spec = [r for r in results["runs"] if r["method"] == "speculative"]
    for temp in sorted({r["temperature"] for r in spec}):
        rows = [r for r in spec if r["temperature"] == temp and r["batch_size"] == 1]
        longest = max(rows, key=lambda r: r["gamma"])
        acc = longest["per_position_acceptance"]
        ax1.plot(range(1, len(acc) + 1), acc, marker="o", label=f"T={temp:g} (γ={longest['gamma']})")
        for bs in sorted({r["batch_size"] for r in spec}):
            rows = sorted((r for r in spec if r["temperature"] == temp and r["batch_size"] == bs), key=lambda r: r["gamma"])
            ax2.plot([r["gamma"] for r in rows], [r["speedup_vs_target_only"] for r in rows], marker="o",
                     label=f"ours T={temp:g} bs={bs}")
            if bs == 1:
                ax2.plot([r["gamma"] for r in rows], [r["predicted_speedup"] for r in rows], ls=":",
                         label=f"Leviathan predicted T={temp:g}")
        hf = sorted((r for r in results["runs"] if r["method"] == "hf_assisted" and r["temperature"] == temp),
                    key=lambda r: r["gamma"])
        if hf:
            ax2.plot([r["gamma"] for r in hf], [r["speedup_vs_target_only"] for r in hf], ls="--", marker="x",
                     label=f"HF assisted T={temp:g} bs=1")
    ax1.set(xlabel="draft position i", ylabel="P(first i drafts accepted)", title="Acceptance per position", ylim=(0, 1))
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xlabel="γ (draft tokens per step)", ylabel="speedup vs target-only (same batch)", title="Speedup vs γ")
    ax1.legend(), ax2.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    """``scripts/bench_speculative.py`` / ``llm-distill bench-speculative``: run, print the table, write JSON (+ plot)."""
    (args,) = parse_args_and_config((BenchArguments,), argv)
    results = run_benchmark(args)
    print(format_table(results))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return results
