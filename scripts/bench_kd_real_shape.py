"""A full KD training step at a real shape: chunked (memory-lean) vs plain loss, time and peak memory.

    python scripts/bench_kd_real_shape.py                      # H=896, V=151,936, batch 2 x 256, 4-layer Qwen2 pair
    python scripts/bench_kd_real_shape.py --layers 24 --rounds 2   # the whole Qwen2.5-0.5B depth (~10 GB, slow on CPU)

The shape of a Qwen2.5-0.5B student (hidden 896, 14 query / 2 KV heads, MLP 4864, vocabulary 151,936, tied
embeddings) distilled from a teacher of the same shape, random weights (timing does not depend on them), one
batch of 2 x 256 tokens, every token a target. One step = ``DistillationTrainer.training_step`` (teacher forward
under no_grad, student forward, KD loss, backward) + AdamW step, as in training. By default both models have 4
layers instead of 24: the loss and the LM head are then a *larger* share of the step than in the real model, so a
chunked path that is no slower here is no slower at full depth (``--layers 24`` runs the real depth).

Each measurement is a fresh child process (peak memory = the child's RSS high-water mark minus its RSS once the
models, optimizer state and batch exist; the optimizer state is created by a first, untimed step); the variants
alternate over ``--rounds`` rounds, each child timing ``--steps`` steps after one warm-up step; medians over all
timed steps are reported. Writes bench_results/kd_real_shape.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_distill.footprint import environment, peak_rss_mib, rss_mib, write_results  # noqa: E402

logger = logging.getLogger("bench_kd_real_shape")
VARIANTS = {"chunked (default)": 256, "plain (loss_chunk_size 0)": 0}


def qwen_pair(layers: int, vocab: int, seed: int):
    """A student and a teacher of Qwen2.5-0.5B's width and vocabulary, ``layers`` deep, random weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=1024)
    torch.manual_seed(seed)
    student = Qwen2ForCausalLM(config)
    teacher = Qwen2ForCausalLM(config).eval()
    return student, teacher


def measure(chunk: int, args) -> dict:
    """Warm-up step, then ``args.steps`` timed steps of one variant in this (fresh) process."""
    import torch

    from llm_distill import DistillationConfig, DistillationTrainer

    torch.manual_seed(args.seed)
    student, teacher = qwen_pair(args.layers, args.vocab, args.seed)
    config = DistillationConfig(output_dir="/tmp/bench_kd_real_shape", report_to="none", use_cpu=True,
                                loss_chunk_size=chunk, learning_rate=1e-5, per_device_train_batch_size=args.batch)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config)
    trainer.create_optimizer()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    num_items = (batch["labels"][:, 1:] != -100).sum()

    def step() -> float:
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch, num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # creates AdamW's state: part of the baseline, as in any training run after step 1
    base = rss_mib()
    times = [step() for _ in range(args.steps)]
    peak = peak_rss_mib() - base
    return {"seconds": times, "peak_above_state_mib": peak, "baseline_rss_mib": base,
            "threads": torch.get_num_threads()}


def run_child(chunk: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(chunk), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--steps", str(args.steps),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child for loss_chunk_size={chunk} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="layers of student and teacher (Qwen2.5-0.5B: 24)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per child")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (one child per variant per round)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_results/kd_real_shape.json")
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args)))
        return

    results = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, chunk in (VARIANTS.items() if r % 2 == 0 else reversed(VARIANTS.items())):
            results[name].append(run_child(chunk, args))
            logger.warning("round %d %s: %s", r, name, [f"{s:.2f}s" for s in results[name][-1]["seconds"]])
    summary = {name: {"median_step_s": statistics.median(s for c in runs for s in c["seconds"]),
                      "peak_above_state_mib": statistics.median(c["peak_above_state_mib"] for c in runs),
                      "baseline_rss_mib": statistics.median(c["baseline_rss_mib"] for c in runs)}
               for name, runs in results.items()}
    plain = summary["plain (loss_chunk_size 0)"]
    tokens = args.batch * args.seq_len
    print(f"\nQwen2 pair, {args.layers} layers, H 896, V {args.vocab:,}, batch {args.batch} x {args.seq_len}, "
          f"{args.rounds} alternating rounds x {args.steps} steps, medians, "
          f"{results[next(iter(results))][0]['threads']} threads\n")
    print("| loss path | step (s) | tokens/s | step vs plain | peak above weights+optimizer (MiB) | memory vs plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, s in summary.items():
        print(f"| {name} | {s['median_step_s']:.2f} | {tokens / s['median_step_s']:,.0f} | "
              f"{s['median_step_s'] / plain['median_step_s']:.3f} | {s['peak_above_state_mib']:,.0f} | "
              f"{s['peak_above_state_mib'] / plain['peak_above_state_mib']:.3f} |")
    write_results(args.out, {"command": "python " + " ".join(sys.argv), "args": vars(args), "summary": summary,
                             "runs": results, "env": environment()})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
