"""Benchmark speculative decoding: acceptance, speedup vs target-only, Leviathan's prediction, HF assisted.

    python scripts/bench_speculative.py                                  # embedded teacher + outputs/spec_draft
    python scripts/bench_speculative.py --gammas 2 4 --temperatures 0 --rounds 5
    python scripts/bench_speculative.py --target_model Qwen/Qwen2.5-1.5B --draft_model Qwen/Qwen2.5-0.5B

The default draft is the KD student of the default run: ``python scripts/distill.py --output_dir
outputs/spec_draft``. In one process and interleaved round by round it times (a) target-only decoding
with a KV cache (our loop with gamma=0, and ``transformers`` ``generate``), (b) ``SpeculativeDecoder`` at
batch 1 and batch ``--batch_size``, (c) ``generate(assistant_model=...)`` at batch 1 with a fixed gamma.
Prints a table; writes ``bench_results/speculative.json`` and ``bench_results/speculative.png``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.cli import parse_args_and_config  # noqa: E402
from llm_distill.speculative_bench import BenchArguments, format_table, plot, run_benchmark  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = parse_args_and_config((BenchArguments,), sys.argv[1:])
    results = run_benchmark(args)
    print(format_table(results))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
