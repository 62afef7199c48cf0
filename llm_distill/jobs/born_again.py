"""Job: born-again generations (Furlanello et al. 2018). Generation k+1, a student of the same architecture, learns
from generation k (or from the ensemble of generations 1..k); held-out figures per generation.

    python scripts/born_again.py [--base_config configs/default.yaml] [--generations 3] [--ensemble true]
    llm-distill born-again --generations 2 --max_steps 100

Generation 1 is the base config's run as is (its teacher -> its student). Generation k+1 has the same student
(``student_model``, same init and seed) and data; its teacher is generation k's saved student, or with
``ensemble`` the mean predictive distribution of generations 1..k (``llm_distill.ensemble.EnsembleLM``). Every
generation goes through :func:`llm_distill.jobs.distill.run_distillation` with typed configs built by
``config_from_dict`` (no argv strings); results land in ``<output_dir>/born_again.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llm_distill.checks import check_field
from llm_distill.config import (
    DataArguments,
    DistillationConfig,
    ModelArguments,
    config_from_dict,
    parse_args_and_config,
)
from llm_distill.ensemble import EnsembleLM
from llm_distill.jobs.distill import REPO_ROOT, run_distillation
from llm_distill.models import load_lm

logger = logging.getLogger(__name__)

TYPES = (ModelArguments, DataArguments, DistillationConfig)


@dataclass
class BornAgainArguments:
    """How many generations, from which base distillation config."""

    base_config: str = field(default=str(REPO_ROOT / "configs" / "default.yaml"),
                             metadata={"help": "The distillation YAML of generation 1 (its student is every "
                                               "generation's architecture and init)."})
    generations: int = field(default=2, metadata={"help": "Number of generations (>= 1)."})
    ensemble: bool = field(default=False, metadata={"help": "Teach generation k+1 with the mean distribution of "
                                                            "generations 1..k instead of generation k alone."})
    output_dir: str = field(default="outputs/born_again", metadata={"help": "Generation k goes to <output_dir>/genK."})
    max_steps: int | None = field(default=None, metadata={"help": "Override the base config's max_steps."})
    seed: int | None = field(default=None, metadata={"help": "Override the base config's seed."})

    def __post_init__(self):
        check_field(self.generations >= 1, "generations", self.generations, "an integer >= 1")
        check_field(Path(self.base_config).is_file(), "base_config", self.base_config, "an existing YAML file")


def generation_config(opts: BornAgainArguments, k: int, previous: list[dict], overrides: dict):
    """Typed configs of generation ``k`` (1-based): the base config, ``overrides``, and generation k-1 as teacher."""
    values = dict(overrides)
    values["output_dir"] = str(Path(opts.output_dir) / f"gen{k}")
    for name in ("max_steps", "seed"):
        if getattr(opts, name) is not None:
            values[name] = getattr(opts, name)
    if k > 1:
        values["teacher_model"] = previous[-1]["path"]
    model_args, data_args, args = config_from_dict(TYPES, values, base=opts.base_config)
    if k > 1 and model_args.student_init == "teacher_layers":
        raise ValueError(f"{opts.base_config}: student_init=teacher_layers builds the student from its teacher, so "
                         "generation 2 would start as a copy of generation 1. Born-again generations need "
                         "student_init: pretrained or fresh (the same init every generation).")
    return model_args, data_args, args


def run_born_again(opts: BornAgainArguments, overrides: dict | None = None) -> dict:
    """Train the generations; return ``{"generations": [...], ...}`` with held-out perplexity / accuracy each."""
    if opts.generations > 1:  # check generation 2's config before generation 1 spends any compute
        generation_config(opts, 2, [{"path": str(Path(opts.output_dir) / "gen1")}], overrides or {})
    generations: list[dict] = []
    for k in range(1, opts.generations + 1):
        model_args, data_args, args = generation_config(opts, k, generations, overrides or {})
        teacher = None
        if opts.ensemble and k > 2:
            teacher = EnsembleLM([load_lm(g["path"]) for g in generations])
        logger.info("Born-again generation %d: teacher %s", k,
                    f"ensemble of generations 1..{k - 1}" if teacher is not None else model_args.teacher_model)
        result = run_distillation(model_args, data_args, args, teacher_override=teacher)
        generations.append({
            "generation": k, "path": args.output_dir,
            "teacher": "ensemble" if teacher is not None else model_args.teacher_model,
            "perplexity": result.get("student_perplexity_after"), "accuracy": result.get("student_accuracy_after"),
            "teacher_perplexity": result.get("teacher_perplexity"),
            "top1_agreement_with_its_teacher": result.get("top1_agreement_after"), "steps": result["steps"],
        })
    report = {"base_config": opts.base_config, "ensemble": opts.ensemble, "overrides": overrides or {},
              "generations": generations}
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(opts.output_dir) / "born_again.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = ["", "=== born-again generations: held-out ===",
             f"{'generation':<12}{'teacher':<28}{'perplexity':>12}{'accuracy':>10}"]
    for g in report["generations"]:
        teacher = g["teacher"] if len(str(g["teacher"])) <= 26 else "..." + str(g["teacher"])[-23:]
        ppl = "-" if g["perplexity"] is None else f"{g['perplexity']:.3f}"
        acc = "-" if g["accuracy"] is None else f"{g['accuracy']:.3f}"
        lines.append(f"{g['generation']:<12}{teacher:<28}{ppl:>12}{acc:>10}")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    """``scripts/born_again.py`` / ``llm-distill born-again``."""
    (opts,) = parse_args_and_config((BornAgainArguments,), argv)
    return run_born_again(opts)
