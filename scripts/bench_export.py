"""Generation speed of a causal LM as PyTorch fp32, ONNX fp32 and ONNX int8 (onnxruntime), interleaved in one process.

    python scripts/bench_export.py --model outputs/compress/3-sparsify
    python scripts/bench_export.py --model ~/.cache/llm_distill/gguf-b83433b02745 --output bench_results/compress-smollm2-speed.json

Exports ``model`` with its KV cache (``llm_distill.export``), writes an onnxruntime dynamic-int8 copy, checks logits
parity and greedy text against PyTorch, then times batch-1 greedy generation of ``new_tokens`` tokens at 1 thread
(the three formats take turns; median of ``repeats`` after a warm-up). Prints and writes the figures as JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.config import parse_args_and_config  # noqa: E402
from llm_distill.export import ONNX_FILE, OnnxCausalLM, export_onnx  # noqa: E402
from llm_distill.footprint import file_size, generation_speed, torch_generator  # noqa: E402
from llm_distill.jobs import setup_logging  # noqa: E402


@dataclass
class BenchExportArguments:
    model: str = field(default="outputs/compress/3-sparsify", metadata={"help": "fp32 causal LM folder."})
    output_dir: str = field(default="outputs/bench-export", metadata={"help": "Where the ONNX files go."})
    new_tokens: int = field(default=64, metadata={"help": "Greedy tokens generated per timed run."})
    repeats: int = field(default=2, metadata={"help": "Timed runs per format (median reported)."})
    output: str = field(default="bench_results/export-speed.json", metadata={"help": "Results JSON."})


def main(argv: list[str]) -> dict:
    (args,) = parse_args_and_config((BenchExportArguments,), argv)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    fp32_dir, int8_dir = Path(args.output_dir) / "onnx", Path(args.output_dir) / "onnx-int8"
    export_onnx(model, fp32_dir)
    int8_dir.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(fp32_dir / ONNX_FILE, int8_dir / ONNX_FILE, weight_type=QuantType.QInt8, per_channel=True)
    shutil.copy(fp32_dir / "config.json", int8_dir / "config.json")
    prompt = torch.randint(100, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    o32, o8 = OnnxCausalLM(fp32_dir, threads=1), OnnxCausalLM(int8_dir, threads=1)
    with torch.no_grad():
        diff = float(abs(o32.logits(prompt.numpy()) - model(prompt).logits.numpy()).max())
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                  min_new_tokens=32, do_sample=False, pad_token_id=0)
    runners = {"pytorch fp32": {1: torch_generator(model, prompt, args.new_tokens)},
               "onnx fp32": {1: lambda: o32.generate(prompt.numpy(), args.new_tokens)},
               "onnx int8": {1: lambda: o8.generate(prompt.numpy(), args.new_tokens)}}
    speed = generation_speed(runners, args.new_tokens, args.repeats)
    results = {"model": args.model, "logits_max_abs_diff": diff,
               "greedy_identical_32": o32.generate(prompt.numpy(), 32).tolist() == expected.tolist(),
               "file_bytes": {"fp32 safetensors": file_size(args.model), "onnx fp32": file_size(fp32_dir),
                              "onnx int8": file_size(int8_dir)},
               "tokens_per_s_1_thread": {name: by_threads[1] for name, by_threads in speed.items()}}
    print(json.dumps(results, indent=1))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1:])
