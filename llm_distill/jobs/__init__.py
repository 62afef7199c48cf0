"""The jobs: one module per thing a user runs, each an arguments dataclass, a typed run function and ``main(argv)``.

``scripts/<job>.py`` and the ``llm-distill <verb>`` console command both call ``main``; jobs call each other through
the typed run functions. Jobs use the building blocks (``llm_distill.*``); blocks never import jobs.
"""

from __future__ import annotations

import logging


def setup_logging() -> None:
    """The scripts' log format (timestamps and logger names), at INFO."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
