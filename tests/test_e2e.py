"""The main job end to end on tiny saved models, and the embedded-default builder on a miniature recipe."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_distill import embedded

from llm_distill.embedded import causal as tiny
from llm_distill.jobs.distill import main as run_distillation

from conftest import miniature_recipe


def common_args(paths, out, *extra):
    return ["--teacher_model", str(paths["teacher"]), "--student_model", str(paths["student"]),
            "--dataset", str(paths["train"]), "--eval_dataset", str(paths["eval"]), "--packing", "true",
            "--max_length", "32", "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "6",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--warmup_steps", "0",
            "--logging_steps", "3", "--output_dir", str(out), "--use_cpu", "true", *extra]


def test_distill_script_trains_reports_and_saves(saved_pair, tmp_path):
    out = tmp_path / "run"
    results = run_distillation(common_args(saved_pair, out, "--alpha", "0.8", "--temperature", "2.0"))
    written = json.loads((out / "distill_results.json").read_text())
    assert written["steps"] == 6 and written["world_size"] == 1
    assert results["student_perplexity_after"] < results["student_perplexity_before"]
    assert 0 <= results["top1_agreement_after"] <= 1 and results["train_tokens_per_second"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "tokenizer.json").exists()
    reloaded(input_ids=torch.tensor([[1, 2, 3]]))


def test_student_from_teacher_layers_via_config(saved_pair, tmp_path):
    results = run_distillation(common_args(saved_pair, tmp_path / "r", "--student_init", "teacher_layers",
                                           "--student_num_layers", "2", "--max_steps", "2"))
    assert results["student"] == "teacher_layers"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "r").config.num_hidden_layers == 2


def test_bad_row_fails_before_training(saved_pair, tmp_path):
    from llm_distill.data import DataValidationError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    paths = dict(saved_pair, train=bad)
    with pytest.raises(DataValidationError, match=r"bad\.jsonl line 2: field 'text' is missing"):
        run_distillation(common_args(paths, tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_embedded_builder_is_deterministic_and_reloadable(tmp_path, monkeypatch):
    """A miniature recipe through the real build path: corpus split, BPE, pretraining, save, reload."""
    monkeypatch.setenv("LLM_DISTILL_CACHE", str(tmp_path / "cache"))
    recipe = miniature_recipe(teacher_steps=3, teacher_layers=2)
    root = tiny.build(recipe)
    info = json.loads((root / "build_info.json").read_text())
    assert info["files"]["heldout"] > 0 and info["files"]["train"] > 10 * info["files"]["heldout"]
    train_sources = {json.loads(line)["source"] for line in open(root / "data/train.jsonl")}
    heldout_sources = {json.loads(line)["source"] for line in open(root / "data/heldout.jsonl")}
    assert not train_sources & heldout_sources
    assert embedded.resolve("embedded:teacher", recipe) == str(root / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    assert teacher.config.num_hidden_layers == 2
    first = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert info["teacher_sha256"] == tiny.weights_digest(teacher)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # another thread count: reductions must not change the weights
    try:
        rebuilt = tiny.build(recipe, force=True)
    finally:
        torch.set_num_threads(threads)
    again = AutoModelForCausalLM.from_pretrained(rebuilt / "teacher")
    for k, v in again.state_dict().items():
        assert torch.equal(v, first[k]), f"{k} differs between two builds with the same seed"
    info_again = json.loads((rebuilt / "build_info.json").read_text())
    assert (info_again["teacher_sha256"], info_again["student_sha256"]) == (info["teacher_sha256"], info["student_sha256"])
    with pytest.raises(ValueError, match="Unknown embedded artefact"):
        embedded.resolve("embedded:nope", recipe)


def test_lora_student_via_config(saved_pair, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    run_distillation(common_args(saved_pair, out, "--use_peft", "true", "--lora_r", "4",
                                 "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2"))
    assert (out / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(saved_pair["student"])
    PeftModel.from_pretrained(base, out)(input_ids=torch.tensor([[1, 2, 3]]))
