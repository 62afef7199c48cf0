"""Born-again generations: generation k+1 is taught by generation k's saved student (its teacher perplexity is
generation k's student perplexity on the same held-out data), or by the ensemble of generations 1..k; EnsembleLM is
the mean of the members' distributions; teacher_layers students are refused with the fix."""

import json

import pytest
import torch
import yaml

from llm_distill.ensemble import EnsembleLM
from llm_distill.jobs.born_again import BornAgainArguments, run_born_again


def base_config(paths, tmp_path, **extra):
    config = {"teacher_model": str(paths["teacher"]), "student_model": str(paths["student"]),
              "dataset": str(paths["train"]), "eval_dataset": str(paths["eval"]), "packing": True, "max_length": 32,
              "max_train_samples": 8, "max_eval_samples": 4, "max_steps": 2, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "warmup_steps": 0, "alpha": 1.0, "save_strategy": "no", "report_to": "none",
              "use_cpu": True, "output_dir": str(tmp_path / "unused"), "disable_tqdm": True, **extra}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_generation_k_plus_1_learns_from_generation_k_then_from_the_ensemble(saved_pair, tmp_path):
    opts = BornAgainArguments(base_config=base_config(saved_pair, tmp_path), generations=3, ensemble=True,
                              output_dir=str(tmp_path / "ban"))
    report = run_born_again(opts)
    gens = report["generations"]
    assert [g["teacher"] for g in gens] == [str(saved_pair["teacher"]), gens[0]["path"], "ensemble"]
    assert gens[1]["teacher_perplexity"] == pytest.approx(gens[0]["perplexity"], rel=1e-5)
    assert all(g["steps"] == 2 and g["perplexity"] > 1 for g in gens)
    assert json.loads((tmp_path / "ban" / "born_again.json").read_text())["generations"][2]["teacher"] == "ensemble"


def test_ensemble_is_the_mean_of_the_members_distributions(llama_factory):
    a, b = llama_factory(seed=1), llama_factory(seed=2)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        got = EnsembleLM([a, b])(input_ids=ids).logits.exp()
        want = (a(input_ids=ids).logits.softmax(-1) + b(input_ids=ids).logits.softmax(-1)) / 2
        single = EnsembleLM([a])(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(single, a(input_ids=ids).logits.log_softmax(-1))


def test_teacher_layers_students_are_refused_after_generation_1(saved_pair, tmp_path):
    opts = BornAgainArguments(base_config=base_config(saved_pair, tmp_path, student_init="teacher_layers",
                                                      student_model=None), generations=2,
                              output_dir=str(tmp_path / "ban"))
    with pytest.raises(ValueError, match="student_init: pretrained or fresh"):
        run_born_again(opts)
