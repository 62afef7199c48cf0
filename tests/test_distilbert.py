"""The masked-LM path end to end: BERT masking, fixed held-out masks, DistillationTrainer on BERT, the whole
DistilBERT recipe through run_distillation, and the embedded masked-LM teacher builder on a miniature recipe."""

import json
from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from llm_distill import DistillationConfig, DistillationTrainer

from llm_distill.embedded import causal as tiny
from llm_distill.data import DataValidationError, for_masked_lm, mask_once, masked_lm_collator
from llm_distill.losses import IGNORE_INDEX
from llm_distill.student_init import student_from_teacher
from llm_distill.jobs.distill import main as run_distillation

from conftest import _corpus_texts, miniature_recipe, write_jsonl


def make_bert(tokenizer, seed=0, layers=4):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64,
                                      pad_token_id=tokenizer.pad_token_id, type_vocab_size=1)).eval()


def token_rows(tokenizer, n=8, length=24):
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"input_ids": torch.randint(10, len(tokenizer), (length - i,), generator=g).tolist()}
                              for i in range(n)])


def test_fixed_masking_is_deterministic_and_only_labels_masked_tokens(tiny_tokenizer):
    rows = token_rows(tiny_tokenizer)
    rows = Dataset.from_list([{"input_ids": r["input_ids"] + [tiny_tokenizer.eos_token_id]} for r in rows])
    a, b = mask_once(rows, tiny_tokenizer, 0.3, seed=1), mask_once(rows, tiny_tokenizer, 0.3, seed=1)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert mask_once(rows, tiny_tokenizer, 0.3, seed=2)["labels"] != a["labels"]
    n_masked = n_total = 0
    for orig, masked in zip(rows, a):
        ids, labels = orig["input_ids"], masked["labels"]
        assert len(masked["input_ids"]) == len(ids) and labels[-1] == IGNORE_INDEX  # EOS (special): never a target
        for tok, new, lab in zip(ids, masked["input_ids"], labels):
            if lab == IGNORE_INDEX:
                assert new == tok  # unmasked positions are untouched
            else:
                assert lab == tok  # the target is the original token
                n_masked += 1
        n_total += len(ids) - 1
    assert 0.15 < n_masked / n_total < 0.45


def test_masked_lm_data_needs_text_rows_and_a_mask_token(tiny_tokenizer):
    with pytest.raises(DataValidationError, match="Use rows with a 'text' field"):
        for_masked_lm(token_rows(tiny_tokenizer), "prompt_response", "x.jsonl")
    no_mask = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, pad_token="<|pad|>")
    with pytest.raises(DataValidationError, match="needs a tokenizer with a mask token"):
        masked_lm_collator(no_mask)


def bert_trainer(tok, tmp_path, **kw):
    teacher = make_bert(tok, seed=1)
    student = student_from_teacher(teacher, [0, 2])
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0,
                alpha_kd=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0, kd_positions="all", mlm_probability=0.3)
    args.update(kw)
    return DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(**args),
                               train_dataset=token_rows(tok),
                               data_collator=masked_lm_collator(tok, args["mlm_probability"], seed=0),
                               processing_class=tok)


def test_bert_student_distils_with_the_triple_loss(tiny_tokenizer, tmp_path):
    trainer = bert_trainer(tiny_tokenizer, tmp_path)
    assert trainer._shift_labels is False and trainer.hidden_projection is None
    trainer.train()
    for h in (h for h in trainer.state.log_history if "loss" in h):
        assert h["loss"] == pytest.approx(5 * h["kd_loss"] + 2 * h["ce_loss"] + h["cos_loss"], rel=1e-3)
        assert h["cos_loss"] > 0 and h["kd_loss"] > 0
    assert trainer._lm_head_paths["student"].fused is False  # BERT's MLM head is not a plain Linear: logits path


def test_memory_lean_fallback_equals_plain_path_on_bert(tiny_tokenizer, tmp_path):
    losses = []
    for chunk in (4, 0):
        trainer = bert_trainer(tiny_tokenizer, tmp_path / str(chunk), loss_chunk_size=chunk, max_steps=1)
        trainer.train()
        losses.append(trainer.state.log_history[0])
    for key in ("loss", "kd_loss", "ce_loss", "cos_loss"):
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-5), key


def test_alpha_clm_on_a_masked_lm_student_is_refused(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="set alpha_mlm instead"):
        bert_trainer(tiny_tokenizer, tmp_path, alpha_mlm=None, alpha_clm=2.0)


@pytest.fixture
def bert_paths(tmp_path, tiny_tokenizer):
    make_bert(tiny_tokenizer, seed=1).save_pretrained(tmp_path / "bert")
    tiny_tokenizer.save_pretrained(tmp_path / "bert")
    texts = _corpus_texts(6)
    return {"teacher": tmp_path / "bert",
            "train": write_jsonl(tmp_path / "train.jsonl", [{"text": t[:1500]} for t in texts[:4]]),
            "eval": write_jsonl(tmp_path / "eval.jsonl", [{"text": t[:1500]} for t in texts[4:6]])}


def distilbert_args(paths, out, *extra):
    return ["--config", "configs/distilbert.yaml", "--teacher_model", str(paths["teacher"]),
            "--dataset", str(paths["train"]), "--eval_dataset", str(paths["eval"]), "--max_length", "32",
            "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "3",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--output_dir", str(out),
            "--use_cpu", "true", *extra]


def test_distilbert_recipe_end_to_end(bert_paths, tmp_path):
    out = tmp_path / "run"
    results = run_distillation(distilbert_args(bert_paths, out, "--student_layers", "0", "2"))
    assert results["objective"] == "masked_lm" and results["steps"] == 3
    assert results["loss_weights"] == {"kd": 5.0, "ce": 2.0, "cos": 1.0, "mse": 0.0}
    assert 0 <= results["student_accuracy_after"] <= 1 and results["eval_tokens"] > 0
    written = json.loads((out / "distill_results.json").read_text())
    assert written["student"] == "teacher_layers"
    student = AutoModelForMaskedLM.from_pretrained(out)  # a plain HF masked LM
    assert isinstance(student, BertForMaskedLM) and student.config.num_hidden_layers == 2
    # Fixed held-out masks: another run (different loss) scores the teacher on exactly the same tokens.
    other = run_distillation(distilbert_args(bert_paths, tmp_path / "mlm_only", "--alpha_kd", "0", "--alpha_cos", "0",
                                             "--max_steps", "1"))
    assert other["teacher_perplexity"] == results["teacher_perplexity"]
    assert other["eval_tokens"] == results["eval_tokens"]


def test_causal_student_for_a_masked_teacher_is_refused(bert_paths, saved_pair, tmp_path):
    args = distilbert_args(bert_paths, tmp_path / "r", "--student_init", "pretrained",
                           "--student_model", str(saved_pair["student"]), "--tokenizer", str(bert_paths["teacher"]))
    with pytest.raises(ValueError, match="teacher is a masked LM but the student is a causal LM"):
        run_distillation(args)


@pytest.mark.slow
def test_embedded_mlm_teacher_builder_is_deterministic_and_reloadable(tmp_path, monkeypatch):
    from llm_distill.embedded.masked import TinyMLMRecipe, build_mlm_teacher, mlm_dir

    monkeypatch.setenv("LLM_DISTILL_CACHE", str(tmp_path / "cache"))
    base = miniature_recipe(teacher_steps=1, teacher_layers=1)
    recipe = replace(TinyMLMRecipe(), train_chars=50_000, seq_len=32, steps=3, batch_size=2,
                     teacher=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    path = build_mlm_teacher(base, recipe)
    assert path.parent == mlm_dir(base, recipe) and path.parent != tiny.embedded_dir(base)
    assert mlm_dir(base, replace(recipe, steps=4)) != path.parent  # its own recipe hash names its folder
    teacher = AutoModelForMaskedLM.from_pretrained(path)
    assert isinstance(teacher, BertForMaskedLM) and teacher.config.num_hidden_layers == 2
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).mask_token == "<|mask|>"
    first = {k: v.clone() for k, v in teacher.state_dict().items()}
    again = AutoModelForMaskedLM.from_pretrained(build_mlm_teacher(base, recipe, force=True))
    for k, v in again.state_dict().items():
        assert torch.equal(v, first[k]), f"{k} differs between two builds with the same seed"


def test_prune_script_on_a_masked_lm_then_distil_it(bert_paths, tmp_path):
    """scripts/prune.py on a BERT: MLM-loss scores, masked-token perplexity on fixed masks, a head count BertConfig
    cannot describe saved with pruning.json; then the pruned folder is the student of the DistilBERT recipe, which
    scores teacher and pruned student on the very masks the prune report used (same figures, independent code)."""
    from llm_distill.jobs.prune import format_report
    from llm_distill.jobs.prune import main as run_pruning
    from llm_distill.pruning import layer_shapes, load_pruned

    out = tmp_path / "pruned"
    data = ["--dataset", str(bert_paths["train"]), "--eval_dataset", str(bert_paths["eval"]), "--max_length", "32",
            "--max_eval_samples", "8", "--mlm_probability", "0.15", "--packing", "true"]  # prune packs as told (#18)
    results = run_pruning(["--model", str(bert_paths["teacher"]), "--output_dir", str(out), "--keep_heads", "2",
                           "--drop_layers", "1", "--standard_config", "false", "--importance", "gradient",
                           "--calibration_samples", "4", "--batch_size", "2", "--latency_repeats", "0", *data])
    assert results["objective"] == "masked_lm" and "masked-token ppl" in format_report(results)
    assert results["after"]["layers"] == 3 and results["after"]["heads_per_layer"] == 2
    assert [s.num_attention_heads for s in layer_shapes(load_pruned(out))] == [2, 2, 2]

    distilled = run_distillation(distilbert_args(bert_paths, tmp_path / "recovered", "--student_model", str(out),
                                                 "--student_init", "pretrained", *data))
    assert distilled["objective"] == "masked_lm" and distilled["steps"] == 3
    assert distilled["teacher_perplexity"] == pytest.approx(results["before"]["perplexity"], rel=1e-5)
    assert distilled["student_perplexity_before"] == pytest.approx(results["after"]["perplexity"], rel=1e-5)
