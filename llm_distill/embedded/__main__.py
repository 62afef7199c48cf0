"""Build (or show) the embedded default's cache.

    python -m llm_distill.embedded              # the causal default: tokenizer, corpus, teacher, student (~5 min once)
    python -m llm_distill.embedded --mlm        # also the masked-LM teacher of the DistilBERT recipe
    python -m llm_distill.embedded --xtok       # also the cross-tokenizer pair (second tokenizer + its student)
    python -m llm_distill.embedded --force      # rebuild
"""

import logging
import sys

from llm_distill.embedded import build, build_mlm_teacher, build_xtok

logging.basicConfig(level=logging.INFO)
print(build(force="--force" in sys.argv))
if "--mlm" in sys.argv:
    print(build_mlm_teacher(force="--force" in sys.argv))
if "--xtok" in sys.argv:
    print(build_xtok(force="--force" in sys.argv))
