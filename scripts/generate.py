"""Generate a teacher-response dataset (JSONL) for response distillation: batched, resumable, sharded.

    python scripts/generate.py                                      # embedded teacher, stdlib prompts, offline
    accelerate launch scripts/generate.py --config configs/generate.yaml --max_prompts 64
    accelerate launch --num_processes 8 scripts/generate.py --config my.yaml --prompts prompts.jsonl \
        --output data/responses.jsonl                               # one shard per process, merged by rank 0

Run the same command again after a crash to resume (nothing lost, nothing duplicated); a different config
on an existing output is refused unless ``--overwrite true``. Train on the result with
``scripts/distill.py --config configs/two-stage-response-kd.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import run_cli  # noqa: E402
from llm_distill.jobs.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
