"""The embedded default: offline tiny models and data, named ``embedded:<artefact>`` in configs.

``causal`` builds the byte-level BPE tokenizer, the standard-library corpus, the Llama-style teacher and the
student; ``masked`` builds the BERT-style teacher of the DistilBERT recipe on top of it; ``xtok``
the second tokenizer and its student (cross-tokenizer distillation). Library code never sees
an ``embedded:`` name: a job calls :func:`resolve` once, where it starts, and passes plain paths on.
"""

from __future__ import annotations

from llm_distill.embedded.causal import TinyRecipe, build
from llm_distill.embedded.masked import build_mlm_teacher
from llm_distill.embedded.xtok import build_xtok

EMBEDDED_PREFIX = "embedded:"
ARTEFACTS = ("teacher", "student", "tokenizer", "train", "heldout", "mlm_teacher", "student_xtok", "tokenizer_xtok")


def is_embedded(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(EMBEDDED_PREFIX)


def resolve(name: str | None, recipe: TinyRecipe | None = None) -> str | None:
    """Map ``embedded:<artefact>`` to its local path (building the cache if needed); pass other names through."""
    if not is_embedded(name):
        return name
    artefact = name[len(EMBEDDED_PREFIX) :]
    if artefact not in ARTEFACTS:
        raise ValueError(f"Unknown embedded artefact {name!r}; choose one of: "
                         f"{', '.join(EMBEDDED_PREFIX + a for a in ARTEFACTS)}")
    if artefact == "mlm_teacher":  # built on demand by the DistilBERT recipe
        return str(build_mlm_teacher(recipe))
    if artefact in ("student_xtok", "tokenizer_xtok"):  # the cross-tokenizer pair, built on demand
        return str(build_xtok(recipe) / artefact)
    root = build(recipe)
    return str(root / {"train": "data/train.jsonl", "heldout": "data/heldout.jsonl"}.get(artefact, artefact))
