"""Cross-tokenizer distillation through DistillationTrainer and the distill job, on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset

from conftest import _corpus_texts, make_llama, write_jsonl
from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer
from llm_distill.cross_tokenizer import CrossTokenizerCollator, cross_tokenize, encode_prompt_response, encode_text
from llm_distill.jobs.distill import main as run_distillation
from llm_distill.models import VocabularyMismatchError, check_vocab_compatible


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, temperature=2.0, alpha=0.5,
                use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return DistillationConfig(**base)


def _rows(student_tok, teacher_tok, n=8):
    texts = [t[200 + 37 * i: 200 + 37 * i + 160] for i, t in enumerate((_corpus_texts(4) * 2)[:n])]
    return [cross_tokenize(encode_prompt_response(t[:40], t[40:], student_tok),
                           encode_prompt_response(t[:40], t[40:], teacher_tok)) for t in texts]


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="cross_tokenizer"):
        DistillationConfig(output_dir="x", cross_tokenizer="gold")
    with pytest.raises(ValueError, match="teacher_logits"):
        DistillationConfig(output_dir="x", cross_tokenizer="uld", teacher_logits="store")
    with pytest.raises(ValueError, match="alpha_cos"):
        DistillationConfig(output_dir="x", cross_tokenizer="hybrid", alpha_cos=1.0)


def test_vocabulary_mismatch_error_names_cross_tokenizer(tiny_tokenizer, xtok_tokenizer):
    with pytest.raises(VocabularyMismatchError, match="cross_tokenizer: hybrid"):
        check_vocab_compatible(make_llama(xtok_tokenizer), make_llama(tiny_tokenizer), tiny_tokenizer)


def test_hybrid_trainer_with_one_tokenizer_matches_the_token_level_trainer(tiny_tokenizer, tmp_path):
    """The trainer wiring (both forwards, fused lm_head features, normalisation) adds nothing of its own."""
    rows = _rows(tiny_tokenizer, tiny_tokenizer, n=4)
    cross_batch = CrossTokenizerCollator(tiny_tokenizer, tiny_tokenizer)(rows)
    plain_batch = DistillationCollator(tiny_tokenizer)(rows)
    teacher, student = make_llama(tiny_tokenizer, seed=1, num_hidden_layers=3), make_llama(tiny_tokenizer, seed=2)
    losses = {}
    for mode, batch in (("none", plain_batch), ("hybrid", cross_batch)):
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, processing_class=tiny_tokenizer,
                                      teacher_processing_class=tiny_tokenizer, args=_config(tmp_path, cross_tokenizer=mode),
                                      train_dataset=Dataset.from_list(rows))
        trainer.model.train()
        losses[mode] = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(losses["hybrid"], losses["none"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["uld", "hybrid"])
def test_trainer_distils_across_tokenizers(tiny_tokenizer, xtok_tokenizer, tmp_path, mode):
    teacher = make_llama(xtok_tokenizer, seed=1, num_hidden_layers=3)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = make_llama(tiny_tokenizer, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, cross_tokenizer=mode),
        train_dataset=Dataset.from_list(_rows(tiny_tokenizer, xtok_tokenizer)), processing_class=tiny_tokenizer,
        teacher_processing_class=xtok_tokenizer, data_collator=CrossTokenizerCollator(tiny_tokenizer, xtok_tokenizer))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["kd_loss"] > 0 and h["ce_loss"] > 0 for h in logged)
    for h in logged:  # the logged terms add up to the loss
        assert h["loss"] == pytest.approx(0.5 * h["kd_loss"] + 0.5 * h["ce_loss"], rel=1e-3)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_kd_term_is_normalised_by_the_step_groups_under_gradient_accumulation(tiny_tokenizer, xtok_tokenizer,
                                                                              tmp_path):
    """2 micro-batches of 4 rows give the gradient of 1 batch of 8 (the KD denominator is the step's group count)."""
    rows = _rows(tiny_tokenizer, xtok_tokenizer, n=8)
    teacher = make_llama(xtok_tokenizer, seed=1)
    grads = {}
    for name, (bs, ga) in {"one": (8, 1), "two": (4, 2)}.items():
        student = make_llama(tiny_tokenizer, seed=2)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
            teacher_processing_class=xtok_tokenizer, data_collator=CrossTokenizerCollator(tiny_tokenizer, xtok_tokenizer),
            args=_config(tmp_path, cross_tokenizer="hybrid", per_device_train_batch_size=bs,
                         gradient_accumulation_steps=ga, max_steps=1, learning_rate=1.0, lr_scheduler_type="constant",
                         max_grad_norm=0.0, optim="sgd"))
        before = copy.deepcopy(student.state_dict())
        trainer.train()
        grads[name] = {k: before[k] - v for k, v in student.state_dict().items()}
    for k in grads["one"]:
        torch.testing.assert_close(grads["two"][k], grads["one"][k], rtol=1e-4, atol=1e-6)


def test_distill_job_across_tokenizers(tiny_tokenizer, xtok_tokenizer, tmp_path):
    paths = {}
    for name, tok, seed in (("teacher", xtok_tokenizer, 1), ("student", tiny_tokenizer, 2)):
        paths[name] = tmp_path / name
        make_llama(tok, seed=seed).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    texts = _corpus_texts(4)
    write_jsonl(tmp_path / "train.jsonl", [{"text": t[:1200]} for t in texts[:3]])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": texts[3][:600]}])
    out = tmp_path / "run"
    results = run_distillation([
        "--teacher_model", str(paths["teacher"]), "--student_model", str(paths["student"]),
        "--dataset", str(tmp_path / "train.jsonl"), "--eval_dataset", str(tmp_path / "eval.jsonl"), "--packing", "true",
        "--max_length", "48", "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--output_dir", str(out), "--use_cpu", "true", "--cross_tokenizer", "hybrid", "--alpha", "0.5",
        "--report_to", "none", "--save_strategy", "no"])
    written = json.loads((out / "distill_results.json").read_text())
    assert written["cross_tokenizer"] == "hybrid" and written["steps"] == 4
    assert results["student_perplexity_after"] < results["student_perplexity_before"]
    assert results["teacher_perplexity"] is None  # the teacher cannot be scored on the student's ids
    # Without cross_tokenizer the same pair is refused up front, and the error names the fix.
    with pytest.raises(VocabularyMismatchError, match="cross_tokenizer"):
        run_distillation(["--teacher_model", str(paths["teacher"]), "--student_model", str(paths["student"]),
                          "--dataset", str(tmp_path / "train.jsonl"),
                          "--eval_dataset", "", "--output_dir", str(out), "--use_cpu", "true", "--max_steps", "1"])


def test_encode_text_pieces_cover_the_document(tiny_tokenizer):
    from llm_distill.cross_tokenizer import split_text

    text = _corpus_texts(1)[0][:2000]
    pieces = split_text(text, tiny_tokenizer, 50)
    assert "".join(pieces) == text.rstrip() or "".join(pieces) == text
    assert all(len(encode_text(p, tiny_tokenizer).input_ids) <= 52 for p in pieces)


def test_embedded_cross_tokenizer_pair_builds_apart_from_the_causal_cache(tmp_path, monkeypatch):
    """The second tokenizer + its student: another size, a BOS the first tokenizer lacks, other specials, its own
    cache folder (the causal cache and its figures are not invalidated)."""
    from conftest import miniature_recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distill.embedded import causal, resolve
    from llm_distill.embedded.xtok import XtokRecipe, build_xtok

    monkeypatch.setenv("LLM_DISTILL_CACHE", str(tmp_path / "cache"))
    base = miniature_recipe()
    recipe = XtokRecipe(vocab_size=280, tokenizer_train_chars=200_000,
                        student=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1))
    root = build_xtok(base, recipe)  # needs only the corpus: the causal build is not triggered
    assert not causal.embedded_dir(base).exists()
    assert root.parent == causal.embedded_dir(base).parent and root.name.startswith("embedded-xtok-")
    causal.build(base)
    assert causal.TinyRecipe().digest() == causal.embedded_dir().name.split("-")[1]  # the causal recipe is unchanged
    first = AutoTokenizer.from_pretrained(causal.embedded_dir(base) / "tokenizer")
    second = AutoTokenizer.from_pretrained(root / "tokenizer_xtok")
    assert len(second) == 280 != len(first)
    assert second("x = 1")["input_ids"][0] == second.bos_token_id == second.convert_tokens_to_ids("<s>")
    assert first("x = 1")["input_ids"][0] != first.bos_token_id
    assert second.eos_token == "</s>" != first.eos_token and second.chat_template
    student = AutoModelForCausalLM.from_pretrained(root / "student_xtok")
    assert student.get_output_embeddings().weight.shape[0] == 280
    assert resolve("embedded:tokenizer_xtok", base).endswith("tokenizer_xtok")


def test_perplexity_per_byte_is_total_nll_over_bytes(tiny_tokenizer, xtok_tokenizer):
    import math

    from llm_distill.cross_tokenizer import perplexity_per_byte

    texts = ["def f(x):\n    return x\n", "naïve café 😀"]
    for tok in (tiny_tokenizer, xtok_tokenizer):
        model = make_llama(tok, seed=3)
        r = perplexity_per_byte(model, tok, texts, batch_size=1)
        nll = 0.0
        for text in texts:  # every token after the start token is predicted, whichever the tokenizer
            ids = tok(text, add_special_tokens=False)["input_ids"]
            full = torch.tensor([[tok.bos_token_id] + ids])  # tiny: <|endoftext|>, xtok: <s>
            logits = model(input_ids=full).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, full[0, 1:], reduction="sum").item()
        n_bytes = sum(len(t.encode()) for t in texts)
        assert r["bytes"] == n_bytes and r["tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"])
                                                            for t in texts)
        assert r["perplexity_per_byte"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)


def test_ce_only_on_cross_tokenizer_rows_needs_no_teacher(tiny_tokenizer, xtok_tokenizer, tmp_path):
    """alpha 0 with cross_tokenizer: the rows keep their alignment columns, the CE term is the plain one."""
    rows = _rows(tiny_tokenizer, xtok_tokenizer, n=4)
    trainer = DistillationTrainer(
        model=make_llama(tiny_tokenizer, seed=2), teacher_model=None, args=_config(tmp_path, cross_tokenizer="hybrid",
                                                                                   alpha=0.0, max_steps=1),
        train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
        data_collator=CrossTokenizerCollator(tiny_tokenizer, xtok_tokenizer))
    trainer.train()
    plain = DistillationTrainer(model=make_llama(tiny_tokenizer, seed=2), teacher_model=None,
                                args=_config(tmp_path, alpha=0.0), processing_class=tiny_tokenizer,
                                train_dataset=Dataset.from_list(rows))
    batch = DistillationCollator(tiny_tokenizer)(rows)
    cross = CrossTokenizerCollator(tiny_tokenizer, xtok_tokenizer)(rows)
    model = make_llama(tiny_tokenizer, seed=2).train()
    torch.testing.assert_close(trainer.compute_loss(model, cross), plain.compute_loss(model, batch))
