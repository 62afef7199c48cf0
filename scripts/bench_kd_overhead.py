"""What a distillation step costs over plain fine-tuning, on the embedded default.

    python scripts/bench_kd_overhead.py                     # configs/default.yaml: teacher 4x256, student 2x128, 8 x 256 tokens
    python scripts/bench_kd_overhead.py --reps 40 --loss_type jsd
    python scripts/bench_kd_overhead.py --loss_types all    # all six divergences in ONE interleaved run
    python scripts/bench_kd_overhead.py --config my.yaml    # any distill config (models, data, batch size)

overhead = (KD step) / (student fine-tuning step + teacher forward), the issue's definition: 1.0 means the
distillation loss itself is free, everything else is the two forwards any online KD must pay.

- KD step: ``DistillationTrainer.training_step`` (teacher forward under ``no_grad`` + student forward + KD/CE loss +
  backward) + optimiser step, with the default memory-lean loss and with the plain reference loss
  (``loss_chunk_size: 0``);
- fine-tuning step: ``transformers.Trainer.training_step`` on the same student with the model's own cross-entropy +
  optimiser step (plain SFT, what a user would otherwise run);
- teacher forward: ``teacher(**inputs).logits`` under ``no_grad``.

All four alternate on the same batches after a warm-up; medians of ``--reps`` rounds. Timings on a busy machine
are noisy: compare the ratios, which are measured in one run. Writes ``bench_results/kd_overhead.json``.
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
import transformers  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from llm_distill.data import DistillationCollator  # noqa: E402
from llm_distill.losses import LOSS_TYPES  # noqa: E402
from llm_distill.jobs.distill import load_everything, parse  # noqa: E402
from llm_distill.trainer import DistillationTrainer  # noqa: E402

logger = logging.getLogger("bench_kd_overhead")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30, help="timed rounds (each runs all four measurements)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench_results/kd_overhead.json")
    parser.add_argument("--loss_types", default=None,
                        help="comma-separated loss types (or 'all'): one memory-lean KD trainer per type, all measured "
                             "in the same alternating rounds (the plain-loss row is then left out)")
    args, distill_argv = parser.parse_known_args()
    model_args, data_args, train_args = parse([*distill_argv, "--output_dir", "outputs/bench_kd_overhead"])
    tokenizer, teacher, student, train_ds, _ = load_everything(model_args, data_args, train_args)
    collator = DistillationCollator(tokenizer)

    def kd_trainer(chunk: int, *extra: str) -> DistillationTrainer:
        kd_args = parse([*distill_argv, "--output_dir", "outputs/bench_kd_overhead", "--loss_chunk_size", str(chunk),
                         *extra])[2]
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args, data_collator=collator,
                                      processing_class=tokenizer)
        trainer.create_optimizer()
        return trainer

    chunk = train_args.loss_chunk_size or 256
    if args.loss_types:
        names = LOSS_TYPES if args.loss_types == "all" else tuple(args.loss_types.split(","))
        trainers = {f"kd {name} (memory-lean loss)": kd_trainer(chunk, "--loss_type", name) for name in names}
    else:
        trainers = {"kd (memory-lean loss)": kd_trainer(chunk), "kd (plain loss)": kd_trainer(0)}
    sft = Trainer(model=student, args=TrainingArguments(output_dir="outputs/bench_kd_overhead", report_to="none",
                                                        learning_rate=train_args.learning_rate, use_cpu=train_args.use_cpu),
                  data_collator=collator, processing_class=tokenizer)
    sft.create_optimizer()
    trainers["fine-tuning step"] = sft
    teacher_model = next(iter(trainers.values())).teacher_model

    loader = DataLoader(train_ds, batch_size=train_args.per_device_train_batch_size, shuffle=True,
                        collate_fn=collator, generator=torch.Generator().manual_seed(train_args.seed))
    batches = [{k: v.to(sft.args.device) for k, v in b.items()} for b, _ in zip(loader, range(args.reps + args.warmup))]
    times = {name: [] for name in [*trainers, "teacher forward"]}
    for i, batch in enumerate(batches):  # interleaved: every round runs all four on the same batch
        round_times = {name: timed_step(t, batch) for name, t in trainers.items()}
        round_times["teacher forward"] = timed_teacher_forward(teacher_model, batch)
        if i >= args.warmup:
            for name, seconds in round_times.items():
                times[name].append(seconds)

    med = {name: statistics.median(v) for name, v in times.items()}
    baseline = med["fine-tuning step"] + med["teacher forward"]
    rows = [(name, med[name], med[name] / baseline if name.startswith("kd") else None) for name in times]
    tokens = batches[0]["input_ids"].numel()
    print(f"\nbatch {tuple(batches[0]['input_ids'].shape)}, loss_type {args.loss_types or train_args.loss_type}, "
          f"{args.reps} interleaved rounds, medians, {torch.get_num_threads()} threads\n")
    print("| step | median ms | tokens/s | / (fine-tuning step + teacher forward) |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds, ratio in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {tokens / seconds:,.0f} | {'-' if ratio is None else f'{ratio:.3f}'} |")
    print(f"| fine-tuning step + teacher forward | {1000 * baseline:.1f} | {tokens / baseline:,.0f} | 1.000 |")
    result = {
        "command": "python " + " ".join(sys.argv),
        "batch_shape": list(batches[0]["input_ids"].shape), "loss_type": args.loss_types or train_args.loss_type, "reps": args.reps,
        "median_seconds": med, "overhead_ratio": {n: r for n, _, r in rows if r is not None},
        "all_seconds": times,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                "python": platform.python_version(), "machine": platform.machine()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
