"""``embedded:train_openings`` / ``embedded:heldout_openings``: prompt/response rows cut from the corpus files.

On-policy distillation needs prompts (the student writes the completions), and the embedded corpus is raw text.
Each row's prompt is the opening of one standard-library file (its first ``PROMPT_CHARS`` characters, cut at a line
end) and its response the ground-truth continuation (the next ``RESPONSE_CHARS``, cut at a line end), marked
``finish_reason: length`` so that no EOS is appended (the file goes on). Off-policy KD trains on that continuation;
on-policy KD replaces it by the student's own sample. Derived from ``data/<split>.jsonl`` of the built cache, once,
under the cache's lock, and written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

PROMPT_CHARS = 240
RESPONSE_CHARS = 480


def cut_at_line_end(text: str, limit: int) -> str:
    """``text[:limit]`` extended to the end of its last line (the whole text when shorter)."""
    end = text.find("\n", limit)
    return text if end < 0 else text[: end + 1]


def opening_rows(texts: list[dict], prompt_chars: int = PROMPT_CHARS, response_chars: int = RESPONSE_CHARS) -> list[dict]:
    """One ``{"prompt", "response", "finish_reason": "length", "source"}`` row per file with text after its opening."""
    rows = []
    for row in texts:
        prompt = cut_at_line_end(row["text"], prompt_chars)
        response = cut_at_line_end(row["text"][len(prompt):], response_chars)
        if prompt.strip() and response.strip():
            rows.append({"prompt": prompt, "response": response, "finish_reason": "length", "source": row["source"]})
    return rows


def openings_file(root: Path, split: str) -> Path:
    """``<root>/data/<split>_openings.jsonl``, written from ``<root>/data/<split>.jsonl`` if missing."""
    out = root / "data" / f"{split}_openings.jsonl"
    with FileLock(str(out) + ".lock"):
        if out.exists():
            return out
        with open(root / "data" / f"{split}.jsonl", encoding="utf-8") as f:
            rows = opening_rows([json.loads(line) for line in f])
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out)
    return out
