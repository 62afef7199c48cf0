"""Held-out evaluation: perplexity and top-1 agreement with the teacher, token-weighted across ranks.

Perplexity is ``exp(total NLL / total tokens)`` over all valid positions of the whole held-out set - not
a mean of per-batch perplexities, and not a mean of per-rank means (ranks hold different token counts).

We do not use the ``evaluate`` library here: its metrics are fetched from the hub at load time (so they
cannot run offline), and its ``perplexity`` metric reloads a model by hub id; what we need is two sums
over the logits we already have.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import reduce
from torch.utils.data import DataLoader

from llm_distill.data import Fields, for_masked_lm, load_rows, mask_once, prepare_dataset
from llm_distill.distributed import is_sharded
from llm_distill.head_features import HeadFeatures, LMHeadPath
from llm_distill.losses import IGNORE_INDEX


def heldout_set(source: str, tokenizer, data_args, max_samples: int | None, seed: int, masked: bool = False,
                mlm_probability: float = 0.15):
    """The held-out set every job scores on, built one way: rows of ``source`` (``data_args.eval_split``), validated,
    tokenised as ``data_args`` says (packed into ``max_length`` blocks or not, as the run says), a seeded subset of
    ``max_samples``; for masked LMs masked once, deterministically (every model is scored on the same masks). The
    same file, settings and seed give the same set, so prune and distill report the same perplexity for one model."""
    rows, fmt = load_rows(source, data_args.eval_split, data_args.dataset_config, Fields.from_args(data_args))
    dataset = prepare_dataset(rows, fmt, tokenizer, data_args, max_samples, seed, "eval")
    if masked:
        dataset = mask_once(for_masked_lm(dataset, fmt, source), tokenizer, mlm_probability, seed)
    return dataset


@torch.no_grad()
def evaluate_models(models: dict, dataset, collator, batch_size: int = 8, reference: str | None = "teacher",
                    shift_labels: bool = True, chunk_size: int = 256) -> dict[str, dict[str, float]]:
    """Perplexity and top-1 accuracy of every model in ``models``, and its top-1 agreement with ``models[reference]``.

    The dataset is split across processes (no row is counted twice); sums are reduced. When a model is
    sharded (FSDP / ZeRO-3) ranks with fewer batches run uncounted filler batches so the collectives match.
    With ``shift_labels=False`` (masked LMs) the valid positions are the masked tokens, so these are masked-token
    perplexity and accuracy. Returns ``{name: {"perplexity", "nll", "accuracy", "tokens", "top1_agreement"?}}``.
    """
    state = PartialState()
    device = state.device
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        shard = dataset.select(indices)
    batches = [(batch, True) for batch in DataLoader(shard, batch_size=batch_size, collate_fn=collator)]
    if state.num_processes > 1 and len(dataset) and any(is_sharded(m) for m in models.values()):
        # A sharded model's forward is a collective (FSDP all-gathers, ZeRO-3 gathers): every rank must run the
        # same number of batches or the one with more hangs. Pad with uncounted repeats of a real batch.
        n_max = math.ceil(math.ceil(len(dataset) / state.num_processes) / batch_size)
        filler = collator([dataset[0]])
        batches += [(filler, False)] * (n_max - len(batches))
    sums = {name: torch.zeros(4, dtype=torch.float64, device=device) for name in models}  # nll, tokens, agree, correct
    paths = {name: LMHeadPath("teacher", quiet=True) for name in models}  # frozen here: the decoder, then the head
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    for batch, counted in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        targets = labels[:, 1:] if shift_labels else labels
        valid = (targets != IGNORE_INDEX) & counted
        argmax = {}
        for name, model in models.items():
            features = paths[name](model, batch)
            nll, argmax[name] = scored_positions(features, valid, targets[valid], shift_labels, chunk_size)
            sums[name][0] += nll
            sums[name][1] += valid.sum()
            sums[name][3] += (argmax[name] == targets[valid]).sum()
        if reference in argmax:
            for name in models:
                sums[name][2] += (argmax[name] == argmax[reference]).sum()
    for name, m in models.items():
        m.train(was_training[name])
    results = {}
    for name, s in sums.items():
        s = reduce(s, reduction="sum") if state.num_processes > 1 else s
        nll, tokens, agree, correct = s.tolist()
        tokens = max(tokens, 1.0)
        results[name] = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "accuracy": correct / tokens,
                         "tokens": int(tokens)}
        if reference in models:
            results[name]["top1_agreement"] = agree / tokens
    return results


def scored_positions(features: HeadFeatures, valid: torch.Tensor, targets: torch.Tensor, shift_labels: bool = True,
                     chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float64) of ``targets`` and the argmax token at the ``valid`` positions ``(B, S')`` of ``features``
    (``S' = S - 1`` with ``shift_labels``: position t predicts token t + 1). Fused features are projected through
    the head ``chunk_size`` positions at a time, in the head's dtype and then fp32, as the model's own forward
    computes its logits; fallback logits are only gathered."""
    x = features.features[:, :-1] if shift_labels else features.features
    x = x[valid]  # (N, H) hidden states or (N, V) logits
    nll = torch.zeros((), dtype=torch.float64, device=x.device)
    argmax = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    step = chunk_size if features.weight is not None and chunk_size > 0 else max(1, x.shape[0])
    for start in range(0, x.shape[0], step):
        chunk = x[start : start + step]
        if features.weight is not None:
            chunk = F.linear(chunk.to(features.weight.dtype), features.weight, features.bias)
        logits = chunk.float()  # (n, V)
        nll += F.cross_entropy(logits, targets[start : start + step], reduction="sum").double()
        argmax[start : start + step] = logits.argmax(-1)
    return nll, argmax


@torch.no_grad()
def forward_latency(models: dict, input_ids: torch.Tensor, repeats: int = 10) -> dict[str, float]:
    """Median seconds of one forward pass of each model on ``input_ids`` ``(B, S)``, after one warm-up pass. The
    models take turns within each repeat, so a load spike on a shared machine hits all of them, not just one."""
    times = {name: [] for name in models}
    for model in models.values():
        model.eval()(input_ids=input_ids)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=input_ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Stopwatch:
    """``with Stopwatch() as t: ...; t.seconds``"""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
