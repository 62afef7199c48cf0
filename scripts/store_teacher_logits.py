"""Run the teacher once over the training data and store its top-k log-probabilities per token (offline KD).

    python scripts/store_teacher_logits.py --teacher_logits outputs/teacher_logits            # embedded default
    python scripts/store_teacher_logits.py --config configs/qwen2.5-1.5b-to-0.5b.yaml --teacher_logits /data/qwen-top64 --top_k 64
    accelerate launch scripts/distill.py --teacher_logits outputs/teacher_logits               # train, no teacher loaded
    python scripts/store_teacher_logits.py --teacher_logits outputs/teacher_draws --selection sample   # 64 draws (forward KL)

Takes the same config as ``scripts/distill.py`` (teacher, tokenizer, data, ``temperature``, ``seed``,
``per_device_eval_batch_size``) plus ``--top_k``, ``--selection``, ``--logprob_dtype``, ``--rows_per_shard``, ``--overwrite``.
Writes ``<teacher_logits>/manifest.json`` and parquet shards; re-running resumes (finished shards are skipped).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import run_cli  # noqa: E402
from llm_distill.jobs.store_logits import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
