"""From distilled student to deployable file, measured per stage: structured prune -> distil -> gradual sparsity ->
int8 quantization -> ONNX export, each stage saved and scored on the same held-out data.

    python scripts/compress.py                                     # embedded default, configs/compress.yaml
    python scripts/compress.py --stages distill sparsify quantize --sparsity_pattern 2:4
    python scripts/compress.py --stages quantize export --student outputs/default   # compress a student you have

Prints the per-stage table (parameters, non-zeros, file size, tokens/s at 1 and all threads, held-out perplexity,
top-1 agreement with the teacher), writes it to bench_results/compress.json and draws bench_results/compress.png.
Needs the compress extra: pip install -e ".[compress]".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import setup_logging  # noqa: E402
from llm_distill.jobs.compress import main  # noqa: E402

if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1:])
