"""Offline KD: the top-k "other bucket" divergence, the resumable store, and training with no teacher in memory."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from llm_distill import DistillationCollator
from llm_distill.losses import LOSS_TYPES, token_divergence, topk_divergence
from llm_distill.offline_kd import load_teacher_logits, store_teacher_logits
from test_trainer import config, token_dataset


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_full_topk_equals_full_divergence(loss_type):
    s, t = torch.randn(6, 40) * 3, torch.randn(6, 40) * 3
    logp = F.log_softmax(t / 2.0, -1)
    ids = logp.argsort(-1, descending=True)
    got = topk_divergence(s, ids, logp.gather(-1, ids), loss_type, 2.0, jsd_beta=0.3, skew_lambda=0.2)
    torch.testing.assert_close(got, token_divergence(s, t, loss_type, 2.0, 0.3, 0.2), rtol=1e-5, atol=1e-6)


def test_tail_goes_to_an_other_bucket():
    """KL over k+1 outcomes (top-k + the rest), from the textbook formula in float64; gradients finite."""
    s, t, k = (torch.randn(5, 30) * 2).requires_grad_(), torch.randn(5, 30) * 2, 4
    logp = F.log_softmax(t, -1)
    lp_k, ids = logp.topk(k, -1)
    got = topk_divergence(s, ids, lp_k.half(), "forward_kl")  # fp16 as stored
    q = F.log_softmax(s.double(), -1).exp()
    p_b = torch.cat([lp_k.half().double().exp(), 1 - lp_k.half().double().exp().sum(-1, keepdim=True)], -1)
    q_k = q.gather(-1, ids)
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    want = (p_b * (p_b.log() - q_b.log())).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert torch.all(got <= token_divergence(s, t, "forward_kl") + 1e-5)  # coarse-graining lower-bounds the KL
    got.sum().backward()
    assert torch.isfinite(s.grad).all()
    # The student's optimum matches the teacher's tail mass, it does not zero it (unlike renormalising over top-k).
    q_opt = torch.full((1, 30), 0.0)
    q_opt[0, ids[0]] = lp_k[0]  # student logits = teacher top-k logprobs, tail spread uniformly over the rest
    tail = 1 - lp_k[0].exp().sum()
    rest = torch.ones(30, dtype=torch.bool)
    rest[ids[0]] = False
    q_opt[0, rest] = (tail / rest.sum()).log()
    assert topk_divergence(q_opt, ids[:1], lp_k[:1], "forward_kl").item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_peaked_teacher_whose_fp16_topk_sums_past_one_stays_finite(loss_type):
    """A confident teacher: its top-2 hold all but ~1e-9 of the mass, and fp16 rounding makes the stored top-k sum to
    >= 1. The tail bucket is floored, so reverse-direction losses stay finite (they take log p_other under q)."""
    t = torch.full((4, 50), -20.0)
    t[:, 0], t[:, 1] = 5.0, torch.tensor([0.005, 0.01, 0.0175, 3.0])  # two near-equal favourites (and a control)
    lp_k, ids = F.log_softmax(t, -1).topk(8, -1)
    assert (lp_k.half().float().exp().sum(-1) > 1.0).sum() == 3  # the case under test really occurs
    s = torch.randn(4, 50, requires_grad=True)
    got = topk_divergence(s, ids, lp_k.half(), loss_type, jsd_beta=0.9, skew_lambda=0.1)
    assert torch.isfinite(got).all() and (got >= -1e-6).all() and got.max() < 100.0
    got.sum().backward()
    assert torch.isfinite(s.grad).all()


def _store(teacher, tiny_tokenizer, path, k, rows, **kw):
    return store_teacher_logits(teacher, rows, path, DistillationCollator(tiny_tokenizer), top_k=k,
                                vocab_size=len(tiny_tokenizer), batch_size=3, rows_per_shard=3, device="cpu", **kw)


def test_store_roundtrip_resume_and_settings_check(tiny_tokenizer, llama_factory, tmp_path):
    teacher, rows = llama_factory(seed=1), token_dataset(tiny_tokenizer, n=8)
    out = _store(teacher, tiny_tokenizer, tmp_path / "s", 5, rows)
    ds = load_teacher_logits(out)
    assert len(ds) == 8 and ds.features["topk_logprobs"].feature.feature.dtype == "float16"
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 3
    # Row 0 matches a direct teacher forward: top-5 log-probs of its valid positions, most likely first.
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        logp = F.log_softmax(teacher(input_ids=ids).logits[0, :-1], -1)
    valid = torch.tensor(rows[0]["labels"][1:]) != -100
    want_lp, want_ids = logp[valid].topk(5, -1)
    assert torch.equal(torch.tensor(ds[0]["topk_ids"]), want_ids.int())
    torch.testing.assert_close(torch.tensor(ds[0]["topk_logprobs"]).float(), want_lp, rtol=1e-3, atol=1e-3)
    # Resume: a killed run leaves a shard missing (and maybe a .tmp); only that shard is recomputed.
    shards = sorted((out / "data").glob("*.parquet"))
    before = {s.name: s.stat().st_mtime_ns for s in shards}
    shards[1].unlink()
    (out / "data" / "shard-00002-of-00003.parquet.tmp").write_text("partial")
    _store(teacher, tiny_tokenizer, tmp_path / "s", 5, rows)
    after = {s.name: s.stat().st_mtime_ns for s in sorted((out / "data").glob("*.parquet"))}
    assert after[shards[0].name] == before[shards[0].name] and after[shards[2].name] == before[shards[2].name]
    assert load_teacher_logits(out)["topk_ids"] == ds["topk_ids"]
    with pytest.raises(FileExistsError, match="top_k"):
        _store(teacher, tiny_tokenizer, tmp_path / "s", 7, rows)


def _kl_to_teacher(student, teacher, rows, tok):
    batch = DistillationCollator(tok)([rows[i] for i in range(len(rows))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    valid = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        s, t = student(**inputs).logits[:, :-1][valid], teacher(**inputs).logits[:, :-1][valid]
    return token_divergence(s, t).mean().item()


@pytest.mark.slow
def test_offline_training_needs_no_teacher_and_matches_online(tiny_tokenizer, llama_factory, tmp_path):
    from llm_distill import DistillationTrainer

    teacher, student0 = llama_factory(seed=1, num_hidden_layers=3), llama_factory(seed=2)
    with torch.no_grad():  # a random tiny teacher is nearly uniform; real ones are peaked (top-32 holds most mass)
        teacher.lm_head.weight.mul_(8.0)
    rows = token_dataset(tiny_tokenizer, n=8)
    kw = dict(alpha=1.0, temperature=1.0, max_steps=12, logging_steps=1, learning_rate=3e-2)

    online = DistillationTrainer(model=copy.deepcopy(student0), teacher_model=teacher,
                                 args=config(tmp_path / "online", **kw), train_dataset=rows,
                                 data_collator=DistillationCollator(tiny_tokenizer), processing_class=tiny_tokenizer)
    online.train()
    results = {}
    for k in (len(tiny_tokenizer),):  # the full distribution stored as top-k: must reproduce online KD
        store = _store(teacher, tiny_tokenizer, tmp_path / f"top{k}", k, rows)
        trainer = DistillationTrainer(model=copy.deepcopy(student0), args=config(tmp_path / f"off{k}", teacher_logits=str(store), **kw),
                                      data_collator=DistillationCollator(tiny_tokenizer), processing_class=tiny_tokenizer)
        assert trainer.teacher_model is None
        trainer.train()
        results[k] = trainer
    first = lambda t: next(h for h in t.state.log_history if "kd_loss" in h)["kd_loss"]  # noqa: E731
    # k = V: the same loss as online KD up to fp16 storage of the log-probabilities.
    assert first(results[len(tiny_tokenizer)]) == pytest.approx(first(online), rel=2e-3)
    kl0 = _kl_to_teacher(student0, teacher, rows, tiny_tokenizer)
    kl_online = _kl_to_teacher(online.model, teacher, rows, tiny_tokenizer)
    kl_offline = _kl_to_teacher(results[len(tiny_tokenizer)].model, teacher, rows, tiny_tokenizer)
    assert kl_online < 0.85 * kl0, (kl0, kl_online)
    assert kl_offline == pytest.approx(kl_online, rel=0.02), (kl0, kl_online, kl_offline)


def test_offline_errors(tiny_tokenizer, llama_factory, tmp_path):
    from llm_distill import DistillationTrainer

    store = _store(llama_factory(seed=1), tiny_tokenizer, tmp_path / "s", 4, token_dataset(tiny_tokenizer, n=3),
                   temperature=2.0)
    make = lambda **kw: DistillationTrainer(model=llama_factory(seed=2), processing_class=tiny_tokenizer,  # noqa: E731
                                            args=config(tmp_path, teacher_logits=str(store), **kw))
    with pytest.raises(ValueError, match="stored at temperature 2.0"):
        make(temperature=1.0)
    with pytest.raises(ValueError, match="pass teacher_model=None"):
        DistillationTrainer(model=llama_factory(seed=2), teacher_model=llama_factory(seed=1),
                            args=config(tmp_path, teacher_logits=str(store)), processing_class=tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="store_teacher_logits.py"):
        DistillationTrainer(model=llama_factory(seed=2), args=config(tmp_path, teacher_logits=str(tmp_path / "nope")))
    assert len(make(temperature=2.0).train_dataset) == 3


def _sampled_rows(logits: torch.Tensor, k: int, seed: int = 0):
    """``teacher_topk(selection="sample")`` on fixed logits: a stub head path hands them over as the features."""
    from types import SimpleNamespace

    from llm_distill.offline_kd import teacher_topk

    n, v = logits.shape
    batch = {"input_ids": torch.zeros(1, n + 1, dtype=torch.long), "labels": torch.zeros(1, n + 1, dtype=torch.long)}
    head = lambda model, inputs: SimpleNamespace(features=torch.cat([logits, logits[:1]])[None], weight=None,  # noqa: E731
                                                 bias=None)
    return teacher_topk(None, batch, k, 1.0, v, head, selection="sample",
                        generator=torch.Generator().manual_seed(seed))


def test_sampled_store_rows_are_draw_frequencies():
    """k draws per position: the distinct ids drawn, log(count / k), zero-weight fillers; frequencies -> p."""
    from llm_distill.offline_kd import SAMPLE_FILL

    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0)) * 2
    ids, logw = _sampled_rows(logits, k=20_000)  # more draws than tokens: every slot is a token, weights sum to 1
    w = torch.zeros(3, 20).scatter_(1, ids.long(), logw.exp())
    assert torch.equal(ids.sort(-1).values, torch.arange(20).expand(3, -1).to(ids.dtype))  # each id once
    p = logits.softmax(-1)
    sigma = (p * (1 - p) / 20_000).sqrt()
    assert ((w - p).abs() <= 5 * sigma + 1e-6).all()  # a 5-sigma band per token (60 tokens)
    ids, logw = _sampled_rows(logits, k=4)  # 4 draws: at most 4 distinct ids with weight, the rest fillers
    drawn = logw > SAMPLE_FILL / 2
    assert (drawn.sum(-1) <= 4).all() and torch.allclose(logw.exp().sum(-1), torch.ones(3))
    assert (logw[drawn].exp() * 4).round().sum() == 12  # the counts of the 3 x 4 draws
    assert drawn[:, 0].all()  # most frequent first


def test_sampled_forward_kl_gradient_is_unbiased_and_top_k_is_not():
    """The reason to sample: averaged over draws, the stored-sample forward-KL gradient equals the full one
    (q - p); the top-k + tail bucket gradient with the same k is off by far more than the sampling noise."""
    logits = torch.randn(1, 24, generator=torch.Generator().manual_seed(1))  # flat-ish, like the embedded teacher
    student = torch.randn(1, 24, generator=torch.Generator().manual_seed(2))
    full = student.softmax(-1) - logits.softmax(-1)  # d KL(p || q) / d student logits
    reps = 4000
    ids, logw = _sampled_rows(logits.expand(reps, -1), k=6, seed=3)
    s = student.expand(reps, -1).clone().requires_grad_()
    topk_divergence(s, ids, logw, "forward_kl").sum().backward()
    sampled = s.grad.mean(0, keepdim=True)
    noise = s.grad.std(0) / reps**0.5  # standard error of the mean, per token
    assert ((sampled - full).abs() <= 5 * noise + 1e-4).all()
    lp_k, top = F.log_softmax(logits, -1).topk(6, -1)
    s1 = student.clone().requires_grad_()
    topk_divergence(s1, top, lp_k, "forward_kl").sum().backward()
    assert (s1.grad - full).abs().max() > 10 * noise.max()


def test_sampled_store_trains_forward_kl_only(tiny_tokenizer, llama_factory, tmp_path):
    from llm_distill import DistillationTrainer

    rows = token_dataset(tiny_tokenizer, n=3)
    store = _store(llama_factory(seed=1), tiny_tokenizer, tmp_path / "s", 8, rows, selection="sample", seed=5)
    again = _store(llama_factory(seed=1), tiny_tokenizer, tmp_path / "again", 8, rows, selection="sample", seed=5)
    assert json.loads((store / "manifest.json").read_text())["selection"] == "sample"
    assert load_teacher_logits(store)["topk_ids"] == load_teacher_logits(again)["topk_ids"]  # seeded per shard
    make = lambda **kw: DistillationTrainer(model=llama_factory(seed=2), processing_class=tiny_tokenizer,  # noqa: E731
                                            args=config(tmp_path, teacher_logits=str(store), temperature=1.0, **kw))
    with pytest.raises(ValueError, match="selection=sample, an estimate of the forward KL only"):
        make(loss_type="reverse_kl")
    trainer = make(loss_type="forward_kl", max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2
