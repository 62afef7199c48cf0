"""Job: DistillSpec (Zhou et al. 2023, arXiv:2310.08461): distil the draft toward the target to raise acceptance.

    python scripts/distillspec.py [--key value ...]
    llm-distill distillspec [--key value ...]

Acceptance in speculative decoding is 1 - TV(p, q) per token (Leviathan et al. 2022, Corollary 3.6), so a
draft that imitates the target *on the text the decoder actually visits* accepts more. The recipe:

1. measure the draft's acceptance on held-out prompts (greedy and sampled);
2. build continuation data on *training* prompts: draft-generated (on-policy, DistillSpec's default),
   target-generated (sampled exactly from the target with our speculative decoder), or both;
3. distil with ``DistillationTrainer`` (``llm_distill.jobs.distill.run_distillation``: the teacher's full
   distribution on every continuation token, loss on the continuation only);
4. measure acceptance again on the same held-out prompts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm_distill.config import DataArguments, DistillationConfig, ModelArguments, config_from_dict, parse_args_and_config
from llm_distill.embedded import resolve
from llm_distill.jobs import check_demo_inputs
from llm_distill.jobs.bench_speculative import PROMPT_FORMATS, batches, load_prompt_ids
from llm_distill.jobs.distill import DEFAULT_CONFIG, run_distillation
from llm_distill.losses import Divergence
from llm_distill.models import load_causal_lm, load_tokenizer
from llm_distill.speculative import SpeculativeDecoder, check_gamma

logger = logging.getLogger(__name__)

DATA_SOURCES = ("draft", "target", "mixed")


@dataclass
class DistillSpecArguments:
    target_model: str = field(default="embedded:teacher", metadata={"help": "Target (the teacher here)."})
    draft_model: str = field(default="outputs/spec_draft", metadata={"help": "Draft to improve (the student)."})
    train_prompts: str = field(default="embedded:train", metadata={"help": "JSONL ('text'/'prompt') to draw prompts from."})
    eval_prompts: str = field(default="embedded:heldout", metadata={"help": "Held-out JSONL for acceptance."})
    num_train_prompts: int = field(default=512, metadata={"help": "Training prompts (one window per row)."})
    num_eval_prompts: int = field(default=24, metadata={"help": "Held-out prompts for acceptance."})
    prompt_tokens: int = field(default=48, metadata={"help": "Tokens per prompt."})
    prompt_format: str = field(default="window", metadata={
        "help": "'window' (text windows) or 'chat' (rows' 'prompt'/'messages' through the chat template)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Continuation length (data and evaluation)."})
    data_source: str = field(default="mixed", metadata={"help": f"Who writes the continuations: {', '.join(DATA_SOURCES)}."})
    data_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the continuations."})
    eval_gamma: int = field(default=4, metadata={"help": "gamma for the acceptance measurement."})
    data_gamma: int = field(default=4, metadata={
        "help": "gamma when the target writes continuations (exact samples either way); 0 = the target decodes alone, "
                "faster while the draft still accepts little (e.g. a fresh layer cut of a deep model)."})
    loss_type: str = field(default="forward_kl", metadata={"help": "KD divergence (see DistillationConfig.loss_type)."})
    max_steps: int = field(default=300, metadata={"help": "Training steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (cosine)."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    gen_batch_size: int = field(default=32, metadata={"help": "Batch size of data generation."})
    output_dir: str = field(default="outputs/spec_draft_distillspec", metadata={"help": "Distilled draft + data."})
    results: str = field(default="bench_results/distillspec.json", metadata={"help": "JSON summary."})
    seed: int = field(default=0, metadata={"help": "Seed for prompts, sampling and training."})

    def __post_init__(self):
        if self.data_source not in DATA_SOURCES:
            raise ValueError(f"data_source={self.data_source!r} is invalid: expected one of {', '.join(DATA_SOURCES)}.")
        check_gamma(self.eval_gamma)
        if self.data_gamma < 0:
            raise ValueError(f"data_gamma={self.data_gamma} is invalid: expected an integer >= 0 (0 = target alone).")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={self.prompt_format!r} is invalid: choose one of {PROMPT_FORMATS}.")
        for name in ("num_train_prompts", "num_eval_prompts", "prompt_tokens", "max_new_tokens",
                     "max_steps", "batch_size", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an integer >= 1.")
        if self.data_temperature <= 0:
            raise ValueError(f"data_temperature={self.data_temperature} is invalid: expected > 0.")
        Divergence(loss_type=self.loss_type)  # checks loss_type


def measure_acceptance(target, draft, tokenizer, prompts, gamma: int, max_new_tokens: int, seed: int,
                       batch_size: int = 8) -> dict:
    """Acceptance of ``draft`` for ``target`` on ``prompts``: greedy and sampled (T=1), batched."""
    decoder = SpeculativeDecoder(target, draft, tokenizer, gamma=gamma)
    out = {}
    for mode, kwargs in (("greedy", {"do_sample": False}), ("sampled_T1", {"do_sample": True, "temperature": 1.0})):
        gen = torch.Generator().manual_seed(seed)
        acc = drafted = judged = emitted = steps = 0
        for chunk in batches(prompts, batch_size):
            s = decoder.generate(chunk, max_new_tokens=max_new_tokens, generator=gen, eos_token_id=[], **kwargs).stats
            acc, drafted, judged = acc + s.accepted_tokens, drafted + s.drafted_tokens, judged + s.accepted_tokens + s.rejected_steps
            emitted, steps = emitted + s.emitted_tokens, steps + s.row_steps
        out[mode] = {"acceptance_rate": acc / drafted, "alpha": acc / judged, "mean_accepted_length": emitted / steps}
    return out


def generate_continuations(model_target, model_draft, tokenizer, prompts, source: str, args) -> list[dict]:
    """Prompt/continuation rows written by the draft alone or by the target (exact samples, sped up by the draft)."""
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    half = len(prompts) // 2
    for i, chunk in enumerate(tqdm(batches(prompts, args.gen_batch_size), desc="continuations", dynamic_ncols=True)):
        writer = source if source != "mixed" else ("draft" if i * args.gen_batch_size < half else "target")
        if writer == "draft":  # on-policy: the draft decodes alone (gamma=0 = one model, autoregressive)
            decoder, gamma = SpeculativeDecoder(model_draft, model_draft, tokenizer), 0
        else:  # the target's own samples, produced by speculative sampling (lossless, cheaper)
            decoder, gamma = SpeculativeDecoder(model_target, model_draft, tokenizer), args.data_gamma
        out = decoder.generate(chunk, max_new_tokens=args.max_new_tokens, do_sample=True, gamma=gamma,
                               temperature=args.data_temperature, generator=gen, eos_token_id=[])
        for p, g in zip(chunk, out.generated):
            rows.append({"prompt": tokenizer.decode(p), "response": tokenizer.decode(g), "finish_reason": "length",
                         "writer": writer})
    return rows


def run_distillspec(args: DistillSpecArguments) -> dict:
    """Acceptance before, continuation data, distillation, acceptance after; returns (and writes) the summary."""
    check_demo_inputs(args, "target_model", ("draft_model", "train_prompts", "eval_prompts"))
    names, args = args, replace(args, **{name: resolve(getattr(args, name)) for name in
                                          ("target_model", "draft_model", "train_prompts", "eval_prompts")})
    start = time.time()
    if not Path(args.draft_model).exists() and args.draft_model == "outputs/spec_draft":
        raise FileNotFoundError("The default draft outputs/spec_draft does not exist. Make it with `python "
                                "scripts/distill.py --output_dir outputs/spec_draft` (~2 min), or pass --draft_model.")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.target_model)
    eval_prompts = load_prompt_ids(args.eval_prompts, tokenizer, args.num_eval_prompts, args.prompt_tokens, args.seed,
                                   args.prompt_format)
    train_prompts = load_prompt_ids(args.train_prompts, tokenizer, args.num_train_prompts, args.prompt_tokens, args.seed,
                                    args.prompt_format)
    target = load_causal_lm(args.target_model, "float32").eval()
    draft = load_causal_lm(args.draft_model, "float32").eval()

    # 1. Acceptance before, on held-out prompts.
    before = measure_acceptance(target, draft, tokenizer, eval_prompts, args.eval_gamma, args.max_new_tokens, args.seed)
    logger.info("acceptance before: %s", before)

    # 2. Continuations on training prompts.
    t0 = time.time()
    rows = generate_continuations(target, draft, tokenizer, train_prompts, args.data_source, args)
    data_path = Path(args.output_dir) / "distillspec_data.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    gen_s = time.time() - t0

    # 3. Distil the draft toward the target on them (loss on continuation tokens only).
    t0 = time.time()
    train = run_distillation(*config_from_dict((ModelArguments, DataArguments, DistillationConfig), {
        "teacher_model": args.target_model, "student_model": args.draft_model, "student_init": "pretrained",
        "tokenizer": args.target_model, "dataset": str(data_path), "eval_dataset": "", "packing": False,
        "max_length": max(map(len, train_prompts)) + args.max_new_tokens + 16, "max_train_samples": len(rows),
        "alpha": 1.0, "loss_type": args.loss_type, "temperature": 1.0, "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "warmup_steps": max(1, args.max_steps // 20), "logging_steps": max(1, args.max_steps // 6),
        "output_dir": args.output_dir, "seed": args.seed,
    }, base=DEFAULT_CONFIG))
    train_s = time.time() - t0

    # 4. Acceptance after, same prompts and seeds.
    distilled = load_causal_lm(args.output_dir, "float32").eval()
    after = measure_acceptance(target, distilled, tokenizer, eval_prompts, args.eval_gamma, args.max_new_tokens, args.seed)
    results = {
        "config": asdict(names), "before": before, "after": after,
        "delta_pp": {m: 100 * (after[m]["acceptance_rate"] - before[m]["acceptance_rate"]) for m in before},
        "train_rows": len(rows), "train_loss": (train or {}).get("train_loss"), "generation_s": gen_s,
        "training_s": train_s, "wall_time_s": time.time() - start,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=1))
    (Path(args.output_dir) / "distillspec_results.json").write_text(json.dumps(results, indent=1))
    return results


def format_results(r: dict) -> str:
    lines = ["", "=== DistillSpec: draft acceptance on held-out prompts "
             f"(gamma={r['config']['eval_gamma']}, {r['config']['num_eval_prompts']} prompts) ===",
             f"{'mode':<12}{'accept before':>15}{'accept after':>14}{'Δ pp':>7}{'alpha before':>14}{'alpha after':>13}"
             f"{'len before':>12}{'len after':>11}"]
    for m in r["before"]:
        b, a = r["before"][m], r["after"][m]
        lines.append(f"{m:<12}{b['acceptance_rate']:>15.3f}{a['acceptance_rate']:>14.3f}{r['delta_pp'][m]:>7.1f}"
                     f"{b['alpha']:>14.3f}{a['alpha']:>13.3f}{b['mean_accepted_length']:>12.2f}"
                     f"{a['mean_accepted_length']:>11.2f}")
    lines.append(f"{r['train_rows']} continuation rows ({r['config']['data_source']}), generation "
                 f"{r['generation_s']:.0f}s, training {r['training_s']:.0f}s, wall {r['wall_time_s']:.0f}s")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    """``scripts/distillspec.py`` / ``llm-distill distillspec``: parse ``argv``, run, print the table."""
    (args,) = parse_args_and_config((DistillSpecArguments,), argv)
    results = run_distillspec(args)
    print(format_results(results))
    return results
