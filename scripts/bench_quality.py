"""What distillation buys: the same student, data, steps and hyper-parameters, trained CE-only vs with KD.

    python scripts/bench_quality.py                          # embedded default: CE-only vs forward-KL KD
    python scripts/bench_quality.py --variants forward_kl:1.0:1.0 forward_kl:2.0:1.0 reverse_kl:1.0:1.0
    python scripts/bench_quality.py --config configs/default.yaml --max_steps 100   # extra args go to distill

Each variant is ``loss_type:temperature:alpha``; the CE-only baseline (alpha=0) always runs first.
Reports held-out perplexity of the teacher, the CE-only student and each KD student, and the fraction of
the teacher-student gap that KD recovers: (ppl_CE - ppl_KD) / (ppl_CE - ppl_teacher).
Writes ``bench_results/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from llm_distill.jobs.distill import main as run_distillation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["forward_kl:1.0:1.0"],
                        help="KD runs as loss_type:temperature:alpha")
    parser.add_argument("--out", default="bench_results/quality.json")
    parser.add_argument("--workdir", default="outputs/bench_quality")
    args, distill_args = parser.parse_known_args()

    runs = [("ce_only", ["--alpha", "0.0"])]
    for v in args.variants:
        loss_type, temperature, alpha = v.split(":")
        runs.append((f"kd_{loss_type}_T{temperature}_a{alpha}",
                     ["--loss_type", loss_type, "--temperature", temperature, "--alpha", alpha]))

    results = {}
    for name, extra in runs:
        logging.getLogger(__name__).warning("=== %s ===", name)
        start = time.time()
        r = run_distillation([*distill_args, *extra, "--output_dir", f"{args.workdir}/{name}"])
        r["bench_wall_s"] = time.time() - start
        results[name] = r

    teacher = results["ce_only"]["teacher_perplexity"]
    ce = results["ce_only"]["student_perplexity_after"]
    rows = [("teacher", teacher, None, None), ("student CE-only (alpha=0)", ce,
                                               results["ce_only"]["top1_agreement_after"], None)]
    for name, r in results.items():
        if name == "ce_only":
            continue
        kd = r["student_perplexity_after"]
        recovered = (ce - kd) / (ce - teacher) if ce != teacher else float("nan")
        r["gap_recovered"] = recovered
        rows.append((f"student {name}", kd, r["top1_agreement_after"], recovered))

    print("\n| model | held-out perplexity | top-1 agreement with teacher | gap recovered |")
    print("| --- | ---: | ---: | ---: |")
    for label, ppl, agree, rec in rows:
        print(f"| {label} | {ppl:.2f} | {'-' if agree is None else f'{agree:.3f}'} | "
              f"{'-' if rec is None else f'{100 * rec:.0f}%'} |")
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "runs": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
