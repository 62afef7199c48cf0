"""Prune attention heads, MLP neurons and whole layers, then distil the pruned model back with scripts/distill.py.

    python scripts/prune.py                                            # embedded teacher, configs/prune.yaml
    python scripts/prune.py --keep_heads 4 --mlp_width 344 --drop_layers 1 --output_dir outputs/pruned-hml
    python scripts/prune.py --model Qwen/Qwen2.5-0.5B --keep_heads 8 --drop_layers 6 --gqa per_group \
        --eval_dataset "" --output_dir outputs/qwen-pruned
    python scripts/distill.py --config configs/prune-distill.yaml      # recover: the original is the teacher
    python scripts/prune.py --model embedded:mlm_teacher --keep_heads 2 --drop_layers 1 --standard_config false \
        --max_length 128 --output_dir outputs/pruned-mlm                 # a BERT: masked-token scores and perplexity

Scores heads / neurons (``importance``) and layers (``layer_importance``) on calibration data, keeps the most
important, prints parameters / heads / layers / held-out perplexity before and after, and writes
``<output_dir>/`` (weights, config, tokenizer, ``pruning.json``, ``prune_results.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import run_cli  # noqa: E402
from llm_distill.jobs.prune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
