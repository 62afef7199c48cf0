"""The memory-lean loss: chunked / fused-linear == plain reference, for losses and gradients, and in the trainer."""

import logging

import pytest
import torch
import torch.nn.functional as F

from llm_distill.head_features import LMHeadPath, plain_lm_head
from llm_distill.losses import IGNORE_INDEX, LOSS_TYPES, chunked_distillation_loss, distillation_loss

B, S, HS, HT, V = 3, 11, 16, 24, 97


def batch(seed=0, vs=V, vt=V, mask=True):
    """Student/teacher hidden states + heads (teacher vocab may be padded) and labels with masked positions."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, S, HS, generator=g, dtype=torch.float64).float().requires_grad_()
    ws = (torch.randn(vs, HS, generator=g) * 0.5).requires_grad_()
    bs = (torch.randn(vs, generator=g) * 0.1).requires_grad_()
    ht, wt = torch.randn(B, S, HT, generator=g), torch.randn(vt, HT, generator=g) * 0.5
    labels = torch.randint(0, min(vs, vt), (B, S), generator=g)
    if mask:
        labels[0, :4] = IGNORE_INDEX  # a prompt
        labels[1, -3:] = IGNORE_INDEX  # padding
        labels[2, 5] = IGNORE_INDEX  # a hole
    return hs, ws, bs, ht, wt, labels


KW = dict(temperature=2.0, jsd_beta=0.3, skew_lambda=0.2, num_items_in_batch=40)


def plain(hs, ws, bs, ht, wt, labels, **kw):
    return distillation_loss(F.linear(hs, ws, bs), F.linear(ht, wt) if ht is not None else None, labels, **kw)


def assert_same(a, b, grads_a, grads_b):
    for name in ("loss", "kd_loss", "ce_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6, msg=name)
    assert a.num_tokens == b.num_tokens
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("chunk_size", [1, 23, 4, 5, 1000])  # divide N=23 (23 chunks, 1 chunk) / do not / > N
def test_fused_matches_plain_loss_and_grads(loss_type, chunk_size):
    hs, ws, bs, ht, wt, labels = batch()
    kw = dict(KW, loss_type=loss_type, alpha=0.7)
    ref = plain(hs, ws, bs, ht, wt, labels, **kw)
    assert ref.num_tokens == 23  # the valid (shifted, unmasked) positions the chunk sizes above are chosen for
    ref_grads = torch.autograd.grad(ref.loss, (hs, ws, bs))
    out = chunked_distillation_loss(hs, ws, ht, wt, labels, student_bias=bs, chunk_size=chunk_size, **kw)
    assert_same(ref, out, ref_grads, torch.autograd.grad(out.loss, (hs, ws, bs)))


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # T = 1 shares the student's softmax between KD and CE
@pytest.mark.parametrize("vs,vt", [(V, V), (V, V + 31), (V + 7, V)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_closed_form_forward_kl_gradient_equals_autograd(temperature, vs, vt, alpha):
    """forward_kl takes a closed-form gradient (q - p, q - onehot); every branch of it against the plain path."""
    hs, ws, bs, ht, wt, labels = batch(3, vs=vs, vt=vt)
    kw = dict(KW, loss_type="forward_kl", alpha=alpha, temperature=temperature)
    ref = plain(hs, ws, bs, ht, wt, labels, **kw)
    out = chunked_distillation_loss(hs, ws, ht, wt, labels, student_bias=bs, chunk_size=6, **kw)
    assert_same(ref, out, torch.autograd.grad(ref.loss, (hs, ws, bs)), torch.autograd.grad(out.loss, (hs, ws, bs)))


@pytest.mark.parametrize("alpha", [0.6, 1.0])  # 1.0: the KD-only path that skips CE's V-wide passes
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss_type,params", [
    ("reverse_kl", {}), ("tvd", {}),
    ("jsd", {"jsd_beta": 0.0}), ("jsd", {"jsd_beta": 0.5}), ("jsd", {"jsd_beta": 1.0}),
    ("skew_forward_kl", {"skew_lambda": 0.0}), ("skew_forward_kl", {"skew_lambda": 1.0}),
    ("skew_reverse_kl", {"skew_lambda": 0.0}), ("skew_reverse_kl", {"skew_lambda": 1.0}),
])
def test_closed_form_gradient_of_every_divergence_equals_autograd(temperature, loss_type, params, alpha):
    """Every divergence takes a closed-form gradient (h - q sum h); at T = 1 the student's softmax is shared with CE,
    and at the parameter endpoints (JSD beta 0 / 1, skew lambda 0 / 1) the formulas must reduce to their limits."""
    hs, ws, bs, ht, wt, labels = batch(5)
    kw = dict(KW, loss_type=loss_type, alpha=alpha, temperature=temperature, **params)
    ref = plain(hs, ws, bs, ht, wt, labels, **kw)
    out = chunked_distillation_loss(hs, ws, ht, wt, labels, student_bias=bs, chunk_size=7, **kw)
    if not ref.loss.requires_grad:  # skew forward KL at lambda 1 is KL(p || p) = 0: no dependence on the student
        assert out.loss.item() == 0.0 == ref.loss.item()
        assert all(not g.any() for g in torch.autograd.grad(out.loss, (hs, ws, bs), allow_unused=True) if g is not None)
        return
    assert_same(ref, out, torch.autograd.grad(ref.loss, (hs, ws, bs)), torch.autograd.grad(out.loss, (hs, ws, bs)))


def test_upstream_gradient_scale_is_applied():
    """backward() of ``c * loss`` (DDP's loss x world_size, a user's weighting) scales every gradient by c; a
    plain ``loss.backward()`` takes the unscaled fast path. Both must equal the plain path's gradients."""
    hs, ws, bs, ht, wt, labels = batch(2)
    kw = dict(KW, loss_type="jsd", alpha=0.6)
    ref = plain(hs, ws, bs, ht, wt, labels, **kw)
    out = chunked_distillation_loss(hs, ws, ht, wt, labels, student_bias=bs, chunk_size=5, **kw)
    for c in (1.0, 2.5):
        want = torch.autograd.grad(c * ref.loss, (hs, ws, bs), retain_graph=True)
        got = torch.autograd.grad(c * out.loss if c != 1.0 else out.loss, (hs, ws, bs), retain_graph=True)
        for g_want, g_got in zip(want, got):
            torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunked_logits_matches_plain_grads_wrt_logits(loss_type):
    hs, ws, bs, ht, wt, labels = batch(1)
    s_logits = F.linear(hs, ws, bs).detach().requires_grad_()  # (B, S, V)
    t_logits = F.linear(ht, wt)
    kw = dict(KW, loss_type=loss_type, alpha=0.4)
    ref = distillation_loss(s_logits, t_logits, labels, **kw)
    out = chunked_distillation_loss(s_logits, None, t_logits, None, labels, chunk_size=3, **kw)
    assert_same(ref, out, torch.autograd.grad(ref.loss, s_logits), torch.autograd.grad(out.loss, s_logits))


@pytest.mark.parametrize("vs,vt", [(V, V + 31), (V + 7, V)])  # teacher / student embedding padded
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padded_vocab_is_sliced_like_the_plain_path(vs, vt, loss_type):
    hs, ws, bs, ht, wt, labels = batch(2, vs=vs, vt=vt)
    kw = dict(KW, loss_type=loss_type, alpha=0.5)
    ref = plain(hs, ws, bs, ht, wt, labels, **kw)
    out = chunked_distillation_loss(hs, ws, ht, wt, labels, student_bias=bs, chunk_size=6, **kw)
    assert_same(ref, out, torch.autograd.grad(ref.loss, (hs, ws, bs)), torch.autograd.grad(out.loss, (hs, ws, bs)))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_limits_and_ce_only(alpha):
    hs, ws, bs, ht, wt, labels = batch(3)
    ref = plain(hs, ws, bs, ht, wt, labels, alpha=alpha)
    out = chunked_distillation_loss(hs, ws, ht, wt, labels, student_bias=bs, alpha=alpha, chunk_size=7)
    assert_same(ref, out, torch.autograd.grad(ref.loss, (hs, ws)), torch.autograd.grad(out.loss, (hs, ws)))
    no_teacher = chunked_distillation_loss(hs, ws, None, None, labels, student_bias=bs, alpha=0.0, chunk_size=7)
    torch.testing.assert_close(no_teacher.loss, ref.ce_loss if alpha == 0 else no_teacher.ce_loss)
    assert no_teacher.kd_loss == 0


def test_gradient_accumulation_normalisation():
    """Two halves normalised by the global count add up to the whole batch (num_items_in_batch semantics)."""
    hs, ws, bs, ht, wt, labels = batch(4)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    whole = chunked_distillation_loss(hs, ws, ht, wt, labels, chunk_size=5)
    halves = [chunked_distillation_loss(hs[i], ws, ht[i], wt, labels[i], chunk_size=5, num_items_in_batch=n)
              for i in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(halves[0].loss + halves[1].loss, whole.loss, rtol=1e-6, atol=1e-6)


def test_all_masked_is_zero_without_nan():
    hs, ws, bs, ht, wt, labels = batch(5)
    labels[:] = IGNORE_INDEX
    out = chunked_distillation_loss(hs, ws, ht, wt, labels, chunk_size=4)
    out.loss.backward()
    assert out.loss == 0 and out.num_tokens == 0
    assert torch.all(hs.grad == 0) and torch.all(ws.grad == 0)


def test_bf16_inputs_fp32_math():
    hs, ws, bs, ht, wt, labels = batch(6)
    hs16, ws16 = hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16().requires_grad_()
    ref = plain(hs16, ws16, None, ht.bfloat16(), wt.bfloat16(), labels)
    out = chunked_distillation_loss(hs16, ws16, ht.bfloat16(), wt.bfloat16(), labels, chunk_size=4)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    g_ref, g_out = torch.autograd.grad(ref.loss, (hs16, ws16)), torch.autograd.grad(out.loss, (hs16, ws16))
    assert g_out[0].dtype == g_out[1].dtype == torch.bfloat16
    for a, b in zip(g_ref, g_out):  # same bf16 casts as autograd; only fp32 accumulation order differs
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------ models / trainer


def test_lm_head_path_on_llama_and_fallbacks(llama_factory, tiny_tokenizer, caplog):
    model = llama_factory(seed=0)
    x = torch.randint(0, len(tiny_tokenizer), (2, 9))
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    for role in ("student", "teacher"):
        feats = LMHeadPath(role)(model, inputs)
        assert feats.weight is model.lm_head.weight  # fused: hidden states + the head itself
        torch.testing.assert_close(F.linear(feats.features, feats.weight), model(**inputs).logits, rtol=1e-5, atol=1e-5)

    capped = llama_factory(seed=0)
    capped.config.final_logit_softcapping = 30.0  # Gemma-style: logits != lm_head(hidden)
    assert plain_lm_head(capped)[0] is None
    with caplog.at_level(logging.WARNING):
        feats = LMHeadPath("student")(capped, inputs)
    assert feats.weight is None and feats.features.shape == (2, 9, model.config.vocab_size)
    assert "built in full" in caplog.text

    from peft import LoraConfig, get_peft_model

    lora_head = get_peft_model(llama_factory(seed=0), LoraConfig(target_modules=["lm_head", "q_proj"]))
    assert plain_lm_head(lora_head)[0] is None  # a LoRA head is not the plain weight
    lora_body = get_peft_model(llama_factory(seed=0), LoraConfig(target_modules=["q_proj"]))
    assert plain_lm_head(lora_body)[0] is not None


@pytest.mark.parametrize("loss_type", ["jsd"])
def test_trainer_chunked_equals_plain_training(tiny_tokenizer, llama_factory, tmp_path, loss_type):
    """Same seed, same data: loss_chunk_size=5 and 0 give the same logged losses and the same trained weights."""
    from test_trainer import make_trainer

    results = []
    for chunk in (5, 0):
        trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path / str(chunk), loss_type=loss_type,
                               loss_chunk_size=chunk, gradient_accumulation_steps=2, max_steps=2, logging_steps=1)
        trainer.train()
        logs = [h[k] for h in trainer.state.log_history if "loss" in h for k in ("loss", "kd_loss", "ce_loss")]
        results.append((logs, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
        if chunk:
            assert trainer._lm_head_paths["student"].fused and trainer._lm_head_paths["teacher"].fused
    (logs_c, sd_c), (logs_p, sd_p) = results
    assert logs_c == pytest.approx(logs_p, rel=1e-4)
    for k in sd_p:
        torch.testing.assert_close(sd_c[k], sd_p[k], rtol=1e-4, atol=1e-5)


def test_config_range_check():
    from llm_distill.config import DistillationConfig

    with pytest.raises(ValueError, match="loss_chunk_size"):
        DistillationConfig(output_dir="x", loss_chunk_size=-1)
    assert DistillationConfig(output_dir="x").loss_chunk_size > 0  # the memory-lean path is the default
