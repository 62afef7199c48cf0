"""The embedded default: offline tiny models and data, named ``embedded:<artefact>`` in configs.

``causal`` builds the byte-level BPE tokenizer, the standard-library corpus, the Llama-style teacher and the
student; ``masked`` builds the BERT-style teacher of the DistilBERT recipe on top of it; ``xtok``
the second tokenizer and its student (cross-tokenizer distillation). ``smollm2`` is a real
135M-parameter teacher from the optional extra ``real`` (:mod:`llm_distill.embedded.smollm2`). Library code never sees
an ``embedded:`` name: a job calls :func:`resolve` once, where it starts, and passes plain paths on.
"""

from __future__ import annotations

from llm_distill.embedded.causal import TinyRecipe, build
from llm_distill.embedded.masked import build_mlm_teacher
from llm_distill.embedded.openings import openings_file
from llm_distill.embedded.smollm2 import MissingExtraError, smollm2_folder
from llm_distill.embedded.xtok import build_xtok
from llm_distill.gguf import resolve_gguf

__all__ = ["ARTEFACTS", "EMBEDDED_PREFIX", "MissingExtraError", "TinyRecipe", "build", "build_mlm_teacher",
           "is_embedded", "resolve"]

EMBEDDED_PREFIX = "embedded:"
ARTEFACTS = ("teacher", "student", "tokenizer", "train", "heldout", "mlm_teacher", "smollm2", "train_openings",
             "heldout_openings", "student_xtok", "tokenizer_xtok")


def is_embedded(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(EMBEDDED_PREFIX)


def resolve(name: str | None, recipe: TinyRecipe | None = None) -> str | None:
    """Map ``embedded:<artefact>`` to its local path (building the cache if needed), a ``.gguf`` file (or a folder
    holding one) to its dequantized HF folder (:mod:`llm_distill.gguf`); pass other names through."""
    if not is_embedded(name):
        return resolve_gguf(name)
    artefact = name[len(EMBEDDED_PREFIX) :]
    if artefact not in ARTEFACTS:
        raise ValueError(f"Unknown embedded artefact {name!r}; choose one of: "
                         f"{', '.join(EMBEDDED_PREFIX + a for a in ARTEFACTS)}")
    if artefact == "smollm2":  # a real teacher from the optional extra `real` (MissingExtraError without it)
        return str(smollm2_folder())
    if artefact == "mlm_teacher":  # built on demand by the DistilBERT recipe
        return str(build_mlm_teacher(recipe))
    if artefact in ("student_xtok", "tokenizer_xtok"):  # the cross-tokenizer pair, built on demand
        return str(build_xtok(recipe) / artefact)
    root = build(recipe)
    if artefact.endswith("_openings"):  # prompt/response rows for on-policy distillation (llm_distill.on_policy)
        return str(openings_file(root, artefact.removesuffix("_openings")))
    return str(root / {"train": "data/train.jsonl", "heldout": "data/heldout.jsonl"}.get(artefact, artefact))
