"""What a distillation step costs over plain fine-tuning, and beside TRL's ``GKDTrainer``, on the embedded default.

    python scripts/bench_kd_overhead.py                     # configs/default.yaml: teacher 4x256, student 2x128, 8 x 256 tokens
    python scripts/bench_kd_overhead.py --reps 40 --loss_type jsd
    python scripts/bench_kd_overhead.py --loss_types all    # all six divergences in ONE interleaved run
    python scripts/bench_kd_overhead.py --config my.yaml    # any distill config (models, data, batch size)
    python scripts/bench_kd_overhead.py --memory_steps 0    # timings only (no peak-memory subprocesses)
    python scripts/bench_kd_overhead.py --base HEAD~1       # + that revision's KD trainer rows, same rounds (before/after)
    python scripts/bench_kd_overhead.py --threads 1         # on a shared machine: no OpenMP barrier stalls (see below)

overhead = (KD step) / (student fine-tuning step + teacher forward), the issue's definition: 1.0 means the
distillation loss itself is free, everything else is the two forwards any online KD must pay.

- KD step: ``DistillationTrainer.training_step`` (teacher forward under ``no_grad`` + student forward + KD/CE loss +
  backward) + optimiser step, with the default memory-lean loss and with the plain reference loss
  (``loss_chunk_size: 0``);
- TRL peer (when ``trl`` is installed: ``pip install -e ".[bench]"``): TRL's ``GKDTrainer.training_step`` +
  optimiser step, configured as the run's KD (``beta=0``: forward KL; ``lmbda=0``, ``seq_kd=False``: off-policy on
  the batch's tokens; no gradient checkpointing, fp32, like ours) - full logits of both models, as TRL computes them.
  Only for ``loss_type forward_kl``, ``temperature 1`` and ``alpha 1`` (GKD has no CE term and ignores its
  temperature in the loss);
- fine-tuning step: ``transformers.Trainer.training_step`` on the same student with the model's own cross-entropy +
  optimiser step (plain SFT, what a user would otherwise run);
- teacher forward: ``teacher(**inputs).logits`` under ``no_grad``.

All alternate on the same batches after a warm-up (the order reversed every other round); medians of ``--reps`` rounds. Before the rounds, each KD
trainer's step-1 loss on the first batch is printed (the same weights for all: they match to rounding). Timings on a
busy machine are noisy: compare the ratios, which are measured in one run. On a machine whose cores other jobs
also use, torch's default of one thread per core makes every op wait at an OpenMP barrier for a thread that is not
scheduled, which penalises the step with more (smaller) ops; ``--threads 1`` measures the work without that.

Peak memory (``--memory_steps`` > 0, CPU): each trainer in a fresh process of its own, which loads the models and
batches, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reports the peak resident set of
``--memory_steps`` steps minus the resident set before them: the memory training adds on top of the loaded models
and data (the optimiser state, the same for every row, included). On CUDA, ``torch.cuda.max_memory_allocated``
likewise.
Writes ``bench_results/kd_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import dataclasses
import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from llm_distill.data import DistillationCollator  # noqa: E402
from llm_distill.losses import LOSS_TYPES  # noqa: E402
from llm_distill.jobs.distill import load_everything, parse, resolve_names  # noqa: E402
from llm_distill.trainer import DistillationTrainer  # noqa: E402

logger = logging.getLogger("bench_kd_overhead")

OUT_DIR = "outputs/bench_kd_overhead"
TRL_ROW = "TRL GKDTrainer (full logits)"
FINE_TUNING_ROW = "fine-tuning step"


def timed_step(trainer: Trainer, batch: dict) -> float:
    """One optimiser step of ``trainer`` on ``batch`` (forward, loss, backward, step), in seconds."""
    # Trainer counts the target tokens of the whole accumulated batch and passes them to compute_loss.
    num_items = (batch["labels"][:, 1:] != -100).sum()
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch, num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def timed_teacher_forward(teacher, batch: dict) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    start = time.perf_counter()
    teacher(**inputs).logits
    return time.perf_counter() - start


def trl_gkd_trainer(student, teacher, tokenizer, collator, train_args, train_ds) -> Trainer | None:
    """TRL's ``GKDTrainer`` set up as the run's KD, or ``None`` (with a warning) when it cannot be."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        logger.warning("trl is not installed: no TRL peer row (pip install -e '.[bench]').")
        return None
    if (train_args.loss_type, train_args.temperature, train_args.alpha) != ("forward_kl", 1.0, 1.0):
        logger.warning("No TRL row: GKDTrainer's loss equals ours only for loss_type forward_kl, temperature 1, alpha 1 "
                       "(the run has %s, %s, %s).", train_args.loss_type, train_args.temperature, train_args.alpha)
        return None
    # beta=0: forward KL; lmbda=0 / seq_kd=False: the batch's own tokens (off-policy); fp32 and no gradient
    # checkpointing (SFTConfig's defaults are bf16 and checkpointing), dropout left as it is (shared student).
    cfg = GKDConfig(output_dir=f"{OUT_DIR}/trl", report_to="none", learning_rate=train_args.learning_rate,
                    weight_decay=train_args.weight_decay, use_cpu=train_args.use_cpu, bf16=False, fp16=False,
                    gradient_checkpointing=False, beta=0.0, lmbda=0.0, seq_kd=False, temperature=1.0,
                    disable_dropout=False, max_length=None)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, data_collator=collator,
                         train_dataset=train_ds, processing_class=tokenizer)  # SFTTrainer requires a dataset
    trainer.create_optimizer()
    return trainer


def load_base_package(rev: str):
    """``llm_distill`` as of git revision ``rev``, importable beside this tree's as ``llm_distill_base``."""
    root = Path(tempfile.mkdtemp(prefix="kd_overhead_base_"))
    archive = subprocess.run(["git", "archive", rev, "llm_distill"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    package = root / "llm_distill_base"
    (root / "llm_distill").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bllm_distill\b", "llm_distill_base", path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("llm_distill_base.trainer"), importlib.import_module("llm_distill_base.config")


def base_kd_trainer(rev: str, kd_args, **kwargs):
    """Revision ``rev``'s ``DistillationTrainer`` with this run's settings (the before side of a before/after)."""
    trainer_mod, config_mod = load_base_package(rev) if "llm_distill_base" not in sys.modules else (
        sys.modules["llm_distill_base.trainer"], sys.modules["llm_distill_base.config"])
    cls = config_mod.DistillationConfig
    values = {f.name: getattr(kd_args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(kd_args, f.name)}
    trainer = trainer_mod.DistillationTrainer(args=cls(**values), **kwargs)
    trainer.create_optimizer()
    return trainer


def build_trainers(args, distill_argv: list[str], only: str | None = None):
    """``(trainers by row name, teacher, batches, train_args)``; ``only``: just that row (a memory child)."""
    model_args, data_args, train_args = parse([*distill_argv, "--output_dir", OUT_DIR])
    tokenizer, teacher, student, train_ds, _ = load_everything(*resolve_names(model_args, data_args), train_args)
    collator = DistillationCollator(tokenizer)

    def kd_trainer(chunk: int, *extra: str, base: str | None = None) -> DistillationTrainer:
        kd_args = parse([*distill_argv, "--output_dir", OUT_DIR, "--loss_chunk_size", str(chunk), *extra])[2]
        common = dict(model=student, teacher_model=teacher, data_collator=collator, processing_class=tokenizer)
        if base:
            return base_kd_trainer(base, kd_args, **common)
        trainer = DistillationTrainer(args=kd_args, **common)
        trainer.create_optimizer()
        return trainer

    def sft_trainer() -> Trainer:
        trainer = Trainer(model=student, args=TrainingArguments(output_dir=OUT_DIR, report_to="none",
                                                                learning_rate=train_args.learning_rate,
                                                                use_cpu=train_args.use_cpu),
                          data_collator=collator, processing_class=tokenizer)
        trainer.create_optimizer()
        return trainer

    chunk = train_args.loss_chunk_size or 256
    if args.loss_types:
        names = LOSS_TYPES if args.loss_types == "all" else tuple(args.loss_types.split(","))
        makers = {f"kd {name} (memory-lean loss)": (lambda n=name: kd_trainer(chunk, "--loss_type", n)) for name in names}
    else:
        makers = {"kd (memory-lean loss)": lambda: kd_trainer(chunk), "kd (plain loss)": lambda: kd_trainer(0),
                  TRL_ROW: lambda: trl_gkd_trainer(student, teacher, tokenizer, collator, train_args, train_ds)}
        if args.base:  # the same two KD rows from another revision, measured in the same rounds
            makers = {"kd (memory-lean loss)": makers["kd (memory-lean loss)"],
                      f"kd (memory-lean loss) @{args.base}": lambda: kd_trainer(chunk, base=args.base),
                      "kd (plain loss)": makers["kd (plain loss)"],
                      f"kd (plain loss) @{args.base}": lambda: kd_trainer(0, base=args.base), TRL_ROW: makers[TRL_ROW]}
    makers[FINE_TUNING_ROW] = sft_trainer
    trainers = {name: make() for name, make in makers.items() if only is None or name == only}
    trainers = {name: t for name, t in trainers.items() if t is not None}
    device = (next(iter(trainers.values())).args.device if trainers else torch.device("cpu"))
    loader = DataLoader(train_ds, batch_size=train_args.per_device_train_batch_size, shuffle=True,
                        collate_fn=collator, generator=torch.Generator().manual_seed(train_args.seed))
    count = args.reps + args.warmup if only is None else args.memory_steps
    batches = [{k: v.to(device) for k, v in b.items()} for b, _ in zip(loader, range(count))]
    return trainers, teacher, batches, train_args


def step_one_losses(trainers: dict, batch: dict) -> dict:
    """Each KD trainer's loss on ``batch`` with the same (untrained) weights, under ``no_grad`` (a parity check)."""
    num_items = (batch["labels"][:, 1:] != -100).sum()
    losses = {}
    with torch.no_grad():
        for name, trainer in trainers.items():
            if name != FINE_TUNING_ROW:
                trainer.model.train()
                losses[name] = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items).item()
    return losses


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args, distill_argv: list[str]) -> None:
    """One row's training-step peak memory over the loaded models and data, printed as JSON (see the docstring)."""
    trainers, _, batches, _ = build_trainers(args, distill_argv, only=args.memory_child)
    trainer = trainers[args.memory_child]
    cuda = trainer.args.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        base = _rss_bytes()
    for batch in batches:
        timed_step(trainer, batch)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    print("MEMORY_JSON " + json.dumps({"mib": round((peak - base) / 2**20, 1), "kind": "cuda" if cuda else "cpu_rss"}))


def peak_memory(names: list[str], args, distill_argv: list[str]) -> dict:
    """Each row's peak memory (MiB) from a fresh process of its own (``memory_child``)."""
    out = {}
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory_child", name, "--memory_steps",
               str(args.memory_steps), *(["--loss_types", args.loss_types] if args.loss_types else []),
               *(["--base", args.base] if args.base else []), *(["--threads", str(args.threads)] if args.threads else []),
               *distill_argv]
        result = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
        if result.returncode != 0 or not lines:
            logger.warning("peak memory of %r failed: %s", name, result.stderr[-2000:])
            continue
        out[name] = json.loads(lines[-1].removeprefix("MEMORY_JSON "))["mib"]
    return out


def profile_rows(trainers: dict, batches: list, warmup: int, top: int = 20) -> None:
    """``torch.profiler`` tables (self CPU time per op, top ``top``) of each row's steps on the same batches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, trainer in trainers.items():
        for batch in batches[:warmup]:
            timed_step(trainer, batch)
        with profile(activities=activities, record_shapes=False, profile_memory=True) as prof:
            for batch in batches[warmup:]:
                timed_step(trainer, batch)
        print(f"\n=== {name}: {len(batches) - warmup} steps ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def run_rounds(trainers: dict, teacher, batches: list, warmup: int) -> dict:
    """Per-row step seconds over the timed rounds; every round runs every row on the same batch, in reversed order
    on odd rounds (no row always follows the same one: allocator and cache state carry over between rows)."""
    times = {name: [] for name in [*trainers, "teacher forward"]}
    names = list(trainers)
    for i, batch in enumerate(batches):
        round_times = {name: timed_step(trainers[name], batch) for name in (names if i % 2 == 0 else names[::-1])}
        round_times["teacher forward"] = timed_teacher_forward(teacher, batch)
        if i >= warmup:
            for name, seconds in round_times.items():
                times[name].append(seconds)
    return times


def report(med: dict, memory: dict, tokens: int) -> tuple[list, float]:
    baseline = med[FINE_TUNING_ROW] + med["teacher forward"]
    trl = med.get(TRL_ROW)
    print("| step | median ms | tokens/s | / (fine-tuning step + teacher forward) | time / TRL | peak MiB | memory / TRL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, seconds in med.items():
        ratio = seconds / baseline if name.startswith("kd") else None
        vs_trl = seconds / trl if trl and name != "teacher forward" else None
        mib = memory.get(name)
        mem_vs = mib / memory[TRL_ROW] if mib is not None and memory.get(TRL_ROW) else None
        rows.append((name, seconds, ratio, vs_trl, mib, mem_vs))
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"| {name} | {1000 * seconds:.1f} | {tokens / seconds:,.0f} | {fmt(ratio, '.3f')} | {fmt(vs_trl, '.3f')} "
              f"| {fmt(mib, '.1f')} | {fmt(mem_vs, '.3f')} |")
    print(f"| fine-tuning step + teacher forward | {1000 * baseline:.1f} | {tokens / baseline:,.0f} | 1.000 | - | - | - |")
    return rows, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30, help="timed rounds (each runs every row once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench_results/kd_overhead.json")
    parser.add_argument("--loss_types", default=None,
                        help="comma-separated loss types (or 'all'): one memory-lean KD trainer per type, all measured "
                             "in the same alternating rounds (the plain-loss and TRL rows are then left out)")
    parser.add_argument("--memory_steps", type=int, default=3,
                        help="steps of each row's peak-memory process (0: no memory measurement)")
    parser.add_argument("--base", default=None,
                        help="git revision whose KD trainer rows are measured too, in the same rounds (before/after)")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table per row (--reps steps each after --warmup) and exit")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    args, distill_argv = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args, distill_argv)
    trainers, teacher, batches, train_args = build_trainers(args, distill_argv)
    if args.profile:
        return profile_rows(trainers, batches, args.warmup)
    step1 = step_one_losses(trainers, batches[0])
    times = run_rounds(trainers, teacher, batches, args.warmup)
    memory = peak_memory(list(trainers), args, distill_argv) if args.memory_steps > 0 else {}

    med = {name: statistics.median(v) for name, v in times.items()}
    tokens = batches[0]["input_ids"].numel()
    print(f"\nbatch {tuple(batches[0]['input_ids'].shape)}, loss_type {args.loss_types or train_args.loss_type}, "
          f"{args.reps} interleaved rounds, medians, {torch.get_num_threads()} threads; peak memory: "
          f"{args.memory_steps} steps per row in its own process\n")
    print("step-1 loss on the first batch (same weights): " + ", ".join(f"{k} {v:.9g}" for k, v in step1.items()))
    rows, baseline = report(med, memory, tokens)
    result = {
        "command": "python " + " ".join(sys.argv),
        "batch_shape": list(batches[0]["input_ids"].shape), "loss_type": args.loss_types or train_args.loss_type,
        "reps": args.reps, "median_seconds": med, "baseline_seconds": baseline,
        "overhead_ratio": {n: r for n, _, r, *_ in rows if r is not None},
        "time_vs_trl": {n: v for n, _, _, v, *_ in rows if v is not None},
        "peak_memory_mib": memory, "memory_vs_trl": {n: m for n, *_, m in rows if m is not None},
        "memory_method": "CPU: peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the steps, "
                         f"{args.memory_steps} steps per row in a fresh process; CUDA: max_memory_allocated growth",
        "step1_loss": step1, "all_seconds": times,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                "trl": _trl_version(), "python": platform.python_version(), "machine": platform.machine()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


def _trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
