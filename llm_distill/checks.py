"""The one field-check helper every arguments dataclass uses, and the dtype names they accept.

Imports only the leaf ``errors`` module, so that the losses, the config and the jobs can all use it
without an import cycle.
"""

from __future__ import annotations

from llm_distill.errors import FieldError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_field(condition: bool, name: str, value, expected: str) -> None:
    """Raise ``FieldError("<name>=<value> is invalid: expected <expected>.")`` (a ``ValueError``) unless
    ``condition`` holds."""
    if not condition:
        raise FieldError(f"{name}={value!r} is invalid: expected {expected}.")
