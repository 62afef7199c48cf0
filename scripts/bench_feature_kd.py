"""Feature-level KD vs logit KD at equal steps, on the embedded decoder and encoder defaults.

    python scripts/bench_feature_kd.py                          # writes bench_results/feature_kd.json
    python scripts/bench_feature_kd.py --steps 120 --seeds 0 1 2 3 --models decoder
    python scripts/bench_feature_kd.py --steps 40 --max_length 128 --batch_size 4   # a busy 2-core machine

Every run of one model starts from the same student, sees the same data in the same order for the same number of
steps with the same learning rate and seed; the runs differ only in the loss:

- ``logit``: logit KD only (decoder: configs/default.yaml, KD at T=1; encoder: configs/distilbert.yaml without the
  cosine term, i.e. 5 KD + 2 MLM);
- ``hidden``: + the hidden-layer map (uniform map, learned projections where the widths differ);
- ``relation``: + MiniLMv2 Q-Q / K-K / V-V relations on the last layer pair;
- ``both``: + both.

Held-out: perplexity (masked-token perplexity on one fixed masking for the encoder) and top-1 agreement with the
teacher, mean +- std over the seeds; ``rel_ppl_change`` is against ``logit``'s mean. Runs go through
``jobs.distill.run_distillation`` (typed configs from ``config_from_dict``), the code users run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llm_distill.config import DataArguments, DistillationConfig, ModelArguments, config_from_dict  # noqa: E402
from llm_distill.jobs.distill import REPO_ROOT, run_distillation  # noqa: E402

MODELS = {  # base config, overrides shared by every variant
    "decoder": (REPO_ROOT / "configs" / "default.yaml", {}),
    "encoder": (REPO_ROOT / "configs" / "distilbert.yaml", {"alpha_cos": 0.0}),
}
VARIANTS = {
    "logit": {},
    "hidden": {"alpha_hidden": 1.0, "hidden_loss": "cosine", "hidden_layer_map": "uniform"},
    "relation": {"alpha_attn_relation": 1.0},
    "both": {"alpha_hidden": 1.0, "hidden_loss": "cosine", "hidden_layer_map": "uniform", "alpha_attn_relation": 1.0},
}
TYPES = (ModelArguments, DataArguments, DistillationConfig)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run (equal for every variant)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max_eval_samples", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=None, help="override the configs' sequence length")
    parser.add_argument("--batch_size", type=int, default=None, help="override per_device_train_batch_size")
    parser.add_argument("--base", action="append", default=[], metavar="MODEL=YAML",
                        help="another base config for decoder / encoder (e.g. real models), repeatable")
    parser.add_argument("--out", default="bench_results/feature_kd.json")
    parser.add_argument("--workdir", default="outputs/bench_feature_kd")
    return parser.parse_args()


def one_run(model: str, variant: str, seed: int, opts) -> dict:
    base, shared = MODELS[model]
    base = dict(b.split("=", 1) for b in opts.base).get(model, base)
    values = {**shared, **VARIANTS[variant], "max_steps": opts.steps, "seed": seed, "save_strategy": "no",
              "logging_steps": max(opts.steps // 4, 1), "max_eval_samples": opts.max_eval_samples,
              "warmup_steps": max(opts.steps // 20, 1), "output_dir": f"{opts.workdir}/{model}-{variant}-{seed}",
              "report_to": "none", "disable_tqdm": True}
    if opts.max_length:
        values["max_length"] = opts.max_length
    if opts.batch_size:
        values["per_device_train_batch_size"] = opts.batch_size
    result = run_distillation(*config_from_dict(TYPES, values, base=base))
    return {"ppl": result["student_perplexity_after"], "top1": result["top1_agreement_after"],
            "teacher_ppl": result["teacher_perplexity"], "train_s": result["train_runtime_s"]}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("ppl", "top1", "train_s"):
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values}
    return out


def table(results: dict) -> str:
    lines = [f"{'model':<9}{'variant':<10}{'perplexity':>20}{'rel. vs logit':>15}{'top-1 agree':>18}{'train s':>9}"]
    for model, variants in results.items():
        for variant, r in variants.items():
            ppl, top1 = r["ppl"], r["top1"]
            lines.append(f"{model:<9}{variant:<10}{ppl['mean']:>12.3f} ± {ppl['std']:<5.3f}"
                         f"{r.get('rel_ppl_change', 0.0) * 100:>+14.2f}%{top1['mean']:>11.4f} ± {top1['std']:<5.4f}"
                         f"{r['train_s']['mean']:>8.1f}")
    return "\n".join(lines)


def main() -> None:
    opts = parse()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start, results = time.time(), {}
    for model in opts.models:
        results[model] = {}
        for variant in opts.variants:
            runs = [one_run(model, variant, seed, opts) for seed in opts.seeds]
            results[model][variant] = {**summarise(runs), "teacher_ppl": runs[0]["teacher_ppl"],
                                       "overrides": VARIANTS[variant]}
        if "logit" in results[model]:
            reference = results[model]["logit"]["ppl"]
            for r in results[model].values():
                r["rel_ppl_change"] = r["ppl"]["mean"] / reference["mean"] - 1.0
                r["beyond_spread"] = (reference["mean"] - r["ppl"]["mean"]) > (reference["std"] + r["ppl"]["std"])
    run = {"command": "python " + " ".join(sys.argv), "steps": opts.steps, "seeds": opts.seeds,
           "wall_time_s": time.time() - start, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__}
    out = Path(opts.out)
    report = json.loads(out.read_text()) if out.is_file() else {"runs": {}, "results": {}}
    for model in results:  # other models' results from an earlier invocation are kept, each with its command
        report["runs"][model], report["results"][model] = run, results[model]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\n" + table(results))
    print(f"\nwall time {run['wall_time_s']:.0f}s -> {opts.out}")


if __name__ == "__main__":
    main()
