"""Job: from distilled student to deployable file, measured per stage.

    python scripts/compress.py [--config configs/compress.yaml] [--key value ...]
    llm-distill compress [--config configs/compress.yaml] [--key value ...]

Stages, in this order, any subset (``stages``): ``prune`` (structured: heads / layers / MLP width of the teacher,
``jobs.prune``) -> ``distill`` (recover by KD from the teacher, ``jobs.distill``) -> ``sparsify`` (more KD steps with
gradual magnitude pruning, ``llm_distill.sparsity``) -> ``quantize`` (torchao int8 PTQ of the fp32 result,
``llm_distill.quantization``) -> ``export`` (ONNX with KV cache run by onnxruntime, ``llm_distill.export``; plus an
onnxruntime dynamic-int8 copy). Each stage's result is saved under ``<output_dir>/<n>-<stage>`` and scored on the
same held-out batches (``llm_distill.footprint``): parameters, non-zeros, file size, CPU generation speed (batch 1,
``new_tokens`` greedy tokens, 1 thread and all threads), held-out perplexity and top-1 agreement with the teacher.
The table is printed, written as JSON (``results_json``) and drawn as a Pareto plot (``plot``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, set_seed

from llm_distill.checks import check_field
from llm_distill.config import DataArguments, DistillationConfig, ModelArguments, config_from_dict, parse_args_and_config
from llm_distill.data import DistillationCollator, Fields, load_rows, prepare_dataset
from llm_distill.embedded import resolve
from llm_distill.export import ONNX_FILE, OnnxCausalLM, export_onnx
from llm_distill.footprint import count_parameters, file_size, generation_speed, score, torch_generator
from llm_distill.jobs.distill import run_distillation
from llm_distill.jobs.prune import PruneArguments, run_pruning
from llm_distill.models import load_lm, load_tokenizer
from llm_distill.quantization import PTQ_METHODS, quantize_pretrained, require
from llm_distill.sparsity import SPARSITY_PATTERNS

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "compress.yaml"
STAGES = ("prune", "distill", "sparsify", "quantize", "export")


@dataclass
class CompressArguments:
    """Which stages to run, their budgets, and how every stage's result is scored."""

    teacher: str = field(default="embedded:teacher", metadata={"help": "The reference model: pruned by the prune "
                                                                       "stage, the KD teacher, the agreement target."})
    student: str = field(default="embedded:student", metadata={"help": "The student to start from when 'prune' is "
                                                                       "not a stage (with 'prune', the pruned teacher)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the teacher's)."})
    stages: list[str] = field(default_factory=lambda: list(STAGES),
                              metadata={"help": f"Stages to run, any subset of {', '.join(STAGES)} (run in that order)."})
    output_dir: str = field(default="outputs/compress", metadata={"help": "Each stage writes <output_dir>/<n>-<stage>."})
    prune_config: str = field(default=str(REPO_ROOT / "configs" / "prune.yaml"),
                              metadata={"help": "PruneArguments YAML for the prune stage (what to remove, importance)."})
    distill_config: str = field(default=str(REPO_ROOT / "configs" / "default.yaml"),
                                metadata={"help": "Distillation YAML the distill and sparsify stages start from (data, "
                                                  "loss, batch size); the settings below override it."})
    distill_steps: int = field(default=40, metadata={"help": "Optimizer steps of the distill stage."})
    sparsify_steps: int = field(default=40, metadata={"help": "Optimizer steps of the sparsify stage (pruning reaches "
                                                              "the target at 3/4 of them; the rest recover)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the distill / sparsify stages."})
    target_sparsity: float = field(default=0.5, metadata={"help": "Sparsify stage: share of zeros in the linear layers."})
    sparsity_pattern: str = field(default="unstructured",
                                  metadata={"help": f"Sparsify stage pattern, one of {', '.join(SPARSITY_PATTERNS)}."})
    quantize: list[str] = field(
        default_factory=lambda: ["int8_weight_only", "int8_dynamic", "int8_weight_only+emb"],
        metadata={"help": f"Quantize stage: torchao methods, any of {', '.join(PTQ_METHODS)}; '+emb' also quantizes "
                          "the input embeddings and the output head (left fp32 otherwise)."})
    onnx_int8: bool = field(default=True, metadata={"help": "Export stage: also write an onnxruntime dynamic-int8 "
                                                           "copy (int8 weights, int8 activations per batch)."})
    eval_dataset: str = field(default="embedded:heldout", metadata={"help": "Held-out text every stage is scored on."})
    max_eval_samples: int = field(default=16, metadata={"help": "Held-out sequences (packed, max_length tokens)."})
    max_length: int = field(default=256, metadata={"help": "Tokens per held-out sequence."})
    new_tokens: int = field(default=64, metadata={"help": "Tokens generated (greedy, batch 1) for the speed figures."})
    prompt_tokens: int = field(default=16, metadata={"help": "Prompt length of the speed runs (held-out tokens)."})
    latency_repeats: int = field(default=3, metadata={"help": "Timed generations per model and thread count; the "
                                                              "models take turns; the median is reported. 0 = skip."})
    results_json: str | None = field(default="bench_results/compress.json", metadata={"help": "Table as JSON."})
    plot: str | None = field(default="bench_results/compress.png",
                             metadata={"help": "Pareto plot (perplexity vs file size and vs speed); empty = none."})
    seed: int = field(default=42, metadata={"help": "Seed of every stage."})

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        check_field(self.stages and not unknown, "stages", self.stages, f"a non-empty subset of {', '.join(STAGES)}")
        bad = [m for m in self.quantize if m.removesuffix("+emb") not in PTQ_METHODS]
        check_field(not bad, "quantize", self.quantize, f"methods among {', '.join(PTQ_METHODS)} (+emb optional)")
        check_field(self.sparsity_pattern in SPARSITY_PATTERNS, "sparsity_pattern", self.sparsity_pattern,
                    f"one of {', '.join(SPARSITY_PATTERNS)}")
        check_field(0.0 < self.target_sparsity < 1.0, "target_sparsity", self.target_sparsity, "a number in (0, 1)")
        for name in ("distill_steps", "sparsify_steps", "max_eval_samples", "new_tokens", "prompt_tokens"):
            check_field(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check_field(self.latency_repeats >= 0, "latency_repeats", self.latency_repeats, "an integer >= 0 (0 = skip)")
        self.stages = [s for s in STAGES if s in self.stages]  # the pipeline's order, whatever the config's


def parse(argv: list[str]) -> CompressArguments:
    """Parse argv; with no ``--config`` the embedded recipe (configs/compress.yaml) is the base."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and DEFAULT_CONFIG.is_file():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    (args,) = parse_args_and_config((CompressArguments,), argv)
    return args


def main(argv: list[str]) -> dict:
    """``scripts/compress.py`` / ``llm-distill compress``: parse ``argv``, run, print the table."""
    results = run_compression(parse(argv))
    print(format_table(results["rows"]))
    return results


# ------------------------------------------------------------------ stages: folder in, [(name, folder, kind)] out


def _config_path(path: str) -> str:
    """A config path as given, or relative to the repository (so the defaults work from any directory)."""
    return path if Path(path).is_file() or not (REPO_ROOT / path).is_file() else str(REPO_ROOT / path)


def _stage_dir(args: CompressArguments, stage: str, suffix: str = "") -> Path:
    return Path(args.output_dir) / f"{STAGES.index(stage) + 1}-{stage}{suffix}"


def stage_prune(args: CompressArguments, current: str, tokenizer) -> list[tuple[str, Path, str]]:
    out = _stage_dir(args, "prune")
    (prune_args,) = config_from_dict((PruneArguments,), {
        "model": args.teacher, "tokenizer": args.tokenizer or args.teacher, "output_dir": str(out),
        "eval_dataset": None, "latency_repeats": 0, "seed": args.seed}, base=_config_path(args.prune_config))
    run_pruning(prune_args)
    return [("prune", out, "torch")]


def _distil(args: CompressArguments, current: str, stage: str, steps: int, extra: dict) -> Path:
    out = _stage_dir(args, stage)
    values = {"teacher_model": args.teacher, "student_model": current, "student_init": "pretrained",
              "tokenizer": args.tokenizer or args.teacher, "output_dir": str(out), "max_steps": steps,
              "learning_rate": args.learning_rate, "warmup_steps": max(1, steps // 20), "eval_dataset": None,
              "save_strategy": "no", "report_to": "none", "seed": args.seed, "logging_steps": max(1, steps // 4),
              **extra}
    run_distillation(*config_from_dict((ModelArguments, DataArguments, DistillationConfig), values,
                                       base=_config_path(args.distill_config)))
    return out


def stage_distill(args: CompressArguments, current: str, tokenizer) -> list[tuple[str, Path, str]]:
    return [("distill", _distil(args, current, "distill", args.distill_steps, {}), "torch")]


def stage_sparsify(args: CompressArguments, current: str, tokenizer) -> list[tuple[str, Path, str]]:
    steps = args.sparsify_steps
    extra = {"target_sparsity": args.target_sparsity, "sparsity_pattern": args.sparsity_pattern,
             "sparsity_start_step": 0, "sparsity_end_step": max(1, steps * 3 // 4),
             "sparsity_every": max(1, steps // 16)}
    name = f"sparsify {args.sparsity_pattern} {args.target_sparsity:.0%}"
    return [(name, _distil(args, current, "sparsify", steps, extra), "torch")]


def stage_quantize(args: CompressArguments, current: str, tokenizer) -> list[tuple[str, Path, str]]:
    produced = []
    for method in args.quantize:
        out = _stage_dir(args, "quantize", f"-{method.replace('+', '-')}")
        quantize_pretrained(current, out, method.removesuffix("+emb"), embeddings=method.endswith("+emb"))
        tokenizer.save_pretrained(out)
        produced.append((f"torchao {method}", out, "torch"))
    return produced


def stage_export(args: CompressArguments, current: str, tokenizer) -> list[tuple[str, Path, str]]:
    out = _stage_dir(args, "export", "-onnx")
    export_onnx(load_lm(current, "float32"), out)
    produced = [("onnx fp32", out, "onnx")]
    if args.onnx_int8:
        quantization = require("onnxruntime.quantization")
        q_out = _stage_dir(args, "export", "-onnx-int8")
        q_out.mkdir(parents=True, exist_ok=True)
        quantization.quantize_dynamic(out / ONNX_FILE, q_out / ONNX_FILE, weight_type=quantization.QuantType.QInt8,
                                     per_channel=True)  # per-tensor weights: ppl 18.1 vs 14.8 on SmolLM2-135M
        shutil.copy(out / "config.json", q_out / "config.json")
        produced.append(("onnx int8 (ort dynamic)", q_out, "onnx"))
    return produced


STAGE_FUNCTIONS = {"prune": stage_prune, "distill": stage_distill, "sparsify": stage_sparsify,
                   "quantize": stage_quantize, "export": stage_export}
FP32_STAGES = ("prune", "distill", "sparsify")  # their result is the input of the next stage


# ------------------------------------------------------------------ scoring


def heldout_batches(args: CompressArguments, tokenizer) -> list[dict]:
    """The held-out rows every stage is scored on, packed into ``max_length`` blocks, in fixed batches of 8."""
    data_args = DataArguments(dataset=args.eval_dataset, eval_dataset=args.eval_dataset, packing=True,
                              max_length=args.max_length)
    rows, fmt = load_rows(args.eval_dataset, "train", None, Fields.from_args(data_args))
    heldout = prepare_dataset(rows, fmt, tokenizer, data_args, args.max_eval_samples, args.seed, "eval")
    return list(DataLoader(heldout, batch_size=8, collate_fn=DistillationCollator(tokenizer)))


def measure(name: str, folder: Path, kind: str, batches: list[dict], reference, args: CompressArguments,
            source: str | None = None):
    """One table row (without speed), the model's speed runners ``{threads: call}`` and its argmax per held-out
    position. ONNX rows count the parameters of ``source``, the PyTorch folder they were exported from."""
    all_threads = os.cpu_count() or 1
    prompt = batches[0]["input_ids"][:1, : args.prompt_tokens]
    if kind == "onnx":
        sessions = {t: OnnxCausalLM(folder, threads=t) for t in sorted({1, all_threads})}
        model = sessions[all_threads]
        counts = count_parameters(AutoModelForCausalLM.from_pretrained(str(source)))
        logits_fn = lambda ids, mask: model.logits(ids.numpy(), mask.numpy())  # noqa: E731
        runners = {t: (lambda s=s: s.generate(prompt.numpy(), args.new_tokens)) for t, s in sessions.items()}
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        counts = count_parameters(model)
        logits_fn = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
        run = torch_generator(model, prompt, args.new_tokens)
        runners = {t: run for t in sorted({1, all_threads})}
    scores = score(logits_fn, batches, reference)
    row = {"stage": name, "kind": kind, "folder": str(folder), **counts, "file_bytes": file_size(folder) if folder.is_dir() else None,
           **{k: scores[k] for k in ("perplexity", "accuracy", "tokens")}, "top1_agreement": scores.get("top1_agreement")}
    logger.info("%s: perplexity %.3f, %.2f MB", name, row["perplexity"], row["file_bytes"] / 1e6)
    return row, runners, scores["argmax"]


def run_compression(args: CompressArguments) -> dict:
    """Run ``args.stages`` and return ``{"rows": [...], "args": {...}}`` (also written to ``results_json``)."""
    names = args
    args = dataclasses.replace(args, **{n: resolve(getattr(args, n)) for n in ("teacher", "student", "tokenizer",
                                                                                 "eval_dataset")})
    set_seed(args.seed)
    start = time.time()
    tokenizer = load_tokenizer(args.tokenizer or args.teacher)
    batches = heldout_batches(args, tokenizer)
    rows, runners = [], {}
    teacher_row, runners["teacher"], reference = measure("teacher", Path(args.teacher), "torch", batches, None, args)
    rows.append(teacher_row | {"top1_agreement": 1.0})
    current = args.student
    if "prune" not in args.stages:
        row, runners["student (start)"], _ = measure("student (start)", Path(current), "torch", batches, reference,
                                                     args)
        rows.append(row)
    for stage in args.stages:
        for name, folder, kind in STAGE_FUNCTIONS[stage](args, current, tokenizer):
            row, runners[name], _ = measure(name, folder, kind, batches, reference, args, source=current)
            rows.append(row | {"made_from": current})
        if stage in FP32_STAGES:
            current = str(folder)
    if args.latency_repeats:
        speed = generation_speed(runners, args.new_tokens, args.latency_repeats)
        for row in rows:
            row["tokens_per_s"] = {str(t): v for t, v in speed[row["stage"]].items()}
    results = {"rows": rows, "args": dataclasses.asdict(names), "wall_time_s": time.time() - start,
               "threads_all": os.cpu_count()}
    write_outputs(results, args)
    return results


# ------------------------------------------------------------------ report


def write_outputs(results: dict, args: CompressArguments) -> None:
    if args.results_json:
        Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot_pareto(results["rows"], args.plot)


def format_table(rows: list[dict]) -> str:
    """The per-stage table (Markdown), sizes relative to the first student row."""
    base = next((r for r in rows[1:] if r["kind"] == "torch"), rows[0])
    head = ("| stage | params | non-zeros | file MB | vs fp32 | tok/s 1 thr | tok/s all | perplexity | top-1 agree |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = ["", "=== llm-distill: compress ===", head]
    for r in rows:
        speed = r.get("tokens_per_s", {})
        one, *rest = list(speed.values()) or [None]
        many = rest[-1] if rest else one
        lines.append(f"| {r['stage']} | {r['parameters']:,} | {r['nonzeros']:,} | {_num((r['file_bytes'] or 0) / 1e6, 2)} | "
                     f"{_ratio(base['file_bytes'], r['file_bytes'])} | {_num(one)} | {_num(many)} | "
                     f"{r['perplexity']:.3f} | {r['top1_agreement']:.3f} |")
    return "\n".join(lines)


def _ratio(base, size) -> str:
    return f"{base / size:.2f}x smaller" if base and size else "-"


def _num(x, digits: int = 0) -> str:
    return "-" if not x else f"{x:,.{digits}f}"


def plot_pareto(rows: list[dict], path: str) -> None:
    """Perplexity vs file size and vs 1-thread generation speed, one labelled point per stage (teacher left out:
    it is the reference, not a candidate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["stage"] != "teacher" and r["file_bytes"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [("file size (MB)", [r["file_bytes"] / 1e6 for r in rows])]
    if all("tokens_per_s" in r for r in rows):
        panels.append(("ms per generated token, 1 thread", [1e3 / list(r["tokens_per_s"].values())[0] for r in rows]))
    for ax, (label, xs) in zip(axes, panels):
        ys = [r["perplexity"] for r in rows]
        ax.scatter(xs, ys)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["stage"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _pareto_front(xs, ys)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", alpha=0.6, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.legend()
    fig.suptitle("llm-distill compress: each stage's cost vs quality (lower-left is better)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better), by increasing x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    front, best = [], float("inf")
    for i in order:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return front
