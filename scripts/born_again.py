"""Born-again generations: generation k+1 (same architecture) learns from generation k, or from the ensemble of
generations 1..k; prints and writes held-out figures per generation.

    python scripts/born_again.py                                        # embedded default, 2 generations
    python scripts/born_again.py --generations 3 --ensemble true --max_steps 100
    python scripts/born_again.py --base_config configs/my_run.yaml --output_dir outputs/ban
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from llm_distill.jobs import setup_logging  # noqa: E402
from llm_distill.jobs.born_again import main  # noqa: E402

if __name__ == "__main__":
    setup_logging()
    main(sys.argv[1:])
