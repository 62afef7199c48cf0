"""Benchmark speculative decoding: acceptance, speedup vs target-only, Leviathan's prediction, HF assisted.

    python scripts/bench_speculative.py                                  # embedded teacher + outputs/spec_draft
    python scripts/bench_speculative.py --gammas 2 4 --temperatures 0 --rounds 5
    python scripts/bench_speculative.py --target_model Qwen/Qwen2.5-1.5B --draft_model Qwen/Qwen2.5-0.5B
    python scripts/bench_speculative.py --config configs/real/speculative-chat.yaml   # chat prompts, real model

``--prompt_format chat`` reads each row's ``prompt`` (or ``messages``) and applies the tokenizer's chat template
(assistant turn opened) instead of cutting text windows.

The default draft is the KD student of the default run: ``python scripts/distill.py --output_dir
outputs/spec_draft``. In one process and interleaved round by round it times (a) target-only decoding
with a KV cache (our loop with gamma=0, and ``transformers`` ``generate``), (b) ``SpeculativeDecoder`` at
batch 1 and batch ``--batch_size``, (c) ``generate(assistant_model=...)`` at batch 1 with a fixed gamma.
Prints a table; writes ``bench_results/speculative.json`` and ``bench_results/speculative.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import run_cli  # noqa: E402
from llm_distill.jobs.bench_speculative import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
