"""Measure gradual magnitude pruning during distillation against one-shot pruning, on the embedded default.

    python scripts/bench_sparsity.py --student outputs/compress/2-distill          # after scripts/compress.py
    python scripts/bench_sparsity.py --student outputs/default --steps 120 --patterns unstructured 2:4

From the same dense distilled student, ``steps`` more distillation steps (the same data, loss, LR schedule) in each run:
1. dense: no pruning (the reference);
2. gradual: Zhu & Gupta's cubic schedule from 0 to the target at 3/4 of the steps (``llm_distill.sparsity``);
3. one-shot: magnitude pruning to the target before the first step (the same masks tool), then the same steps with
   the masks held fixed;
for each pattern (unstructured 50%, 2:4). Prints a markdown table (held-out perplexity, its change vs dense, top-1
agreement with the teacher, measured sparsity) and writes ``bench_results/sparsity.json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.config import (  # noqa: E402
    DataArguments,
    DistillationConfig,
    ModelArguments,
    config_from_dict,
    parse_args_and_config,
)
from llm_distill.jobs import setup_logging  # noqa: E402
from llm_distill.jobs.distill import run_distillation  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchSparsityArguments:
    student: str = field(default="outputs/compress/2-distill", metadata={"help": "The dense distilled student."})
    teacher: str = field(default="embedded:teacher", metadata={"help": "KD teacher (and agreement target)."})
    steps: int = field(default=40, metadata={"help": "Distillation steps of every run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak LR of every run."})
    target_sparsity: float = field(default=0.5, metadata={"help": "Sparsity of the pruned runs."})
    patterns: list[str] = field(default_factory=lambda: ["unstructured", "2:4"], metadata={"help": "Patterns."})
    max_eval_samples: int = field(default=16, metadata={"help": "Held-out sequences scored."})
    output_root: str = field(default="outputs/bench-sparsity", metadata={"help": "Folder for the runs."})
    output: str = field(default="bench_results/sparsity.json", metadata={"help": "Where the results are written."})


def run(args: BenchSparsityArguments, name: str, extra: dict) -> dict:
    values = {"teacher_model": args.teacher, "student_model": args.student, "student_init": "pretrained",
              "output_dir": str(Path(args.output_root) / name.replace(" ", "-").replace(":", "")),
              "max_steps": args.steps, "learning_rate": args.learning_rate, "warmup_steps": max(1, args.steps // 20),
              "max_eval_samples": args.max_eval_samples, "logging_steps": max(1, args.steps // 4),
              "save_strategy": "no", "report_to": "none", **extra}
    result = run_distillation(*config_from_dict((ModelArguments, DataArguments, DistillationConfig), values,
                                                base=REPO_ROOT / "configs" / "default.yaml"))
    return {"run": name, "perplexity": result["student_perplexity_after"],
            "top1_agreement": result["top1_agreement_after"], "sparsity": result.get("sparsity", 0.0),
            "perplexity_start": result["student_perplexity_before"], "steps": result["steps"]}


def main(argv: list[str]) -> list[dict]:
    (args,) = parse_args_and_config((BenchSparsityArguments,), argv)
    rows = [run(args, "dense", {})]
    for pattern in args.patterns:
        common = {"target_sparsity": args.target_sparsity, "sparsity_pattern": pattern}
        rows.append(run(args, f"gradual {pattern}", {**common, "sparsity_start_step": 0,
                                                     "sparsity_end_step": max(1, args.steps * 3 // 4),
                                                     "sparsity_every": max(1, args.steps // 16)}))
        rows.append(run(args, f"one-shot {pattern}", {**common, "sparsity_start_step": 0, "sparsity_end_step": 0}))
    dense = rows[0]["perplexity"]
    lines = ["| run | sparsity | held-out ppl | vs dense | top-1 agree |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        r["vs_dense"] = r["perplexity"] / dense - 1
        lines.append(f"| {r['run']} | {r['sparsity']:.3f} | {r['perplexity']:.3f} | {r['vs_dense']:+.1%} | "
                     f"{r['top1_agreement']:.3f} |")
    print(f"\nstart: the dense distilled student, ppl {rows[0]['perplexity_start']:.3f}; {args.steps} steps per run")
    print("\n".join(lines))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": asdict(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1:])
