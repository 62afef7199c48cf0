"""On-policy distillation (GKD) against off-policy KD on the embedded default, same student, steps and prompts.

    python scripts/bench_on_policy.py                       # ~5-10 min on 2 busy CPU cores
    python scripts/bench_on_policy.py --steps 120 --max_new_tokens 64 --out bench_results/on_policy_long.json
    python scripts/bench_on_policy.py --speed_only --out bench_results/on_policy_speed.json   # ~2 min: speed goals only

From the same fresh student (embedded:student), the same teacher (embedded:teacher), the same prompts (the openings
of the training stdlib files, embedded:train_openings) and the same number of steps:

- (a) off-policy KD on the ground-truth continuations (forward KL; today's default);
- (b) sequence-level KD on teacher samples (seq_kd, forward KL);
- (c) on-policy lmbda=1, reverse KL;
- (d) mixed lmbda=0.5, JSD beta=0.5;
- (trl) when ``trl`` is installed (``pip install -e ".[bench]"``): TRL's on-policy ``DistillationTrainer`` (reverse KL,
  beta=1) on the same models, prompts, batch size, steps and completion length - a peer row for (c).

Scores on held-out prompts (embedded:heldout_openings): perplexity of the ground-truth continuations, the teacher's
NLL per token of the student's sampled (T=1) and greedy continuations, the share of repeated 4-grams in the greedy
ones, top-1 agreement with the teacher; wall time (probes excluded), s/step, peak memory (CUDA: max allocated;
CPU: for (c) and TRL only, peak resident-set growth of a short run in a fresh process) and the share of the step
spent generating. The teacher's NLL of the
student's samples is also probed every ``--probe_every`` steps (the plot). Then, in one interleaved loop on the same
batches and tokens: on-policy step vs (off-policy KD step + generating the same tokens with the generator alone).
Writes ``bench_results/on_policy.json`` and ``bench_results/on_policy.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer  # noqa: E402
from llm_distill.data import tokenize_prompt_response  # noqa: E402
from llm_distill.embedded import resolve  # noqa: E402
from llm_distill.evaluation import evaluate_models  # noqa: E402
from llm_distill.generation.backends import eos_token_ids, left_pad, make_generation_config, sample  # noqa: E402
from llm_distill.models import load_lm  # noqa: E402
from llm_distill.on_policy import completion_rows, cut_after_eos, rollout_seed, teacher_nll  # noqa: E402

logger = logging.getLogger("bench_on_policy")
ARMS = {
    "a_off_policy_kd": dict(lmbda=0.0, loss_type="forward_kl"),
    "b_seq_kd": dict(lmbda=0.0, seq_kd=True, loss_type="forward_kl"),
    "c_on_policy_reverse_kl": dict(lmbda=1.0, loss_type="reverse_kl"),
    "d_mixed_jsd": dict(lmbda=0.5, loss_type="jsd", jsd_beta=0.5),
}


# ------------------------------------------------------------------------------------------ data and models

def load_world(args) -> dict:
    """Tokenizer, teacher, the student's path, training rows (prompt + ground truth cut to max_new_tokens tokens)
    and held-out prompts / rows."""
    paths = {name: resolve(f"embedded:{name}") for name in ("teacher", "student", "train_openings", "heldout_openings")}
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])

    def rows(path, limit):
        with open(path, encoding="utf-8") as f:
            raw = [json.loads(line) for line in f][:limit]
        out = []
        for r in raw:
            enc = tokenize_prompt_response(r["prompt"], r["response"], tokenizer, add_eos=False)
            n = len(tokenizer(r["prompt"])["input_ids"])
            if n > args.max_prompt_tokens:
                continue
            out.append({"prompt": r["prompt"], "input_ids": enc["input_ids"][: n + args.max_new_tokens],
                        "labels": enc["labels"][: n + args.max_new_tokens], "prompt_ids": enc["input_ids"][:n]})
        return out

    train, heldout = rows(paths["train_openings"], args.train_prompts), rows(paths["heldout_openings"], args.eval_prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"tokenizer": tokenizer, "teacher_path": paths["teacher"], "student_path": paths["student"],
            "teacher": load_lm(paths["teacher"]).to(device).eval(), "device": device,
            "train_ds": Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train]),
            "train_prompts": [r["prompt"] for r in train],
            "heldout_ds": Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in heldout]),
            "heldout_prompts": [r["prompt_ids"] for r in heldout]}


# ------------------------------------------------------------------------------------------ scores

@torch.no_grad()
def continuations(model, tokenizer, prompts, max_new_tokens: int, greedy: bool, seed: int, batch_size: int = 16):
    """The model's completions (cut after the first EOS) through the project's batched generator."""
    eos = eos_token_ids(model, tokenizer)
    config = make_generation_config(eos, tokenizer.pad_token_id, tokenizer.bos_token_id, max_new_tokens=max_new_tokens,
                                    do_sample=not greedy, temperature=1.0, top_p=1.0, top_k=0)
    device = next(model.parameters()).device
    was_training, out = model.training, []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i : i + batch_size], tokenizer.pad_token_id, device)
        new = sample(model, ids, mask, config, seed + i).sequences[:, ids.shape[1]:].tolist()
        out += cut_after_eos(new, set(eos))
    model.train(was_training)
    return out


@torch.no_grad()
def teacher_nll_of(teacher, tokenizer, prompts, completions, batch_size: int = 16) -> float:
    """The teacher's NLL per token of ``completions`` after ``prompts``."""
    total, count = 0.0, 0
    device = next(teacher.parameters()).device
    for i in range(0, len(prompts), batch_size):
        rows = completion_rows(prompts[i : i + batch_size], completions[i : i + batch_size], tokenizer.pad_token_id, device)
        logits = teacher(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        s, n = teacher_nll(logits, None, None, rows["labels"])
        total, count = total + s.item(), count + int(n)
    return total / max(count, 1)


def repeated_4gram_share(completions) -> float:
    """Share of 4-grams that repeat an earlier 4-gram of the same completion (0 = no loops)."""
    grams = repeated = 0
    for c in completions:
        seen = set()
        for i in range(len(c) - 3):
            g = tuple(c[i : i + 4])
            grams, repeated = grams + 1, repeated + (g in seen)
            seen.add(g)
    return repeated / max(grams, 1)


def final_scores(student, world, args) -> dict:
    tok, teacher, prompts = world["tokenizer"], world["teacher"], world["heldout_prompts"]
    ev = evaluate_models({"student": student, "teacher": teacher}, world["heldout_ds"], DistillationCollator(tok),
                         batch_size=16)
    sampled = continuations(student, tok, prompts, args.max_new_tokens, greedy=False, seed=1234)
    greedy = continuations(student, tok, prompts, args.max_new_tokens, greedy=True, seed=0)
    return {"heldout_perplexity": ev["student"]["perplexity"], "top1_agreement": ev["student"]["top1_agreement"],
            "teacher_nll_sampled": teacher_nll_of(teacher, tok, prompts, sampled),
            "teacher_nll_greedy": teacher_nll_of(teacher, tok, prompts, greedy),
            "greedy_repeated_4grams": repeated_4gram_share(greedy),
            "mean_sampled_length": statistics.mean(len(c) for c in sampled)}


# ------------------------------------------------------------------------------------------ one training run

class Probe(TrainerCallback):
    """Step wall times (between step ends, probes excluded) and, every ``every`` steps, the teacher's NLL of the
    student's sampled continuations of fixed held-out prompts (the curve of the plot)."""

    def __init__(self, world, args):
        self.world, self.args, self.step_seconds, self.curve, self.last = world, args, [], [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        if state.global_step % self.args.probe_every == 0 or state.global_step == state.max_steps:
            prompts = self.world["heldout_prompts"][: self.args.probe_prompts]
            comps = continuations(model, self.world["tokenizer"], prompts, self.args.max_new_tokens, False, 99)
            nll = teacher_nll_of(self.world["teacher"], self.world["tokenizer"], prompts, comps)
            self.curve.append({"step": state.global_step, "train_seconds": round(sum(self.step_seconds), 3),
                               "teacher_nll_sampled": round(nll, 4)})
        self.last = time.perf_counter()  # the probe is not training time


class PeakMemory:
    """CUDA: max allocated MiB during the block (on CPU see ``peak_rss``; ``mib`` is None)."""

    def __enter__(self):
        self.mib = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def common_args(args, out_dir: str) -> dict:
    return dict(output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                logging_steps=args.probe_every, save_strategy="no", report_to="none", seed=args.seed,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)


def build_ours(name: str, overrides: dict, world, args, out_dir: str, callbacks) -> DistillationTrainer:
    cfg = DistillationConfig(**common_args(args, f"{out_dir}/{name}"), alpha=1.0, max_new_tokens=args.max_new_tokens,
                             rollout_temperature=1.0, **overrides)
    return DistillationTrainer(model=load_lm(world["student_path"]), teacher_model=world["teacher"], args=cfg,
                               train_dataset=world["train_ds"], data_collator=DistillationCollator(world["tokenizer"]),
                               processing_class=world["tokenizer"], callbacks=callbacks)


def run_ours(name: str, overrides: dict, world, args, out_dir: str) -> dict:
    probe = Probe(world, args)
    trainer = build_ours(name, overrides, world, args, out_dir, [probe])
    with PeakMemory() as mem:
        trainer.train()
    shares = [h["rollout_time_share"] for h in trainer.state.log_history if "rollout_time_share" in h]
    return summarise(name, probe, mem, final_scores(trainer.model, world, args),
                     rollout_share=statistics.mean(shares) if shares else 0.0, settings=overrides)


def has_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        logger.warning("trl is not installed: no TRL peer row (pip install -e '.[bench]').")
        return False
    return True


def build_trl(world, args, out_dir: str, callbacks):
    """TRL's stable on-policy DistillationTrainer (reverse KL: beta=1) on the same models and prompts."""
    from trl import DistillationConfig as TrlConfig
    from trl import DistillationTrainer as TrlTrainer

    tokenizer = copy.deepcopy(world["tokenizer"])
    tokenizer.padding_side = "left"  # TRL requires it
    cfg = TrlConfig(**common_args(args, f"{out_dir}/trl"), max_completion_length=args.max_new_tokens, beta=1.0,
                    temperature=1.0, top_p=1.0, top_k=0, bf16=False)
    return TrlTrainer(model=load_lm(world["student_path"]), teacher_model=load_lm(world["teacher_path"]), args=cfg,
                      train_dataset=Dataset.from_list([{"prompt": p} for p in world["train_prompts"]]),
                      processing_class=tokenizer, callbacks=callbacks)


def run_trl(world, args, out_dir: str) -> dict:
    probe = Probe(world, args)
    trainer = build_trl(world, args, out_dir, [probe])
    with PeakMemory() as mem:
        trainer.train()
    return summarise("trl_distillation_trainer", probe, mem, final_scores(trainer.model, world, args),
                     rollout_share=None, settings={"trl": __import__("trl").__version__, "beta": 1.0})


def speed_duel(world, args, out_dir: str) -> dict:
    """Our (c) and TRL's trainer alternated ``--duel_rounds`` times (``--duel_steps`` steps each, no probes), so that
    the machine's load drifts over both alike: the pooled median s/step of each (first step of a run excluded)."""
    times = {"ours": [], "trl": []}
    for r in range(args.duel_rounds):
        for kind in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
            timer = Probe(world, argparse.Namespace(**{**vars(args), "probe_every": 10**9}))
            duel = argparse.Namespace(**{**vars(args), "steps": args.duel_steps})
            trainer = (build_ours("duel", ARMS["c_on_policy_reverse_kl"], world, duel, out_dir, [timer]) if kind == "ours"
                       else build_trl(world, duel, out_dir, [timer]))
            trainer.train()
            times[kind] += timer.step_seconds[1:]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"s_per_step": {k: round(v, 4) for k, v in med.items()}, "rounds": args.duel_rounds,
            "steps": args.duel_steps, "speedup": round(med["trl"] / med["ours"], 3)}


def peak_rss(kind: str, args) -> float:
    """CPU peak memory of a short run (``--memory_steps``) of our (c) or TRL's trainer, in a fresh process: the
    growth of the peak resident set (``ru_maxrss``) over the resident set once models and data are loaded. In one
    process the allocator keeps memory of earlier runs, so in-process figures would only count the first run."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_rss_child, (kind, vars(args)))


def _peak_rss_child(kind: str, settings: dict) -> float:
    import resource

    args = argparse.Namespace(**{**settings, "steps": settings["memory_steps"]})
    torch.set_num_threads(settings["threads"])
    world = load_world(args)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = (build_ours("c", ARMS["c_on_policy_reverse_kl"], world, args, out_dir, []) if kind == "ours"
                   else build_trl(world, args, out_dir, []))
        base = _rss()
        trainer.train()
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20, 1)


def summarise(name, probe, mem, scores, rollout_share, settings) -> dict:
    steady = probe.step_seconds[1:] or probe.step_seconds  # the first step pays one-off warm-up
    return {"name": name, "settings": settings, "train_seconds": round(sum(probe.step_seconds), 2),
            "s_per_step": round(statistics.median(steady), 4), "peak_memory_mib": None if mem.mib is None else round(mem.mib, 1),
            "rollout_time_share": None if rollout_share is None else round(rollout_share, 3),
            **{k: round(v, 4) for k, v in scores.items()}, "curve": probe.curve}


# ------------------------------------------------------------------------------------------ step cost

def step_cost(world, args, out_dir: str) -> dict:
    """Interleaved on the same batches and tokens (lr 0, so every sample is the same): generate alone, an off-policy
    KD step on the generated rows, a full on-policy step (which generates them again)."""
    student, tok = load_lm(world["student_path"]).to(world["device"]), world["tokenizer"]
    base = {**common_args(args, f"{out_dir}/cost"), "learning_rate": 0.0}
    on = DistillationTrainer(model=student, teacher_model=world["teacher"], processing_class=tok,
                             args=DistillationConfig(**base, alpha=1.0, lmbda=1.0, loss_type="reverse_kl",
                                                     max_new_tokens=args.max_new_tokens))
    off = DistillationTrainer(model=student, teacher_model=world["teacher"], processing_class=tok,
                              args=DistillationConfig(**base, alpha=1.0, loss_type="reverse_kl"))
    for t in (on, off):
        t.create_optimizer()
    student.train()
    collate, times = DistillationCollator(tok), {"on_policy_step": [], "generate_alone": [], "off_policy_step": []}
    for r in range(args.cost_warmup + args.cost_reps):
        n = len(world["train_ds"])
        batch = collate([world["train_ds"][(r * args.batch_size + i) % n] for i in range(args.batch_size)])
        batch = {k: v.to(world["device"]) for k, v in batch.items()}
        on.rollouts.seed = r  # the on-policy step samples with rollout_seed(r, step 0, micro-batch 0, rank 0)
        t0 = time.perf_counter()
        rolled = on.rollouts.rollout(student, batch, "student", seed=rollout_seed(r, 0, 0, 0))
        t1 = time.perf_counter()
        _train_step(off, {k: v for k, v in rolled.items() if k != "rollout_source"})
        t2 = time.perf_counter()
        samples, count = on.get_batch_samples(iter([batch]), 1, torch.device(world["device"]))
        _train_step(on, samples[0], count)
        t3 = time.perf_counter()
        if r >= args.cost_warmup:
            for key, s in zip(times, (t3 - t2, t1 - t0, t2 - t1)):
                times[key].append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_seconds": {k: round(v, 5) for k, v in med.items()}, "reps": args.cost_reps,
            "ratio": round(med["on_policy_step"] / (med["off_policy_step"] + med["generate_alone"]), 3)}


def _train_step(trainer, batch, count=None):
    count = count if count is not None else (batch["labels"][:, 1:] != -100).sum()
    trainer.training_step(trainer.model, batch, count)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ report

def at_time(curve: list[dict], seconds: float) -> dict | None:
    """The last probe of ``curve`` taken within ``seconds`` of training."""
    done = [p for p in curve if p["train_seconds"] <= seconds * 1.0001]
    return done[-1] if done else None


def goals(runs: dict, cost: dict, duel: dict | None) -> dict:
    a = runs["a_off_policy_kd"]
    best = min(("c_on_policy_reverse_kl", "d_mixed_jsd"), key=lambda k: runs[k]["teacher_nll_sampled"])
    out = {"best_on_policy_arm": best,
           "equal_steps_relative_nll_reduction": round(1 - runs[best]["teacher_nll_sampled"] / a["teacher_nll_sampled"], 4)}
    out["equal_steps_goal_met"] = out["equal_steps_relative_nll_reduction"] >= 0.10
    equal_time = {}
    for k in ("c_on_policy_reverse_kl", "d_mixed_jsd"):  # each on-policy arm at off-policy KD's total train time
        probe, ref = at_time(runs[k]["curve"], a["train_seconds"]), a["curve"][-1]
        if probe is not None:
            equal_time[k] = {"seconds": a["train_seconds"], "step": probe["step"], "nll": probe["teacher_nll_sampled"],
                             "off_policy_nll": ref["teacher_nll_sampled"],
                             "relative_reduction": round(1 - probe["teacher_nll_sampled"] / ref["teacher_nll_sampled"], 4)}
    out["equal_wall_time"] = equal_time
    if "trl_distillation_trainer" in runs:
        ours, trl = runs["c_on_policy_reverse_kl"], runs["trl_distillation_trainer"]
        out["vs_trl_step_speedup"] = duel["speedup"]  # alternated runs (speed_duel), not the two long runs
        out["vs_trl_memory_ratio"] = round(ours["peak_memory_mib"] / max(trl["peak_memory_mib"], 1e-9), 3)
        out["faster_and_leaner_than_trl"] = out["vs_trl_step_speedup"] > 1 and out["vs_trl_memory_ratio"] < 1
    out["step_cost_ratio"] = cost["ratio"]
    out["step_cost_goal_met"] = cost["ratio"] <= 1.10
    return out


def print_table(runs: dict, cost: dict, g: dict) -> None:
    cols = [("heldout_perplexity", "held-out ppl", ".2f"), ("teacher_nll_sampled", "teacher NLL (T=1)", ".3f"),
            ("teacher_nll_greedy", "teacher NLL (greedy)", ".3f"), ("greedy_repeated_4grams", "greedy rep. 4-grams", ".3f"),
            ("top1_agreement", "top-1 agree", ".3f"), ("train_seconds", "wall s", ".1f"), ("s_per_step", "s/step", ".3f"),
            ("rollout_time_share", "rollout share", ".2f"), ("peak_memory_mib", "peak MiB", ".0f")]
    print("\n| run | " + " | ".join(c[1] for c in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for r in runs.values():
        cells = ["-" if r.get(k) is None else format(r[k], f) for k, _, f in cols]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    m = cost["median_seconds"]
    print(f"\nstep cost (medians of {cost['reps']} interleaved rounds): on-policy step {m['on_policy_step']:.4f}s, "
          f"off-policy KD step {m['off_policy_step']:.4f}s + generate alone {m['generate_alone']:.4f}s -> "
          f"ratio {cost['ratio']:.3f} (goal <= 1.10: {'met' if g['step_cost_goal_met'] else 'NOT met'})")
    print(f"equal steps: {g['best_on_policy_arm']} lowers the teacher NLL of the student's samples by "
          f"{100 * g['equal_steps_relative_nll_reduction']:.1f}% vs (a) (goal >= 10%: "
          f"{'met' if g['equal_steps_goal_met'] else 'NOT met'})")
    for k, v in g["equal_wall_time"].items():
        print(f"equal wall time ({v['seconds']:.0f}s, (a)'s whole run): {k} at step {v['step']}: NLL {v['nll']:.3f} vs "
              f"(a) {v['off_policy_nll']:.3f} ({100 * v['relative_reduction']:+.1f}%)")
    if "vs_trl_step_speedup" in g:
        print(f"vs TRL DistillationTrainer (alternated runs): step {g['vs_trl_step_speedup']:.2f}x faster, memory ratio "
              f"{g['vs_trl_memory_ratio']:.2f} (goal: faster and leaner: {'met' if g['faster_and_leaner_than_trl'] else 'NOT met'})")


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs.values():
        steps = [p["step"] for p in r["curve"]]
        secs = [p["train_seconds"] for p in r["curve"]]
        nll = [p["teacher_nll_sampled"] for p in r["curve"]]
        axes[0].plot(steps, nll, marker="o", label=r["name"])
        axes[1].plot(secs, nll, marker="o", label=r["name"])
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("teacher NLL / token of student samples (T=1)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("On-policy vs off-policy distillation, embedded default (held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--max_prompt_tokens", type=int, default=128, help="skip openings with longer prompts")
    parser.add_argument("--train_prompts", type=int, default=512)
    parser.add_argument("--eval_prompts", type=int, default=24)
    parser.add_argument("--probe_every", type=int, default=10)
    parser.add_argument("--probe_prompts", type=int, default=16)
    parser.add_argument("--cost_reps", type=int, default=4)
    parser.add_argument("--cost_warmup", type=int, default=2)
    parser.add_argument("--arms", default=",".join([*ARMS, "trl"]), help="comma-separated subset of the runs")
    parser.add_argument("--duel_rounds", type=int, default=2, help="alternations of our (c) and TRL for s/step")
    parser.add_argument("--duel_steps", type=int, default=4)
    parser.add_argument("--memory_steps", type=int, default=3, help="steps of the CPU peak-memory runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a busy 2-core machine 2 threads are far slower for these tiny models)")
    parser.add_argument("--speed_only", action="store_true",
                        help="only the step-cost loop, the TRL speed duel and the CPU peak-memory runs (no training arms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/on_policy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = load_world(args)
    wanted = [] if args.speed_only else args.arms.split(",")
    runs, duel, memory = {}, None, {}
    with tempfile.TemporaryDirectory() as out_dir:
        for name, overrides in ARMS.items():
            if name in wanted:
                runs[name] = run_ours(name, overrides, world, args, out_dir)
                logger.warning("%s: %s", name, {k: v for k, v in runs[name].items() if k != "curve"})
        if "trl" in wanted and has_trl():
            runs["trl_distillation_trainer"] = run_trl(world, args, out_dir)
        peer = has_trl() and (args.speed_only or "trl_distillation_trainer" in runs)
        if not torch.cuda.is_available() and peer:  # CPU: peak memory of (c) and TRL, each in a fresh process
            memory = {kind: peak_rss(kind, args) for kind in ("ours", "trl")}
            for name, kind in (("c_on_policy_reverse_kl", "ours"), ("trl_distillation_trainer", "trl")):
                if name in runs:
                    runs[name]["peak_memory_mib"] = memory[kind]
        duel = speed_duel(world, args, out_dir) if peer else None
        cost = step_cost(world, args, out_dir)
    if args.speed_only:
        print(json.dumps({"step_cost": cost, "speed_duel_vs_trl": duel, "cpu_peak_memory_mib": memory}, indent=2))
    g = goals(runs, cost, duel) if {"a_off_policy_kd", "c_on_policy_reverse_kl", "d_mixed_jsd"} <= set(runs) else {}
    if g:
        print_table(runs, cost, g)
    result = {"command": "python " + " ".join(sys.argv), "settings": vars(args), "runs": runs, "step_cost": cost,
              "speed_duel_vs_trl": duel, "cpu_peak_memory_mib": memory,
              "goals": g, "train_rows": len(world["train_ds"]), "heldout_prompts": len(world["heldout_prompts"]),
              "env": {"torch": torch.__version__, "transformers": transformers.__version__, "device": world["device"],
                      "threads": torch.get_num_threads(), "python": platform.python_version()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if runs:
        plot(runs, out.with_suffix(".png"))
    print(f"\nwrote {out}" + (f" and {out.with_suffix('.png')}" if runs else ""))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
