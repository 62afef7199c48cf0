"""Feature-level losses against hand-computed references: MiniLMv2 relations (explicit loops over heads, queries and
keys on a tiny attention layer), the attention-map loss, RKD (its formula, loop by loop), the hidden-layer map, and
the properties every term keeps: identical inputs -> 0, masking, all-masked -> 0 without NaN, gradient-accumulation
normalisation (two halves with the global count == the whole)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llm_distill.features.losses import (
    attention_map_loss,
    attention_probs,
    attention_relation_loss,
    hidden_map_loss,
    pooled_embeddings,
    relation_log_probs,
    rkd_loss,
)


def tiny_attention_qkv(B=2, S=5, D=12, W=12, seed=0):
    """Q, K, V of a tiny attention layer (three random linear maps of random inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    wq, wk, wv = (torch.randn(D, W, generator=g) / D**0.5 for _ in range(3))
    return x @ wq, x @ wk, x @ wv


def relation_by_hand(x, R, key_mask, causal):
    """rel[b, r, i, j] = exp(<x_r[i], x_r[j]> / sqrt(W/R)) / sum over allowed j' - with Python loops."""
    B, S, W = x.shape
    dr = W // R
    out = torch.zeros(B, R, S, S, dtype=torch.float64)
    for b, r, i in itertools.product(range(B), range(R), range(S)):
        allowed = [j for j in range(S) if key_mask[b, j] and (not causal or j <= i)]
        head = x[b, :, r * dr:(r + 1) * dr]  # (S, W/R)
        scores = {j: float(head[i] @ head[j]) / math.sqrt(dr) for j in allowed}
        z = sum(math.exp(v) for v in scores.values())
        for j in allowed:
            out[b, r, i, j] = math.exp(scores[j]) / z
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_relation_matrices_match_a_hand_computed_reference(causal):
    q, _, _ = tiny_attention_qkv()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    want = relation_by_hand(q.double(), 3, mask, causal)
    got = relation_log_probs(q, 3, mask, causal).exp().double()
    allowed = mask[:, None, None, :].expand_as(got)
    torch.testing.assert_close(got[allowed], want[allowed], atol=1e-6, rtol=1e-5)
    assert got[~allowed].max() == 0.0  # masked keys get no probability


def test_relation_loss_matches_the_minilmv2_formula_by_hand():
    s_qkv, t_qkv = tiny_attention_qkv(W=12, seed=0), tiny_attention_qkv(W=8, seed=1)  # widths differ: no projection
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    R, total = 2, 0.0
    for s, t in zip(s_qkv, t_qkv):
        rs, rt = relation_by_hand(s.double(), R, mask, True), relation_by_hand(t.double(), R, mask, True)
        for b, r, i in itertools.product(range(2), range(R), range(5)):
            if mask[b, i]:
                total += sum(float(rt[b, r, i, j] * (math.log(rt[b, r, i, j]) - math.log(rs[b, r, i, j])))
                             for j in range(5) if rt[b, r, i, j] > 0) / R
    got = attention_relation_loss(s_qkv, t_qkv, mask, relation_heads=R, causal=True)
    assert got.item() == pytest.approx(total / 8, rel=1e-5)  # 8 valid query positions
    assert attention_relation_loss(t_qkv, t_qkv, mask, relation_heads=R).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_loss_accumulates_exactly_and_survives_an_all_masked_batch():
    s_qkv, t_qkv = tiny_attention_qkv(B=4, seed=0), tiny_attention_qkv(B=4, seed=1)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[3, 2:] = 0
    whole = attention_relation_loss(s_qkv, t_qkv, mask, relation_heads=4)
    n = mask.sum()
    halves = sum(attention_relation_loss([x[sl] for x in s_qkv], [x[sl] for x in t_qkv], mask[sl], relation_heads=4,
                                         num_items_in_batch=n) for sl in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(halves, whole)
    s = [x.requires_grad_() for x in s_qkv]
    zero = attention_relation_loss(s, t_qkv, torch.zeros(4, 5), relation_heads=4)
    zero.backward()
    assert zero.item() == 0.0 and all(torch.isfinite(x.grad).all() for x in s)
    with pytest.raises(ValueError, match="relation_heads=5 does not divide"):
        attention_relation_loss(s_qkv, t_qkv, mask, relation_heads=5)


def test_attention_map_loss_by_hand_and_head_check():
    q, k, _ = tiny_attention_qkv()
    q2, k2, _ = tiny_attention_qkv(seed=3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    heads = lambda x: x.view(2, 5, 3, 4).transpose(1, 2)  # noqa: E731
    a_s = attention_probs(heads(q), heads(k), mask, causal=True)
    a_t = attention_probs(heads(q2), heads(k2), mask, causal=True)
    want = sum(float(((a_s[b, :, i] - a_t[b, :, i]) ** 2)[:, mask[b]].sum(-1).mean())
               for b in range(2) for i in range(5) if mask[b, i]) / 8
    assert attention_map_loss(a_s, a_t, mask).item() == pytest.approx(want, rel=1e-6)
    assert attention_map_loss(a_t, a_t, mask).item() == 0.0
    with pytest.raises(ValueError, match="same number of heads"):
        attention_map_loss(a_s[:, :2], a_t, mask)


def rkd_by_hand(s, t, wd=1.0, wa=2.0):
    n = s.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = {p: float((s[p[0]] - s[p[1]]).norm()) for p in pairs}
    dt = {p: float((t[p[0]] - t[p[1]]).norm()) for p in pairs}
    mus, mut = sum(ds.values()) / len(pairs), sum(dt.values()) / len(pairs)

    def huber(a, b):
        x = abs(a - b)
        return 0.5 * x * x if x < 1 else x - 0.5

    dist = sum(huber(ds[p] / mus, dt[p] / mut) for p in pairs) / len(pairs)

    def cos_at(x, i, j, k):
        a, c = x[i] - x[j], x[k] - x[j]
        return float(a @ c / (a.norm() * c.norm()))

    triplets = [(i, j, k) for i, j, k in itertools.product(range(n), repeat=3) if len({i, j, k}) == 3]
    angle = sum(huber(cos_at(s, *tr), cos_at(t, *tr)) for tr in triplets) / len(triplets)
    return wd * dist + wa * angle


def test_rkd_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g).double(), (torch.randn(5, 11, generator=g) * 3).double()
    assert rkd_loss(s, t).item() == pytest.approx(rkd_by_hand(s, t), rel=1e-6)
    assert rkd_loss(s, t, angle_weight=0.0).item() == pytest.approx(rkd_by_hand(s, t, wa=0.0), rel=1e-6)
    # invariant to the scale of either side (distances are normalised by their mean, angles are scale free)
    assert rkd_loss(s * 10, s).item() == pytest.approx(0.0, abs=1e-9)
    single = torch.randn(1, 7, requires_grad=True)
    assert rkd_loss(single, torch.randn(1, 3)).item() == 0.0


def test_pooled_embeddings_ignore_padding():
    h = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(pooled_embeddings(h, mask), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))


def test_hidden_map_loss_is_the_mean_of_per_layer_terms():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 6, generator=g) for _ in range(2)]
    t = [torch.randn(2, 4, 6, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    valid = mask.bool()
    mse = sum(float((a[valid] - b[valid]).pow(2).mean(-1).sum()) / 6 for a, b in zip(s, t)) / 2
    cos = sum(float((1 - F.cosine_similarity(a[valid], b[valid], dim=-1)).sum()) / 6 for a, b in zip(s, t)) / 2
    assert hidden_map_loss(s, t, mask, loss="mse").item() == pytest.approx(mse, rel=1e-6)
    assert hidden_map_loss(s, t, mask, loss="cosine").item() == pytest.approx(cos, rel=1e-6)
    assert hidden_map_loss(s, t, mask, loss="mse", num_items_in_batch=12).item() == pytest.approx(mse / 2, rel=1e-6)
    with pytest.raises(ValueError, match="hidden_loss='l1'"):
        hidden_map_loss(s, t, mask, loss="l1")
