"""Gradual magnitude pruning during distillation: the schedule, masks through optimizer steps, checkpoints and resume,
the 2:4 pattern, and a plain reload of the sparse result."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer
from llm_distill.sparsity import (
    MASKS_FILE,
    GradualPruningCallback,
    is_two_four,
    magnitude_mask,
    prunable_weights,
    scheduled_sparsity,
    sparsity_report,
)
from test_trainer import token_dataset


def test_cubic_schedule_values_at_chosen_steps():
    # Zhu & Gupta: s_t = s_f (1 - (1 - (t - t0) / (n dt))^3), held between updates.
    kw = dict(target=0.5, start=10, end=50, every=10)
    assert scheduled_sparsity(0, **kw) == 0.0 and scheduled_sparsity(9, **kw) == 0.0
    assert scheduled_sparsity(10, **kw) == 0.0  # t = t0: the schedule starts at 0
    assert scheduled_sparsity(20, **kw) == pytest.approx(0.5 * (1 - 0.75 ** 3))
    assert scheduled_sparsity(29, **kw) == pytest.approx(0.5 * (1 - 0.75 ** 3))  # constant between updates
    assert scheduled_sparsity(30, **kw) == pytest.approx(0.5 * (1 - 0.5 ** 3))
    assert scheduled_sparsity(40, **kw) == pytest.approx(0.5 * (1 - 0.25 ** 3))
    assert scheduled_sparsity(50, **kw) == 0.5 and scheduled_sparsity(1000, **kw) == 0.5
    # end - start not a multiple of every: the target is still reached at end
    assert scheduled_sparsity(25, target=0.8, start=0, end=25, every=10) == 0.8
    values = [scheduled_sparsity(t, **kw) for t in range(0, 60)]
    assert values == sorted(values)  # never decreases


def test_masks_come_from_the_tools_and_only_grow():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    m30 = magnitude_mask(w, 0.3)
    assert (~m30).sum() == round(0.3 * w.numel())
    kept = w.abs()[m30].min()
    assert (w.abs()[~m30] <= kept).all()  # the smallest magnitudes go
    m60 = magnitude_mask(w * m30, 0.6)
    assert not (m60 & ~m30).any()  # already-zero weights rank lowest: pruned stays pruned
    m24 = magnitude_mask(w, 0.5, "2:4")
    assert is_two_four(w * m24) and (~m24).float().mean() == 0.5
    blocks = w.abs().reshape(16, 8, 4)
    expected = blocks >= blocks.sort(-1).values[..., 2:3]  # the two largest of each block are kept
    assert torch.equal(m24.reshape(16, 8, 4), expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        magnitude_mask(torch.randn(4, 6), 0.5, "2:4")


def test_scope_excludes_embeddings_and_head_unless_asked(llama_factory):
    model = llama_factory()
    linear = prunable_weights(model)
    assert "lm_head" not in linear and all(name.startswith("model.layers.") for name in linear)
    assert len(linear) == 2 * 7  # q k v o gate up down per layer
    assert "lm_head" in prunable_weights(model, "linear_and_head")
    assert "model.embed_tokens" in prunable_weights(model, "all")


def _trainer(tokenizer, llama_factory, tmp_path, student=None, **kw):
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
                logging_steps=2, save_strategy="no", report_to="none", seed=0, alpha=0.5, use_cpu=True,
                dataloader_num_workers=0, target_sparsity=0.5, sparsity_start_step=0, sparsity_end_step=4,
                sparsity_every=2)
    args.update(kw)
    args = DistillationConfig(**args)
    student = student if student is not None else llama_factory(seed=2)
    callback = GradualPruningCallback(student, args.target_sparsity, args.sparsity_start_step, args.sparsity_end_step,
                                      args.sparsity_every, args.sparsity_pattern, args.sparsity_scope)
    trainer = DistillationTrainer(model=student, teacher_model=llama_factory(seed=1, num_hidden_layers=3), args=args,
                                  train_dataset=token_dataset(tokenizer, n=16), callbacks=[callback],
                                  data_collator=DistillationCollator(tokenizer), processing_class=tokenizer)
    return trainer, callback


def test_gradual_pruning_follows_the_schedule_and_survives_optimizer_steps(tiny_tokenizer, llama_factory, tmp_path):
    trainer, callback = _trainer(tiny_tokenizer, llama_factory, tmp_path)
    seen = []
    original = callback.on_optimizer_step

    def check_after_step(args, state, control, **kw):  # right after optimizer.step(): AdamW has moved every weight
        original(args, state, control, **kw)
        seen.append(all(not (w[~callback.masks[n].to(w.device)] != 0).any()
                        for n, w in prunable_weights(callback.model).items()) if callback.masks else True)
    callback.on_optimizer_step = check_after_step
    trainer.train()
    assert seen and all(seen)
    steps = [s for s, _ in callback.history]
    assert steps == [2, 4]  # 0 at step 0, then every 2 steps until sparsity_end_step
    assert callback.history[0][1] == pytest.approx(0.5 * (1 - 0.5 ** 3), abs=0.01)
    assert callback.history[-1][1] == pytest.approx(0.5, abs=1e-3)
    assert sparsity_report(trainer.model)["sparsity"] == pytest.approx(0.5, abs=1e-3)  # still 0.5 after 4 more steps
    logged = [h["sparsity"] for h in trainer.state.log_history if "loss" in h]
    assert logged[0] < logged[-1] == pytest.approx(0.5, abs=1e-3)
    # made permanent: the saved model is a plain checkpoint with the zeros in it
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert sparsity_report(reloaded)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for name, w in prunable_weights(reloaded).items():
        assert torch.equal(w != 0, prunable_weights(trainer.model)[name] != 0)


def test_checkpoint_and_resume_keep_the_masks(tiny_tokenizer, llama_factory, tmp_path):
    full, _ = _trainer(tiny_tokenizer, llama_factory, tmp_path / "a", save_strategy="steps", save_steps=3)
    full.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-3"
    assert (ckpt / MASKS_FILE).exists()
    # The checkpoint is a plain HF folder: from_pretrained gives the pruned weights (no weight_orig / weight_mask).
    at3 = AutoModelForCausalLM.from_pretrained(ckpt)
    assert sparsity_report(at3)["sparsity"] == pytest.approx(0.5 * (1 - 0.5 ** 3), abs=0.01)
    resumed, callback = _trainer(tiny_tokenizer, llama_factory, tmp_path / "a", student=at3, save_strategy="steps",
                                 save_steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert callback.history[0][0] == 4  # it went on from step 3's masks to the next schedule value
    for name, w in prunable_weights(full.model).items():
        assert torch.allclose(w, prunable_weights(resumed.model)[name], atol=1e-5), name


def test_two_four_holds_in_every_block_after_training(tiny_tokenizer, llama_factory, tmp_path):
    trainer, callback = _trainer(tiny_tokenizer, llama_factory, tmp_path, sparsity_pattern="2:4")
    trainer.train()
    weights = prunable_weights(trainer.model)
    assert all(is_two_four(w) for w in weights.values())
    assert sparsity_report(trainer.model)["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_config_checks_name_the_field(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="target_sparsity"):
        DistillationConfig(**base, target_sparsity=0.4, sparsity_pattern="2:4", max_steps=10)
    with pytest.raises(ValueError, match="sparsity_pattern"):
        DistillationConfig(**base, target_sparsity=0.5, sparsity_pattern="4:8", max_steps=10)
    with pytest.raises(ValueError, match="sparsity_end_step"):
        DistillationConfig(**base, target_sparsity=0.5)
    assert DistillationConfig(**base, target_sparsity=0.5, max_steps=100).sparsity_end_step == 75
    with pytest.raises(ValueError, match="qat"):
        DistillationConfig(**base, qat="int2")
