"""DistilBERT's triple loss: the pure functions against the original distiller's formulas, masking, the projection,
normalisation; the config's weights and their precedence; DistillationTrainer logging, gradient accumulation and the
learned projection (optimiser, checkpoint, resume, never in the saved student)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer
from llm_distill.losses import (
    IGNORE_INDEX,
    LossWeights,
    chunked_distillation_loss,
    distillation_loss,
    hidden_state_loss,
    triple_loss,
    with_hidden_terms,
)
from llm_distill.trainer import PROJECTION_FILE

from conftest import ragged_dataset

DISTILBERT = LossWeights(kd=5.0, ce=2.0, cos=1.0)  # the weights of DistilBERT's training command


def mlm_batch(B=3, S=10, V=30, H=8, seed=0):
    """Masked-LM-shaped tensors: padding at the end of rows 1 and 2, labels on ~1/3 of the real positions."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, S, V, generator=g) * 2, torch.randn(B, S, V, generator=g) * 2
    hs, ht = torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)
    attention = torch.ones(B, S, dtype=torch.long)
    attention[1, 7:] = 0
    attention[2, 4:] = 0
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[(torch.rand(B, S, generator=g) > 0.35) | (attention == 0)] = IGNORE_INDEX
    labels[0, 0] = 3  # at least one target
    return s, t, hs, ht, attention, labels


def distiller_reference(s, t, hs, ht, attention, labels, T, w: LossWeights, restrict_ce_to_mask: bool):
    """huggingface/transformers examples/research_projects/distillation/distiller.py, Distiller.step (MLM branch),
    written with the same torch modules, in float64."""
    s, t, hs, ht = s.double(), t.double(), hs.double(), ht.double()
    mask = (labels > -1) if restrict_ce_to_mask else attention.bool()
    s_slct, t_slct = s[mask], t[mask]
    loss_ce = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_slct / T, -1), F.softmax(t_slct / T, -1)) * T**2
    loss_mlm = torch.nn.CrossEntropyLoss(ignore_index=-100)(s.view(-1, s.size(-1)), labels.view(-1))
    keep = attention.bool()
    loss_cos = torch.nn.CosineEmbeddingLoss(reduction="mean")(hs[keep], ht[keep], hs.new_ones(int(keep.sum())))
    return w.kd * loss_ce + w.ce * loss_mlm + w.cos * loss_cos, (loss_ce, loss_mlm, loss_cos)


@pytest.mark.parametrize("restrict", [False, True], ids=["kd_on_all_positions", "kd_on_masked_only"])
def test_triple_loss_matches_the_distilbert_distiller(restrict):
    s, t, hs, ht, attention, labels = mlm_batch()
    want, (kd, ce, cos) = distiller_reference(s, t, hs, ht, attention, labels, 2.0, DISTILBERT, restrict)
    out = triple_loss(s, t, labels, hs, ht, attention, weights=DISTILBERT, temperature=2.0, shift_labels=False,
                      kd_mask=None if restrict else attention)
    for got, ref in ((out.loss, want), (out.kd_loss, kd), (out.ce_loss, ce), (out.cos_loss, cos)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert out.mse_loss is None  # weight 0: not reported, so reported terms recombine into the loss


def test_mse_term_is_the_mean_squared_error_of_the_valid_states():
    _, _, hs, ht, attention, _ = mlm_batch()
    out = hidden_state_loss(hs, ht, attention, cos_weight=0.0, mse_weight=3.0)
    keep = attention.bool()
    torch.testing.assert_close(out.mse_loss, F.mse_loss(hs[keep], ht[keep]))
    torch.testing.assert_close(out.loss, 3.0 * out.mse_loss)


def test_cosine_term_ignores_padded_positions():
    _, _, hs, ht, attention, _ = mlm_batch()
    hs.requires_grad_()
    base = hidden_state_loss(hs, ht, attention, mse_weight=1.0)
    hs2, ht2 = hs.detach().clone(), ht.clone()
    hs2[attention == 0] = 1e3 * torch.randn_like(hs2[attention == 0])  # garbage where the attention mask is 0
    ht2[attention == 0] = -7.0
    moved = hidden_state_loss(hs2, ht2, attention, mse_weight=1.0)
    torch.testing.assert_close(moved.loss, base.loss)
    (grad,) = torch.autograd.grad(base.loss, hs)
    assert grad[attention == 0].abs().max() == 0 and grad[attention == 1].abs().max() > 0
    assert base.num_positions == attention.sum()


def test_cosine_is_zero_for_aligned_states_of_any_scale():
    _, _, hs, _, attention, _ = mlm_batch()
    assert hidden_state_loss(hs, 3.0 * hs, attention).cos_loss.abs() < 1e-6
    assert hidden_state_loss(hs, -hs, attention).cos_loss == pytest.approx(2.0)  # opposite: 1 - (-1) per position


def test_projection_path_maps_student_width_to_teacher_width():
    _, _, hs, _, attention, _ = mlm_batch(H=8)
    ht = torch.randn(*hs.shape[:2], 12)
    proj = torch.nn.Linear(8, 12, bias=False)
    out = hidden_state_loss(hs, ht, attention, projection=proj, mse_weight=0.5)
    keep = attention.bool()
    p = proj(hs[keep])
    want = (1 - F.cosine_similarity(p, ht[keep], dim=-1)).mean() + 0.5 * F.mse_loss(p, ht[keep])
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().max() > 0  # the projection learns from the loss
    with pytest.raises(ValueError, match="pass a projection"):
        hidden_state_loss(hs, ht, attention)


def test_all_padding_gives_zero_and_no_nan():
    _, _, hs, ht, attention, _ = mlm_batch()
    hs.requires_grad_()
    out = hidden_state_loss(hs, ht, torch.zeros_like(attention), mse_weight=1.0)
    assert out.loss.item() == 0.0 and out.num_positions == 0
    out.loss.backward()
    assert torch.isfinite(hs.grad).all()


def test_global_position_count_splits_across_micro_batches():
    """Normalised by the whole batch's position count, two halves sum to the whole (gradient accumulation)."""
    _, _, hs, ht, attention, _ = mlm_batch(B=4)
    whole = hidden_state_loss(hs, ht, attention, mse_weight=1.0).loss
    total = attention.sum()
    parts = sum(hidden_state_loss(hs[i:i + 2], ht[i:i + 2], attention[i:i + 2], mse_weight=1.0,
                                  num_items_in_batch=total).loss for i in (0, 2))
    torch.testing.assert_close(parts, whole)


@pytest.mark.parametrize("kd_on_all", [False, True])
def test_chunked_path_equals_the_plain_triple_loss(kd_on_all):
    """The trainer's default (chunked KD + CE, then the hidden terms) == triple_loss, values and gradients."""
    s, t, hs, ht, attention, labels = mlm_batch()
    s.requires_grad_()
    hs.requires_grad_()
    kw = dict(temperature=2.0, shift_labels=False, kd_mask=attention if kd_on_all else None)
    ref = triple_loss(s, t, labels, hs, ht, attention, weights=DISTILBERT, **kw)
    chunked = chunked_distillation_loss(s, None, t, None, labels, chunk_size=4, weights=DISTILBERT, **kw)
    out = with_hidden_terms(chunked, hidden_state_loss(hs, ht, attention, cos_weight=DISTILBERT.cos), DISTILBERT)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.kd_loss, ref.kd_loss)
    for g_out, g_ref in zip(torch.autograd.grad(out.loss, (s, hs)), torch.autograd.grad(ref.loss, (s, hs))):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)


def test_causal_kd_on_all_positions_includes_the_prompt():
    """kd_mask in the labels' frame: position t (predicting t+1) gets KD when token t+1 is real, prompt or not."""
    s, t, _, _, attention, labels = mlm_batch()
    prompt_masked = labels.clone()
    prompt_masked[:, :5] = IGNORE_INDEX
    only_labels = distillation_loss(s, t, prompt_masked, temperature=2.0, alpha=1.0)
    on_all = distillation_loss(s, t, prompt_masked, temperature=2.0, alpha=1.0, kd_mask=attention)
    keep = attention[:, 1:].bool()
    want = F.kl_div(F.log_softmax(s[:, :-1][keep] / 2, -1), F.log_softmax(t[:, :-1][keep] / 2, -1), log_target=True,
                    reduction="batchmean") * 4
    torch.testing.assert_close(on_all.kd_loss, want)
    assert not torch.isclose(on_all.kd_loss, only_labels.kd_loss)
    torch.testing.assert_close(on_all.ce_loss, only_labels.ce_loss)  # CE stays on the labels


# ----------------------------------------------------------------------------- config: weights and precedence


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    return DistillationConfig(**{**base, **kw})


def test_alpha_rules_until_an_explicit_weight_is_set(tmp_path):
    assert cfg(tmp_path, alpha=0.3).loss_weights() == LossWeights(kd=0.3, ce=0.7)
    assert cfg(tmp_path, alpha=0.3, alpha_cos=1.0).loss_weights() == LossWeights(kd=0.3, ce=0.7, cos=1.0)
    explicit = cfg(tmp_path, alpha=0.3, alpha_kd=5.0, alpha_mlm=2.0, alpha_cos=1.0)
    assert explicit.uses_explicit_weights() and explicit.loss_weights() == DISTILBERT
    assert cfg(tmp_path, alpha_clm=1.0, alpha_mse=0.5).loss_weights() == LossWeights(kd=0.0, ce=1.0, mse=0.5)


@pytest.mark.parametrize("kw, message", [
    (dict(alpha_cos=-1.0), "alpha_cos=-1.0 is invalid"),
    (dict(alpha_kd=float("nan")), "alpha_kd=nan is invalid"),
    (dict(alpha_mlm=1.0, alpha_clm=1.0), "set only one"),
    (dict(alpha_kd=0.0, alpha_mlm=0.0), "nothing to train on"),
    (dict(kd_positions="masked"), "kd_positions='masked' is invalid"),
    (dict(mlm_probability=0.0), "mlm_probability=0.0 is invalid"),
    (dict(teacher_logits="store", alpha_cos=1.0), "need the teacher's hidden states"),
])
def test_triple_loss_settings_are_checked_and_name_the_field(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        cfg(tmp_path, **kw)


# ----------------------------------------------------------------------------- trainer


TRIPLE = dict(alpha_kd=5.0, alpha_clm=2.0, alpha_cos=1.0, alpha_mse=0.5, temperature=2.0)


def triple_trainer(tok, llama_factory, out, student=None, **kw):
    """Teacher 32 wide, student 16 wide: the hidden-state terms need the learned projection."""
    args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, logging_steps=2,
                save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0, **TRIPLE)
    args.update(kw)
    return DistillationTrainer(
        model=student if student is not None else llama_factory(seed=2, hidden_size=16, intermediate_size=32),
        teacher_model=llama_factory(seed=1, num_hidden_layers=3), args=DistillationConfig(**args),
        train_dataset=ragged_dataset(tok), data_collator=DistillationCollator(tok), processing_class=tok,
    )


@pytest.mark.parametrize("chunk", [256, 0], ids=["memory_lean", "plain"])
def test_trainer_logs_each_term_and_they_recombine_into_the_loss(tiny_tokenizer, llama_factory, tmp_path, chunk):
    trainer = triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", loss_chunk_size=chunk)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert all(h[k] > 0 for k in ("kd_loss", "ce_loss", "cos_loss", "mse_loss"))
        recombined = 5.0 * h["kd_loss"] + 2.0 * h["ce_loss"] + 1.0 * h["cos_loss"] + 0.5 * h["mse_loss"]
        assert h["loss"] == pytest.approx(recombined, rel=1e-3)


def test_alpha_mode_logs_cos_only_when_asked(tiny_tokenizer, llama_factory, tmp_path):
    trainer = triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", student=llama_factory(seed=2),
                             alpha_kd=None, alpha_clm=None, alpha_mse=None, alpha=0.5, max_steps=2)
    assert trainer.hidden_projection is None  # same widths: the cosine compares the states directly
    trainer.train()
    h = trainer.state.log_history[0]
    assert "mse_loss" not in h and h["loss"] == pytest.approx(0.5 * h["kd_loss"] + 0.5 * h["ce_loss"] + h["cos_loss"],
                                                             rel=1e-3)


def _one_sgd_step(tok, llama_factory, out, batch, accum):
    trainer = triple_trainer(tok, llama_factory, out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", warmup_steps=0,
                             max_grad_norm=0.0, train_sampling_strategy="sequential", logging_steps=1,
                             kd_positions="all")
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    weights["projection"] = trainer.hidden_projection.weight.detach().clone()
    return weights, trainer.state.log_history[0]


def test_gradient_accumulation_matches_one_big_batch(tiny_tokenizer, llama_factory, tmp_path):
    """2 x 4 accumulated == 1 x 8 with every term on (KD on all positions, cosine, MSE, projection): the position
    counts are global like num_items_in_batch, so the loss, each term and the update are the same."""
    big, big_log = _one_sgd_step(tiny_tokenizer, llama_factory, tmp_path / "big", batch=8, accum=1)
    acc, acc_log = _one_sgd_step(tiny_tokenizer, llama_factory, tmp_path / "acc", batch=4, accum=2)
    for key in ("loss", "kd_loss", "ce_loss", "cos_loss", "mse_loss"):
        assert acc_log[key] == pytest.approx(big_log[key], rel=1e-5), key
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)


def test_projection_trains_is_checkpointed_resumes_and_stays_out_of_the_student(tiny_tokenizer, llama_factory, tmp_path):
    ckpt_args = dict(save_strategy="steps", save_steps=2)
    full = triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "full", **ckpt_args)
    before = full.hidden_projection.weight.detach().clone()
    full.train()
    proj = full.hidden_projection
    assert any(p is proj.weight for g in full.optimizer.param_groups for p in g["params"])
    assert not torch.equal(proj.weight, before) and proj.weight.grad is None  # trained; zeroed after each step

    ckpt = tmp_path / "full" / "checkpoint-2"
    saved = load_file(str(ckpt / PROJECTION_FILE))
    assert saved["weight"].shape == (32, 16)
    student_keys = load_file(str(ckpt / "model.safetensors")).keys()
    assert not any("proj" in k and k.startswith("hidden") for k in student_keys) and len(student_keys) > 0
    full.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # a plain HF model: no extra weights
    assert set(reloaded.state_dict()) == set(full.model.state_dict())

    resumed = triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "full", **ckpt_args)
    resumed.train(resume_from_checkpoint=str(ckpt))
    torch.testing.assert_close(resumed.hidden_projection.weight, proj.weight)  # same as never interrupted
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, full.model.state_dict()[k])


def test_resume_without_a_saved_projection_is_refused(tiny_tokenizer, llama_factory, tmp_path):
    plain = triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "p", alpha_cos=None, alpha_mse=None, max_steps=2,
                           save_strategy="steps", save_steps=2)
    plain.train()
    trainer = triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "p")
    with pytest.raises(FileNotFoundError, match=PROJECTION_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "p" / "checkpoint-2"))


def test_mlm_weight_name_on_a_causal_student_is_refused(tiny_tokenizer, llama_factory, tmp_path):
    with pytest.raises(ValueError, match="set alpha_clm instead"):
        triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", alpha_clm=None, alpha_mlm=2.0)


def test_teacher_is_unchanged_by_the_triple_loss(tiny_tokenizer, llama_factory, tmp_path):
    trainer = triple_trainer(tiny_tokenizer, llama_factory, tmp_path / "out", max_steps=2)
    before = copy.deepcopy(trainer.teacher_model.state_dict())
    trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in trainer.teacher_model.state_dict().items())
