"""Job: a teacher answers prompts; the rows go to JSONL (resumable, sharded over processes, batched).

    python scripts/generate.py [--config configs/generate.yaml] [--key value ...]
    accelerate launch --num_processes 8 scripts/generate.py --config my.yaml --prompts prompts.jsonl
    llm-distill generate [--config ...] [--key value ...]

:func:`run_generation` is the typed entry (``GenerateArguments`` in, the run summary out, on every rank); the steps
are the ``llm_distill.generation`` blocks: prompts validated and encoded before any weights are loaded, one batch
plan for any number of processes, a crash-safe store that resumes, and one merge on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm
from transformers import AutoConfig

from llm_distill.config import ConfigError, parse_args_and_config
from llm_distill.distributed import shutdown_distributed
from llm_distill.embedded import resolve
from llm_distill.errors import UserError
from llm_distill.jobs import with_base
from llm_distill.generation import (
    GenerateArguments,
    HFBackend,
    Prompt,
    ShardStore,
    VLLMBackend,
    encode_prompts,
    fingerprint_of,
    load_prompts,
    make_rows,
    plan_batches,
    row_key,
    use_chat_template,
)
from llm_distill.models import load_causal_lm, load_tokenizer, loading

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "generate.yaml"


@dataclass
class _Prepared:
    """Everything decided before any weights are loaded."""

    tokenizer: object
    all_prompts: list[Prompt]
    prompts: list[Prompt]           # kept after the over_length policy, encoded
    chat: bool
    fingerprint: dict
    encode_stats: dict
    expected: set[tuple]            # every (id, sample_index) the output must hold


def parse(argv: list[str] | None) -> GenerateArguments:
    return parse_args_and_config((GenerateArguments,), argv)[0]


def run_generation(args: GenerateArguments) -> dict:
    """Generate (or resume) ``args.output``; returns the run summary (on every rank)."""
    state = PartialState(cpu=_use_cpu())
    start = time.time()
    names = args
    if not args.teacher_model or not args.prompts:
        raise ConfigError("teacher_model and prompts must both be set: the teacher and the prompts it answers (or "
                          "run with neither for the embedded demo, configs/generate.yaml).")
    with state.main_process_first():  # rank 0 builds the embedded default once; the others find it cached
        args = replace(args, prompts=resolve(args.prompts))
        prompts = load_prompts(args)  # the user's rows are checked before any model is built or loaded
        args = replace(args, **{name: resolve(getattr(args, name)) for name in ("teacher_model", "tokenizer")})
    prep = _prepare(args, names, prompts)
    # 5. Resume: main repairs / checks the output, then every rank reads what is already done.
    store = ShardStore(args.output)
    status = _on_main_then_share(state, lambda: store.prepare(prep.fingerprint, args.overwrite))
    done = store.done_keys() & prep.expected
    state.wait_for_everyone()  # nobody appends before every rank has read the shards
    if status == "complete":  # same config, already merged: nothing to generate
        logger.info("%s is complete for this config; nothing to generate (--overwrite true to start again).", store.output)
        return {**store.read_meta()["summary"], "status_at_start": status, "rows_generated_this_run": 0,
                "generated_tokens_this_run": 0, "tokens_per_second": None, "world_size": state.num_processes,
                "wall_time_s": round(time.time() - start, 2)}
    # 3. The same batch plan on every rank and every restart; this rank's share is every world_size-th batch.
    plan = plan_batches(prep.prompts, args.batch_size, args.sort_by_length)
    n = args.num_return_sequences
    todo = [(i, b) for i, b in enumerate(plan) if i % state.num_processes == state.process_index
            and any((p.id, s) not in done for p in b for s in range(n))]
    logger.info("%d prompts (%d already done) in %d batches; this process (%d of %d) runs %d batches.",
                len(prep.prompts), len({k[0] for k in done}), len(plan), state.process_index + 1, state.num_processes,
                len(todo))
    mine = _generate(state, args, names.teacher_model, prep, store, todo, done) if todo else \
        {"rank": state.process_index, "rows": 0, "tokens": 0, "generate_s": 0.0}
    # 6. Merge on rank 0 after every shard is complete.
    per_rank = gather_object([mine])
    state.wait_for_everyone()
    run = {"teacher": names.teacher_model, "status_at_start": status, "world_size": state.num_processes,
           "rows_already_done": len(done), "num_batches": len(plan), "start": start, "per_rank": per_rank}
    summary = _on_main_then_share(state, lambda: _merge_and_summarise(store, names, prep, run))
    state.wait_for_everyone()
    return summary


def _prepare(args: GenerateArguments, names: GenerateArguments, prompts: list[Prompt]) -> _Prepared:
    """1-2. Tokenizer, prompts validated and encoded, the output's fingerprint (of the names the user gave, not of
    cache paths): every check before any weights are loaded."""
    tokenizer = load_tokenizer(args.tokenizer or args.teacher_model, args.trust_remote_code)
    tokenizer.padding_side = "left"
    chat = use_chat_template(tokenizer, prompts, args.chat_template)
    with loading(args.teacher_model, "teacher_model"):
        config = AutoConfig.from_pretrained(args.teacher_model, trust_remote_code=args.trust_remote_code)
    context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    max_prompt_length = args.max_prompt_length or context - args.max_new_tokens
    if max_prompt_length < 1:
        raise ConfigError(f"max_new_tokens={args.max_new_tokens} leaves no room for a prompt in the teacher's "
                         f"context of {context} tokens; lower max_new_tokens.")
    fingerprint = fingerprint_of(names, prompts, chat, max_prompt_length)
    kept, encode_stats = encode_prompts(prompts, tokenizer, chat, max_prompt_length, args.over_length,
                                        args.system_prompt)
    expected = {(p.id, s) for p in kept for s in range(args.num_return_sequences)}
    return _Prepared(tokenizer, prompts, kept, chat, fingerprint, encode_stats, expected)


def _generate(state, args: GenerateArguments, teacher_name: str, prep: _Prepared, store: ShardStore, todo: list,
              done: set) -> dict:
    """4. This rank's batches, each appended to its shard as soon as it finishes; returns this rank's counts."""
    if args.backend == "vllm":
        backend = VLLMBackend(args.teacher_model, prep.tokenizer, args)
    else:
        model = load_causal_lm(args.teacher_model, args.teacher_dtype, args.attn_implementation,
                               args.trust_remote_code).to(state.device)
        backend = HFBackend(model, prep.tokenizer, args)
    params = args.sampling_params()
    rows_written = tokens = 0
    gen_time = 0.0
    bar = tqdm(total=sum(len(b) for _, b in todo), desc=f"generating [rank {state.process_index}]", unit="prompt",
               dynamic_ncols=True, disable=not state.is_local_main_process)
    with store.open_shard(state.process_index) as handle:
        t0 = time.perf_counter()
        # batches come back as they finish (with refill decoding, not always in plan order); per row: (seed, id, index)
        for batch, completions in backend.generate_batches([batch for _, batch in todo], seed=args.seed):
            gen_time += time.perf_counter() - t0
            rows = [r for p, comps in zip(batch, completions)
                    for r in make_rows(p, comps, prep.tokenizer, args, prep.chat, teacher_name, params)
                    if row_key(r) not in done]  # a partly written batch is re-run whole, written once
            store.append(handle, rows)
            rows_written += len(rows)
            tokens += sum(r["response_tokens"] for r in rows)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(gen_time, 1e-9):,.0f}")
            t0 = time.perf_counter()
    bar.close()
    return {"rank": state.process_index, "rows": rows_written, "tokens": tokens, "generate_s": gen_time}


def _merge_and_summarise(store: ShardStore, args: GenerateArguments, prep: _Prepared, run: dict) -> dict:
    """Main process only: the shards merged into the output, and the run summary recorded in the meta file."""
    merged = store.merge({p.id: p.index for p in prep.prompts}, prep.expected, args.drop_empty)
    per_rank = run["per_rank"]
    total_tokens = sum(r["tokens"] for r in per_rank)
    slowest = max(r["generate_s"] for r in per_rank)
    summary = {
        "output": str(store.output), "teacher": run["teacher"], "status_at_start": run["status_at_start"],
        "world_size": run["world_size"], "prompts": len(prep.all_prompts), "prompts_kept": len(prep.prompts),
        "prompts_truncated": prep.encode_stats["truncated"], "prompts_skipped": prep.encode_stats["skipped"],
        "skipped_ids": prep.encode_stats["skipped_ids"], "rows_already_done": run["rows_already_done"],
        "rows_generated_this_run": sum(r["rows"] for r in per_rank), "generated_tokens_this_run": total_tokens,
        "tokens_per_second": total_tokens / slowest if slowest else None, "batch_size": args.batch_size,
        "num_batches": run["num_batches"], "wall_time_s": round(time.time() - run["start"], 2), "per_rank": per_rank,
        **merged,
    }
    store.write_meta({"fingerprint": prep.fingerprint, "complete": True, "config": asdict(args), "summary": summary})
    return summary


def _on_main_then_share(state, work):
    """Run ``work()`` on the main process and hand its result to every rank. If it raises (a refused config, a
    corrupt output, rows missing at the merge), every rank raises instead of waiting at the next barrier forever."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if state.num_processes > 1:
        message = None if error is None else f"{type(error).__name__}: {error}"
        result, message, users = gather_object([(result, message, isinstance(error, UserError))])[0]
        if message is not None and error is None:  # the user's fault stays one message on every rank
            raise (UserError if users else RuntimeError)(f"The main process stopped: {message}")
    if error is not None:
        raise error
    return result


def _use_cpu() -> bool:
    """``PartialState`` (unlike ``Accelerator``) ignores ACCELERATE_USE_CPU; without ``cpu=True`` a multi-process
    CPU launch would run N independent single-process copies instead of N gloo ranks."""
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (multi and not torch.cuda.is_available())


def format_summary(s: dict) -> str:
    tps = s["tokens_per_second"]
    lines = [
        "", "=== llm-distill: teacher responses ===",
        f"output            {s['output']}  ({s['rows_written']} rows)",
        f"teacher           {s['teacher']}",
        f"prompts           {s['prompts']} ({s['prompts_truncated']} truncated, {s['prompts_skipped']} skipped)",
        f"this run          {s['rows_generated_this_run']} rows, {s['generated_tokens_this_run']:,} tokens"
        + (f", {tps:,.0f} tokens/s" if tps else "") + f" ({s['rows_already_done']} rows resumed)",
        f"finish reasons    {s['finish_reasons']}" + (f", {s['empty_dropped']} empty dropped" if s["empty_dropped"] else ""),
        f"processes         {s['world_size']}, batch size {s['batch_size']}, wall time {s['wall_time_s']:.1f}s",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    """``scripts/generate.py`` / ``llm-distill generate``: parse ``argv`` (no ``--config``: the embedded default's),
    run, print the summary on rank 0."""
    args = parse(with_base(argv, DEFAULT_CONFIG, ("teacher_model", "prompts", "tokenizer")))
    try:
        summary = run_generation(args)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        if os.environ.get("LLM_DISTILL_PRINT_JSON"):
            print(json.dumps(summary))
    return summary
