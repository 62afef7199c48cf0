"""Throughput and peak memory of distillation under each launch config (GPU), or a plumbing check on CPU.

    python scripts/bench_scaling.py build --out /tmp/scale --preset 1b          # ~1.1B teacher, ~0.2B student, random init
    accelerate launch --config_file configs/accelerate/single_gpu.yaml scripts/bench_scaling.py run --models /tmp/scale --name single_gpu
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 scripts/bench_scaling.py run --models /tmp/scale --name fsdp2_x2
    # CPU plumbing check (2 gloo ranks, tiny preset):
    python scripts/bench_scaling.py build --out /tmp/scale-tiny --preset tiny
    python -m llm_distill.launch --cpu-processes 2 scripts/bench_scaling.py run --models /tmp/scale-tiny --name cpu_x2 --use_cpu true

``build`` makes the models from config (seeded random init: throughput and memory do not depend on the
weights) with the embedded tokenizer; ``run`` distils for ``--max_steps`` (default 30) on the embedded
training data and writes ``bench_results/scaling_<name>.json`` with global train tokens/s and rank 0's peak
GPU memory. Extra ``--key value`` pairs after ``run`` go to ``scripts/distill.py``'s parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill import embedded
from llm_distill.jobs.distill import main as run_distillation  # noqa: E402

logger = logging.getLogger("bench_scaling")
REPO = Path(__file__).resolve().parents[1]

# TinyLlama-1.1B's shape for the teacher; a ~0.2B student of the same family (shared 32k vocabulary).
PRESETS = {
    "1b": {
        "teacher": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4),
        "student": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                        num_key_value_heads=4),
        "vocab_size": 32000, "max_length": 1024,
    },
    "tiny": {
        "teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2),
        "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1),
        "vocab_size": 4096, "max_length": 64,
    },
}


def build(out: Path, preset: str, seed: int = 0) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = PRESETS[preset]
    tokenizer = AutoTokenizer.from_pretrained(embedded.resolve("embedded:tokenizer"))
    if len(tokenizer) > spec["vocab_size"]:
        raise ValueError(f"preset {preset}: vocab_size {spec['vocab_size']} < tokenizer size {len(tokenizer)}")
    for name in ("teacher", "student"):
        config = LlamaConfig(vocab_size=spec["vocab_size"], max_position_embeddings=spec["max_length"],
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **spec[name])
        (out / name).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out / name)
        if name == "student":  # student_init: fresh only needs the config
            config.save_pretrained(out / name)
            continue
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        logger.info("teacher: %.2fB parameters", sum(p.numel() for p in model.parameters()) / 1e9)
        model.save_pretrained(out / name)
    (out / "preset.json").write_text(json.dumps({"preset": preset, **spec}, indent=2))
    print(f"built {preset} models in {out}")


def run(models: Path, name: str, extra: list[str]) -> None:
    spec = json.loads((models / "preset.json").read_text())
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"),  # its data + recipe
            "--teacher_model", str(models / "teacher"), "--student_model", str(models / "student"),
            "--student_init", "fresh", "--teacher_dtype", "bfloat16", "--max_length", str(spec["max_length"]),
            "--max_train_samples", "100000", "--max_steps", "30", "--per_device_train_batch_size", "4",
            "--logging_steps", "10", "--eval_dataset", "", "--save_strategy", "no",
            "--output_dir", f"outputs/bench_scaling_{name}", *extra]
    if torch.cuda.is_available():
        argv = ["--bf16", "true", "--gradient_checkpointing", "true", *argv]
        torch.cuda.reset_peak_memory_stats()
    results = run_distillation(argv)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if PartialState().process_index != 0:  # every rank measured; rank 0 reports
        return
    row = {"name": name, "preset": spec["preset"], "world_size": results["world_size"], "steps": results["steps"],
           "train_tokens_per_second": results["train_tokens_per_second"], "peak_memory_gib_rank0": peak,
           "peak_rss_gib_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "command": " ".join(sys.argv)}
    out = REPO / "bench_results" / f"scaling_{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"{'config':<16}{'ranks':>6}{'tokens/s':>12}{'peak GiB (rank 0)':>20}")
    print(f"{name:<16}{row['world_size']:>6}{row['train_tokens_per_second'] or 0:>12,.0f}"
          f"{'-' if peak is None else f'{peak:.2f}':>20}")


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    r = sub.add_parser("run")
    r.add_argument("--models", type=Path, required=True)
    r.add_argument("--name", required=True)
    args, extra = parser.parse_known_args()
    if args.cmd == "build":
        build(args.out, args.preset)
    else:
        run(args.models, args.name, extra)


if __name__ == "__main__":
    main()
