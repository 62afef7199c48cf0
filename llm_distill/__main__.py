"""``python -m llm_distill <verb> ...`` is the ``llm-distill`` console command."""

import sys

from llm_distill.console import main

sys.exit(main())
