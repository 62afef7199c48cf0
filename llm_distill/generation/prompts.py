"""Prompts for the generator: read from JSONL / text / datasets, validated (file, line, field), encoded, batched.

Chat prompts are rendered with the tokenizer's template (``add_generation_prompt=True``) as text and tokenised with
``add_special_tokens=False`` (the template already carries BOS: no double BOS); raw prompts are tokenised as the
trainer will tokenise them. The batch plan depends only on the prompts and the config, never on the number of
processes: that is what makes 1-process, N-process and resumed runs write identical rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from llm_distill.data import ROLES
from llm_distill.errors import UserError
from llm_distill.generation.arguments import GenerateArguments
from llm_distill.jsonl import read_json, read_jsonl, read_lines

logger = logging.getLogger(__name__)


class PromptValidationError(UserError):
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
    """Yield ``(where, row)`` for every prompt row; ``row`` may be anything (validated by the caller), or a
    :class:`PromptValidationError` from the shared reader (not UTF-8, not JSON, a lone surrogate)."""
    path = Path(args.prompts)
    if path.suffix in (".jsonl", ".json", ".txt") and not path.is_file():
        raise PromptValidationError(f"Prompt file {path} does not exist (prompts: a .jsonl / .json / .txt file, a "
                                    "saved dataset folder or a hub dataset name).")
    if path.suffix == ".jsonl":
        yield from read_jsonl(path, PromptValidationError)
        return
    if path.is_file() and path.suffix == ".json":
        yield from read_json(path, PromptValidationError)
        return
    if path.is_file():  # plain text: one prompt per line, blank lines skipped
        for where, line in read_lines(path, PromptValidationError):
            yield where, line if isinstance(line, Exception) else {args.prompt_field: line}
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


def _prompt_of(row, where: str, rownum: int, args: GenerateArguments) -> Prompt | str:
    """One row as a :class:`Prompt` (``index`` set by the caller), or the message saying why it cannot be one. A row
    without ``id_field`` gets its row number (0-based) as id: an id of its own, whatever happened to other rows."""
    if isinstance(row, Exception):
        return str(row)
    if not isinstance(row, dict):
        return f"{where}: each row must be a JSON object, got {type(row).__name__}."
    pid = row.get(args.id_field, rownum)
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        return f"{where}: field '{args.id_field}' must be a string or an integer, got {type(pid).__name__}."
    if args.messages_field in row and row[args.messages_field] is not None:
        problem = _validate_messages(row[args.messages_field], where, args.messages_field)
        return problem or Prompt(-1, pid, messages=row[args.messages_field])
    if args.prompt_field not in row:
        return (f"{where}: field '{args.prompt_field}' is missing (rows need '{args.prompt_field}' or "
                f"'{args.messages_field}'; set prompt_field / messages_field to your column names).")
    text = row[args.prompt_field]
    if not isinstance(text, str):
        return f"{where}: field '{args.prompt_field}' must be a string, got {type(text).__name__}."
    if args.prompt_max_lines:
        text = "".join(text.splitlines(keepends=True)[: args.prompt_max_lines])
    if not text.strip():
        return f"{where}: field '{args.prompt_field}' is empty."
    return Prompt(-1, pid, prompt=text)


def _report(errors: list[tuple[str, str]], source: str, max_errors: int) -> PromptValidationError:
    """One error for every bad row: a problem repeated on many rows (a missing field) is listed once, with a count."""
    groups: dict[str, list[str]] = {}
    for where, message in errors:
        groups.setdefault(message.removeprefix(f"{where}: "), []).append(message)
    lines = [msgs[0] + (f" (and {len(msgs) - 1} more row(s) with the same problem)" if len(msgs) > 1 else "")
             for msgs in groups.values()]
    more = "\n... and more; fix these first." if len(lines) > max_errors else ""
    return PromptValidationError(f"{len(errors)} bad prompt row(s) in {source}:\n  " + "\n  ".join(lines[:max_errors])
                                 + more)


def load_prompts(args: GenerateArguments, max_errors: int = 10) -> list[Prompt]:
    """Read and validate every prompt; raise one error listing the bad rows (each problem once)."""
    prompts, errors, seen = [], [], {}
    for rownum, (where, row) in enumerate(_read_source(args)):
        if args.max_prompts is not None and len(prompts) >= args.max_prompts:
            break
        prompt = _prompt_of(row, where, rownum, args)
        if isinstance(prompt, str):
            errors.append((where, prompt))
        elif prompt.id in seen:
            errors.append((where, f"{where}: id {prompt.id!r} already used at {seen[prompt.id]}; ids must be unique."))
        else:
            seen[prompt.id] = where
            prompt.index = len(prompts)
            prompts.append(prompt)
    if errors:
        raise _report(errors, args.prompts, max_errors)
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
