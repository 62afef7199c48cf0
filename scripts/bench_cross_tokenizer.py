"""Distillation across tokenizers on the embedded default: CE only vs sequence-level KD vs ``uld`` vs ``hybrid``,
with the same-tokenizer KD figure beside them; held-out perplexity *per byte* (comparable across tokenizers).

    python scripts/bench_cross_tokenizer.py                     # the full budget of scripts/bench_quality.py
    python scripts/bench_cross_tokenizer.py --max_steps 100     # a shorter run (extra args go to every distill run)
    python scripts/bench_cross_tokenizer.py --smoke             # minutes: the pipeline on a miniature world (figures
                                                                # meaningless; checks the script end to end)

The teacher is the embedded teacher (byte-level BPE, 4,096 tokens, no BOS). The cross-tokenizer student is
``embedded:student_xtok`` (2 x 128 Llama) with ``embedded:tokenizer_xtok`` (3,072 tokens, ``<s>`` BOS, other
specials); the same-tokenizer student is ``embedded:student`` (same shape, the teacher's tokenizer). Every run gets
the budget of ``configs/default.yaml`` (300 steps x 8 rows, lr 3e-3, cosine) on the same 256 training texts (train
files cut into pieces of at most 254 tokens of the student's tokenizer), and every model is scored on the same
64 held-out texts, per byte (``llm_distill.cross_tokenizer.perplexity_per_byte``).

Runs (student, objective):
* ``ce_only``        - xtok student, CE on the texts (alpha 0);
* ``seq_kd``         - xtok student, CE on teacher text: each training text's first quarter + the teacher's greedy
                       continuation (sequence-level KD, Kim & Rush 2016: the only cross-tokenizer option before);
* ``uld`` / ``hybrid`` - xtok student, ``cross_tokenizer: uld | hybrid`` (alpha ``--xtok_alpha``);
* ``same_tok_ce`` / ``same_tok_kd`` - the same-tokenizer student, CE only and forward-KL KD (alpha 1), for scale.

Gap recovered = (ppl_CE - ppl_run) / (ppl_CE - ppl_teacher), per byte, against the CE-only run of the *same*
student. Writes ``bench_results/cross_tokenizer.json``. Each finished run is cached in ``--workdir`` (rerun = resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llm_distill.cross_tokenizer import perplexity_per_byte, split_text  # noqa: E402
from llm_distill.embedded import causal, resolve  # noqa: E402
from llm_distill.jobs.distill import main as run_distillation  # noqa: E402

logger = logging.getLogger("bench_cross_tokenizer")


def text_pieces(jsonl: str, tokenizer, n: int, max_tokens: int, seed: int) -> list[str]:
    """``n`` pieces (at most ``max_tokens`` tokens each, >= 64 characters) of a seeded sample of the split's files."""
    texts = causal.read_texts(Path(jsonl))
    random.Random(seed).shuffle(texts)
    pieces: list[str] = []
    for text in texts:
        pieces += [p for p in split_text(text, tokenizer, max_tokens) if len(p.strip()) >= 64]
        if len(pieces) >= 4 * n:
            break
    random.Random(seed + 1).shuffle(pieces)
    return pieces[:n]


@torch.no_grad()
def greedy_continuations(teacher, tokenizer, texts: list[str], prompt_fraction: float, batch_size: int = 64) -> list[str]:
    """Sequence-level KD rows: each text's first ``prompt_fraction`` of teacher tokens + the teacher's greedy
    continuation of the same total length."""
    rows = []
    tokenizer.padding_side = "left"
    for start in range(0, len(texts), batch_size):
        chunk = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        prompts = [[tokenizer.eos_token_id] + ids[: max(1, int(len(ids) * prompt_fraction))] for ids in chunk]
        budget = max(len(ids) for ids in chunk) - min(len(p) for p in prompts) + 1
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        out = teacher.generate(**batch, max_new_tokens=budget, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=None)
        width = batch["input_ids"].shape[1]
        for i, (ids, prompt) in enumerate(zip(chunk, prompts)):
            new = out[i, width: width + len(ids) - len(prompt) + 1].tolist()
            rows.append(tokenizer.decode(prompt[1:] + new))
        logger.warning("seq-KD data: %d / %d continuations", len(rows), len(texts))
    return rows


def write_texts(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def cached_run(name: str, argv: list[str], workdir: Path) -> dict:
    """One distill run (or its cached result when ``workdir/name`` finished before)."""
    done = workdir / name / "distill_results.json"
    if done.exists():
        logger.warning("=== %s: cached in %s ===", name, done.parent)
        return json.loads(done.read_text())
    logger.warning("=== %s ===", name)
    start = time.time()
    result = run_distillation([*argv, "--output_dir", str(workdir / name)])
    result["bench_wall_s"] = time.time() - start
    done.write_text(json.dumps(result, indent=2))
    return result


def score(model_path: str, texts: list[str], start_id: int | None) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return perplexity_per_byte(model, AutoTokenizer.from_pretrained(model_path), texts, start_id=start_id)


def build_runs(args, paths: dict, data: dict, extra: list[str]) -> dict[str, list[str]]:
    base = ["--config", "configs/default.yaml", "--teacher_model", paths["teacher"], "--packing", "false",
            "--eval_dataset", "", "--seed", str(args.seed),
            "--max_train_samples", str(args.n_train), "--logging_steps", "50", *extra]
    # The xtok student cannot share the teacher's vocabulary check, so its CE-only runs go through the cross-tokenizer
    # data path with alpha 0 (the teacher is then never run; the CE term is the plain one).
    xtok = ["--student_model", paths["student_xtok"], "--tokenizer", paths["tokenizer_xtok"],
            "--teacher_tokenizer", paths["teacher"]]
    return {  # in order of importance: a run cut short by the clock leaves the others cached
        "ce_only": [*base, *xtok, "--dataset", data["train"], "--cross_tokenizer", "hybrid", "--alpha", "0"],
        "hybrid": [*base, *xtok, "--dataset", data["train"], "--cross_tokenizer", "hybrid",
                   "--alpha", str(args.xtok_alpha)],
        "uld": [*base, *xtok, "--dataset", data["train"], "--cross_tokenizer", "uld", "--alpha", str(args.xtok_alpha)],
        "seq_kd": [*base, *xtok, "--dataset", data["seq_kd"], "--cross_tokenizer", "hybrid", "--alpha", "0"],
        "same_tok_ce": [*base, "--student_model", paths["student"], "--dataset", data["train"], "--alpha", "0"],
        "same_tok_kd": [*base, "--student_model", paths["student"], "--dataset", data["train"], "--alpha", "1.0"],
    }


def prepare_data(args, paths: dict, workdir: Path) -> dict[str, str]:
    tok_x = AutoTokenizer.from_pretrained(paths["tokenizer_xtok"])
    train = text_pieces(paths["train"], tok_x, args.n_train, 254, args.seed)
    heldout = text_pieces(paths["heldout"], tok_x, args.n_eval, 254, args.seed)
    return {"train": write_texts(workdir / "train.jsonl", train), "heldout": write_texts(workdir / "heldout.jsonl", heldout),
            "seq_kd": str(workdir / "seq_kd.jsonl")}  # written by ensure_seq_kd_data, when that run needs it


def ensure_seq_kd_data(paths: dict, data: dict) -> None:
    """The sequence-level KD rows: the teacher's greedy continuations of the training texts (once)."""
    if Path(data["seq_kd"]).exists():
        return
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).eval()
    train = causal.read_texts(Path(data["train"]))
    write_texts(Path(data["seq_kd"]), greedy_continuations(teacher, AutoTokenizer.from_pretrained(paths["teacher"]),
                                                            train, 0.25))


OBJECTIVES = {"ce_only": "CE on the texts", "seq_kd": "CE on teacher continuations (sequence-level KD)",
              "uld": "cross_tokenizer: uld", "hybrid": "cross_tokenizer: hybrid", "same_tok_ce": "CE on the texts",
              "same_tok_kd": "token-level forward KL (alpha 1)"}


def report(results: dict, scores: dict) -> list[tuple]:
    """Table rows ``(run, objective, ppl per byte, gap recovered)``; adds the per-byte figures to ``results``."""
    teacher = scores["teacher"]["perplexity_per_byte"]
    rows = [("teacher", "-", teacher, None)]
    for name, r in results.items():
        baseline = "same_tok_ce" if name.startswith("same_tok") else "ce_only"
        ppl = scores[name]["perplexity_per_byte"]
        r["perplexity_per_byte"], r["bits_per_byte"] = ppl, scores[name]["bits_per_byte"]
        r["gap_recovered"] = None
        if baseline in scores and name != baseline:
            ce = scores[baseline]["perplexity_per_byte"]
            r["gap_recovered"] = (ce - ppl) / (ce - teacher)
        label = f"{name} (alpha {r['alpha']})" if name in ("uld", "hybrid") else name
        rows.append((label, OBJECTIVES.get(name, "?"), ppl, r["gap_recovered"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="outputs/bench_cross_tokenizer")
    parser.add_argument("--out", default="bench_results/cross_tokenizer.json")
    parser.add_argument("--n_train", type=int, default=256)
    parser.add_argument("--n_eval", type=int, default=64)
    parser.add_argument("--xtok_alpha", type=float, default=0.5, help="KD weight of the uld / hybrid runs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", nargs="+", default=None, help="subset of runs (default: all)")
    parser.add_argument("--smoke", action="store_true", help="miniature embedded world in --workdir, 2 steps per run")
    args, extra = parser.parse_known_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = None
    if args.smoke:  # a teacher of 3 steps, 8 training texts: checks the pipeline, not the method
        os.environ["LLM_DISTILL_CACHE"] = str(workdir / "cache")
        recipe = dataclasses.replace(causal.TinyRecipe(), tokenizer_train_chars=300_000, teacher_steps=3, seq_len=64)
        args.n_train, args.n_eval = 8, 4
        extra = [*extra, "--max_steps", "2", "--per_device_train_batch_size", "4", "--warmup_steps", "0"]
    names = ("teacher", "student", "train", "heldout", "student_xtok", "tokenizer_xtok")
    paths = {name: resolve(f"embedded:{name}", recipe) for name in names}
    data = prepare_data(args, paths, workdir)
    heldout = causal.read_texts(Path(data["heldout"]))
    runs = build_runs(args, paths, data, extra)
    results = {}
    for name, argv in runs.items():
        if args.runs and name not in args.runs:
            continue
        if name == "seq_kd":
            ensure_seq_kd_data(paths, data)
        results[name] = cached_run(name, argv, workdir)
    eos = AutoTokenizer.from_pretrained(paths["teacher"]).eos_token_id  # the teacher's document separator
    scores = {"teacher": score(paths["teacher"], heldout, eos)}
    for name in results:
        scores[name] = score(str(workdir / name), heldout, None if name in runs and "--cross_tokenizer" in runs[name] else eos)
    rows = report(results, scores)
    print("\n| run | objective | held-out perplexity per byte | gap recovered |")
    print("| --- | --- | ---: | ---: |")
    for label, objective, ppl, rec in rows:
        print(f"| {label} | {objective} | {ppl:.4f} | {'-' if rec is None else f'{100 * rec:.0f}%'} |")
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "teacher": scores["teacher"], "runs": results,
                                          "scores": scores}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
