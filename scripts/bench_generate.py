"""Throughput of the generator (refill and static batches) vs the one-prompt-at-a-time loop, on the embedded teacher.

    python scripts/bench_generate.py                                 # 64 prompts, 64 new tokens, greedy, 3 repeats
    python scripts/bench_generate.py --num_prompts 128 --batch_sizes 8 32 64 --repeats 3
    python scripts/bench_generate.py --generate_batch false          # without transformers' continuous batching

Same prompts (the first 8 lines of stdlib files, as in configs/generate.yaml), same max_new_tokens, greedy
decoding. "one-at-a-time" is the tutorial loop ``model.generate(**tokenizer(prompt, return_tensors="pt"))``
per prompt; "static" is ``llm_distill.generation`` with ``decoding=static`` (length-sorted, left-padded batches,
one ``generate`` each); "refill" is its default ``decoding=refill`` (``batch_size`` rows in flight, a finished
row's slot refilled at once); "generate_batch" is transformers' ``model.generate_batch`` (continuous batching,
paged cache). Tokens/s counts real response tokens (no EOS, no padding). Methods alternate across repeats and the
median is reported, because timings on a shared CPU are noisy. Prints a table and writes
``bench_results/generate.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import set_seed  # noqa: E402

from llm_distill.config import parse_args_and_config  # noqa: E402
from llm_distill.embedded import resolve  # noqa: E402
from llm_distill.generation import GenerateArguments, HFBackend, encode_prompts, load_prompts, plan_batches  # noqa: E402
from llm_distill.models import load_causal_lm, load_tokenizer  # noqa: E402

logger = logging.getLogger("bench_generate")


@dataclass
class BenchArguments:
    teacher_model: str = field(default="embedded:teacher", metadata={"help": "Teacher to generate with."})
    num_prompts: int = field(default=64, metadata={"help": "Prompts (first 8 lines of stdlib train files)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt."})
    batch_sizes: list[int] = field(default_factory=lambda: [8, 32], metadata={"help": "Batch sizes to measure."})
    repeats: int = field(default=3, metadata={"help": "Alternating repeats per method; the median is reported."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads for every method."})
    generate_batch: bool = field(
        default=True, metadata={"help": "Also time transformers' own continuous batching (model.generate_batch), "
                                        "at the largest batch size."}
    )
    output: str = field(default="bench_results/generate.json", metadata={"help": "Where the JSON results go."})
    seed: int = field(default=0, metadata={"help": "Seed."})


def one_at_a_time(model, tokenizer, texts: list[str], max_new_tokens: int) -> tuple[int, list[list[int]]]:
    """The tutorial loop: one prompt, one generate call."""
    outputs = []
    for text in texts:
        enc = tokenizer(text, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(until_eos(out[0, enc["input_ids"].shape[1]:].tolist(), tokenizer.eos_token_id))
    return sum(len(o) for o in outputs), outputs


def until_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def generator(backend: HFBackend, prompts, batch_size: int) -> tuple[int, list[list[int]]]:
    """``llm_distill.generation``: the backend's batches as the job runs them (length-sorted plan)."""
    by_index = {}
    for batch, completions in backend.generate_batches(plan_batches(prompts, batch_size), seed=0):
        for p, (c,) in zip(batch, completions):
            by_index[p.index] = c.token_ids
    outputs = [by_index[i] for i in sorted(by_index)]
    return sum(len(o) for o in outputs), outputs


def generate_batch(model, tokenizer, prompts, max_new_tokens: int, batch_size: int) -> tuple[int, list[list[int]]]:
    """transformers' continuous batching, its cache sized to this workload (left to itself on CPU it sizes the cache
    from the machine's memory, which took 7 s per call here)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    longest = max(len(p.input_ids) for p in prompts) + max_new_tokens
    cb = ContinuousBatchingConfig(page_size=64, num_blocks=len(prompts) * (longest // 64 + 1),
                                  max_batch_tokens=64 * batch_size, max_requests_per_batch=batch_size)
    results = model.generate_batch([p.input_ids for p in prompts], generation_config=config,
                                   continuous_batching_config=cb, warmup=False)
    outputs = [until_eos(list(r.generated_tokens), tokenizer.eos_token_id) for r in results.values()]  # input order
    return sum(len(o) for o in outputs), outputs


def main(argv: list[str]) -> dict:
    (b,) = parse_args_and_config((BenchArguments,), argv)
    torch.set_num_threads(b.threads)
    set_seed(b.seed)
    gen_args = GenerateArguments(teacher_model=b.teacher_model, prompts=resolve("embedded:train"), prompt_field="text",
                                 id_field="source", prompt_max_lines=8, max_prompts=b.num_prompts,
                                 max_new_tokens=b.max_new_tokens, chat_template="never")
    tokenizer = load_tokenizer(resolve(b.teacher_model))
    prompts, _ = encode_prompts(load_prompts(gen_args), tokenizer, False, 1024 - b.max_new_tokens, "truncate_left")
    model = load_causal_lm(resolve(b.teacher_model)).eval()
    methods = {"one-at-a-time": lambda: one_at_a_time(model, tokenizer, [p.prompt for p in prompts], b.max_new_tokens)}
    for decoding in ("static", "refill"):
        for bs in b.batch_sizes:
            backend = HFBackend(model, tokenizer, GenerateArguments(max_new_tokens=b.max_new_tokens, batch_size=bs,
                                                                    decoding=decoding))
            methods[f"{decoding} (batch {bs})"] = lambda backend=backend, bs=bs: generator(backend, prompts, bs)
    if b.generate_batch:
        bs = max(b.batch_sizes)
        methods[f"generate_batch ({bs})"] = lambda: generate_batch(model, tokenizer, prompts, b.max_new_tokens, bs)

    times = {name: [] for name in methods}
    tokens, outputs = {}, {}
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for _ in tqdm(range(b.repeats), desc="repeats"):
            for name, fn in methods.items():  # alternate methods so load spikes hit all of them
                t0 = time.perf_counter()
                tokens[name], outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
    base = "one-at-a-time"
    results = []
    for name in methods:
        median = statistics.median(times[name])
        same = sum(a == o for a, o in zip(outputs[name], outputs[base])) / len(prompts)
        results.append({"method": name, "tokens": tokens[name], "seconds_median": round(median, 3),
                        "seconds_all": [round(t, 3) for t in times[name]], "tokens_per_second": round(tokens[name] / median, 1),
                        "identical_to_one_at_a_time": round(same, 3)})
    base_tps = results[0]["tokens_per_second"]
    for r in results:
        r["speedup"] = round(r["tokens_per_second"] / base_tps, 2)
    report = {
        "command": "python scripts/bench_generate.py " + " ".join(argv), "config": asdict(b), "results": results,
        "prompts": len(prompts), "prompt_tokens_mean": round(sum(len(p.input_ids) for p in prompts) / len(prompts), 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_start": round(load_before, 2), "load_average_end": round(os.getloadavg()[0], 2),
                    "torch": torch.__version__},
    }
    print(f"\n{'method':<22}{'tokens':>8}{'median s':>10}{'tokens/s':>10}{'speedup':>9}{'same output':>13}")
    for r in results:
        print(f"{r['method']:<22}{r['tokens']:>8}{r['seconds_median']:>10.2f}{r['tokens_per_second']:>10.1f}"
              f"{r['speedup']:>8.2f}x{r['identical_to_one_at_a_time']:>12.0%}")
    print(f"({len(prompts)} prompts, mean {report['prompt_tokens_mean']} prompt tokens, {b.max_new_tokens} new tokens, "
          f"greedy; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    Path(b.output).parent.mkdir(parents=True, exist_ok=True)
    Path(b.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
