"""Feature-level KD in DistillationTrainer: a layer map across different widths trains its projections (optimiser,
checkpoint, resume, never in the exported student); every feature term logs and recombines into the loss on the
plain and memory-lean paths; weights at 0 are exactly today's training; gradient accumulation matches one big batch;
PEFT students and the masked-LM (DistilBERT) recipe; the config checks."""

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer
from llm_distill.trainer import FEATURE_PROJECTION_FILE

from conftest import ragged_dataset

FEATURES = dict(alpha_hidden=1.0, hidden_layer_map="0:1,1:2", alpha_attn_relation=1.0, relation_heads=2,
                alpha_rkd=0.5)


def feature_trainer(tok, llama_factory, out, student=None, peft_config=None, **kw):
    """Teacher 3 x 32 wide, student 2 x 16 wide (GQA in both)."""
    args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, logging_steps=2,
                save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0, alpha=0.5,
                temperature=2.0)
    args.update(kw)
    return DistillationTrainer(
        model=student if student is not None else llama_factory(seed=2, hidden_size=16, intermediate_size=32),
        teacher_model=llama_factory(seed=1, num_hidden_layers=3), args=DistillationConfig(**args),
        train_dataset=ragged_dataset(tok), data_collator=DistillationCollator(tok), processing_class=tok,
        peft_config=peft_config,
    )


@pytest.mark.parametrize("chunk", [256, 0], ids=["memory_lean", "plain"])
def test_every_feature_term_logs_and_recombines_into_the_loss(tiny_tokenizer, llama_factory, tmp_path, chunk):
    trainer = feature_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", loss_chunk_size=chunk,
                              alpha_attn_map=0.3, **FEATURES)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert all(h[k] > 0 for k in ("kd_loss", "ce_loss", "hidden_loss", "attn_relation_loss", "attn_map_loss",
                                       "rkd_loss"))
        recombined = (0.5 * h["kd_loss"] + 0.5 * h["ce_loss"] + h["hidden_loss"] + h["attn_relation_loss"]
                      + 0.3 * h["attn_map_loss"] + 0.5 * h["rkd_loss"])
        assert h["loss"] == pytest.approx(recombined, rel=1e-3)


def test_memory_lean_and_plain_paths_give_the_same_feature_terms(tiny_tokenizer, llama_factory, tmp_path):
    histories = []
    for chunk in (0, 256):
        trainer = feature_trainer(tiny_tokenizer, llama_factory, tmp_path / f"o{chunk}", loss_chunk_size=chunk,
                                  max_steps=2, **FEATURES)
        trainer.train()
        histories.append(trainer.state.log_history[0])
    for key in ("hidden_loss", "attn_relation_loss", "rkd_loss", "kd_loss"):
        assert histories[0][key] == pytest.approx(histories[1][key], rel=1e-4)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_zero_feature_weights_are_exactly_todays_training(tiny_tokenizer, llama_factory, tmp_path):
    base = feature_trainer(tiny_tokenizer, llama_factory, tmp_path / "base")
    base.train()
    zeroed = feature_trainer(tiny_tokenizer, llama_factory, tmp_path / "zero", hidden_layer_map="0:1,1:2",
                             alpha_hidden=0.0, alpha_attn_relation=0.0, alpha_attn_map=0.0, alpha_rkd=0.0)
    zeroed.train()
    assert zeroed.feature_distiller is None
    for key, value in _weights(base).items():
        assert torch.equal(value, _weights(zeroed)[key]), key  # bit for bit
    assert [h.get("loss") for h in base.state.log_history] == [h.get("loss") for h in zeroed.state.log_history]
    on = feature_trainer(tiny_tokenizer, llama_factory, tmp_path / "on", **FEATURES)
    on.train()  # and the terms do change the update when they are on
    assert any(not torch.equal(v, _weights(on)[k]) for k, v in _weights(base).items())


def test_layer_map_across_widths_trains_its_projections_checkpoints_and_resumes(tiny_tokenizer, llama_factory,
                                                                                 tmp_path):
    out = tmp_path / "out"
    trainer = feature_trainer(tiny_tokenizer, llama_factory, out, alpha_hidden=1.0, hidden_layer_map="0:1,1:2",
                              save_strategy="steps", save_steps=2)
    projections = trainer.feature_distiller.projections
    assert sorted(projections.maps) == ["0", "1"] and projections.maps["0"].weight.shape == (32, 16)
    before = {k: v.clone() for k, v in projections.state_dict().items()}
    grads = []
    projections.maps["0"].weight.register_hook(lambda g: grads.append(g.abs().sum().item()))
    trainer.train()
    assert grads and all(g > 0 for g in grads)  # the projection gets gradients ...
    for key, value in projections.state_dict().items():
        assert not torch.equal(value, before[key])  # ... and the optimiser steps it
    saved = load_file(out / "checkpoint-4" / FEATURE_PROJECTION_FILE)
    torch.testing.assert_close(saved["maps.0.weight"], projections.maps["0"].weight.detach())
    trainer.save_model(str(out / "final"))
    exported = AutoModelForCausalLM.from_pretrained(out / "final")  # a plain student: no projection in it
    assert not any("maps" in k for k in exported.state_dict())
    resumed = feature_trainer(tiny_tokenizer, llama_factory, out, alpha_hidden=1.0, hidden_layer_map="0:1,1:2",
                              save_strategy="steps", save_steps=2, max_steps=6)
    resumed._load_from_checkpoint(str(out / "checkpoint-2"))
    two = load_file(out / "checkpoint-2" / FEATURE_PROJECTION_FILE)
    torch.testing.assert_close(resumed.feature_distiller.projections.maps["1"].weight.detach(), two["maps.1.weight"])


def _one_sgd_step(tok, llama_factory, out, batch, accum):
    trainer = feature_trainer(tok, llama_factory, out, per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accum, max_steps=1, optim="sgd", learning_rate=1.0,
                              lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                              train_sampling_strategy="sequential", logging_steps=1, alpha_hidden=1.0,
                              hidden_layer_map="0:1,1:2", alpha_attn_relation=1.0, relation_heads=2)
    trainer.train()
    weights = _weights(trainer)
    weights["projection"] = trainer.feature_distiller.projections.maps["0"].weight.detach().clone()
    return weights, trainer.state.log_history[0]


def test_gradient_accumulation_matches_one_big_batch(tiny_tokenizer, llama_factory, tmp_path):
    big, big_log = _one_sgd_step(tiny_tokenizer, llama_factory, tmp_path / "big", batch=8, accum=1)
    small, small_log = _one_sgd_step(tiny_tokenizer, llama_factory, tmp_path / "small", batch=4, accum=2)
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-5, rtol=1e-4)
    for key in ("hidden_loss", "attn_relation_loss"):
        assert small_log[key] == pytest.approx(big_log[key], rel=1e-4, abs=2e-6)  # logs are rounded to 6 places


def test_peft_student_trains_its_adapter_with_feature_terms(tiny_tokenizer, llama_factory, tmp_path):
    from peft import LoraConfig

    trainer = feature_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", max_steps=2,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
                              **FEATURES)
    lora = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    h = trainer.state.log_history[0]
    assert h["hidden_loss"] > 0 and h["attn_relation_loss"] > 0
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(v, after[k]) for k, v in lora.items())  # lora_B starts at 0 and moves


def test_masked_lm_recipe_with_feature_terms(tiny_tokenizer, tmp_path):
    def bert(layers, seed):
        torch.manual_seed(seed)
        return BertForMaskedLM(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=layers, num_attention_heads=4,
                                          max_position_embeddings=64, pad_token_id=tiny_tokenizer.pad_token_id))
    rows = [{"input_ids": r["input_ids"]} for r in ragged_dataset(tiny_tokenizer)]
    args = DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                              logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", alpha_kd=5.0,
                              alpha_mlm=2.0, alpha_cos=1.0, kd_positions="all", temperature=2.0, alpha_hidden=1.0,
                              alpha_attn_relation=1.0, alpha_attn_map=1.0, alpha_rkd=1.0, remove_unused_columns=False)
    assert tiny_tokenizer.mask_token is not None
    collator = DataCollatorForLanguageModeling(tiny_tokenizer, mlm=True, mlm_probability=0.3)
    trainer = DistillationTrainer(model=bert(2, 2), teacher_model=bert(4, 1), args=args,
                                  train_dataset=Dataset.from_list(rows), data_collator=collator,
                                  processing_class=tiny_tokenizer)
    assert trainer.feature_distiller.causal is False and trainer.feature_distiller.pairs == [(0, 1), (1, 3)]
    trainer.train()
    h = trainer.state.log_history[0]
    assert all(h[k] > 0 for k in ("hidden_loss", "attn_relation_loss", "attn_map_loss", "rkd_loss", "cos_loss"))


@pytest.mark.parametrize("kw, message", [
    (dict(alpha_hidden=-1.0), "alpha_hidden=-1.0 is invalid"),
    (dict(hidden_layer_map="0->1"), "is not 'student_layer:teacher_layer'"),
    (dict(hidden_loss="l1"), "hidden_loss='l1' is invalid"),
    (dict(relation_heads=0), "relation_heads=0 is invalid"),
    (dict(relation_layers="0:1,1:2"), "one 'student:teacher' pair"),
    (dict(teacher_logits="store", alpha_attn_relation=1.0), "need the teacher's activations"),
])
def test_feature_settings_are_checked_and_name_the_field(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)


def test_a_layer_outside_the_models_is_refused_before_training(tiny_tokenizer, llama_factory, tmp_path):
    with pytest.raises(ValueError, match="the teacher has 3 layers .* layer 5 does not exist"):
        feature_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", alpha_hidden=1.0, hidden_layer_map="0:5")
    with pytest.raises(ValueError, match="the student has 2 heads and the teacher 4"):
        feature_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", alpha_attn_map=1.0,
                        student=llama_factory(seed=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                              num_key_value_heads=1))
