"""The one field-check helper every arguments dataclass uses, and the dtype names they accept.

A leaf module (it imports nothing of ours), so that the losses, the config and the jobs can all use it
without an import cycle.
"""

from __future__ import annotations

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_field(condition: bool, name: str, value, expected: str) -> None:
    """Raise ``ValueError("<name>=<value> is invalid: expected <expected>.")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}.")
