"""The one base class of every error a user can cause (bad data, config, paths, vocabularies).

A leaf module (it imports nothing of ours), so every block can subclass :class:`UserError` without an import cycle.
The command-line entry (``llm_distill.jobs.run_cli``) catches exactly this class: such an error ends as one line,
``error: <file> line <n>: <what is wrong and the fix>``, and a non-zero exit, without a traceback (set
``LLM_DISTILL_DEBUG=1`` for the traceback). Anything else is a bug of ours and keeps its traceback.

It subclasses ``ValueError`` so that code (and tests) catching ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave (a file, a row, a setting, a model path) cannot be used as given; the message names
    where and says how to fix it."""


class FieldError(UserError):
    """A configuration field with a value outside its accepted range (raised by ``checks.check_field``)."""


class ModelLoadError(UserError):
    """A model or tokenizer name that neither is a local folder nor loads from the hub."""
