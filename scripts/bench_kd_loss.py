"""Time and peak memory of one KD loss forward+backward, from hidden states + lm_head to gradients.

    python scripts/bench_kd_loss.py                                  # V=32k and 152k, B*S=4096 tokens, H=896
    python scripts/bench_kd_loss.py --tokens 1024 --vocab 152064 --reps 3

Variants: naive (the tutorial loss: full logits, log_softmax of both in fp32, F.kl_div), plain
(``llm_distill.losses.distillation_loss``), chunked (``chunked_distillation_loss``, fused lm_head) and liger
(``LigerFusedLinearJSDLoss``, ``compiled=False``; skipped with a note when liger-kernel is absent). Each
measurement runs in a fresh subprocess; on CPU peak memory = ru_maxrss high-water mark minus the RSS after the
inputs are built (torch's allocations are invisible to tracemalloc); on GPU ``torch.cuda.max_memory_allocated``.
Variants alternate, ``--reps`` rounds; medians are reported. Writes bench_results/kd_loss.json.

Each child's address space is capped (``--mem-cap-gib``, default 80% of RAM): a variant that needs more fails
with torch's allocation error and is reported as "over the cap" instead of waking the kernel's OOM killer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_kd_loss")
VARIANTS = ("naive", "plain", "chunked", "liger")


def measure(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, seed: int) -> dict:
    """One forward+backward of ``variant`` in this (fresh) process: seconds and peak MiB above the inputs."""
    import torch
    import torch.nn.functional as F

    from llm_distill.footprint import peak_rss_mib, rss_mib
    from llm_distill.losses import chunked_distillation_loss, distillation_loss

    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    hs = torch.randn(1, tokens, hidden, device=dev, requires_grad=True)
    ws = (torch.randn(vocab, hidden, device=dev) * 0.02).requires_grad_()
    ht, wt = torch.randn(1, tokens, hidden, device=dev), torch.randn(vocab, hidden, device=dev) * 0.02
    labels = torch.randint(0, vocab, (1, tokens), device=dev)
    if variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        # beta=0 is forward KL in GKD's convention, the divergence every other variant computes here.
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0, compiled=False)
    base = torch.cuda.memory_allocated() if cuda else rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if variant == "naive":
        s, t = hs @ ws.t(), ht @ wt.t()  # (1, N, V) full logits
        kd = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                      reduction="none").sum(-1).mean()
        loss = 0.5 * kd + 0.5 * F.cross_entropy(s.float().view(-1, vocab), labels.view(-1))
    elif variant == "plain":
        loss = distillation_loss(hs @ ws.t(), ht @ wt.t(), labels, loss_type="forward_kl", shift_labels=False).loss
    elif variant == "chunked":
        loss = chunked_distillation_loss(hs, ws, ht, wt, labels, chunk_size=chunk, loss_type="forward_kl",
                                         shift_labels=False).loss
    else:
        loss = liger(hs.view(-1, hidden), ws, ht.view(-1, hidden), wt, labels.view(-1))
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_mib() - base
    return {"seconds": seconds, "peak_mib": peak}


def total_ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def run_child(variant, args, vocab) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--vocab", str(vocab),
           "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--seed", str(args.seed)]
    cap = int(args.mem_cap_gib * 2**30)

    def limit_memory():  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_memory)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        over = "can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr
        logger.warning("%s V=%d %s: %s", variant, vocab, "needs more than the memory cap" if over else "failed", err)
        return {"error": f"over the {args.mem_cap_gib:g} GiB cap" if over else err[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="B*S valid tokens")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--chunk", type=int, default=256, help="loss_chunk_size of the chunked path")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_results/kd_loss.json")
    p.add_argument("--mem-cap-gib", type=float, default=round(0.8 * total_ram_gib(), 1),
                   help="address-space cap of each measurement process (default: 80%% of RAM)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.vocab[0], args.hidden, args.chunk, args.seed)))
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    variants = list(args.variants)
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        if "liger" in variants:
            variants.remove("liger")
            logger.warning("liger-kernel not installed: the liger column is skipped "
                           "(pip install --no-deps liger-kernel to include it).")
    rows = []
    for vocab in args.vocab:
        samples = {v: [] for v in variants}
        failed = {}
        for _ in range(args.reps):  # alternate the variants, one fresh process each
            for v in variants:
                if v in failed:  # out of memory once is out of memory every time
                    continue
                r = run_child(v, args, vocab)
                if "error" in r:
                    failed[v] = r["error"]
                else:
                    samples[v].append(r)
        for v, error in failed.items():
            rows.append({"vocab": vocab, "tokens": args.tokens, "hidden": args.hidden, "variant": v, "error": error})
        for v in variants:
            if samples[v]:
                rows.append({"vocab": vocab, "tokens": args.tokens, "hidden": args.hidden, "variant": v,
                             "seconds": statistics.median(s["seconds"] for s in samples[v]),
                             "peak_mib": statistics.median(s["peak_mib"] for s in samples[v]), "reps": len(samples[v])})
    # Ratios against the naive loss where it ran; where it did not fit, against the cap (an upper bound: "< x").
    naive = {r["vocab"]: r for r in rows if r["variant"] == "naive" and "error" not in r}
    naive_failed = {r["vocab"] for r in rows if r["variant"] == "naive" and "error" in r}
    cap_mib = args.mem_cap_gib * 1024
    print(f"\n{'V':>7} {'variant':<8} {'fwd+bwd s':>10} {'peak MiB':>9} {'mem/naive':>10} {'time/naive':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['vocab']:>7} {r['variant']:<8} {r['error']}")
            continue
        n = naive.get(r["vocab"])
        r["mem_vs_naive"] = r["peak_mib"] / n["peak_mib"] if n else None
        r["time_vs_naive"] = r["seconds"] / n["seconds"] if n else None
        if n is None and r["vocab"] in naive_failed:
            r["mem_vs_naive_upper_bound"] = r["peak_mib"] / cap_mib  # naive needed more than the cap
        mem = (f"{r['mem_vs_naive']:.2f}" if r["mem_vs_naive"] is not None else
               f"<{r['mem_vs_naive_upper_bound']:.2f}" if "mem_vs_naive_upper_bound" in r else "nan")
        time_ratio = f"{r['time_vs_naive']:.2f}" if r["time_vs_naive"] is not None else "nan"
        print(f"{r['vocab']:>7} {r['variant']:<8} {r['seconds']:>10.3f} {r['peak_mib']:>9.0f} {mem:>10} {time_ratio:>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "mem_cap_gib": args.mem_cap_gib,
                                          "results": rows}, indent=2))


if __name__ == "__main__":
    main()
