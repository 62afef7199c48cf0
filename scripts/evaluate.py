"""Score models on one held-out file with the routine every job uses (memory-lean, never the full logits).

    python scripts/evaluate.py --models teacher=embedded:smollm2 kd=outputs/real/pruned-24-kd \
        ce=outputs/real/pruned-24-ce --eval_dataset answers.jsonl --max_length 256
    python scripts/evaluate.py --models teacher=embedded:teacher student=outputs/default --packing true

Each ``name=model`` is a folder, hub id, ``.gguf`` file or ``embedded:`` name; the first is the reference of
top-1 agreement. The held-out set is built by ``llm_distill.evaluation.heldout_set`` exactly as distill and prune
build it (rows validated; prompt/response and chat rows scored on the response only; ``--packing`` for text), so
the same file and settings give the same figures as those jobs' reports. Prints a table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_distill.config import DataArguments  # noqa: E402
from llm_distill.data import DistillationCollator  # noqa: E402
from llm_distill.embedded import resolve  # noqa: E402
from llm_distill.evaluation import evaluate_models, heldout_set  # noqa: E402
from llm_distill.footprint import write_results  # noqa: E402
from llm_distill.jobs import run_cli  # noqa: E402
from llm_distill.models import load_causal_lm, load_tokenizer  # noqa: E402


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="name=model pairs; the first is the reference")
    p.add_argument("--eval_dataset", default="embedded:heldout")
    p.add_argument("--tokenizer", default=None, help="default: the first model's")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--packing", choices=["true", "false"], default="false")
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(pair) != 2 for pair in pairs):
        p.error("--models takes name=model pairs, e.g. teacher=embedded:teacher student=outputs/default")
    data_args = DataArguments(max_length=args.max_length, packing=args.packing == "true")
    tokenizer = load_tokenizer(resolve(args.tokenizer or pairs[0][1]))
    dataset = heldout_set(resolve(args.eval_dataset), tokenizer, data_args, args.max_eval_samples, args.seed)
    models = {name: load_causal_lm(resolve(model), "float32").eval() for name, model in pairs}
    scores = evaluate_models(models, dataset, DistillationCollator(tokenizer), args.batch_size, reference=pairs[0][0])
    print(f"\n{len(dataset)} sequences of {args.eval_dataset}, {scores[pairs[0][0]]['tokens']:,} "
          "scored tokens\n\n| model | perplexity | accuracy | top-1 agreement |\n| --- | ---: | ---: | ---: |")
    for name, s in scores.items():
        print(f"| {name} | {s['perplexity']:.2f} | {s['accuracy']:.3f} | {s.get('top1_agreement', float('nan')):.3f} |")
    if args.out:
        write_results(args.out, {"argv": argv, "scores": scores})
    return scores


if __name__ == "__main__":
    sys.exit(run_cli(main))
