"""scripts/bench_quality.py: the seed table (mean +- std) is computed from the per-seed runs, gap paired per seed."""

import importlib.util
import statistics
from pathlib import Path

import pytest


def load_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(teacher, ppl, agree):
    return {"teacher_perplexity": teacher, "student_perplexity_after": ppl, "top1_agreement_after": agree}


def test_seed_table_pairs_the_gap_per_seed_and_reports_mean_and_std():
    bench = load_script()
    per_seed = {}
    for seed, (teacher, ce, kd) in {1: (100.0, 300.0, 140.0), 2: (110.0, 250.0, 120.0)}.items():
        runs = {"ce_only": fake_run(teacher, ce, 0.4), "kd_forward_kl_T1.0_a1.0": fake_run(teacher, kd, 0.6)}
        runs["kd_forward_kl_T1.0_a1.0"]["gap_recovered"] = (ce - kd) / (ce - teacher)
        per_seed[seed] = runs
    lines, summary = bench.table(per_seed)
    gaps = summary["kd_forward_kl_T1.0_a1.0"]["gap_recovered"]
    assert gaps == pytest.approx([0.8, 130 / 140])  # paired within each seed, not from the mean perplexities
    kd_line = next(line for line in lines if line.startswith("| student kd_forward_kl"))
    assert f"{statistics.mean([140.0, 120.0]):.2f} ± {statistics.stdev([140.0, 120.0]):.2f}" in kd_line
    assert f"{100 * statistics.mean(gaps):.0f} ± {100 * statistics.stdev(gaps):.0f}%" in kd_line
    assert lines[2].startswith("| teacher | 105.00 ± 7.07 |")


def test_one_seed_prints_plain_values():
    bench = load_script()
    assert bench.spread([3.14159], ".2f") == "3.14"
    assert bench.runs_of(["reverse_kl:2.0:0.5"])[1] == (
        "kd_reverse_kl_T2.0_a0.5", ["--loss_type", "reverse_kl", "--temperature", "2.0", "--alpha", "0.5"])
