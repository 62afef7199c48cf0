"""Teacher-response datasets for response (sequence-level) distillation: resumable, sharded, batched.

A teacher answers prompts; the student is then fine-tuned on the answers (``scripts/distill.py`` with
``alpha: 0`` is sequence-level KD, Kim & Rush 2016; ``alpha > 0`` adds logit KD on the same rows).

Pipeline (``run_generation``), every check before the model is loaded:

1. **Prompts** from JSONL (``prompt`` or ``messages``), a text file (one per line), a ``save_to_disk``
   folder or a hub dataset + column. Bad rows fail with file, line and field.
2. **Encode**: the chat template (``add_generation_prompt=True``) when the tokenizer has one, rendered as
   text and tokenised with ``add_special_tokens=False`` (the template already carries BOS: no double BOS);
   raw prompts are tokenised as the trainer will tokenise them. Prompts longer than the context are
   truncated from the left (counted and logged), skipped, or refused (``over_length``).
3. **Plan**: prompts sorted by token length (less padding), cut into batches of ``batch_size``; batch
   ``i`` belongs to rank ``i % world_size``. The plan depends only on the prompts and the config, never
   on the number of processes, so 1 and N processes (and a resumed run) run *the same batches* and
   greedy decoding gives bit-identical rows. (``split_between_processes`` pads the last shard with
   duplicates, which would then have to be removed; a round-robin plan never creates them.)
4. **Generate** each batch left-padded (decoder-only), stop on EOS, and append its rows to this rank's
   shard ``<output>.parts/shard-<rank>.jsonl`` with flush + fsync as soon as the batch finishes.
5. **Resume**: on restart with the same output, a truncated last line (a kill mid-write) is cut off, the
   rows already on disk are skipped, and a batch that was only partly written is generated again whole
   (same batch => same numerics) but only its missing rows are written: every id exactly once.
   A different config on an existing output is refused unless ``overwrite``.
6. **Merge**: rank 0 reads every shard, de-duplicates by ``(id, sample_index)``, writes the rows in input
   order to ``<output>`` atomically (temp file + rename), and records a summary in ``<stem>.meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm_distill import tiny

logger = logging.getLogger(__name__)

OVER_LENGTH = ("truncate_left", "skip", "error")
CHAT_TEMPLATE_MODES = ("auto", "always", "never")
BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROLES = ("system", "user", "assistant", "tool")


def _check(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}.")


# ---------------------------------------------------------------------------------------------- config


@dataclass
class GenerateArguments:
    """Everything ``scripts/generate.py`` needs: teacher, prompts, sampling, batching, output."""

    # --- teacher
    teacher_model: str = field(
        default="embedded:teacher",
        metadata={"help": "Teacher: hub id or local path (from_pretrained); 'embedded:teacher' is the tiny offline default."},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path or hub id (default: the teacher's)."})
    teacher_dtype: str = field(default="auto", metadata={"help": f"dtype of the teacher, one of {', '.join(DTYPES)}."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel, e.g. sdpa, eager."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    backend: str = field(
        default="hf",
        metadata={"help": f"Generation backend, one of {', '.join(BACKENDS)}: hf = transformers generate (batched, "
                          "left-padded; the tested default); vllm = vLLM offline inference (needs `pip install vllm`)."},
    )
    # --- prompts
    prompts: str = field(
        default="embedded:train",
        metadata={"help": "Prompts: a .jsonl file (rows with prompt_field or messages_field), a .txt file (one prompt "
                          "per line), a Dataset.save_to_disk folder, or a hub dataset name."},
    )
    prompts_split: str = field(default="train", metadata={"help": "Split of a hub / saved dataset."})
    prompts_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    prompt_field: str = field(default="prompt", metadata={"help": "Column with the prompt text."})
    messages_field: str = field(
        default="messages",
        metadata={"help": "Column with a chat conversation [{'role', 'content'}, ...] ending in a user turn; used "
                          "instead of prompt_field when present."},
    )
    id_field: str = field(
        default="id",
        metadata={"help": "Column with a unique prompt id (kept in the output); without it the 0-based row index."},
    )
    prompt_max_lines: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N lines of each prompt (turns documents into completion prompts)."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    chat_template: str = field(
        default="auto",
        metadata={"help": f"One of {', '.join(CHAT_TEMPLATE_MODES)}: auto = apply the tokenizer's chat template when "
                          "it has one; always = require it; never = raw prompts (messages rows then fail)."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message prepended to every chat prompt that has none."}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt in tokens (default: the teacher's context minus max_new_tokens)."},
    )
    over_length: str = field(
        default="truncate_left",
        metadata={"help": f"Prompts longer than max_prompt_length, one of {', '.join(OVER_LENGTH)}: truncate_left "
                          "keeps the last tokens (counted and logged), skip drops the prompt, error refuses to start."},
    )
    # --- sampling (names as in transformers.GenerationConfig)
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum tokens generated per response."})
    do_sample: bool = field(
        default=False, metadata={"help": "Sample (temperature / top_p / top_k) instead of greedy decoding."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0; with do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1] (with do_sample)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens; 0 = off (with do_sample)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL repetition penalty (1.0 = off)."})
    num_return_sequences: int = field(
        default=1, metadata={"help": "Responses per prompt (> 1 needs do_sample); rows get a sample_index."}
    )
    seed: int = field(default=42, metadata={"help": "Seed; batch i samples with seed + i, so a resumed or "
                                                    "re-sharded run draws the same samples."})
    logprobs: int = field(
        default=0,
        metadata={"help": "Keep the teacher's top-k log-probabilities (raw, temperature 1) of every generated token "
                          "for offline logit KD; 0 = off."},
    )
    # --- execution and output
    batch_size: int = field(default=32, metadata={"help": "Prompts per generate call (per process)."})
    sort_by_length: bool = field(
        default=True, metadata={"help": "Batch prompts of similar length together (less padding, faster)."}
    )
    output: str = field(
        default="outputs/generate/responses.jsonl",
        metadata={"help": "Output JSONL. Shards go to <output>.parts/ while running; the run summary to "
                          "<stem>.meta.json. An existing output with the same config is resumed."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Delete an existing output (any config) and start again."})
    drop_empty: bool = field(
        default=False,
        metadata={"help": "Leave empty responses (the teacher emitted EOS first) out of the final file; they are "
                          "counted in the summary and listed in <stem>.meta.json. Off by default: every prompt id "
                          "is in the file exactly once, and scripts/distill.py trains on such a row's one label "
                          "(stop here)."},
    )
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory to use."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model replica."})

    def __post_init__(self):
        _check(self.backend in BACKENDS, "backend", self.backend, f"one of {', '.join(BACKENDS)}")
        _check(self.teacher_dtype in DTYPES, "teacher_dtype", self.teacher_dtype, f"one of {', '.join(DTYPES)}")
        _check(self.chat_template in CHAT_TEMPLATE_MODES, "chat_template", self.chat_template,
               f"one of {', '.join(CHAT_TEMPLATE_MODES)}")
        _check(self.over_length in OVER_LENGTH, "over_length", self.over_length, f"one of {', '.join(OVER_LENGTH)}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature > 0, "temperature", self.temperature, "a number > 0 (use do_sample=false for greedy)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "a number > 0")
        _check(self.num_return_sequences >= 1, "num_return_sequences", self.num_return_sequences, "an integer >= 1")
        _check(self.num_return_sequences == 1 or self.do_sample, "num_return_sequences", self.num_return_sequences,
               "1 with greedy decoding (greedy returns the same response every time); set do_sample=true")
        _check(self.logprobs >= 0, "logprobs", self.logprobs, "an integer >= 0 (0 = off)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        for name in ("max_prompts", "prompt_max_lines", "max_prompt_length"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "an integer >= 1 (or null for no limit)")
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
               self.vllm_gpu_memory_utilization, "a number in (0, 1]")
        _check(bool(self.output), "output", self.output, "a file path such as outputs/generate/responses.jsonl")

    def sampling_params(self) -> dict:
        """The parameters that decide a response (recorded in every row)."""
        params = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "seed": self.seed}
        if self.do_sample:
            params.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1.0:
            params["repetition_penalty"] = self.repetition_penalty
        return params


# --------------------------------------------------------------------------------------------- prompts


class PromptValidationError(ValueError):
    """Prompts that cannot be used as given, with file, line and field."""


@dataclass
class Prompt:
    index: int                       # position in the input: the merge order
    id: str | int
    prompt: str | None = None        # raw text, or
    messages: list | None = None     # a conversation ending in a user turn
    input_ids: list[int] = field(default_factory=list)
    truncated: bool = False


def _read_source(args: GenerateArguments):
    """Yield ``(where, row)`` for every prompt row; ``row`` may be anything (validated by the caller)."""
    path = Path(tiny.resolve(args.prompts))
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix == ".json"):
        if not path.is_file():
            raise PromptValidationError(f"Prompt file {path} does not exist.")
        if path.suffix == ".json":
            from datasets import load_dataset

            for i, row in enumerate(load_dataset("json", data_files=str(path), split="train")):
                yield f"{path} row {i + 1}", row
            return
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as err:
                    yield where, PromptValidationError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).")
        return
    if path.is_file():  # plain text: one prompt per line, blank lines skipped
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path} line {lineno}", {args.prompt_field: line.rstrip("\r\n")}
        return
    from datasets import load_dataset, load_from_disk

    if path.is_dir():
        ds = load_from_disk(str(path))
        ds = ds[args.prompts_split] if hasattr(ds, "keys") else ds
        where = f"{path} [{args.prompts_split}]"
    else:
        ds = load_dataset(args.prompts, args.prompts_config, split=args.prompts_split)
        where = f"dataset {args.prompts} [{args.prompts_split}]"
    for i, row in enumerate(ds):
        yield f"{where} row {i}", row


def _validate_messages(messages, where: str, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{where}: field '{name}' must be a non-empty list of {{'role', 'content'}} objects."
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            return f"{where}: field '{name}[{i}]' must be an object with 'role' in {ROLES} and a string 'content'."
    if messages[-1]["role"] == "assistant":
        return (f"{where}: field '{name}' ends with an assistant turn; a prompt must end with the turn the teacher "
                "answers (drop the trailing assistant message).")
    return None


def load_prompts(args: GenerateArguments, max_errors: int = 10) -> list[Prompt]:
    """Read and validate every prompt; raise one error listing the first ``max_errors`` bad rows."""
    prompts, errors, seen = [], [], {}
    for where, row in _read_source(args):
        if args.max_prompts is not None and len(prompts) >= args.max_prompts:
            break
        if isinstance(row, Exception):
            errors.append(str(row))
            continue
        if not isinstance(row, dict):
            errors.append(f"{where}: each row must be a JSON object, got {type(row).__name__}.")
            continue
        index = len(prompts)
        pid = row.get(args.id_field, index)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            errors.append(f"{where}: field '{args.id_field}' must be a string or an integer, got {type(pid).__name__}.")
            continue
        if pid in seen:
            errors.append(f"{where}: id {pid!r} already used at {seen[pid]}; ids must be unique.")
            continue
        seen[pid] = where
        if args.messages_field in row and row[args.messages_field] is not None:
            problem = _validate_messages(row[args.messages_field], where, args.messages_field)
            if problem:
                errors.append(problem)
                continue
            prompts.append(Prompt(index, pid, messages=row[args.messages_field]))
            continue
        if args.prompt_field not in row:
            errors.append(f"{where}: field '{args.prompt_field}' is missing (rows need '{args.prompt_field}' or "
                          f"'{args.messages_field}'; set prompt_field / messages_field to your column names).")
            continue
        text = row[args.prompt_field]
        if not isinstance(text, str):
            errors.append(f"{where}: field '{args.prompt_field}' must be a string, got {type(text).__name__}.")
            continue
        if args.prompt_max_lines:
            text = "".join(text.splitlines(keepends=True)[: args.prompt_max_lines])
        if not text.strip():
            errors.append(f"{where}: field '{args.prompt_field}' is empty.")
            continue
        prompts.append(Prompt(index, pid, prompt=text))
    if errors:
        more = "\n... and more; fix these first." if len(errors) > max_errors else ""
        raise PromptValidationError(f"{len(errors)} bad prompt row(s) in {args.prompts}:\n  "
                                    + "\n  ".join(errors[:max_errors]) + more)
    if not prompts:
        raise PromptValidationError(f"{args.prompts}: no prompts found.")
    if len({type(p.id) for p in prompts}) > 1:  # mixed int/str ids would break the Arrow schema of the output
        for p in prompts:
            p.id = str(p.id)
    return prompts


def use_chat_template(tokenizer, prompts: list[Prompt], mode: str) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise PromptValidationError("chat_template=always but the tokenizer has no chat_template: set one on the "
                                    "tokenizer, or use chat_template=never for raw prompts.")
    use = has_template and mode != "never"
    if not use and any(p.messages is not None for p in prompts):
        first = next(p for p in prompts if p.messages is not None)
        raise PromptValidationError(
            f"Prompt {first.id!r} has messages but {'chat_template=never' if has_template else 'the tokenizer has no chat_template'}: "
            "messages need a chat template to become text (use a tokenizer with one, or give raw 'prompt' rows)."
        )
    return use


def conversation(p: Prompt, system_prompt: str | None) -> list[dict]:
    messages = list(p.messages) if p.messages is not None else [{"role": "user", "content": p.prompt}]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_prompts(prompts: list[Prompt], tokenizer, chat: bool, max_prompt_length: int, over_length: str,
                   system_prompt: str | None = None) -> tuple[list[Prompt], dict]:
    """Tokenise every prompt as the trainer will; apply the ``over_length`` policy. Returns kept prompts + counts.

    Chat: the template is rendered as text and tokenised with ``add_special_tokens=False``, because templates
    put BOS in the text themselves (tokenising with special tokens would give two BOS). Raw prompts are
    tokenised with the tokenizer's defaults, exactly as ``llm_distill.data.tokenize_prompt_response`` does.
    """
    kept, truncated, skipped = [], [], []
    for p in prompts:
        if chat:
            text = tokenizer.apply_chat_template(conversation(p, system_prompt), tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p.prompt)["input_ids"]
        if len(ids) > max_prompt_length:
            if over_length == "skip":
                skipped.append(p.id)
                continue
            if over_length == "error":
                raise PromptValidationError(
                    f"Prompt {p.id!r} has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}. Set "
                    "over_length=truncate_left or skip, raise max_prompt_length, or lower max_new_tokens.")
            ids = ids[-max_prompt_length:]
            p.truncated = True
            truncated.append(p.id)
            if not chat:  # the row keeps the text the teacher actually saw, so prompt and response match
                p.prompt = tokenizer.decode(ids)
        p.input_ids = ids
        kept.append(p)
    if truncated:
        logger.warning("%d of %d prompts are longer than max_prompt_length=%d tokens and were truncated from the left "
                       "(e.g. ids %s).", len(truncated), len(prompts), max_prompt_length, truncated[:5])
    if skipped:
        logger.warning("%d of %d prompts are longer than max_prompt_length=%d tokens and were skipped (e.g. ids %s).",
                       len(skipped), len(prompts), max_prompt_length, skipped[:5])
    if not kept:
        raise PromptValidationError(f"Every prompt is longer than max_prompt_length={max_prompt_length}.")
    return kept, {"truncated": len(truncated), "skipped": len(skipped), "skipped_ids": skipped[:100]}


def plan_batches(prompts: list[Prompt], batch_size: int, sort_by_length: bool = True) -> list[list[Prompt]]:
    """Cut prompts into batches, longest first (an out-of-memory shows up in the first batch, not the last).

    The plan depends only on the prompts and the config, never on the number of processes: that is what
    makes 1-process, N-process and resumed runs produce identical rows.
    """
    order = sorted(prompts, key=lambda p: (-len(p.input_ids), p.index)) if sort_by_length else list(prompts)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# -------------------------------------------------------------------------------------------- backends


@dataclass
class Completion:
    """One response of the teacher to one prompt."""

    token_ids: list[int]             # generated tokens, without EOS and padding
    finish_reason: str               # "eos" or "length"
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class HFBackend:
    """Batched, left-padded ``model.generate`` (the tested default backend)."""

    def __init__(self, model, tokenizer, args: GenerateArguments):
        from transformers import GenerationConfig

        self.model, self.args = model.eval(), args
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        params = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                      num_return_sequences=args.num_return_sequences, repetition_penalty=args.repetition_penalty,
                      eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id, bos_token_id=tokenizer.bos_token_id,
                      return_dict_in_generate=True, output_logits=args.logprobs > 0)
        if args.do_sample:
            params.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        else:  # do not inherit sampling knobs from the model's generation_config
            params.update(temperature=None, top_p=None, top_k=None)
        self.generation_config = GenerationConfig(**params)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def left_pad(self, batch: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(p.input_ids) for p in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, p in enumerate(batch):
            input_ids[i, longest - len(p.input_ids):] = torch.tensor(p.input_ids)
            attention_mask[i, longest - len(p.input_ids):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.inference_mode()
    def generate(self, batch: list[Prompt], seed: int) -> list[list[Completion]]:
        """``num_return_sequences`` completions per prompt, in batch order."""
        input_ids, attention_mask = self.left_pad(batch)                   # (B, P)
        torch.manual_seed(seed)                                             # sampling draws from the global RNG
        k = self.args.logprobs
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  generation_config=self.generation_config)
        new = out.sequences[:, input_ids.shape[1]:].tolist()               # (B * n, <= max_new_tokens)
        if k > 0:  # raw teacher logits (before temperature / top-k warping), one (B * n, V) tensor per step
            top = [torch.log_softmax(step.float(), dim=-1).topk(k, dim=-1) for step in out.logits]
        completions = []
        for row, tokens in enumerate(new):
            stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            tokens = tokens if stop is None else tokens[:stop]
            c = Completion(tokens, "length" if stop is None else "eos")
            if k > 0:
                c.top_ids = [top[s].indices[row].tolist() for s in range(len(tokens))]
                c.top_logprobs = [[round(v, 5) for v in top[s].values[row].tolist()] for s in range(len(tokens))]
            completions.append(c)
        n = self.args.num_return_sequences
        return [completions[i * n : (i + 1) * n] for i in range(len(batch))]


class VLLMBackend:
    """vLLM offline inference behind the same ``generate(batch, seed)`` interface.

    Not installable on the CPU machines this project is tested on, so it is covered only by the "clear
    error when missing" test. Use a large ``batch_size`` (e.g. 1024): vLLM schedules within the call
    (continuous batching), and each finished call is still one crash-safe append.
    """

    def __init__(self, model_path: str, tokenizer, args: GenerateArguments):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("backend=vllm needs vLLM: `pip install vllm` (Linux + CUDA GPU), or use backend=hf.") from err
        self.args, self.SamplingParams = args, SamplingParams
        self.eos_ids = {tokenizer.eos_token_id}
        self.llm = LLM(model=model_path, tokenizer=args.tokenizer and tiny.resolve(args.tokenizer),
                       dtype=args.teacher_dtype, seed=args.seed, trust_remote_code=args.trust_remote_code,
                       gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                       tensor_parallel_size=args.vllm_tensor_parallel_size)

    def generate(self, batch: list[Prompt], seed: int) -> list[list[Completion]]:
        a = self.args
        params = [self.SamplingParams(
            n=a.num_return_sequences, max_tokens=a.max_new_tokens, seed=seed * 1_000_003 + p.index,
            temperature=a.temperature if a.do_sample else 0.0, top_p=a.top_p if a.do_sample else 1.0,
            top_k=(a.top_k or -1) if a.do_sample else -1, repetition_penalty=a.repetition_penalty,
            logprobs=a.logprobs or None) for p in batch]
        outputs = self.llm.generate([{"prompt_token_ids": p.input_ids} for p in batch], params, use_tqdm=False)
        result = []
        for out in outputs:
            comps = []
            for o in out.outputs:
                tokens = [t for t in o.token_ids if t not in self.eos_ids]
                c = Completion(tokens, "eos" if o.finish_reason == "stop" else "length")
                if a.logprobs and o.logprobs:
                    ranked = [sorted(step.items(), key=lambda kv: -kv[1].logprob)[: a.logprobs] for step in o.logprobs]
                    c.top_ids = [[t for t, _ in step] for step in ranked][: len(tokens)]
                    c.top_logprobs = [[round(lp.logprob, 5) for _, lp in step] for step in ranked][: len(tokens)]
                comps.append(c)
            result.append(comps)
        return result


# ----------------------------------------------------------------------------------- crash-safe store


class OutputExistsError(RuntimeError):
    """The output path holds data from a different config."""


def row_key(row: dict) -> tuple:
    return (row["id"], row.get("sample_index", 0))


def repair_jsonl(path: Path) -> int:
    """Cut off a truncated last line (a process killed mid-write). Returns the number of bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # Scan back, 1 MiB at a time, to the end of the last complete line (a row with many logprobs can be long).
        new_size, end = 0, size
        while end > 0:
            start = max(0, end - (1 << 20))
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                new_size = start + cut + 1
                break
            end = start
        f.truncate(new_size)
    logger.warning("%s: removed a truncated last line (%d bytes) left by an interrupted run.", path, size - new_size)
    return size - new_size


def read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise OutputExistsError(f"{path} line {lineno} is not valid JSON ({err.msg}); the file was "
                                            "edited or corrupted: pass --overwrite true to start again.") from err
    return rows


class ShardStore:
    """``<output>`` (final), ``<output>.parts/shard-<rank>.jsonl`` (while running), ``<stem>.meta.json``."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.parts = self.output.with_name(self.output.name + ".parts")
        self.meta_path = self.output.with_name(self.output.stem + ".meta.json")

    def shard(self, rank: int) -> Path:
        return self.parts / f"shard-{rank:05d}.jsonl"

    def shard_files(self) -> list[Path]:
        return sorted(self.parts.glob("shard-*.jsonl")) if self.parts.is_dir() else []

    def read_meta(self) -> dict | None:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, self.meta_path)

    def prepare(self, fingerprint: dict, overwrite: bool) -> str:
        """Main process only: refuse a different config, repair truncated lines. Returns new/resume/complete."""
        exists = self.output.exists() or self.parts.exists()
        if overwrite:
            for p in (self.output, self.meta_path):
                p.unlink(missing_ok=True)
            shutil.rmtree(self.parts, ignore_errors=True)
            exists = False
        meta = self.read_meta()
        if exists and meta is None:
            raise OutputExistsError(f"{self.output} exists but has no {self.meta_path.name}, so it was not written by "
                                    "this generator: choose another --output, or pass --overwrite true to replace it.")
        if meta is not None and meta.get("fingerprint") != fingerprint:
            old = meta.get("fingerprint", {})
            diff = [f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in sorted(set(old) | set(fingerprint))
                    if old.get(k) != fingerprint.get(k)]
            raise OutputExistsError(
                f"{self.output} was generated with a different config ({'; '.join(diff)}). Resuming would mix two "
                "datasets: use the same config to resume, another --output, or --overwrite true to start again.")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        for path in [self.output, *self.shard_files()]:
            if path.exists():
                repair_jsonl(path)
        status = "new" if meta is None else ("complete" if meta.get("complete") and not self.shard_files() else "resume")
        if meta is None:
            self.write_meta({"fingerprint": fingerprint, "complete": False})
        return status

    def done_keys(self) -> set[tuple]:
        keys = set()
        for path in [self.output, *self.shard_files()]:
            if path.exists():
                keys.update(row_key(r) for r in read_rows(path))
        return keys

    def open_shard(self, rank: int):
        return open(self.shard(rank), "a", encoding="utf-8")

    @staticmethod
    def append(handle, rows: list[dict]) -> None:
        """One write per batch, flushed and fsynced: a kill loses at most the batch in flight."""
        if rows:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())

    def merge(self, order: dict, expected: set[tuple], drop_empty: bool) -> dict:
        """Main process only: shards (+ an earlier final file) -> ``output`` in input order, each key once."""
        rows = {}
        for path in [self.output, *self.shard_files()]:
            if path.exists():
                for r in read_rows(path):
                    rows.setdefault(row_key(r), r)  # a duplicate can only be a byte-identical re-write
        missing = expected - rows.keys()
        if missing:
            raise RuntimeError(f"{len(missing)} responses are missing after generation (e.g. {sorted(missing)[:3]}); "
                               "run the same command again to generate them.")
        keys = sorted(expected, key=lambda k: (order[k[0]], k[1]))
        empty = [k for k in keys if not rows[k]["response"].strip()] if drop_empty else []
        empty_set = set(empty)
        tmp = self.output.with_name(self.output.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for k in keys:
                if k not in empty_set:
                    f.write(json.dumps(rows[k], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.output)
        # Empty responses stay recorded (a resume must not generate them again) only in the meta file.
        shutil.rmtree(self.parts, ignore_errors=True)
        return {"rows_written": len(keys) - len(empty), "empty_dropped": len(empty),
                "empty_dropped_rows": [{"id": k[0], "sample_index": k[1]} for k in empty],
                "finish_reasons": dict(Counter(rows[k]["finish_reason"] for k in keys))}


# ---------------------------------------------------------------------------------------------- rows


def make_rows(prompt: Prompt, completions: list[Completion], tokenizer, args: GenerateArguments, chat: bool,
              teacher_name: str, params: dict) -> list[dict]:
    rows = []
    for s, c in enumerate(completions):
        response = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        row = {"id": prompt.id}
        if args.num_return_sequences > 1:
            row["sample_index"] = s
        if chat:  # the trainer renders messages with the same template, so it sees what the teacher saw
            row["messages"] = [*conversation(prompt, args.system_prompt), {"role": "assistant", "content": response}]
        else:
            row["prompt"] = prompt.prompt
        row["response"] = response  # also in chat rows: one field to read for every format (ignored by the trainer)
        row.update(finish_reason=c.finish_reason, prompt_tokens=len(prompt.input_ids), response_tokens=len(c.token_ids),
                   teacher=teacher_name, generation=params)
        if prompt.truncated:
            row["prompt_truncated"] = True
        if c.top_ids is not None:
            row["teacher_logprobs"] = {"token_ids": c.token_ids, "top_ids": c.top_ids, "top_logprobs": c.top_logprobs}
        rows.append(row)
    return rows


def fingerprint_of(args: GenerateArguments, prompts: list[Prompt], chat: bool, max_prompt_length: int) -> dict:
    """What decides the content of the output; batch size and process count do not (they may change on resume)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.prompt, p.messages], ensure_ascii=False).encode())
    return {
        "teacher_model": args.teacher_model, "tokenizer": args.tokenizer, "teacher_dtype": args.teacher_dtype,
        "backend": args.backend, "prompts": args.prompts, "prompts_sha256": h.hexdigest()[:16],
        "num_prompts": len(prompts), "chat_template": chat, "system_prompt": args.system_prompt,
        "max_prompt_length": max_prompt_length, "over_length": args.over_length, "logprobs": args.logprobs,
        "num_return_sequences": args.num_return_sequences, "drop_empty": args.drop_empty, **args.sampling_params(),
    }


# ------------------------------------------------------------------------------------------------ run


def parse(argv: list[str] | None):
    from llm_distill.cli import parse_args_and_config

    return parse_args_and_config((GenerateArguments,), argv)[0]


def run_generation(args: GenerateArguments) -> dict:
    """Generate (or resume) ``args.output``; returns the run summary (on every rank)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import AutoConfig

    from llm_distill.models import load_causal_lm, load_tokenizer

    state = PartialState(cpu=_use_cpu())
    start = time.time()
    with state.main_process_first():  # rank 0 builds the embedded default once; the others find it cached
        teacher_path = tiny.resolve(args.teacher_model)
        tiny.resolve(args.prompts)
    tokenizer = load_tokenizer(args.tokenizer or args.teacher_model, args.trust_remote_code)
    tokenizer.padding_side = "left"

    # 1-2. Prompts, validated and encoded before any weights are loaded.
    prompts = load_prompts(args)
    chat = use_chat_template(tokenizer, prompts, args.chat_template)
    context = getattr(AutoConfig.from_pretrained(teacher_path, trust_remote_code=args.trust_remote_code),
                      "max_position_embeddings", None) or tokenizer.model_max_length
    max_prompt_length = args.max_prompt_length or context - args.max_new_tokens
    if max_prompt_length < 1:
        raise ValueError(f"max_new_tokens={args.max_new_tokens} leaves no room for a prompt in the teacher's "
                         f"context of {context} tokens; lower max_new_tokens.")
    fingerprint = fingerprint_of(args, prompts, chat, max_prompt_length)
    all_prompts = prompts
    prompts, encode_stats = encode_prompts(prompts, tokenizer, chat, max_prompt_length, args.over_length,
                                           args.system_prompt)
    n = args.num_return_sequences
    expected = {(p.id, s) for p in prompts for s in range(n)}

    # 5. Resume: main repairs / checks the output, then every rank reads what is already done.
    store = ShardStore(args.output)
    status = _on_main_then_share(state, lambda: store.prepare(fingerprint, args.overwrite))
    done = store.done_keys() & expected
    state.wait_for_everyone()  # nobody appends before every rank has read the shards
    if status == "complete":  # same config, already merged: nothing to generate
        summary = {**store.read_meta()["summary"], "status_at_start": status, "rows_generated_this_run": 0,
                   "generated_tokens_this_run": 0, "tokens_per_second": None, "world_size": state.num_processes,
                   "wall_time_s": round(time.time() - start, 2)}
        logger.info("%s is complete for this config; nothing to generate (--overwrite true to start again).", store.output)
        return summary

    # 3. The same batch plan on every rank and every restart; this rank's share is every world_size-th batch.
    plan = plan_batches(prompts, args.batch_size, args.sort_by_length)
    todo = [(i, b) for i, b in enumerate(plan) if i % state.num_processes == state.process_index
            and any((p.id, s) not in done for p in b for s in range(n))]
    logger.info("%d prompts (%d already done) in %d batches; this process (%d of %d) runs %d batches.",
                len(prompts), len({k[0] for k in done}), len(plan), state.process_index + 1, state.num_processes,
                len(todo))

    teacher_name = args.teacher_model
    params = args.sampling_params()
    generated_tokens = generated_rows = 0
    gen_time = 0.0
    if todo:
        if args.backend == "vllm":
            backend = VLLMBackend(teacher_path, tokenizer, args)
        else:
            model = load_causal_lm(args.teacher_model, args.teacher_dtype, args.attn_implementation,
                                   args.trust_remote_code).to(state.device)
            backend = HFBackend(model, tokenizer, args)
        bar = tqdm(total=sum(len(b) for _, b in todo), desc=f"generating [rank {state.process_index}]", unit="prompt",
                   dynamic_ncols=True, disable=not state.is_local_main_process)
        with store.open_shard(state.process_index) as handle:
            for batch_index, batch in todo:
                t0 = time.perf_counter()
                completions = backend.generate(batch, seed=args.seed + batch_index)
                gen_time += time.perf_counter() - t0
                rows = [r for p, comps in zip(batch, completions)
                        for r in make_rows(p, comps, tokenizer, args, chat, teacher_name, params)
                        if row_key(r) not in done]  # a partly written batch is re-run whole, written once
                store.append(handle, rows)
                generated_rows += len(rows)
                generated_tokens += sum(r["response_tokens"] for r in rows)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{generated_tokens / max(gen_time, 1e-9):,.0f}")
        bar.close()

    # 6. Merge on rank 0 after every shard is complete.
    per_rank = gather_object([{"rank": state.process_index, "rows": generated_rows, "tokens": generated_tokens,
                               "generate_s": gen_time}])
    state.wait_for_everyone()

    def merge_and_summarise() -> dict:
        merged = store.merge({p.id: p.index for p in prompts}, expected, args.drop_empty)
        total_tokens = sum(r["tokens"] for r in per_rank)
        slowest = max(r["generate_s"] for r in per_rank)
        summary = {
            "output": str(store.output), "teacher": teacher_name, "status_at_start": status,
            "world_size": state.num_processes, "prompts": len(all_prompts), "prompts_kept": len(prompts),
            "prompts_truncated": encode_stats["truncated"], "prompts_skipped": encode_stats["skipped"],
            "skipped_ids": encode_stats["skipped_ids"], "rows_already_done": len(done),
            "rows_generated_this_run": sum(r["rows"] for r in per_rank), "generated_tokens_this_run": total_tokens,
            "tokens_per_second": total_tokens / slowest if slowest else None, "batch_size": args.batch_size,
            "num_batches": len(plan), "wall_time_s": round(time.time() - start, 2), "per_rank": per_rank, **merged,
        }
        store.write_meta({"fingerprint": fingerprint, "complete": True, "config": asdict(args), "summary": summary})
        return summary

    summary = _on_main_then_share(state, merge_and_summarise)
    state.wait_for_everyone()
    return summary


def _on_main_then_share(state, work):
    """Run ``work()`` on the main process and hand its result to every rank. If it raises (a refused config, a
    corrupt output, rows missing at the merge), every rank raises instead of waiting at the next barrier forever."""
    from accelerate.utils import gather_object

    result, error = None, None
    if state.is_main_process:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if state.num_processes > 1:
        result, message = gather_object([(result, None if error is None else f"{type(error).__name__}: {error}")])[0]
        if message is not None and error is None:
            raise RuntimeError(f"The main process stopped: {message}")
    if error is not None:
        raise error
    return result


def _use_cpu() -> bool:
    """``PartialState`` (unlike ``Accelerator``) ignores ACCELERATE_USE_CPU; without ``cpu=True`` a multi-process
    CPU launch would run N independent single-process copies instead of N gloo ranks."""
    from accelerate.utils import parse_flag_from_env

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
