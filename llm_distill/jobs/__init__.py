"""The jobs: one module per thing a user runs, each an arguments dataclass, a typed run function and ``main(argv)``.

``scripts/<job>.py`` and the ``llm-distill <verb>`` console command both call ``main`` through :func:`run_cli`; jobs
call each other through the typed run functions. Jobs use the building blocks (``llm_distill.*``); blocks never
import jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from llm_distill.errors import UserError

DEBUG_ENV = "LLM_DISTILL_DEBUG"
logger = logging.getLogger("llm_distill")


def _given(argv: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def with_base(argv: list[str], demo_config: Path, inputs: tuple[str, ...]) -> list[str]:
    """``argv`` with the base the run starts from, which is logged: the user's ``--config``; else, when the run names
    none of its own ``inputs`` (models, data, prompts), the embedded demo config ``demo_config`` (so a bare
    ``python scripts/X.py`` runs the demo); else nothing: the arguments dataclasses' defaults, which are meant for
    real models. An example config is never a hidden base under a user's own models or data."""
    if _given(argv, "config"):
        i = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
        name = argv[i + 1] if argv[i] == "--config" and i + 1 < len(argv) else argv[i].partition("=")[2]
        logger.info("Base config: %s (the command line overrides it).", name)
        return argv
    given = [name for name in inputs if _given(argv, name)]
    if given:
        logger.info("Base config: the built-in defaults (you gave --%s; %s, the embedded demo, is not used).",
                    " --".join(given), demo_config.name)
        return argv
    if not demo_config.is_file():
        return argv
    logger.info("Base config: %s, the embedded demo (no model, data or prompts were given: pass --config or your own "
                "--%s to run on yours).", demo_config, " / --".join(inputs[:2]))
    return ["--config", str(demo_config), *argv]


def check_demo_inputs(args, own: str, demo_inputs: tuple[str, ...]) -> None:
    """Refuse a run whose ``own`` model is the user's (not ``embedded:``) but whose ``demo_inputs`` (fields of the
    arguments dataclass ``args``) were left at their demo defaults: a user's target must not be paired with the
    embedded draft or prompts (built for minutes, then meaningless). Called before anything is resolved or loaded."""
    from llm_distill.config import ConfigError

    if str(getattr(args, own)).startswith("embedded:"):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    left = [name for name in demo_inputs if getattr(args, name) == defaults[name]]
    if left:
        raise ConfigError(f"{own}={getattr(args, own)!r} is yours, but {', '.join(left)} still name(s) the embedded demo "
                          f"({', '.join(f'{n}={getattr(args, n)!r}' for n in left)}): pass "
                          f"{' '.join(f'--{n} ...' for n in left)} for your model.")


def setup_logging() -> None:
    """The scripts' log format (timestamps and logger names), at INFO."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """Run a job's ``main(argv)`` as a command: the exit status, 0 on success.

    Every error a user can cause (a :class:`~llm_distill.errors.UserError`: bad rows, settings, paths, vocabularies;
    ``ConfigError``, ``DataValidationError``, ``PromptValidationError``, ``VocabularyMismatchError``,
    ``PruningPlanError``, ``ModelLoadError``, ``OutputExistsError`` and the range checks are all one) ends as one
    message on stderr, ``error: <file> line <n>: <what is wrong and the fix>``, and exit status 2, without a
    traceback: the traceback points into our code, the message points at the user's file. ``LLM_DISTILL_DEBUG=1``
    re-raises it with its traceback. Any other exception is a bug and keeps its traceback."""
    setup_logging()
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
