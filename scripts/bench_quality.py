"""What distillation buys: the same student, data, steps and hyper-parameters, trained CE-only vs with KD, over seeds.

    python scripts/bench_quality.py                          # embedded default: CE-only vs forward-KL KD, seeds 42 43 44
    python scripts/bench_quality.py --seeds 42               # one seed (about a third of the time)
    python scripts/bench_quality.py --variants forward_kl:1.0:1.0 forward_kl:2.0:1.0 reverse_kl:1.0:1.0
    python scripts/bench_quality.py --config configs/default.yaml --max_steps 100   # extra args go to distill

Each variant is ``loss_type:temperature:alpha``; the CE-only baseline (alpha=0) always runs first. A seed sets
everything a run draws: the training subset and its order, and the held-out subset (so the teacher's figure
moves with it too). Per seed the script reports held-out perplexity of the teacher, the CE-only student and each
KD student, and the fraction of the teacher-student gap that KD recovers, (ppl_CE - ppl_KD) / (ppl_CE -
ppl_teacher), a paired quantity; then mean +- sample standard deviation over the seeds, so that a difference can
be told from noise. Writes ``bench_results/quality.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llm_distill.footprint import environment, write_results  # noqa: E402
from llm_distill.jobs.distill import main as run_distillation  # noqa: E402

logger = logging.getLogger("bench_quality")


def runs_of(variants: list[str]) -> list[tuple[str, list[str]]]:
    """(name, extra distill arguments) per run: the CE-only baseline first, then one per KD variant."""
    runs = [("ce_only", ["--alpha", "0.0"])]
    for v in variants:
        loss_type, temperature, alpha = v.split(":")
        runs.append((f"kd_{loss_type}_T{temperature}_a{alpha}",
                     ["--loss_type", loss_type, "--temperature", temperature, "--alpha", alpha]))
    return runs


def one_seed(seed: int, runs, distill_args: list[str], workdir: str) -> dict:
    """Every run at one seed; adds ``gap_recovered`` to each KD run."""
    results = {}
    for name, extra in runs:
        logger.warning("=== seed %d: %s ===", seed, name)
        start = time.time()
        r = run_distillation([*distill_args, *extra, "--seed", str(seed), "--output_dir", f"{workdir}/s{seed}/{name}"])
        r["bench_wall_s"] = time.time() - start
        results[name] = r
    teacher, ce = results["ce_only"]["teacher_perplexity"], results["ce_only"]["student_perplexity_after"]
    for name, r in results.items():
        if name != "ce_only":
            kd = r["student_perplexity_after"]
            r["gap_recovered"] = (ce - kd) / (ce - teacher) if ce != teacher else float("nan")
    return results


def spread(values: list[float], fmt: str) -> str:
    """``mean +- std`` (sample std; just the value for one seed)."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def table(per_seed: dict[int, dict]) -> tuple[list[str], dict]:
    """Markdown rows (mean +- std over seeds) and the same figures as a dict for the JSON."""
    seeds = list(per_seed)
    names = list(per_seed[seeds[0]])
    summary, lines = {}, ["| model | held-out perplexity | top-1 agreement with teacher | gap recovered |",
                          "| --- | ---: | ---: | ---: |"]
    teacher = [per_seed[s]["ce_only"]["teacher_perplexity"] for s in seeds]
    summary["teacher_perplexity"] = teacher
    lines.append(f"| teacher | {spread(teacher, '.2f')} | - | - |")
    for name in names:
        ppl = [per_seed[s][name]["student_perplexity_after"] for s in seeds]
        agree = [per_seed[s][name]["top1_agreement_after"] for s in seeds]
        gap = [per_seed[s][name]["gap_recovered"] for s in seeds] if name != "ce_only" else None
        summary[name] = {"perplexity": ppl, "top1_agreement": agree, "gap_recovered": gap}
        label = "student CE-only (alpha=0)" if name == "ce_only" else f"student {name}"
        gap_text = "-" if gap is None else spread([100 * g for g in gap], ".0f") + "%"
        lines.append(f"| {label} | {spread(ppl, '.2f')} | {spread(agree, '.3f')} | {gap_text} |")
    return lines, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["forward_kl:1.0:1.0"],
                        help="KD runs as loss_type:temperature:alpha")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44],
                        help="one CE-only and one run per variant for each seed (42 is configs/default.yaml's)")
    parser.add_argument("--out", default="bench_results/quality.json")
    parser.add_argument("--workdir", default="outputs/bench_quality")
    args, distill_args = parser.parse_known_args()

    runs = runs_of(args.variants)
    per_seed = {seed: one_seed(seed, runs, distill_args, args.workdir) for seed in args.seeds}
    lines, summary = table(per_seed)
    print(f"\nseeds {args.seeds}: mean ± sample std over seeds\n")
    print("\n".join(lines))
    env = {**environment(), "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    write_results(args.out, {"env": env, "seeds": args.seeds, "summary": summary,
                             "runs": {str(s): r for s, r in per_seed.items()}})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
