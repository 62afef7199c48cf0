"""A/B of the memory-lean loss's closed-form chunk: another revision's ``losses/chunked.py`` against this tree's.

    python scripts/bench_kd_chunk_ab.py                   # vs 94b1e6b (before issue 18), every loss_type
    python scripts/bench_kd_chunk_ab.py --base HEAD~3 --reps 12

Both versions run ``chunked_distillation_loss`` forward + backward on the same random tensors (N = 2048 valid
tokens, student H = 128, teacher H = 256, V = 4096, chunk 256: the embedded default's KD step shapes), in one
process, alternating which goes first each round; medians over the rounds after two warm-ups. Prints
``after / before`` per loss type and the absolute loss difference (the math must not change). Only the loss is timed,
not the models' forwards: for the KD-overhead ratio of a whole step use ``bench_kd_overhead.py --loss_types all``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llm_distill.losses import LOSS_TYPES  # noqa: E402
from llm_distill.losses import chunked as new  # noqa: E402


def load_revision(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:llm_distill/losses/chunked.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "chunked_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("chunked_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["chunked_base"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="94b1e6b")
    parser.add_argument("--reps", type=int, default=8, help="rounds per loss type (the first two are warm-up)")
    args = parser.parse_args()
    old = load_revision(args.base)
    torch.manual_seed(0)
    n, hs_dim, ht_dim, vocab = 2048, 128, 256, 4096
    hs, w = torch.randn(1, n + 1, hs_dim), torch.randn(vocab, hs_dim) * 0.05
    ht, wt = torch.randn(1, n + 1, ht_dim), torch.randn(vocab, ht_dim) * 0.05
    labels = torch.randint(0, vocab, (1, n + 1))
    print(f"| loss_type | {args.base} ms | this tree ms | after / before | abs loss diff |\n| --- | ---: | ---: | ---: | ---: |")
    for loss_type in LOSS_TYPES:
        times, losses = {"old": [], "new": []}, {}
        for r in range(args.reps):
            for name, module in (("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old)):
                h, weight = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
                start = time.perf_counter()
                out = module.chunked_distillation_loss(h, weight, ht, wt, labels, chunk_size=256, loss_type=loss_type,
                                                       alpha=1.0)
                out.loss.backward()
                if r >= 2:
                    times[name].append(time.perf_counter() - start)
                losses[name] = out.loss.item()
        before, after = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"| {loss_type} | {1000 * before:.1f} | {1000 * after:.1f} | {after / before:.3f} | "
              f"{abs(losses['old'] - losses['new']):.2e} |", flush=True)


if __name__ == "__main__":
    main()
