"""GGUF checkpoints as teachers, students, targets and drafts: dequantized once into a plain Hugging Face folder.

Many models exist only as a ``.gguf`` file (llama.cpp's format). transformers reads one with
``from_pretrained(folder, gguf_file=name)``, but the result cannot be saved (``save_pretrained`` refuses a
GGUF-quantized model) and each load dequantizes every tensor again (seconds to minutes). So a job turns a GGUF
name into a folder ONCE, here: the file is loaded dense (``GgufConfig(dequantize=True)``), its quantization marker
is removed (``hf_quantizer.remove_quantization_config``) and it is saved as safetensors with its tokenizer and chat
template. Every later run reuses that folder, and its logits equal the GGUF-loaded model's exactly.

The folder lives in ``$LLM_DISTILL_CACHE`` (default ``~/.cache/llm_distill``) under ``gguf-<key>``
(``gguf_info.json`` inside names the source file). The key hashes the file's size and three 1 MiB samples of its
bytes (start, middle, end): reading 3 MiB instead of the whole file keeps the check instant on multi-GB files, a
copy of the same file hits the same folder, and a re-quantized or edited file (a new size, header or sampled
tensor data) gets a new one. A file lock makes concurrent ranks wait for the first one's conversion instead of
converting in parallel.

A GGUF name is a path ending in ``.gguf``, or a folder holding exactly one ``.gguf`` file and no ``config.json``.
Jobs call :func:`resolve_gguf` on every model name where they resolve ``embedded:`` names; library loaders only
ever see plain folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 20
INFO_FILE = "gguf_info.json"


def gguf_cache_root() -> Path:
    """The same cache root as the embedded default (``$LLM_DISTILL_CACHE`` or ``~/.cache/llm_distill``)."""
    return Path(os.environ.get("LLM_DISTILL_CACHE", Path.home() / ".cache" / "llm_distill"))


def gguf_file_of(name: str | os.PathLike | None) -> Path | None:
    """The ``.gguf`` file ``name`` designates, or ``None`` when it is no GGUF name (a hub id, a plain folder).

    Raises a clear error for a ``.gguf`` path that does not exist and for a folder with several GGUF files."""
    if name is None:
        return None
    path = Path(name).expanduser()
    if str(name).endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(name)!r} does not exist (check the path in your config)")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{str(name)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                             f"name the one to use: {str(path / found[0].name)!r}")
    return None


def is_gguf(name: str | os.PathLike | None) -> bool:
    return gguf_file_of(name) is not None


def gguf_key(path: str | os.PathLike) -> str:
    """12 hex digits from the file's size and three 1 MiB samples (start, middle, end); see the module docstring."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:12]


def gguf_cache_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    return gguf_cache_root() / f"gguf-{gguf_key(path)}"


def load_gguf(path: str | os.PathLike):
    """``(model, tokenizer)`` read straight from a GGUF file, every tensor dequantized to a dense float32 weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    path = Path(path)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail here with the fix)
    except ImportError as err:
        raise ImportError(f"Reading {path.name} needs the `gguf` package: pip install gguf "
                          f"(or pip install 'llm-distill[real]')") from err
    kwargs = dict(gguf_file=path.name, quantization_config=GgufConfig(dequantize=True))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype="float32", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _write_plain_folder(path: Path, out: Path) -> dict:
    start = time.time()
    model, tokenizer = load_gguf(path)
    if getattr(model, "hf_quantizer", None) is not None:  # the marker alone blocks save_pretrained
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"source": str(path.resolve()), "size": path.stat().st_size, "key": gguf_key(path),
            "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.time() - start, 1)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def dequantize_gguf(name: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """The plain HF folder for the GGUF file ``name`` (see :func:`gguf_file_of`), converted on first use.

    Safe to call from many processes at once: the first converts under a file lock into a temporary folder and
    publishes it with one rename; the others wait and reuse it."""
    path = gguf_file_of(name)
    if path is None:
        raise ValueError(f"{str(name)!r} is not a .gguf file nor a folder holding one")
    final = Path(out_dir) if out_dir is not None else gguf_cache_dir(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / INFO_FILE).exists():
            logger.info("GGUF %s: reusing %s", path.name, final)
            return final
        logger.warning("Dequantizing %s into %s (once)", path, final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            info = _write_plain_folder(path, tmp)
            if final.exists():  # a half-written folder from an interrupted run without the info file
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("GGUF %s: %s, %.1fM parameters, dequantized in %.0fs", path.name, info["architecture"],
                       info["parameters"] / 1e6, info["seconds"])
    return final


def resolve_gguf(name: str | None) -> str | None:
    """A GGUF name becomes its dequantized folder (converted once); any other name passes through unchanged."""
    return str(dequantize_gguf(name)) if is_gguf(name) else name
