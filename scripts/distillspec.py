"""DistillSpec: distil the speculative-decoding draft toward the target, report acceptance before / after.

    python scripts/distillspec.py                         # embedded teacher as target, outputs/spec_draft as draft
    python scripts/distillspec.py --data_source draft --loss_type tvd --max_steps 600
    python scripts/distillspec.py --target_model Qwen/Qwen2.5-7B-Instruct --draft_model Qwen/Qwen2.5-0.5B-Instruct \
        --train_prompts prompts.jsonl --eval_prompts heldout.jsonl

The draft must share the target's tokenizer (default: ``python scripts/distill.py --output_dir
outputs/spec_draft``). Continuations are written by the draft (on-policy), the target, or both
(``--data_source``); the draft is then trained with ``DistillationTrainer`` on the target's distribution
over the continuation tokens. Writes the new draft to ``--output_dir`` and the summary to
``bench_results/distillspec.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import run_cli  # noqa: E402
from llm_distill.jobs.distillspec import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
