"""DistillationTrainer on tiny models: logging, checkpoints, frozen teacher, GA equivalence, LoRA, vocab checks."""

import copy

import pytest
import torch
from datasets import Dataset

from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer, VocabularyMismatchError
from llm_distill.losses import IGNORE_INDEX


def token_dataset(tokenizer, n=8, seed=0, prompt_len=3):
    """Rows of varying length with a masked prompt, so the per-token normalisation matters."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (i * 5) % 11
        ids = torch.randint(10, len(tokenizer), (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_len + ids[prompt_len:]})
    return Dataset.from_list(rows)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                logging_steps=2, save_strategy="no", report_to="none", seed=0, temperature=2.0, alpha=0.5,
                use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return DistillationConfig(**base)


def make_trainer(tiny_tokenizer, llama_factory, tmp_path, student=None, teacher=None, **kw):
    teacher = teacher if teacher is not None else llama_factory(seed=1, num_hidden_layers=3)
    student = student if student is not None else llama_factory(seed=2)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, **kw),
        train_dataset=token_dataset(tiny_tokenizer), data_collator=DistillationCollator(tiny_tokenizer),
        processing_class=tiny_tokenizer,
    )


def test_train_logs_each_term_and_writes_checkpoint(tiny_tokenizer, llama_factory, tmp_path):
    trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path, save_strategy="steps", save_steps=4)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert entry["kd_loss"] > 0 and entry["ce_loss"] > 0
        # Each logged term is the token-weighted mean over the window, so the combination must match the loss.
        assert entry["loss"] == pytest.approx(0.5 * entry["kd_loss"] + 0.5 * entry["ce_loss"], rel=1e-3)
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.json").exists()


def test_teacher_is_frozen_and_unchanged(tiny_tokenizer, llama_factory, tmp_path):
    teacher = llama_factory(seed=1, num_hidden_layers=3)
    before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(llama_factory(seed=2).state_dict())
    trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path, teacher=teacher)
    trainer.train()
    assert not trainer.teacher_model.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher_model.parameters())
    for k, v in trainer.teacher_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in trainer.model.state_dict().items())


def _one_sgd_step(tiny_tokenizer, llama_factory, tmp_path, batch, accum):
    trainer = make_trainer(
        tiny_tokenizer, llama_factory, tmp_path / f"{batch}x{accum}", per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, train_sampling_strategy="sequential", logging_steps=1,
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.state.log_history[0]


def test_gradient_accumulation_matches_one_big_batch(tiny_tokenizer, llama_factory, tmp_path):
    """2 micro-batches of 4 accumulated == 1 batch of 8: same loss, same update (ragged lengths, masked prompts)."""
    big, big_log = _one_sgd_step(tiny_tokenizer, llama_factory, tmp_path, batch=8, accum=1)
    acc, acc_log = _one_sgd_step(tiny_tokenizer, llama_factory, tmp_path, batch=4, accum=2)
    assert acc_log["loss"] == pytest.approx(big_log["loss"], rel=1e-5)
    assert acc_log["kd_loss"] == pytest.approx(big_log["kd_loss"], rel=1e-5)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)


def test_lora_student_trains_only_the_adapter(tiny_tokenizer, llama_factory, tmp_path):
    from peft import LoraConfig

    student = llama_factory(seed=2)
    base_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(
        model=student, teacher_model=llama_factory(seed=1, num_hidden_layers=3), args=config(tmp_path, learning_rate=5e-2),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        train_dataset=token_dataset(tiny_tokenizer), data_collator=DistillationCollator(tiny_tokenizer),
        processing_class=tiny_tokenizer,
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora_before
    for n, p in trainer.model.named_parameters():
        if "lora_B" in n:
            assert not torch.equal(p, lora_before[n]), f"{n} did not train"
    merged = trainer.model.base_model.model.state_dict()
    for k, v in base_before.items():  # base weights untouched (peft renames them to *.base_layer.*)
        key = k if k in merged else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(merged[key], v), k
    assert trainer.state.log_history[0]["kd_loss"] > 0


def test_bf16_mixed_precision_trains_like_fp32(tiny_tokenizer, llama_factory, tmp_path):
    """bf16 autocast changes the numbers by its rounding, not the training: the same seeds give logged losses and
    final weights within bf16's precision of the fp32 run (a broken cast, a lost T^2 or a wrong mask would not)."""
    runs = {}
    for bf16 in (False, True):
        trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path / str(bf16), bf16=bf16, logging_steps=1)
        trainer.train()
        losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])
        runs[bf16] = losses, torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
    (loss32, w32), (loss16, w16) = runs[False], runs[True]
    assert len(loss32) == len(loss16) == 4 and torch.isfinite(loss16).all()
    assert torch.allclose(loss16, loss32, rtol=0.005), (loss16, loss32)
    moved = (w32 - torch.cat([p.detach().flatten() for p in llama_factory(seed=2).parameters()])).norm()
    assert (w16 - w32).norm() < 0.1 * moved  # both runs moved the weights the same way, up to rounding


def test_vocab_mismatch_is_refused_with_both_sizes(tiny_tokenizer, llama_factory, tmp_path):
    """A model smaller than the tokenizer cannot be the same vocabulary: refused, naming both sizes and the fix."""
    with pytest.raises(VocabularyMismatchError, match=r"Teacher vocabulary size 300 != student vocabulary size 384"
                                                      r".*tokenizer has 384 tokens.*same model family"):
        make_trainer(tiny_tokenizer, llama_factory, tmp_path, teacher=llama_factory(seed=1, vocab_size=300))


def test_different_sizes_without_tokenizer_ask_for_it(tiny_tokenizer, llama_factory, tmp_path):
    with pytest.raises(VocabularyMismatchError, match="processing_class=tokenizer"):
        DistillationTrainer(model=llama_factory(seed=2), teacher_model=llama_factory(seed=1, vocab_size=448),
                            args=config(tmp_path), train_dataset=token_dataset(tiny_tokenizer),
                            data_collator=DistillationCollator(tiny_tokenizer))


def test_padded_vocab_is_tolerated(tiny_tokenizer, llama_factory, tmp_path):
    """A teacher whose embedding matrix is padded past the tokenizer (like Qwen2.5-7B's 152064 rows)."""
    trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path, teacher=llama_factory(seed=1, vocab_size=448))
    assert trainer.shared_vocab_size == 384
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss"] > 0


def test_ce_only_runs_without_teacher(tiny_tokenizer, llama_factory, tmp_path):
    trainer = DistillationTrainer(
        model=llama_factory(seed=2), teacher_model=None, args=config(tmp_path, alpha=0.0),
        train_dataset=token_dataset(tiny_tokenizer), data_collator=DistillationCollator(tiny_tokenizer),
    )
    trainer.train()
    assert "kd_loss" not in trainer.state.log_history[0] and trainer.state.log_history[0]["ce_loss"] > 0


def test_args_must_be_a_distillation_config(llama_factory, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(model=llama_factory(), teacher_model=llama_factory(),
                            args=TrainingArguments(output_dir=str(tmp_path)))
