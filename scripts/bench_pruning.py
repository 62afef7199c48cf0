"""Measure prune -> distil on the embedded default, against the same pruned architecture trained from scratch.

    python scripts/bench_pruning.py                                   # configs/prune.yaml's plan, ~10 min on 2 CPU cores
    python scripts/bench_pruning.py --mlp_width 344 --max_steps 300   # also halve the MLP; a longer budget

1. ``scripts/prune.py`` (configs/prune.yaml: half the heads, one of four layers) on the embedded teacher;
2. ``scripts/distill.py`` (configs/prune-distill.yaml) with the original as teacher, from the pruned weights;
3. the same pruned architecture from random init (``--student_init fresh``) with the same steps, data and
   schedule: with KD from the same teacher, and CE-only (plain training) - both at ``scratch_learning_rate``;
4. forward latency of the original and the pruned model on one batch, alternating, median of repeats.
Prints a markdown table and writes ``bench_results/pruning.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.config import parse_args_and_config  # noqa: E402
from llm_distill.evaluation import forward_latency  # noqa: E402
from llm_distill.models import load_causal_lm  # noqa: E402
from llm_distill.jobs.prune import describe
from llm_distill.jobs.prune import main as run_pruning  # noqa: E402
from llm_distill.jobs.distill import main as run_distillation  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchPruningArguments:
    output_root: str = field(default="outputs/bench-pruning", metadata={"help": "Folder for the four models."})
    keep_heads: int | None = field(default=None, metadata={"help": "Override configs/prune.yaml's keep_heads."})
    mlp_width: int | None = field(default=None, metadata={"help": "Also prune the MLP to this width."})
    drop_layers: int | None = field(default=None, metadata={"help": "Override configs/prune.yaml's drop_layers."})
    max_steps: int = field(default=120, metadata={"help": "Training steps of every recovery / scratch run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak LR of the distillation from pruned weights."})
    scratch_learning_rate: float = field(default=3e-3, metadata={"help": "Peak LR of the from-scratch runs (the "
                                                                         "default student's, tuned for random init)."})
    latency_batch: int = field(default=8, metadata={"help": "Sequences per timed forward pass."})
    latency_length: int = field(default=256, metadata={"help": "Tokens per timed sequence."})
    latency_repeats: int = field(default=15, metadata={"help": "Timed forward passes per model (median reported)."})
    output: str = field(default="bench_results/pruning.json", metadata={"help": "Where the results are written."})

    def __post_init__(self):
        for name in ("max_steps", "latency_batch", "latency_length", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected an integer >= 1.")


def prune_argv(args: BenchPruningArguments, out: Path) -> list[str]:
    argv = ["--config", str(REPO_ROOT / "configs" / "prune.yaml"), "--output_dir", str(out)]
    for name in ("keep_heads", "mlp_width", "drop_layers"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv


def distill_argv(args: BenchPruningArguments, pruned: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO_ROOT / "configs" / "prune-distill.yaml"), "--student_model", str(pruned),
            "--max_steps", str(args.max_steps), "--learning_rate", str(args.learning_rate), "--output_dir", str(out),
            *extra]


def random_ids(models: dict, batch: int, length: int) -> torch.Tensor:
    """``(batch, length)`` token ids every model accepts, seeded: the latency input."""
    vocab = min(m.config.vocab_size for m in models.values())
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def run(args: BenchPruningArguments) -> dict:
    root = Path(args.output_root)
    start = time.time()
    pruned = run_pruning(prune_argv(args, root / "pruned"))
    runs = {
        "distilled": run_distillation(distill_argv(args, root / "pruned", root / "distilled")),
        "scratch_kd": run_distillation(distill_argv(args, root / "pruned", root / "scratch-kd", "--student_init",
                                                    "fresh", "--learning_rate", str(args.scratch_learning_rate))),
        "scratch_ce": run_distillation(distill_argv(args, root / "pruned", root / "scratch-ce", "--student_init",
                                                    "fresh", "--learning_rate", str(args.scratch_learning_rate),
                                                    "--alpha", "0")),
    }
    original = load_causal_lm("embedded:teacher", "float32")
    small = load_causal_lm(str(root / "distilled"), "float32")
    models = {"original": original, "pruned": small}
    latency = forward_latency(models, random_ids(models, args.latency_batch, args.latency_length),
                              args.latency_repeats)
    ppl = {"original": runs["distilled"]["teacher_perplexity"], "pruned": pruned["after"]["perplexity"],
           "distilled": runs["distilled"]["student_perplexity_after"],
           "scratch_kd": runs["scratch_kd"]["student_perplexity_after"],
           "scratch_ce": runs["scratch_ce"]["student_perplexity_after"]}
    return {
        "args": asdict(args), "plan": pruned["plan"], "importance": pruned["importance"],
        "layer_importance": pruned["layer_importance"],
        "original": describe(original), "pruned": describe(small), "perplexity": ppl,
        "recovered_fraction": (ppl["pruned"] - ppl["distilled"]) / (ppl["pruned"] - ppl["original"]),
        "latency_s": latency, "latency_ratio": latency["pruned"] / latency["original"],
        "top1_agreement": {k: r["top1_agreement_after"] for k, r in runs.items()},
        "train_runtime_s": {k: r["train_runtime_s"] for k, r in runs.items()},
        "threads": torch.get_num_threads(), "wall_time_s": time.time() - start,
    }


def format_table(r: dict) -> str:
    o, p, ppl = r["original"], r["pruned"], r["perplexity"]
    lat = r["latency_s"]
    rows = [
        ("original (teacher)", o, ppl["original"], f"{lat['original'] * 1e3:.0f} ms (1.00x)"),
        ("pruned", p, ppl["pruned"], f"{lat['pruned'] * 1e3:.0f} ms ({r['latency_ratio']:.2f}x)"),
        ("pruned + distilled", p, ppl["distilled"], "same as pruned"),
        ("scratch, KD", p, ppl["scratch_kd"], "same as pruned"),
        ("scratch, CE only", p, ppl["scratch_ce"], "same as pruned"),
    ]
    lines = ["| model | parameters | layers | heads / KV heads per layer | MLP width | held-out ppl | forward latency |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {d['parameters'] / 1e6:.2f}M | {d['layers']} | {d['heads_per_layer']} / "
              f"{d['kv_heads_per_layer']} | {d['mlp_width']} | {value:.1f} | {latency} |"
              for name, d, value, latency in rows]
    lines.append(f"\nrecovered fraction (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_original) = "
                 f"{r['recovered_fraction']:.1%}; {r['args']['max_steps']} steps each; wall time "
                 f"{r['wall_time_s'] / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (bench_args,) = parse_args_and_config((BenchPruningArguments,), sys.argv[1:])
    results = run(bench_args)
    print(format_table(results))
    Path(bench_args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(bench_args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {bench_args.output}")
