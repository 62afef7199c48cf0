"""The one reader of JSON Lines / JSON / text files that users hand us (training rows, prompts).

Every line is decoded and parsed here, once, with the checks a library would otherwise turn into a traceback far
from the cause: bytes that are not UTF-8 (a Latin-1 ``é`` -> ``UnicodeDecodeError`` in the middle of ``datasets``),
lone surrogate escapes (``"\\ud800"`` parses as JSON but cannot be written as UTF-8 -> Arrow fails), a UTF-8 byte
order mark, and lines that are not JSON. A bad line is *yielded* as an exception instance of the caller's error type
(``<file> line <n>: <what> <fix>``), so a caller can stop at the first one (training data) or list several
(prompts).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llm_distill.errors import UserError

BOM = "\ufeff"


def _column(raw: bytes, start: int) -> int:
    return len(raw[:start].decode("utf-8", errors="replace")) + 1


def read_lines(path: str | Path, error: type[UserError] = UserError) -> Iterator[tuple[str, str | UserError]]:
    """Yield ``(where, text)`` for every non-blank line of ``path`` (without its line end), or ``(where, error)``
    for a line that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, error(
                    f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {_column(raw, err.start)}); "
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`).")
                continue
            if lineno == 1:
                line = line.removeprefix(BOM)  # a byte order mark written by some editors: harmless, dropped
            if line.strip():
                yield where, line.rstrip("\r\n")


def surrogate_in(value, name: str = "") -> str | None:
    """The field path (``messages[0].content``) of the first string holding a lone UTF-16 surrogate, else None."""
    if isinstance(value, str):
        return name if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = surrogate_in(key, name) if isinstance(key, str) else None
            found = found or surrogate_in(item, f"{name}.{key}" if name else str(key))
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = surrogate_in(item, f"{name}[{i}]")
            if found is not None:
                return found
    return None


def _checked(where: str, row, error: type[UserError]):
    bad = surrogate_in(row)
    if bad is not None:
        return error(f"{where}: field '{bad}' holds a lone surrogate escape (e.g. \"\\ud800\"), which is not a "
                     "character and cannot be stored as UTF-8; fix or drop the text that wrote it (an emoji cut in "
                     "half, usually).")
    return row


def read_jsonl(path: str | Path, error: type[UserError] = UserError) -> Iterator[tuple[str, object]]:
    """Yield ``(where, row)`` for every non-blank line: ``row`` is the parsed JSON value (any type: the caller checks
    it is an object), or an instance of ``error`` for a line that is not UTF-8, not JSON, or holds a lone
    surrogate."""
    for where, line in read_lines(path, error):
        if isinstance(line, UserError):
            yield where, line
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield where, error(f"{where}: not valid JSON ({err.msg} at column {err.colno}).")
            continue
        yield where, _checked(where, row, error)


def read_json(path: str | Path, error: type[UserError] = UserError) -> Iterator[tuple[str, object]]:
    """Rows of a ``.json`` file: a JSON array of objects (``<file> row <i>``, from 1), or JSON Lines under a ``.json``
    name (as ``datasets``' json loader also accepts), each checked as :func:`read_jsonl` does."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as err:
        lineno = raw[: err.start].count(b"\n") + 1
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        yield f"{path} line {lineno}", error(
            f"{path} line {lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
            f"{_column(raw[line_start:], err.start - line_start)}); save the file as UTF-8.")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values, one per line: JSON Lines
            yield from read_jsonl(path, error)
            return
        yield f"{path} line {err.lineno}", error(f"{path} line {err.lineno}: not valid JSON ({err.msg} at column "
                                                 f"{err.colno}).")
        return
    rows = data if isinstance(data, list) else [data]
    for i, row in enumerate(rows, start=1):
        yield f"{path} row {i}", _checked(f"{path} row {i}", row, error)
