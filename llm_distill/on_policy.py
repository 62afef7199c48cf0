"""On-policy distillation (GKD): the student learns from the teacher on its own samples.

Off-policy KD trains the student on the dataset's (or the teacher's) tokens only, so it never sees the prefixes its
own mistakes lead to, and at inference those mistakes compound (exposure bias). GKD (Agarwal et al. 2023) fixes
this by sampling, with probability ``lmbda`` per batch, the completions from the student itself and letting the
teacher score every token of them (MiniLLM, Gu et al. 2023; "on-policy distillation" with per-token reverse KL,
Thinking Machines 2025). ``seq_kd`` samples the other batches from the teacher (sequence-level KD, Kim & Rush 2016).

How one micro-batch becomes an on-policy batch (:meth:`RolloutSampler.rollout`):

1. **Prompts**: each row's tokens before its first label - the prompt of a prompt/response row, the conversation
   up to the first assistant turn of a chat row (later turns are dropped). ``text`` rows have no prompt: refused.
2. **Sample**: the student as it trains (unwrapped from DDP by the trainer; a PEFT model with its adapter; in eval
   mode, so no dropout) - or the teacher for ``seq_kd`` - generates from the left-padded prompts, batched with a
   KV cache, through the response generator's decoding path (``llm_distill.generation.backends``: no second
   decoder). Seeded per (seed, step, micro-batch, rank) in a forked RNG: resumable, and the training's own random
   stream (dropout) is the same as without rollouts.
3. **Rebuild**: right-padded ``prompt + completion`` rows like the collator's; labels on the completion tokens up
   to and including the first EOS, ``-100`` on the prompt, and nothing is kept after the EOS.

Which micro-batches are sampled is drawn from (seed, step, micro-batch) only, so every rank makes the same choice
(sharded models must generate together). The trainer then recounts ``num_items_in_batch`` over the rebuilt
micro-batches of the step on all ranks, so the loss is the mean over the completion tokens actually trained on.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from llm_distill.generation.backends import (
    eos_token_ids,
    first_eos,
    left_pad,
    make_generation_config,
    pad_token_id,
    sample,
)
from llm_distill.losses import IGNORE_INDEX

ROLLOUT_KEY = "rollout_source"  # in a rebuilt batch: "student" or "teacher" (dropped before the models' forward)


def prompt_lengths(labels: torch.Tensor) -> list[int]:
    """Per row, the index of its first label: the prompt is everything before it. ``labels`` ``(B, S)``, unshifted."""
    valid = labels != IGNORE_INDEX                                       # (B, S)
    if not bool(valid.any(dim=1).all()):
        raise ValueError("On-policy distillation: a row has no label, so its prompt cannot be told apart.")
    starts = valid.int().argmax(dim=1).tolist()                         # first True per row
    if min(starts) == 0:
        raise ValueError("On-policy distillation (lmbda > 0 or seq_kd) samples completions for the rows' prompts, but "
                         "a row is labelled from its first token (a 'text' row has no prompt). Use prompt/response "
                         "or messages rows, e.g. dataset: embedded:train_openings (the stdlib files' openings).")
    return starts


def split_prompts(batch: dict) -> list[list[int]]:
    """The prompt token ids of each row of a collated (right-padded) batch."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    prompts = []
    for i, start in enumerate(prompt_lengths(batch["labels"])):
        row = ids[i, :start]
        prompts.append((row[mask[i, :start].bool()] if mask is not None else row).tolist())
    return prompts


def completion_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> dict:
    """Right-padded ``prompt + completion`` rows: ``input_ids`` / ``attention_mask`` / ``labels`` ``(B, S)`` with
    labels on the completion tokens only."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.as_tensor(p + c, dtype=torch.long)
        labels[i, len(p):n] = torch.as_tensor(c, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def cut_after_eos(new_tokens: list[list[int]], eos_ids) -> list[list[int]]:
    """Each sampled row up to and including its first EOS (what follows is padding or noise: never trained on)."""
    out = []
    for tokens in new_tokens:
        stop = first_eos(tokens, eos_ids)
        out.append(tokens if stop is None else tokens[: stop + 1])
    return out


def rollout_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """A sampling seed for one micro-batch on one rank (different ranks sample differently)."""
    return int(np.random.SeedSequence([seed, step, micro_batch, rank]).generate_state(1)[0])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Sample without dropout (LoRA dropout included), then restore the training mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def teacher_nll(features: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of the teacher's negative log-likelihood of the labelled (completion) tokens.

    ``features`` ``(B, S, H)`` final hidden states with ``weight`` ``(V, H)`` (fused path), or ``(B, S, V)`` logits
    with ``weight=None``. Causal shift: position ``t`` predicts ``labels[:, t + 1]``. Chunked, fp32."""
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX                                      # (B, S-1)
    rows = features[:, :-1][valid]                                       # (N, H) or (N, V)
    targets = targets[valid]                                             # (N,)
    total = torch.zeros((), dtype=torch.float32, device=features.device)
    for i in range(0, targets.numel(), chunk_size):
        x = rows[i : i + chunk_size]
        logits = (torch.nn.functional.linear(x, weight, bias) if weight is not None else x).float()
        picked = logits.gather(-1, targets[i : i + chunk_size, None]).squeeze(-1)
        total += (torch.logsumexp(logits, dim=-1) - picked).sum()
    return total, torch.tensor(targets.numel(), device=features.device)


@dataclass
class RolloutMeter:
    """Per-logging-window sums of the on-policy figures, reduced over ranks when the trainer logs."""

    micro_batches: float = 0.0
    student_batches: float = 0.0
    tokens: float = 0.0            # completion tokens kept (up to and including EOS)
    completions: float = 0.0
    generate_seconds: float = 0.0
    nll_sum: torch.Tensor | float = 0.0
    nll_tokens: torch.Tensor | float = 0.0
    window_start: float | None = None  # the first step of the window began (set by RolloutSampler.prepare)

    def metrics(self, accelerator, device) -> dict[str, float]:
        """``on_policy_fraction``, ``rollout_tokens_per_s``, ``rollout_mean_length``, ``rollout_time_share`` (of the
        window's wall time) and ``rollout_teacher_nll`` over all ranks."""
        window = time.perf_counter() - self.window_start if self.window_start is not None else 0.0
        values = [self.micro_batches, self.student_batches, self.tokens, self.completions, self.generate_seconds,
                  self.nll_sum, self.nll_tokens, window]
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        m, student, tokens, rows, seconds, nll, nll_n, window = accelerator.reduce(stacked, reduction="sum").tolist()
        world = accelerator.num_processes
        out = {"on_policy_fraction": round(student / m, 4) if m else 0.0}
        if rows:
            out.update(rollout_tokens_per_s=round(tokens / max(seconds / world, 1e-9), 1),
                       rollout_mean_length=round(tokens / rows, 2), rollout_time_share=round(seconds / window, 4))
        if nll_n:
            out["rollout_teacher_nll"] = round(nll / nll_n, 6)
        return out

    def add_nll(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.nll_sum = self.nll_sum + total.detach().double()
        self.nll_tokens = self.nll_tokens + count.double()


class RolloutSampler:
    """Replaces some micro-batches' completions by sampled ones (see the module docstring)."""

    def __init__(self, args, tokenizer, student: torch.nn.Module):
        if tokenizer is None:
            raise ValueError("On-policy distillation (lmbda > 0 or seq_kd) needs processing_class=tokenizer: it pads "
                             "the prompts and stops at EOS.")
        self.lmbda, self.seq_kd, self.seed = args.lmbda, args.seq_kd, args.seed
        self.eos_ids = eos_token_ids(student, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        greedy = args.rollout_temperature == 0.0
        self.generation_config = make_generation_config(
            self.eos_ids, self.pad_id, tokenizer.bos_token_id, max_new_tokens=args.max_new_tokens,
            do_sample=not greedy, temperature=args.rollout_temperature, top_p=args.rollout_top_p,
            top_k=args.rollout_top_k)
        self.meter = RolloutMeter()

    def source(self, step: int, micro_batch: int) -> str | None:
        """Who writes this micro-batch's completions: "student" (probability lmbda), "teacher" (seq_kd) or None
        (the dataset's). The same on every rank."""
        if self.lmbda > 0.0 and np.random.default_rng([self.seed, step, micro_batch]).random() < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else None

    def prepare(self, batch_samples: list[dict], step: int, rank: int, student, teacher) -> list[dict]:
        """The optimiser step's micro-batches, each kept or rebuilt from sampled completions."""
        if self.meter.window_start is None:
            self.meter.window_start = time.perf_counter()
        out = []
        for i, batch in enumerate(batch_samples):
            who = self.source(step, i)
            self.meter.micro_batches += 1
            if who is None:
                out.append(batch)
                continue
            self.meter.student_batches += who == "student"
            model = student if who == "student" else teacher
            out.append(self.rollout(model, batch, who, rollout_seed(self.seed, step, i, rank)))
        return out

    def pop_metrics(self, accelerator, device) -> dict[str, float]:
        """The logging window's figures (all ranks); starts the next window."""
        meter, self.meter = self.meter, RolloutMeter()
        return meter.metrics(accelerator, device)

    def rollout(self, model: torch.nn.Module, batch: dict, who: str, seed: int) -> dict:
        """``batch`` with its completions replaced by ``model``'s samples for its prompts."""
        prompts = split_prompts(batch)
        device = batch["input_ids"].device
        start = time.perf_counter()
        input_ids, attention_mask = left_pad(prompts, self.pad_id, device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(model):
            sequences = sample(model, input_ids, attention_mask, self.generation_config, seed).sequences
        completions = cut_after_eos(sequences[:, input_ids.shape[1]:].tolist(), set(self.eos_ids))
        self.meter.generate_seconds += time.perf_counter() - start
        self.meter.tokens += sum(len(c) for c in completions)
        self.meter.completions += len(completions)
        return {**completion_rows(prompts, completions, self.pad_id, device), ROLLOUT_KEY: who}
