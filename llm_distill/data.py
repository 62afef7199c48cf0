"""Training data: load, validate, tokenise with response-only labels, pad.

Three row formats, the ones TRL and the OpenAI API use:

* ``{"text": ...}``                      - language modelling, loss on every token;
* ``{"prompt": ..., "response": ...}``   - loss on the response only (``completion`` is accepted too);
* ``{"messages": [{"role", "content"}, ...]}`` - chat; rendered with ``tokenizer.apply_chat_template``,
  loss on assistant turns only.

Every row is checked before anything is tokenised or trained, and a bad row is reported with the file,
line and field, e.g. ``data.jsonl line 7: field 'response' is empty``. One empty target is legitimate: a
generated row whose teacher stopped at once (``"finish_reason": "eos"`` and an empty response) teaches the
student to stop there; its only label is the EOS token (or the chat template's end of turn).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_dataset, load_from_disk
from transformers import DataCollatorForLanguageModeling

from llm_distill.errors import UserError
from llm_distill.jsonl import read_json, read_jsonl
from llm_distill.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


class DataValidationError(UserError):
    """A training row that cannot be used, with its location and the fix."""


@dataclass
class Fields:
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"

    @classmethod
    def from_args(cls, data_args) -> Fields:
        return cls(data_args.text_field, data_args.prompt_field, data_args.response_field, data_args.messages_field)


# ------------------------------------------------------------------------------------------ validation


def detect_format(keys, fields: Fields, where: str) -> str:
    keys = set(keys)
    if fields.messages in keys:
        return "messages"
    if fields.prompt in keys and (fields.response in keys or "completion" in keys):
        return "prompt_response"
    if fields.text in keys:
        return "text"
    raise DataValidationError(
        f"{where}: cannot tell the data format from the fields {sorted(keys)}. Rows need '{fields.text}', or "
        f"'{fields.prompt}' + '{fields.response}', or '{fields.messages}' (rename columns, or set text_field / "
        "prompt_field / response_field / messages_field)."
    )


def _nonempty_str(row: dict, key: str, where: str, may_be_empty: bool = False) -> str:
    if key not in row:
        raise DataValidationError(f"{where}: field '{key}' is missing.")
    value = row[key]
    if not isinstance(value, str):
        raise DataValidationError(f"{where}: field '{key}' must be a string, got {type(value).__name__}.")
    if not value.strip() and not may_be_empty:
        raise DataValidationError(f"{where}: field '{key}' is empty.")
    return value


def _teacher_stopped_at_once(row: dict) -> bool:
    """A generated row (``scripts/generate.py``) whose response is empty because the teacher emitted EOS first."""
    return row.get("finish_reason") == "eos"


FORMAT_NAMES = {"text": "'text'", "prompt_response": "prompt/response", "messages": "chat ('messages')"}


def validate_row(row: dict, fmt: str, fields: Fields, where: str, first: str | None = None) -> None:
    """Check one row of format ``fmt``; ``first`` (where the first row is) turns a row of another format into one
    clear error instead of a confusing "field ... is missing"."""
    if not isinstance(row, dict):
        raise DataValidationError(f"{where}: each row must be a JSON object, got {type(row).__name__}.")
    try:
        own = detect_format(row.keys(), fields, where)
    except DataValidationError:
        own = fmt  # nothing recognisable: the checks below name the missing field
    if first is not None and own != fmt:
        raise DataValidationError(f"{where}: a {FORMAT_NAMES[own]} row, but {first} is a {FORMAT_NAMES[fmt]} row; "
                                  "use one format in every row of a file (or split it into two files).")
    if fmt == "text":
        _nonempty_str(row, fields.text, where)
    elif fmt == "prompt_response":
        _nonempty_str(row, fields.prompt, where)
        key = fields.response if fields.response in row or "completion" not in row else "completion"
        _nonempty_str(row, key, where, may_be_empty=_teacher_stopped_at_once(row))
    else:
        messages = row.get(fields.messages)
        if not isinstance(messages, list) or not messages:
            raise DataValidationError(f"{where}: field '{fields.messages}' must be a non-empty list of "
                                      "{'role', 'content'} objects.")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                raise DataValidationError(f"{where}: field '{fields.messages}[{i}]' must be an object with 'role' "
                                          f"in {ROLES} and a string 'content'.")
        stopped = _teacher_stopped_at_once(row) and messages[-1]["role"] == "assistant"
        if not stopped and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise DataValidationError(f"{where}: field '{fields.messages}' has no non-empty assistant turn, so there "
                                      "is nothing to learn from this row.")


def _response_key(row: dict, fields: Fields, where: str) -> str:
    """The response column a prompt/response row uses: ``fields.response`` or its alias ``completion``, never both."""
    if fields.response in row and "completion" in row and fields.response != "completion":
        raise DataValidationError(f"{where}: the row has both '{fields.response}' and 'completion'; keep one (they "
                                  "are the same field).")
    return fields.response if fields.response in row or "completion" not in row else "completion"


def validate_rows(rows, fields: Fields) -> str:
    """Check every ``(where, row)`` of :mod:`llm_distill.jsonl`'s readers (a row may be the reader's error); return
    the detected format. Raises on the first bad row, so the error is reported once, without follow-on errors.

    Beyond :func:`validate_row`: every row must have the first row's format, and prompt/response rows must all name
    the response the same way (``response`` or ``completion``: a file that mixes them would leave ``None`` in one
    column of the loaded table)."""
    fmt = first = response_key = None
    for where, row in rows:
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise DataValidationError(f"{where}: each line must be a JSON object, got {type(row).__name__}.")
        if fmt is None:
            fmt, first = detect_format(row.keys(), fields, where), where
        validate_row(row, fmt, fields, where, first)
        if fmt == "prompt_response":
            key = _response_key(row, fields, where)
            if response_key is not None and key != response_key[0]:
                raise DataValidationError(f"{where}: the response is in '{key}' but {response_key[1]} has it in "
                                          f"'{response_key[0]}'; use one name in every row.")
            response_key = response_key or (key, where)
    if fmt is None:
        raise DataValidationError("the file has no rows.")
    return fmt


def validate_json(path: Path, fields: Fields) -> str:
    """Check every row of a ``.json`` file (an array of objects: ``row <i>`` from 1; or JSON Lines)."""
    try:
        return validate_rows(read_json(path, DataValidationError), fields)
    except DataValidationError as err:
        raise DataValidationError(f"{path}: {err}") if str(err) == "the file has no rows." else err


def validate_jsonl(path: Path, fields: Fields) -> str:
    """Check every line of a JSONL file; return the detected format. Raises on the first bad line."""
    try:
        return validate_rows(read_jsonl(path, DataValidationError), fields)
    except DataValidationError as err:
        raise DataValidationError(f"{path}: {err}") if str(err) == "the file has no rows." else err


def load_rows(source: str, split: str = "train", config_name: str | None = None, fields: Fields | None = None):
    """Load a dataset from a JSONL/JSON file, a ``save_to_disk`` folder or the hub; validate every row.

    Returns ``(dataset, format)``.
    """
    fields = fields or Fields()
    path = Path(source)
    if path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise DataValidationError(f"Data file {path} does not exist.")
        fmt = validate_jsonl(path, fields) if path.suffix == ".jsonl" else validate_json(path, fields)
        return load_dataset("json", data_files=str(path), split="train"), fmt
    if path.is_dir():
        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict
            ds = ds[split]
        where = f"{path} [{split}]"
    else:
        ds = load_dataset(source, config_name, split=split)
        where = f"dataset {source} [{split}]"
    fmt = detect_format(ds.column_names, fields, where)
    for i, row in enumerate(ds):
        validate_row(row, fmt, fields, f"{where} row {i}")
    return ds, fmt


# ---------------------------------------------------------------------------------------- tokenising


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_text(text: str, tokenizer) -> dict:
    ids = tokenizer(text)["input_ids"] + _eos(tokenizer)
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_prompt_response(prompt: str, response: str, tokenizer, add_eos: bool = True) -> dict:
    """``add_eos=False`` for responses cut at max_new_tokens (a generated row's ``finish_reason: length``):
    appending EOS there would teach the student to stop mid-sentence."""
    p = tokenizer(prompt)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + (_eos(tokenizer) if add_eos else [])
    return {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r}


def assistant_spans(messages: list[dict], tokenizer, full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``full`` (the rendered conversation): each turn is located by
    rendering the conversation up to it with and without it, which needs a prefix-consistent template (checked)."""
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(upto)):
            raise DataValidationError("The chat template is not prefix-consistent (rendering the first turns alone "
                                      "differs from the start of the full conversation), so assistant tokens cannot "
                                      "be located; use prompt/response rows instead.")
        spans.append((len(before), len(upto)))
    return spans


def tokenize_messages(messages: list[dict], tokenizer) -> dict:
    """Render with the chat template; label exactly the characters of each assistant turn.

    The template is rendered as text and tokenised once (``add_special_tokens=False``: the template adds BOS
    itself, so there is no double BOS). Assistant spans are found by rendering the conversation up to each
    assistant turn with and without it; this needs the template to be prefix-consistent, which is checked.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataValidationError("The data has 'messages' but the tokenizer has no chat_template: set "
                                  "tokenizer.chat_template, or convert rows to prompt/response.")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = assistant_spans(messages, tokenizer, full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(start <= s < end for start, end in spans) else IGNORE_INDEX
        for tok, (s, _e) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return {"input_ids": enc["input_ids"], "labels": labels}


def pack(examples: dict, block_size: int) -> dict:
    """Concatenate tokenised documents and cut into ``block_size`` blocks (the tail remainder is dropped)."""
    ids = [t for seq in examples["input_ids"] for t in seq]
    n = (len(ids) // block_size) * block_size
    blocks = [ids[i : i + block_size] for i in range(0, n, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def prepare_dataset(ds: Dataset, fmt: str, tokenizer, data_args, max_samples: int | None = None,
                    seed: int = 0, desc: str = "train") -> Dataset:
    """Tokenise, truncate (or pack) and sub-sample a validated dataset into ``input_ids`` / ``labels`` rows."""
    fields = Fields.from_args(data_args)
    response_key = fields.response if fields.response in ds.column_names else "completion"

    def encode(row):
        if fmt == "text":
            return tokenize_text(row[fields.text], tokenizer)
        if fmt == "prompt_response":
            return tokenize_prompt_response(row[fields.prompt], row[response_key], tokenizer,
                                            add_eos=row.get("finish_reason") != "length")
        return tokenize_messages(row[fields.messages], tokenizer)

    tokenized = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenizing {desc}")
    if fmt == "text" and data_args.packing:
        tokenized = tokenized.map(lambda b: pack(b, data_args.max_length), batched=True, desc=f"packing {desc}")
    else:
        too_long = sum(1 for n in tokenized["input_ids"] if len(n) > data_args.max_length)
        if too_long:
            logger.warning("%s: %d of %d sequences are longer than max_length=%d and are truncated.",
                           desc, too_long, len(tokenized), data_args.max_length)
        tokenized = tokenized.map(
            lambda r: {k: r[k][: data_args.max_length] for k in ("input_ids", "labels")}, desc=f"truncating {desc}"
        )
        no_target = tokenized.filter(lambda r: all(t == IGNORE_INDEX for t in r["labels"][1:]))
        if len(no_target):
            logger.warning("%s: dropping %d sequences whose prompt fills max_length=%d (no response token left).",
                           desc, len(no_target), data_args.max_length)
            tokenized = tokenized.filter(lambda r: any(t != IGNORE_INDEX for t in r["labels"][1:]))
    return subsample(tokenized, desc, max_samples, seed)


def subsample(tokenized: Dataset, desc: str, max_samples: int | None, seed: int) -> Dataset:
    """The tokenised rows, refused when none is left, cut to ``max_samples`` by a seeded shuffle."""
    if len(tokenized) == 0:
        raise DataValidationError(f"{desc}: no usable sequence left after tokenisation (check max_length).")
    if max_samples is not None and max_samples < len(tokenized):
        tokenized = tokenized.shuffle(seed=seed).select(range(max_samples))
    return tokenized


@dataclass
class DistillationCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds ``attention_mask``."""

    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------- masked LMs


def masked_lm_collator(tokenizer, mlm_probability: float = 0.15, seed: int | None = None):
    """BERT's masking (``mlm_probability`` of the tokens; of those 80% ``<mask>``, 10% random, 10% unchanged;
    special tokens never), padded, with ``labels`` -100 everywhere but the masked tokens. Seeded: same seed, same
    masks. Rows need only ``input_ids`` (see :func:`for_masked_lm`)."""
    if tokenizer.mask_token is None:
        raise DataValidationError("Masked-LM distillation needs a tokenizer with a mask token (tokenizer.mask_token is "
                                  "None): use the teacher's own tokenizer.")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)


def for_masked_lm(dataset: Dataset, fmt: str, where: str) -> Dataset:
    """Tokenised text rows for a masked LM: ``input_ids`` only (the collator makes the labels)."""
    if fmt != "text":
        raise DataValidationError(f"{where}: a masked-LM teacher is distilled on raw text, but the rows are {fmt} "
                                  "(prompt / response or chat). Use rows with a 'text' field.")
    return dataset.remove_columns([c for c in dataset.column_names if c != "input_ids"])


def mask_once(dataset: Dataset, tokenizer, mlm_probability: float = 0.15, seed: int = 0) -> Dataset:
    """The held-out set masked once, deterministically: ``input_ids`` with the masks applied and ``labels`` on the
    masked tokens. Every model evaluated on it (teacher, student before and after, any run with the same seed) is
    scored on identical masks; :class:`DistillationCollator` pads it."""
    collator = masked_lm_collator(tokenizer, mlm_probability, seed)
    rows = []
    for ids in dataset["input_ids"]:  # one row at a time: no padding, so the masks do not depend on batching
        batch = collator([{"input_ids": ids}])
        rows.append({"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()})
    return Dataset.from_list(rows)
