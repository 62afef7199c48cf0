"""Distil a teacher LM into a student.

    accelerate launch scripts/distill.py                                   # embedded default, offline
    accelerate launch scripts/distill.py --config configs/default.yaml --temperature 2.0
    accelerate launch scripts/distill.py --config configs/qwen2.5-1.5b-to-0.5b.yaml

Loads teacher and student (hub ids or paths; ``embedded:*`` = the tiny offline default), validates and
tokenises the data, trains with ``DistillationTrainer``, then evaluates teacher / student-before /
student-after on held-out data and prints + writes ``<output_dir>/distill_results.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import run_cli  # noqa: E402
from llm_distill.jobs.distill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
