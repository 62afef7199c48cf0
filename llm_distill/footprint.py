"""What a compressed model costs and what it keeps: parameters, non-zeros, bytes on disk, generation speed on CPU,
held-out perplexity and top-1 agreement with the teacher - measured the same way for a PyTorch model, a torchao
quantized one and an ONNX Runtime session, so every stage of ``llm-distill compress`` lands in one table.

Speed is measured the way a user meets it: batch 1, greedy generation of a fixed number of new tokens after a fixed
prompt, tokens per second; the models take turns within each repeat (a load spike on a shared machine hits all of
them) and the median is reported, at 1 thread and at all threads.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from llm_distill.losses import IGNORE_INDEX

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".bin", ".data")


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux ``/proc/self/statm``): torch's CPU allocations are invisible
    to tracemalloc, so benchmarks read the resident set."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark, MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict:
    """The versions and machine a benchmark figure belongs to (every ``bench_results/*.json`` records them)."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def write_results(path: str | Path, result: dict) -> None:
    """A benchmark's JSON, its folder created; prints where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


def file_size(folder: str | Path) -> int:
    """Bytes of the weight files in ``folder`` (safetensors / ONNX and its external data), not config or tokenizer."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters and non-zero parameters (a quantized weight counts its logical elements)."""
    total = nonzero = 0
    for p in model.parameters():
        data = p.data if type(p.data) is torch.Tensor else p.data.dequantize()
        total += data.numel()
        nonzero += int(torch.count_nonzero(data))
    return {"parameters": total, "nonzeros": nonzero}


@torch.no_grad()
def score(logits_fn: Callable, batches: list[dict], reference: list[torch.Tensor] | None = None) -> dict:
    """Held-out perplexity (``exp`` of the token-weighted mean NLL over every labelled position), next-token accuracy
    and top-1 agreement with ``reference`` (the teacher's argmax per valid position, one tensor per batch, as
    returned in ``"argmax"``). ``logits_fn(input_ids, attention_mask) -> (B, S, V)`` logits."""
    nll = tokens = agree = correct = 0.0
    argmaxes = []
    for i, batch in enumerate(batches):
        logits = torch.as_tensor(logits_fn(batch["input_ids"], batch["attention_mask"]))[:, :-1].float()
        targets = batch["labels"][:, 1:]
        valid = targets != IGNORE_INDEX
        logits = logits[valid]  # (N, V)
        nll += float(F.cross_entropy(logits, targets[valid], reduction="sum"))
        tokens += int(valid.sum())
        argmax = logits.argmax(-1)
        argmaxes.append(argmax)
        correct += int((argmax == targets[valid]).sum())
        if reference is not None:
            agree += int((argmax == reference[i]).sum())
    tokens = max(tokens, 1.0)
    out = {"perplexity": math.exp(nll / tokens), "accuracy": correct / tokens, "tokens": int(tokens),
           "argmax": argmaxes}
    if reference is not None:
        out["top1_agreement"] = agree / tokens
    return out


def torch_generator(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    """A no-argument call that greedily generates exactly ``new_tokens`` tokens after ``prompt`` ``(1, S)``."""
    model.eval()

    def run():
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return run


def generation_speed(runners: dict[str, dict[int, Callable]], new_tokens: int, repeats: int = 3) -> dict:
    """Median tokens/s of each ``runners[name][threads]()`` (one greedy generation of ``new_tokens``), after one
    warm-up call each. PyTorch runners are timed with ``torch.set_num_threads(threads)``; ONNX Runtime runners carry
    their thread count in their session. Returns ``{name: {threads: tokens/s}}``."""
    before = torch.get_num_threads()
    times = {name: {t: [] for t in by_threads} for name, by_threads in runners.items()}
    try:
        for rep in range(repeats + 1):
            for name, by_threads in runners.items():
                for threads, run in by_threads.items():
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    run()
                    if rep:  # the first round is the warm-up
                        times[name][threads].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {name: {t: new_tokens / statistics.median(ts) for t, ts in by_t.items()} for name, by_t in times.items()}
