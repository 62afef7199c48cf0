"""The ``llm-distill`` console command: one verb per job, each the same ``main(argv)`` as its script.

    llm-distill --help                      # the verbs
    llm-distill distill --help              # every field of the distillation config
    llm-distill distill --config configs/default.yaml --temperature 2.0

A verb imports only its own job (``llm_distill.jobs.<module>``), so ``--help`` answers in a second or two.
"""

from __future__ import annotations

import importlib
import sys

from llm_distill.jobs import run_cli

# verb -> (job module, what it does, the script that runs the same job)
VERBS = {
    "distill": ("distill", "distil a teacher into a student (logit KD, response KD, DistilBERT triple loss)",
                "scripts/distill.py"),
    "generate": ("generate", "build a teacher-response dataset (JSONL), resumable and sharded", "scripts/generate.py"),
    "prune": ("prune", "prune attention heads / layers / MLP width by importance", "scripts/prune.py"),
    "store-logits": ("store_logits", "store the teacher's top-k log-probabilities for offline KD",
                     "scripts/store_teacher_logits.py"),
    "distillspec": ("distillspec", "distil a speculative-decoding draft toward its target (DistillSpec)",
                    "scripts/distillspec.py"),
    "bench-speculative": ("bench_speculative", "measure speculative decoding: acceptance rate and speedup",
                          "scripts/bench_speculative.py"),
    "born-again": ("born_again", "born-again generations: a same-size student taught by its predecessor",
                   "scripts/born_again.py"),
    "compress": ("compress", "prune, distil, sparsify, quantize and export a student, scored per stage",
                 "scripts/compress.py"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: llm-distill <verb> [--config FILE.yaml] [--field value ...]", "",
             "Every verb runs the same job as its script; `llm-distill <verb> --help` lists its fields.", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {about} (= {script})" for verb, (_, about, script) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"llm-distill: unknown verb {verb!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    job = importlib.import_module(f"llm_distill.jobs.{VERBS[verb][0]}")
    return run_cli(job.main, rest)  # a user's error: one `error: ...` line and exit status 2


if __name__ == "__main__":
    sys.exit(main())
