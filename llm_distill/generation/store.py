"""The crash-safe output store: per-rank shards appended batch by batch, repaired and resumed, merged once.

``<output>`` (final), ``<output>.parts/shard-<rank>.jsonl`` (while running), ``<stem>.meta.json`` (the config
fingerprint and the run summary). Each batch is one flushed and fsynced write, a truncated last line (a kill
mid-write) is cut off on restart, and the merge writes every ``(id, sample_index)`` exactly once, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

from llm_distill.errors import UserError

logger = logging.getLogger(__name__)


class OutputExistsError(UserError, RuntimeError):
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
