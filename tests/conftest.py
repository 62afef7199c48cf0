"""Shared fixtures: a tiny BPE tokenizer and tiny Llama models built from configs. No network, no GPU."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO_ROOT = Path(__file__).resolve().parents[1]


def _corpus_texts(n_files: int = 12) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "keyword.py", "numbers.py",
             "opcode.py", "queue.py", "sched.py", "shlex.py", "textwrap.py"]
    return [(root / n).read_text(encoding="utf-8") for n in names[:n_files] if (root / n).exists()]


def build_tiny_tokenizer(vocab_size: int = 384):
    """Byte-level BPE on a dozen stdlib files (well under a second), with the embedded chat template."""
    from dataclasses import replace


    from llm_distill.embedded import causal as tiny

    recipe = replace(tiny.TinyRecipe(), vocab_size=vocab_size, tokenizer_train_chars=10**9)
    tok = tiny.train_tokenizer(_corpus_texts(), recipe)
    tok.chat_template = tiny.CHAT_TEMPLATE
    return tok


def miniature_recipe(teacher_steps: int = 3, teacher_layers: int = 2):
    """The embedded default's recipe shrunk to seconds: a 300-token BPE, 32-token blocks, a 16-wide teacher and an
    8-wide student (for tests of the real build path)."""
    from dataclasses import replace


    from llm_distill.embedded import causal as tiny

    return replace(tiny.TinyRecipe(), vocab_size=300, tokenizer_train_chars=200_000, seq_len=32,
                   teacher_steps=teacher_steps, teacher_batch_size=2,
                   teacher=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=teacher_layers,
                                num_attention_heads=2, num_key_value_heads=1),
                   student=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def corpus_texts():
    return _corpus_texts()


def make_llama(tokenizer, seed: int = 0, **overrides):
    """A Llama causal LM of a few thousand parameters (GQA: 4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    dims.update(overrides)
    config = LlamaConfig(vocab_size=dims.pop("vocab_size", len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **dims)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama_factory(tiny_tokenizer):
    return lambda seed=0, **kw: make_llama(tiny_tokenizer, seed=seed, **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def saved_pair(tmp_path, tiny_tokenizer):
    """A teacher (3 layers) and a student (2 layers) saved with save_pretrained, plus text JSONL data."""
    teacher = make_llama(tiny_tokenizer, seed=1, num_hidden_layers=3)
    student = make_llama(tiny_tokenizer, seed=2, hidden_size=16, intermediate_size=32)
    paths = {}
    for name, model in (("teacher", teacher), ("student", student)):
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tiny_tokenizer.save_pretrained(paths[name])
    texts = _corpus_texts(6)
    paths["train"] = write_jsonl(tmp_path / "train.jsonl", [{"text": t[:1500]} for t in texts[:4]])
    paths["eval"] = write_jsonl(tmp_path / "eval.jsonl", [{"text": t[:1500]} for t in texts[4:6]])
    return paths


@pytest.fixture(scope="session")
def xtok_tokenizer():
    """The cross-tokenizer side: byte-level BPE of another size, ``<s>`` BOS prepended, other special tokens."""
    from llm_distill.embedded.xtok import train_xtok_tokenizer

    return train_xtok_tokenizer(_corpus_texts(), vocab_size=320)


@pytest.fixture
def one_thread():
    """Like each rank of the 2-process tests: on a busy 2-core machine 2 threads are ~50x slower than 1 for these
    tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ragged_dataset(tokenizer, n=8, seed=0):
    """Ragged rows (so attention masks differ from the label masks) with a masked 3-token prompt."""
    from datasets import Dataset

    from llm_distill.losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(10, len(tokenizer), (6 + (i * 5) % 11,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    return Dataset.from_list(rows)
