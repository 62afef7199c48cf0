"""Job: prune heads / layers / MLP width. Config -> model -> calibration data -> scores -> plan -> prune -> save.

    python scripts/prune.py [--config configs/prune.yaml] [--key value ...]
    llm-distill prune [--config configs/prune.yaml] [--key value ...]

:func:`run_pruning` is the typed entry (``PruneArguments`` in, the report out); :func:`main` parses argv. The pruned
folder is then the student of
``scripts/distill.py`` (``--student_model <output_dir> --student_init pretrained``) with the original model
as the teacher, which recovers most of the quality pruning costs (Minitron's prune -> distil recipe).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from llm_distill.checks import DTYPES, check_field
from llm_distill.config import ConfigError, DataArguments, parse_args_and_config
from llm_distill.data import (
    DistillationCollator,
    Fields,
    for_masked_lm,
    load_rows,
    masked_lm_collator,
    prepare_dataset,
)
from llm_distill.embedded import resolve
from llm_distill.evaluation import evaluate_models, forward_latency, heldout_set
from llm_distill.importance import (
    Importance,
    activation_importance,
    block_influence,
    build_plan,
    gradient_importance,
    layer_removal_loss,
)
from llm_distill.jobs import with_base
from llm_distill.models import lm_kind, load_lm, load_tokenizer
from llm_distill.pruning import GQA_MODES, PruningPlan, check_plan, layer_shapes, prune, save_pruned

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "prune.yaml"
IMPORTANCE = {"activation": activation_importance, "gradient": gradient_importance}
LAYER_IMPORTANCE = {"block_influence": block_influence, "loss": layer_removal_loss}


@dataclass
class PruneArguments:
    """What to prune, how to score it, and on which data."""

    model: str | None = field(default=None, metadata={"help": "Model to prune, causal or masked LM: hub id, "
                                                                     "local path (a pruned folder works too), "
                                                                     "'embedded:teacher' or 'embedded:mlm_teacher'."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's); saved with the "
                                                                  "pruned model."})
    output_dir: str = field(default="outputs/pruned", metadata={"help": "Where the pruned model is written."})
    dtype: str = field(default="float32", metadata={"help": f"dtype to load and save in, one of {', '.join(DTYPES)}."})
    keep_heads: int | None = field(
        default=None,
        metadata={"help": "Query heads to keep per layer (e.g. 4 of 8). With GQA a multiple of the unit gqa removes: "
                          "heads per KV group (groups) or KV heads (per_group). Empty = heads untouched."},
    )
    mlp_width: int | None = field(default=None, metadata={"help": "MLP neurons to keep per layer. Empty = untouched."})
    drop_layers: int = field(default=0, metadata={"help": "How many whole layers to remove (least important)."})
    gqa: str = field(
        default="groups",
        metadata={"help": f"GQA head removal, one of {', '.join(GQA_MODES)}: groups = remove whole KV groups (KV cache "
                          "shrinks too); per_group = keep every KV head, remove query heads evenly from each group."},
    )
    uniform: bool = field(
        default=True,
        metadata={"help": "Keep the same number of heads / neurons in every layer (reloads with plain from_pretrained). "
                          "false = rank all layers together (non-uniform; reload with llm_distill.pruning.load_pruned)."},
    )
    standard_config: bool = field(
        default=True,
        metadata={"help": "With uniform: refuse (before scoring) a plan whose result the model's config class cannot "
                          "describe, naming the nearest sizes it accepts, so the output reloads with plain "
                          "from_pretrained. false = allow it: saved with pruning.json, reloaded with "
                          "llm_distill.load_pruned."},
    )
    importance: str = field(
        default="activation",
        metadata={"help": f"Head / neuron scores, one of {', '.join(IMPORTANCE)}: activation = Minitron output norms "
                          "(forward only); gradient = Michel et al. 2019 |dL/dmask|, per-layer normalised."},
    )
    layer_importance: str = field(
        default="block_influence",
        metadata={"help": f"Layer scores, one of {', '.join(LAYER_IMPORTANCE)}: block_influence = 1 - cos(input, "
                          "output) (ShortGPT); loss = loss increase when the layer is skipped."},
    )
    plan: str | None = field(
        default=None,
        metadata={"help": "JSON file with an explicit plan ({'heads': {layer: [heads]}, 'neurons': {...}, 'layers': "
                          "[...], 'gqa': ...}); replaces the importance-based choice."},
    )
    dataset: str | None = field(default=None, metadata={"help": "Calibration text (same formats as distill)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub / saved calibration dataset."})
    calibration_samples: int = field(default=32, metadata={"help": "Calibration sequences used for the scores."})
    max_length: int = field(default=256, metadata={"help": "Tokens per calibration sequence (packed) and per held-out "
                                                           "sequence (packed or not: see packing)."})
    packing: bool = field(default=False, metadata={"help": "Held-out 'text' rows: concatenate and cut into max_length "
                                                           "blocks, as distill's packing does (same file + same "
                                                           "settings = the same perplexity in both jobs)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass for scoring and evaluation."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out text for the perplexity "
                                                                                   "before / after; empty to skip."})
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out sequences to evaluate."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Masked LMs: fraction of tokens masked for the "
                                                                   "scores and the held-out perplexity (seeded)."})
    latency_repeats: int = field(default=10, metadata={"help": "Timed forward passes (batch_size x max_length) of "
                                                                  "the model before and after pruning; median "
                                                                  "reported. 0 = skip."})
    seed: int = field(default=42, metadata={"help": "Seed for sub-sampling the calibration data."})

    def __post_init__(self):
        check_field(self.dtype in DTYPES, "dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        for name in ("keep_heads", "mlp_width"):
            value = getattr(self, name)
            check_field(value is None or value >= 1, name, value, "an integer >= 1 (or empty to leave untouched)")
        check_field(self.drop_layers >= 0, "drop_layers", self.drop_layers, "an integer >= 0")
        check_field(0.0 < self.mlm_probability < 1.0, "mlm_probability", self.mlm_probability, "a number in (0, 1)")
        check_field(self.latency_repeats >= 0, "latency_repeats", self.latency_repeats, "an integer >= 0 (0 = skip)")
        check_field(self.gqa in GQA_MODES, "gqa", self.gqa, f"one of {', '.join(GQA_MODES)}")
        check_field(self.importance in IMPORTANCE, "importance", self.importance, f"one of {', '.join(IMPORTANCE)}")
        check_field(self.layer_importance in LAYER_IMPORTANCE, "layer_importance", self.layer_importance,
               f"one of {', '.join(LAYER_IMPORTANCE)}")
        for name in ("calibration_samples", "max_length", "batch_size", "max_eval_samples"):
            check_field(getattr(self, name) >= (2 if name == "max_length" else 1), name, getattr(self, name),
                   "an integer >= 2" if name == "max_length" else "an integer >= 1")
        if self.plan is None and self.keep_heads is None and self.mlp_width is None and not self.drop_layers:
            raise ValueError("Nothing to prune: set keep_heads, mlp_width, drop_layers, or plan (a JSON plan file).")


def parse(argv: list[str]) -> PruneArguments:
    """Parse argv on its base (:func:`~llm_distill.jobs.with_base`): ``--config``; else the embedded recipe
    (configs/prune.yaml) when no model or data of the user's is given; else the dataclass defaults."""
    (args,) = parse_args_and_config((PruneArguments,), with_base(argv, DEFAULT_CONFIG,
                                                                 ("model", "dataset", "eval_dataset", "tokenizer")))
    return args


def main(argv: list[str]) -> dict:
    """``scripts/prune.py`` / ``llm-distill prune``: parse ``argv``, run, print the report."""
    results = run_pruning(parse(argv))
    print(format_report(results))
    if os.environ.get("LLM_DISTILL_PRINT_JSON"):
        print(json.dumps(results))
    return results


def resolve_names(args: PruneArguments, names: tuple[str, ...]) -> PruneArguments:
    """A copy with the ``embedded:`` names among ``names`` replaced by their local paths (the embedded default is
    built on first use: the data names are resolved only once the plan has been checked, so a refused plan costs
    seconds, not a build)."""
    return replace(args, **{name: resolve(getattr(args, name)) for name in names})


def run_pruning(args: PruneArguments) -> dict:
    """Prune ``args.model`` into ``args.output_dir`` and return the before / after report."""
    if not args.model:
        raise ConfigError("model is not set: pass --model <hub id or folder> (or run with no model / data arguments "
                          "for the embedded demo, configs/prune.yaml).")
    names, args = args, resolve_names(args, ("model", "tokenizer"))
    set_seed(args.seed)
    start = time.time()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_lm(args.model, args.dtype)
    masked = lm_kind(model.config) == "masked"  # BERT / DistilBERT: masked tokens score heads and perplexity
    standard = args.uniform and args.standard_config
    if args.plan:
        plan = PruningPlan.from_dict(json.loads(Path(args.plan).read_text()))
        check_plan(model, plan, standard)
    else:
        # The sizes alone decide whether the config can describe the result: check them with a stand-in plan
        # (uniform scores) before the calibration data is tokenised and scored.
        check_plan(model, choose_plan(model, None, args, stand_in=True), standard)
    calibration, heldout = _data(args, tokenizer, masked)
    if not args.plan:
        plan = choose_plan(model, calibration, args)
    before = describe(model) | _perplexity(model, heldout, tokenizer, args, masked) | _latency(model, args)
    prune(model, plan, standard)
    after = describe(model) | _perplexity(model, heldout, tokenizer, args, masked) | _latency(model, args)
    save_pruned(model, args.output_dir, plan)
    tokenizer.save_pretrained(args.output_dir)
    results = {"model": names.model, "objective": "masked_lm" if masked else "causal_lm", "output_dir": args.output_dir,
               "before": before, "after": after,
               "plan": plan.to_dict(), "importance": args.importance, "layer_importance": args.layer_importance,
               "wall_time_s": time.time() - start}
    Path(args.output_dir, "prune_results.json").write_text(json.dumps(results, indent=1))
    return results


def choose_plan(model, calibration: list[dict] | None, args: PruneArguments, stand_in: bool = False) -> PruningPlan:
    """Score what the arguments ask to prune on the calibration batches and keep the most important.
    ``stand_in=True``: the same sizes from uniform scores, no data (to check the sizes before scoring)."""
    if stand_in:
        shapes = layer_shapes(model)
        scores = Importance(heads=[torch.zeros(s.num_attention_heads) for s in shapes],
                            neurons=[torch.zeros(s.intermediate_size) for s in shapes])
        layer_scores = torch.zeros(len(shapes))
        return build_plan(model, head_scores=scores.heads, keep_heads=args.keep_heads, neuron_scores=scores.neurons,
                          mlp_width=args.mlp_width, layer_scores=layer_scores, drop=args.drop_layers, gqa=args.gqa,
                          uniform=args.uniform)
    scores = IMPORTANCE[args.importance](model, calibration) if args.keep_heads or args.mlp_width else None
    layer_scores = LAYER_IMPORTANCE[args.layer_importance](model, calibration) if args.drop_layers else None
    if layer_scores is not None:
        logger.info("Layer importance (%s): %s", args.layer_importance, [round(float(s), 4) for s in layer_scores])
    return build_plan(model, head_scores=scores and scores.heads, keep_heads=args.keep_heads,
                      neuron_scores=scores and scores.neurons, mlp_width=args.mlp_width, layer_scores=layer_scores,
                      drop=args.drop_layers, gqa=args.gqa, uniform=args.uniform)


def describe(model) -> dict:
    """Parameters, layers, heads and MLP widths as the weights say (lists where layers differ)."""
    shapes = layer_shapes(model)

    def per_layer(name):
        values = [getattr(s, name) for s in shapes]
        return values[0] if len(set(values)) == 1 else values

    return {"parameters": sum(p.numel() for p in model.parameters()), "layers": len(shapes),
            "heads": sum(s.num_attention_heads for s in shapes), "kv_heads": sum(s.num_key_value_heads for s in shapes),
            "heads_per_layer": per_layer("num_attention_heads"), "kv_heads_per_layer": per_layer("num_key_value_heads"),
            "mlp_width": per_layer("intermediate_size")}


def _data(args: PruneArguments, tokenizer, masked: bool = False):
    """Calibration batches and held-out rows. Masked LMs: seeded random masks for the calibration batches (the loss
    the gradient scores use is the MLM loss) and one fixed masking of the held-out rows (before == after masks)."""
    if not args.dataset:
        raise ConfigError("dataset is not set: pass --dataset <calibration text: .jsonl, folder or hub dataset> (or "
                          "run with no model / data arguments for the embedded demo, configs/prune.yaml).")
    args = resolve_names(args, ("dataset", "eval_dataset"))
    data_args = DataArguments(dataset=args.dataset, dataset_split=args.dataset_split, eval_dataset=args.eval_dataset,
                              packing=True, max_length=args.max_length)
    fields = Fields.from_args(data_args)
    rows, fmt = load_rows(args.dataset, args.dataset_split, None, fields)
    # Scores need a few thousand tokens, not the whole corpus: tokenise a seeded sample of rows (4x margin for
    # short documents that pack into less than one block each).
    rows = rows.shuffle(seed=args.seed).select(range(min(len(rows), 4 * args.calibration_samples)))
    train = prepare_dataset(rows, fmt, tokenizer, data_args, args.calibration_samples, args.seed, "calibration")
    if masked:
        train = for_masked_lm(train, fmt, args.dataset)
    collator = masked_lm_collator(tokenizer, args.mlm_probability, args.seed) if masked else DistillationCollator(tokenizer)
    calibration = list(DataLoader(train, batch_size=args.batch_size, collate_fn=collator))
    heldout = None
    if args.eval_dataset:  # the held-out builder of every job: packed or not as the run says (distill's figure)
        heldout = heldout_set(args.eval_dataset, tokenizer, replace(data_args, packing=args.packing),
                              args.max_eval_samples, args.seed, masked, args.mlm_probability)
    return calibration, heldout


def _perplexity(model, heldout, tokenizer, args, masked: bool = False) -> dict:
    """Held-out perplexity: next-token for causal LMs, masked-token (on the fixed masks) for masked LMs."""
    if heldout is None:
        return {}
    result = evaluate_models({"model": model}, heldout, DistillationCollator(tokenizer), args.batch_size, reference=None,
                             shift_labels=not masked)
    return {"perplexity": result["model"]["perplexity"]}


def _latency(model, args: PruneArguments) -> dict:
    """Median forward time on one fixed batch, measured on the model in place (before and after pruning: no copy of
    the model is kept, which for a large model would double its memory; ``scripts/bench_pruning.py`` alternates two
    models for a noise-robust ratio)."""
    if not args.latency_repeats:
        return {}
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.max_length),
                        generator=torch.Generator().manual_seed(args.seed))
    return {"latency_ms": forward_latency({"model": model}, ids, args.latency_repeats)["model"] * 1e3}


def format_report(results: dict) -> str:
    b, a = results["before"], results["after"]
    rows = [("parameters", f"{b['parameters']:,}", f"{a['parameters']:,}"), ("layers", b["layers"], a["layers"]),
            ("query heads / layer", b["heads_per_layer"], a["heads_per_layer"]),
            ("KV heads / layer", b["kv_heads_per_layer"], a["kv_heads_per_layer"]),
            ("MLP width", b["mlp_width"], a["mlp_width"])]
    if "perplexity" in b:
        name = "masked-token ppl" if results.get("objective") == "masked_lm" else "held-out perplexity"
        rows.append((name, f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}"))
    if "latency_ms" in b:
        rows.append(("forward latency (ms)", f"{b['latency_ms']:.1f}", f"{a['latency_ms']:.1f}"))
    lines = ["", "=== llm-distill: pruning ===", f"{'':<22}{'before':>14}{'after':>14}"]
    lines += [f"{name:<22}{str(x):>14}{str(y):>14}" for name, x, y in rows]
    lines.append(f"saved to {results['output_dir']} (reload: llm_distill.pruning.load_pruned, or from_pretrained "
                 "when uniform)")
    return "\n".join(lines)
