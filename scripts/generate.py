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

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.distributed import shutdown_distributed  # noqa: E402
from llm_distill.generation import format_summary, parse, run_generation  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "generate.yaml"


def main(argv: list[str]) -> dict:
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and DEFAULT_CONFIG.is_file():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]  # no --config: the embedded default
    args = parse(argv)
    try:
        summary = run_generation(args)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        if os.environ.get("LLM_DISTILL_PRINT_JSON"):
            print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main(sys.argv[1:])
