"""MLM-only vs DistilBERT's triple loss on the embedded encoder default, and what the half-depth student saves.

    python scripts/bench_distilbert.py                     # ~8 min on 2 CPU cores; writes bench_results/distilbert.json
    python scripts/bench_distilbert.py --max_steps 300     # extra args go to every run (scripts/distill.py flags)
    python scripts/bench_distilbert.py --variant "T1=--temperature 1.0" --variant "kd_masked=--kd_positions labels"

Every run starts from the same student (every other layer of the 4-layer BERT teacher, copied: configs/distilbert.yaml)
and sees the same data in the same order with the same steps, learning rate and seed; the runs differ only in the
loss: ``mlm_only`` = masked-LM cross-entropy alone (alpha_mlm 1, alpha_kd 0, alpha_cos 0), ``triple`` = DistilBERT's
5 KD (T=2) + 2 MLM + 1 cosine; each ``--variant NAME=FLAGS`` adds a triple-loss run with those flags on top.
Held-out: masked-token accuracy and perplexity on one fixed masking of the held-out files, identical for every model.
Cost: parameter counts and forward latency, measured in this process with teacher and student alternating (median
of ``--repeats``), so the student / teacher ratio comes from one run on one machine state.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForMaskedLM  # noqa: E402

from llm_distill import embedded
from llm_distill.evaluation import forward_latency  # noqa: E402
from llm_distill.footprint import environment, write_results  # noqa: E402
from llm_distill.jobs.distill import REPO_ROOT
from llm_distill.jobs.distill import main as run_distillation  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "distilbert.yaml"
RUNS = {"mlm_only": ["--alpha_mlm", "1.0", "--alpha_kd", "0", "--alpha_cos", "0"], "triple": []}


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra triple-loss run, e.g. 'T1=--temperature 1.0' (repeatable)")
    parser.add_argument("--repeats", type=int, default=20, help="forward passes per model for the latency median")
    parser.add_argument("--latency_batch", type=int, default=8, help="sequences per forward pass (128 tokens each)")
    parser.add_argument("--out", default="bench_results/distilbert.json")
    parser.add_argument("--workdir", default="outputs/bench_distilbert")
    return parser.parse_known_args()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def table(results: dict, cost: dict) -> str:
    first = next(iter(results.values()))
    rows = [("teacher (4 layers)", first["teacher_accuracy"], first["teacher_perplexity"], "1.00", "1.00"),
            ("student init: layers 0, 2 (no training)", first["student_accuracy_before"],
             first["student_perplexity_before"], "", "")]
    ratios = (f"{cost['params_ratio']:.2f}", f"{cost['latency_ratio']:.2f}")
    for name, r in results.items():
        rows.append((f"student {name} ({r['steps']} steps)", r["student_accuracy_after"], r["student_perplexity_after"],
                     *ratios))
    lines = ["| model | masked-token accuracy | masked-token perplexity | params / teacher | latency / teacher |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {label} | {acc:.3f} | {ppl:.2f} | {p} | {lat} |" for label, acc, ppl, p, lat in rows]
    return "\n".join(lines)


def main() -> None:
    args, distill_args = parse()
    runs = dict(RUNS)
    for v in args.variant:
        name, _, flags = v.partition("=")
        runs[name] = shlex.split(flags)
    load_start = os.getloadavg()[0]
    results = {}
    for name, extra in runs.items():
        logging.getLogger(__name__).warning("=== %s ===", name)
        start = time.time()
        r = run_distillation(["--config", str(CONFIG), *distill_args, *extra, "--output_dir", f"{args.workdir}/{name}"])
        r["bench_wall_s"] = round(time.time() - start, 1)
        results[name] = r

    teacher = AutoModelForMaskedLM.from_pretrained(embedded.resolve(results["triple"]["teacher"])).float()
    student = AutoModelForMaskedLM.from_pretrained(f"{args.workdir}/triple").float()
    ids = torch.randint(0, teacher.config.vocab_size, (args.latency_batch, 128),
                        generator=torch.Generator().manual_seed(0))
    latency = forward_latency({"teacher": teacher, "student": student}, ids, args.repeats)
    cost = {"teacher_params": params(teacher), "student_params": params(student),
            "params_ratio": params(student) / params(teacher),
            "teacher_latency_ms": 1e3 * latency["teacher"], "student_latency_ms": 1e3 * latency["student"],
            "latency_ratio": latency["student"] / latency["teacher"],
            "latency_input": f"{args.latency_batch} x 128 tokens, median of {args.repeats}"}
    report = table(results, cost)
    print("\n" + report)
    print(f"\nparameters: teacher {cost['teacher_params'] / 1e6:.2f}M, student {cost['student_params'] / 1e6:.2f}M; "
          f"forward ({cost['latency_input']}): teacher {cost['teacher_latency_ms']:.1f} ms, "
          f"student {cost['student_latency_ms']:.1f} ms")
    env = {**environment(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
           "load_average_start": round(load_start, 2), "load_average_end": round(os.getloadavg()[0], 2)}
    write_results(args.out, {"command": "python scripts/bench_distilbert.py " + " ".join(sys.argv[1:]), "env": env,
                             "cost": cost, "table": report, "runs": results})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
