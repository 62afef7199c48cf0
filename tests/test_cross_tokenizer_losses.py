"""``uld`` / ``hybrid``: properties, the vocabulary map, and hybrid == same-vocabulary KD with one tokenizer."""

from __future__ import annotations

import pytest
import torch

from llm_distill.cross_tokenizer import (
    CrossTokenizerCollator,
    VocabularyMap,
    cross_tokenize,
    cross_tokenizer_kd_sum,
    cross_tokenizer_loss,
    encode_prompt_response,
    encode_text,
    hybrid_divergence,
    uld_divergence,
)
from llm_distill.losses import Divergence, LossWeights, distillation_loss


def test_uld_is_zero_for_a_permutation_and_pads_the_smaller_vocabulary():
    torch.manual_seed(0)
    teacher = torch.randn(5, 7)
    student = teacher[:, torch.randperm(7)]
    assert uld_divergence(student, teacher).abs().max() < 1e-6
    # A student with 3 extra tokens of (near) zero probability is as close as the permutation.
    padded = torch.cat([student, torch.full((5, 3), -1e4)], -1)
    assert uld_divergence(padded, teacher).abs().max() < 1e-6
    other = torch.randn(5, 10, requires_grad=True)
    value = uld_divergence(other, teacher, temperature=2.0)
    assert (value > 0).all() and (value <= 2 * 4.0 + 1e-5).all()  # L1 of two distributions <= 2, times T^2
    value.sum().backward()
    assert other.grad.abs().sum() > 0


def test_vocabulary_map_matches_token_strings(tiny_tokenizer, xtok_tokenizer):
    same = VocabularyMap.build(tiny_tokenizer, tiny_tokenizer, len(tiny_tokenizer), len(tiny_tokenizer) + 2)
    assert torch.equal(same.student_ids, torch.arange(len(tiny_tokenizer)))
    assert torch.equal(same.teacher_ids, same.student_ids)
    assert same.student_rest.numel() == 0 and same.teacher_rest.tolist() == [len(tiny_tokenizer), len(tiny_tokenizer) + 1]
    vmap = VocabularyMap.build(tiny_tokenizer, xtok_tokenizer, len(tiny_tokenizer), len(xtok_tokenizer))
    s_tokens = tiny_tokenizer.convert_ids_to_tokens(vmap.student_ids.tolist())
    assert s_tokens == xtok_tokenizer.convert_ids_to_tokens(vmap.teacher_ids.tolist())
    assert 0 < vmap.num_common < min(len(tiny_tokenizer), len(xtok_tokenizer))
    assert "<|endoftext|>" not in s_tokens and "<s>" not in xtok_tokenizer.convert_ids_to_tokens(vmap.teacher_ids.tolist())
    assert vmap.num_common + vmap.student_rest.numel() == len(tiny_tokenizer)


def test_hybrid_is_zero_when_the_student_carries_the_teacher_distribution_over(tiny_tokenizer, xtok_tokenizer):
    vmap = VocabularyMap.build(tiny_tokenizer, xtok_tokenizer, len(tiny_tokenizer), len(xtok_tokenizer))
    torch.manual_seed(0)
    teacher = torch.randn(4, len(xtok_tokenizer))
    student = torch.full((4, len(tiny_tokenizer)), -1e4)
    student[:, vmap.student_ids] = teacher[:, vmap.teacher_ids]
    rest_t = teacher[:, vmap.teacher_rest]
    student[:, vmap.student_rest[: rest_t.shape[1]]] = rest_t  # the other tokens' masses, in any order
    div = Divergence("forward_kl", 1.0)
    assert hybrid_divergence(student, teacher, vmap, div).abs().max() < 1e-5
    noisy = student + torch.randn_like(student)
    assert (hybrid_divergence(noisy, teacher, vmap, div) > 1e-3).all()


def _same_tokenizer_batch(tokenizer, prompt_response: bool):
    from conftest import _corpus_texts

    texts = [t[:300] for t in _corpus_texts(3)]
    if prompt_response:
        sides = [encode_prompt_response(t[:80], t[80:], tokenizer) for t in texts]
    else:
        sides = [encode_text(t, tokenizer) for t in texts]
    rows = [cross_tokenize(side, side) for side in sides]
    return CrossTokenizerCollator(tokenizer, tokenizer)(rows)


@pytest.mark.parametrize("prompt_response", [False, True])
@pytest.mark.parametrize("loss_type,temperature,alpha", [("forward_kl", 1.0, 1.0), ("forward_kl", 2.0, 0.5),
                                                         ("jsd", 1.5, 0.7)])
def test_hybrid_with_one_tokenizer_equals_same_vocabulary_kd(tiny_tokenizer, prompt_response, loss_type,
                                                             temperature, alpha):
    """Every token is common, every group is one token: the cross-tokenizer path is the same-vocabulary loss."""
    batch = _same_tokenizer_batch(tiny_tokenizer, prompt_response)
    b, s = batch["input_ids"].shape
    v = len(tiny_tokenizer)
    torch.manual_seed(1)
    student_ref = torch.randn(b, s, v, requires_grad=True)
    student_xt = student_ref.detach().clone().requires_grad_(True)
    teacher = torch.randn(b, s, v)
    div = Divergence(loss_type, temperature)
    ref = distillation_loss(student_ref, teacher, batch["labels"], alpha=alpha, divergence=div)
    vmap = VocabularyMap.build(tiny_tokenizer, tiny_tokenizer, v, v)
    out = cross_tokenizer_loss((student_xt, None, None), (teacher, None, None), batch, mode="hybrid", divergence=div,
                               weights=LossWeights.from_alpha(alpha), vocab_map=vmap, chunk_size=10**6)
    assert torch.equal(out.kd_loss, ref.kd_loss)  # bit for bit: the same rows through the same divergence code
    torch.testing.assert_close(out.ce_loss, ref.ce_loss)
    torch.testing.assert_close(out.loss, ref.loss)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(student_xt.grad, student_ref.grad)


def test_chunked_and_fused_kd_equal_the_single_chunk(tiny_tokenizer, xtok_tokenizer):
    vmap = VocabularyMap.build(tiny_tokenizer, xtok_tokenizer, len(tiny_tokenizer), len(xtok_tokenizer))
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(len(tiny_tokenizer), 16, requires_grad=True)
    t_hidden, t_weight = torch.randn(37, 24), torch.randn(len(xtok_tokenizer), 24)
    grads = []
    for mode in ("uld", "hybrid"):
        for chunk in (10**6, 8):
            hidden.grad = weight.grad = None
            value = cross_tokenizer_kd_sum(hidden, weight, t_hidden, t_weight, mode=mode, vocab_map=vmap,
                                           divergence=Divergence("forward_kl", 2.0), chunk_size=chunk)
            value.backward()
            grads.append((value.detach(), hidden.grad.clone(), weight.grad.clone()))
        for a, b in zip(grads[-2], grads[-1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_uld_and_hybrid_train_a_student_toward_the_teacher(tiny_tokenizer, xtok_tokenizer):
    """A few gradient steps on the divergence lower it (the loss is a usable training signal, not just a number)."""
    vmap = VocabularyMap.build(tiny_tokenizer, xtok_tokenizer, len(tiny_tokenizer), len(xtok_tokenizer))
    torch.manual_seed(0)
    teacher = torch.randn(16, len(xtok_tokenizer)) * 3
    for mode in ("uld", "hybrid"):
        student = torch.zeros(16, len(tiny_tokenizer), requires_grad=True)
        opt = torch.optim.Adam([student], lr=0.1)
        values = []
        for _ in range(30):
            loss = cross_tokenizer_kd_sum(student, None, teacher, None, mode=mode, vocab_map=vmap,
                                          divergence=Divergence())
            opt.zero_grad()
            loss.backward()
            opt.step()
            values.append(loss.item())
        assert values[-1] < 0.5 * values[0], (mode, values[0], values[-1])
