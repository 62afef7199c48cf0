"""Each divergence against a straightforward reference, plus the properties a KD loss must have."""

import math

import pytest
import torch
import torch.nn.functional as F

from llm_distill.losses import IGNORE_INDEX, LOSS_TYPES, distillation_loss, token_divergence

torch.manual_seed(0)


def probs(logits, T):
    return torch.softmax(logits.double() / T, dim=-1)


def kl(p, q):  # rows of probabilities, float64, no tricks
    return (p * (p.log() - q.log())).sum(-1)


def reference(student, teacher, loss_type, T, beta=0.5, lam=0.1):
    """Textbook formulas on probabilities in float64 (p = teacher, q = student)."""
    p, q = probs(teacher, T), probs(student, T)
    if loss_type == "forward_kl":
        d = kl(p, q)
    elif loss_type == "reverse_kl":
        d = kl(q, p)
    elif loss_type == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif loss_type == "skew_forward_kl":
        d = kl(p, lam * p + (1 - lam) * q)
    elif loss_type == "skew_reverse_kl":
        d = kl(q, (1 - lam) * p + lam * q)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    return d * T**2


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_matches_reference(loss_type, T):
    s, t = torch.randn(7, 50) * 3, torch.randn(7, 50) * 3
    got = token_divergence(s, t, loss_type, T, jsd_beta=0.3, skew_lambda=0.2)
    want = reference(s, t, loss_type, T, beta=0.3, lam=0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_identical_logits_give_zero(loss_type):
    x = torch.randn(5, 40) * 4
    assert token_divergence(x, x.clone(), loss_type, 2.0).abs().max() < 1e-6


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nonnegative_and_grads_finite(loss_type):
    s = (torch.randn(6, 30) * 10).requires_grad_()
    t = torch.randn(6, 30) * 10
    d = token_divergence(s, t, loss_type, 1.0)
    assert (d >= -1e-6).all()
    d.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_jsd_endpoints_are_the_kl_directions():
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    torch.testing.assert_close(token_divergence(s, t, "jsd", jsd_beta=0.0), token_divergence(s, t, "forward_kl"))
    torch.testing.assert_close(token_divergence(s, t, "jsd", jsd_beta=1.0), token_divergence(s, t, "reverse_kl"))


def test_jsd_endpoints_are_the_limits_of_the_general_formula():
    """The endpoints are not arbitrary: the mixture formula, divided by its vanishing weight, tends to them
    (beta -> 0: JSD / beta -> KL(p||q); beta -> 1: JSD / (1 - beta) -> KL(q||p)). Checked in float64 on the general
    branch (0 < beta < 1), so this fails if either endpoint were mapped to the wrong direction."""
    s, t = torch.randn(4, 20, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64)
    eps = 1e-3
    near_0 = token_divergence(s, t, "jsd", jsd_beta=eps) / eps
    near_1 = token_divergence(s, t, "jsd", jsd_beta=1 - eps) / eps
    torch.testing.assert_close(near_0, token_divergence(s, t, "forward_kl"), rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(near_1, token_divergence(s, t, "reverse_kl"), rtol=2e-2, atol=1e-5)
    assert not torch.allclose(near_0, near_1, rtol=1e-2)  # the two directions really differ on this pair


def test_skew_with_zero_lambda_is_plain_kl():
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    torch.testing.assert_close(token_divergence(s, t, "skew_forward_kl", skew_lambda=0.0),
                               token_divergence(s, t, "forward_kl"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_divergence(s, t, "skew_reverse_kl", skew_lambda=0.0),
                               token_divergence(s, t, "reverse_kl"), rtol=1e-5, atol=1e-6)


def test_high_temperature_limit_is_logit_matching():
    """Hinton et al. 2015, sec. 2.1: T^2 KL -> (1 / 2V) * sum((a - b)^2) for zero-mean logits a, b."""
    V = 64
    s, t = torch.randn(3, V) * 0.5, torch.randn(3, V) * 0.5  # |logits| / T ~ 1e-2: the expansion holds
    a, b = t - t.mean(-1, keepdim=True), s - s.mean(-1, keepdim=True)
    limit = ((a - b) ** 2).sum(-1) / (2 * V)
    got = token_divergence(s, t, "forward_kl", temperature=50.0)
    torch.testing.assert_close(got.double(), limit.double(), rtol=3e-2, atol=1e-6)


def _batch(B=3, S=9, V=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, S, V, generator=g)
    t = torch.randn(B, S, V, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    return s, t, labels


def test_plain_loss_equals_masked_mean_formula():
    s, t, labels = _batch()
    out = distillation_loss(s, t, labels, loss_type="forward_kl", temperature=2.0, alpha=0.3)
    s_, t_, y = s[:, :-1].reshape(-1, 24), t[:, :-1].reshape(-1, 24), labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    kd = reference(s_[keep], t_[keep], "forward_kl", 2.0).mean()
    ce = F.cross_entropy(s_[keep].double(), y[keep])
    torch.testing.assert_close(out.kd_loss.double(), kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce_loss.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), 0.3 * kd + 0.7 * ce, rtol=1e-5, atol=1e-6)
    assert out.num_tokens == keep.sum()


def test_alpha_limits():
    s, t, labels = _batch()
    ce_only = distillation_loss(s, t, labels, alpha=0.0)
    kd_only = distillation_loss(s, t, labels, alpha=1.0)
    torch.testing.assert_close(ce_only.loss, ce_only.ce_loss)
    torch.testing.assert_close(kd_only.loss, kd_only.kd_loss)
    no_teacher = distillation_loss(s, None, labels, alpha=0.0)
    torch.testing.assert_close(no_teacher.loss, ce_only.loss)


def test_masked_positions_do_not_matter():
    s, t, labels = _batch()
    base = distillation_loss(s, t, labels, temperature=2.0).loss
    s2, t2 = s.clone(), t.clone()
    s2[0, :3] += 100.0  # positions 0..2 predict labels 1..3, all -100
    t2[2, 5:] -= 50.0  # positions 5.. predict labels 6.., all -100
    torch.testing.assert_close(distillation_loss(s2, t2, labels, temperature=2.0).loss, base)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_batch_is_zero_without_nan(loss_type):
    s, t, labels = _batch()
    s.requires_grad_()
    labels[:] = IGNORE_INDEX
    out = distillation_loss(s, t, labels, loss_type=loss_type)
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() == 0


def test_num_items_in_batch_normalises_across_micro_batches():
    """Two micro-batches normalised by the global count sum to the loss of the whole batch."""
    s, t, labels = _batch(B=4)
    whole = distillation_loss(s, t, labels).loss
    total = (labels[:, 1:] != IGNORE_INDEX).sum()
    parts = sum(distillation_loss(s[i : i + 2], t[i : i + 2], labels[i : i + 2], num_items_in_batch=total).loss
                for i in (0, 2))
    torch.testing.assert_close(parts, whole)


def test_padded_teacher_vocabulary_is_sliced():
    s, t, labels = _batch(V=24)
    padded = torch.cat([t, torch.randn(3, 9, 8) * 5], dim=-1)  # 8 padding rows the tokenizer never emits
    torch.testing.assert_close(distillation_loss(s, padded, labels).loss, distillation_loss(s, t, labels).loss)


def test_bf16_inputs_are_computed_in_fp32():
    s, t, labels = _batch()
    out = distillation_loss(s.bfloat16(), t.bfloat16(), labels)
    ref = distillation_loss(s.bfloat16().float(), t.bfloat16().float(), labels)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss)


def test_unshifted_mode_for_masked_lms():
    s, t, labels = _batch()
    out = distillation_loss(s, t, labels, alpha=0.0, shift_labels=False)
    keep = labels != IGNORE_INDEX
    assert math.isclose(out.ce_loss.item(), F.cross_entropy(s[keep], labels[keep]).item(), rel_tol=1e-5)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        token_divergence(torch.zeros(1, 3), torch.zeros(1, 3), "kl")
