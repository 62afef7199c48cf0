"""On-policy distillation (GKD): lmbda=0 is today's trainer, lmbda=1 trains on the student's own samples, seq_kd on
the teacher's; prompts and tokens after EOS carry no loss; the loss is a mean over the completion tokens trained on;
a PEFT student samples with its adapter in eval mode; 2 gloo ranks run and resume."""

import copy
import json

import pytest
import torch
from datasets import Dataset

import llm_distill.on_policy as on_policy
from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer
from llm_distill.config import parse_args_and_config
from llm_distill.embedded.openings import opening_rows
from llm_distill.losses import IGNORE_INDEX
from llm_distill.on_policy import (
    ROLLOUT_KEY,
    RolloutSampler,
    completion_rows,
    cut_after_eos,
    rollout_seed,
    split_prompts,
    teacher_nll,
)

from conftest import REPO_ROOT, write_jsonl
from test_distributed import launch_two_ranks, train_logs, weights

ODD_TOKEN_RUN = 20  # the dataset's completion: one token repeated, which no sampled completion reproduces


def odd_dataset(tokenizer, n=8, seed=0):
    """Prompt/response rows whose response is ``ODD_TOKEN_RUN`` copies of one token (never what a model samples)."""
    g = torch.Generator().manual_seed(seed)
    odd = len(tokenizer) - 1
    rows = []
    for i in range(n):
        prompt = torch.randint(10, len(tokenizer) - 1, (3 + i % 4,), generator=g).tolist()
        rows.append({"input_ids": prompt + [odd] * ODD_TOKEN_RUN,
                     "labels": [IGNORE_INDEX] * len(prompt) + [odd] * ODD_TOKEN_RUN})
    return Dataset.from_list(rows)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, alpha=1.0, loss_type="reverse_kl",
                use_cpu=True, dataloader_num_workers=0, max_new_tokens=6, train_sampling_strategy="sequential")
    base.update(kw)
    return DistillationConfig(**base)


def make_trainer(tokenizer, llama_factory, tmp_path, student=None, teacher=None, dataset=None, **kw):
    return DistillationTrainer(
        model=student if student is not None else llama_factory(seed=2),
        teacher_model=teacher if teacher is not None else llama_factory(seed=1, num_hidden_layers=3),
        args=config(tmp_path, **kw), train_dataset=dataset if dataset is not None else odd_dataset(tokenizer),
        data_collator=DistillationCollator(tokenizer), processing_class=tokenizer)


def spy_on_loss(trainer) -> list:
    """Record every (inputs, num_items_in_batch) compute_loss sees in training."""
    seen, original = [], trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, num_items_in_batch))
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = spy
    return seen


def reference_samples(model, tokenizer, prompts, seed, max_new_tokens, do_sample=True):
    """What ``model`` samples for ``prompts`` with plain ``generate`` (left-padded), cut after the first EOS."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
                                    temperature=1.0 if do_sample else None, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    return cut_after_eos(out[:, longest:].tolist(), {tokenizer.eos_token_id})


def completions_of(inputs) -> list[list[int]]:
    return [row[row != IGNORE_INDEX].tolist() for row in inputs["labels"]]


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("flag, value, message", [
    ("lmbda", "1.5", "lmbda=1.5 is invalid"), ("max_new_tokens", "0", "max_new_tokens=0 is invalid"),
    ("rollout_temperature", "-1", "rollout_temperature=-1.0 is invalid"), ("rollout_top_p", "0", "rollout_top_p=0.0"),
    ("rollout_top_k", "-2", "rollout_top_k=-2 is invalid")])
def test_rollout_settings_are_checked_where_they_are_parsed(flag, value, message):
    from llm_distill.config import DataArguments, ModelArguments

    with pytest.raises(ValueError, match=message):
        parse_args_and_config((ModelArguments, DataArguments, DistillationConfig),
                              ["--output_dir", "x", f"--{flag}", value])


def test_on_policy_refuses_what_it_cannot_score(tmp_path):
    with pytest.raises(ValueError, match="teacher_logits"):
        config(tmp_path, lmbda=0.5, teacher_logits=str(tmp_path))
    with pytest.raises(ValueError, match="kd_positions=all"):
        config(tmp_path, seq_kd=True, kd_positions="all")


def test_text_rows_have_no_prompt_and_are_refused_with_the_fix(tiny_tokenizer, llama_factory, tmp_path):
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, 6, 7]])}
    with pytest.raises(ValueError, match="embedded:train_openings"):
        split_prompts(batch)
    text_rows = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    with pytest.raises(ValueError, match="a 'text' row has no prompt"):  # when the trainer is built, before any step
        make_trainer(tiny_tokenizer, llama_factory, tmp_path, dataset=text_rows, lmbda=0.5)


# ----------------------------------------------------------------------------- building blocks

def test_rebuilt_rows_label_the_completion_up_to_its_first_eos_only():
    eos, pad = 2, 0
    prompts = [[11, 12, 13], [21]]
    completions = cut_after_eos([[31, eos, 33, 34], [41, 42, 43, 44]], {eos})
    assert completions == [[31, eos], [41, 42, 43, 44]]
    rows = completion_rows(prompts, completions, pad, "cpu")
    assert rows["input_ids"].tolist() == [[11, 12, 13, 31, eos], [21, 41, 42, 43, 44]]
    assert rows["labels"].tolist() == [[-100, -100, -100, 31, eos], [-100, 41, 42, 43, 44]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # Right padding: the shorter row ends in padding without labels.
    rows = completion_rows([[1], [1, 2, 3]], [[eos], [4, eos]], pad, "cpu")
    assert rows["labels"].tolist() == [[-100, eos, -100, -100, -100], [-100, -100, -100, 4, eos]]
    assert rows["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert split_prompts(rows) == [[1], [1, 2, 3]]


def test_mixing_draws_lmbda_of_the_batches_the_same_on_every_rank(tmp_path, tiny_tokenizer, llama_factory):
    sampler = RolloutSampler(config(tmp_path, lmbda=0.3), tiny_tokenizer, llama_factory())
    draws = [sampler.source(step, i) for step in range(1000) for i in range(2)]
    assert set(draws) == {"student", None}
    assert draws.count("student") / len(draws) == pytest.approx(0.3, abs=0.03)
    with_teacher = RolloutSampler(config(tmp_path, lmbda=0.3, seq_kd=True), tiny_tokenizer, llama_factory())
    assert [with_teacher.source(s, 0) for s in range(50)] == [
        "student" if sampler.source(s, 0) else "teacher" for s in range(50)]
    assert len({rollout_seed(0, 3, 1, rank) for rank in range(4)}) == 4  # ranks sample differently


def test_teacher_nll_matches_cross_entropy_from_hidden_states_or_logits():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 1]])
    total, count = teacher_nll(hidden, weight, None, labels, chunk_size=2)
    logits = hidden @ weight.T
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 reduction="sum")
    assert count.item() == 6 and total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert teacher_nll(logits, None, None, labels)[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_embedded_openings_are_prompt_and_ground_truth_continuation(tmp_path, corpus_texts, tiny_tokenizer):
    from llm_distill.data import load_rows, prepare_dataset
    from llm_distill.config import DataArguments
    from llm_distill.embedded.openings import openings_file

    text = "".join(f"line {i}\n" for i in range(200))
    (row,) = opening_rows([{"text": text, "source": "x.py"}], prompt_chars=20, response_chars=30)
    assert row["prompt"] == "line 0\nline 1\nline 2\n" and text.startswith(row["prompt"] + row["response"])
    assert row["response"].startswith("line 3\n") and row["finish_reason"] == "length"
    # The artefact behind embedded:train_openings, derived once from the cache's data/train.jsonl.
    write_jsonl((tmp_path / "data").mkdir() or tmp_path / "data" / "train.jsonl",
                [{"text": t, "source": str(i)} for i, t in enumerate(corpus_texts)])
    path = openings_file(tmp_path, "train")
    assert path == tmp_path / "data" / "train_openings.jsonl" and openings_file(tmp_path, "train") == path
    rows, fmt = load_rows(str(path))
    assert fmt == "prompt_response" and len(rows) == len(corpus_texts)
    ds = prepare_dataset(rows, fmt, tiny_tokenizer, DataArguments(max_length=512))
    first = ds[0]
    assert first["labels"][0] == IGNORE_INDEX and first["labels"][-1] != tiny_tokenizer.eos_token_id  # no EOS: cut


# ----------------------------------------------------------------------------- the trainer

def test_lmbda_zero_is_exactly_todays_loss_and_update(tiny_tokenizer, llama_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(on_policy, "sample", lambda *a, **k: pytest.fail("lmbda=0 must not sample"))
    runs = {}
    for name, kw in (("today", {}), ("lmbda0", dict(lmbda=0.0, max_new_tokens=3, rollout_temperature=0.2,
                                                    rollout_top_k=5, rollout_top_p=0.5))):
        trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path / name, max_steps=2, gradient_accumulation_steps=2,
                               per_device_train_batch_size=2, optim="sgd", loss_type="jsd", alpha=0.5, **kw)
        trainer.train()
        runs[name] = (trainer.state.log_history, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    (logs_a, weights_a), (logs_b, weights_b) = runs["today"], runs["lmbda0"]
    strip = [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k} for h in logs_a]
    assert strip == [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k} for h in logs_b]
    assert not any("on_policy_fraction" in h for h in logs_b)
    for k, v in weights_a.items():
        assert torch.equal(v, weights_b[k]), k


def test_lmbda_one_trains_on_the_students_own_samples_normalised_by_their_tokens(tiny_tokenizer, llama_factory,
                                                                                 tmp_path):
    """Step 1, 2 micro-batches: the loss saw exactly what the student samples (never the dataset's completion), and
    the logged loss is the per-token reverse KL summed over both micro-batches / their completion tokens."""
    teacher, student = llama_factory(seed=1, num_hidden_layers=3), llama_factory(seed=2)
    teacher0, student0 = copy.deepcopy(teacher), copy.deepcopy(student)
    trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path, student=student, teacher=teacher, lmbda=1.0,
                           gradient_accumulation_steps=2, per_device_train_batch_size=2, max_new_tokens=9)
    seen = spy_on_loss(trainer)
    trainer.train()
    assert len(seen) == 2 and all(inputs[ROLLOUT_KEY] == "student" for inputs, _ in seen)
    odd = len(tiny_tokenizer) - 1
    total_sum, n_tokens = 0.0, 0
    for micro, (inputs, _) in enumerate(seen):
        prompts = split_prompts(inputs)
        expected = reference_samples(student0, tiny_tokenizer, prompts, rollout_seed(0, 0, micro, 0), 9)
        assert completions_of(inputs) == expected
        assert all(c != [odd] * len(c) for c in expected)  # not the dataset's completion
        with torch.no_grad():  # the reference formula: sum over completion tokens of KL(q || p)
            q = torch.log_softmax(student0(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits, -1)
            p = torch.log_softmax(teacher0(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits, -1)
        valid = inputs["labels"][:, 1:] != IGNORE_INDEX
        total_sum += (q.exp() * (q - p)).sum(-1)[:, :-1][valid].sum().item()
        n_tokens += int(valid.sum())
    assert {nib.item() for _, nib in seen} == {n_tokens}  # the trained-on count, not the dataset's 2 x 2 x 20
    assert n_tokens != 4 * ODD_TOKEN_RUN
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(total_sum / n_tokens, rel=1e-4)
    assert logged["on_policy_fraction"] == 1.0 and logged["rollout_mean_length"] == pytest.approx(n_tokens / 4)
    assert logged["rollout_teacher_nll"] > 0 and 0 < logged["rollout_time_share"] < 1
    assert logged["rollout_tokens_per_s"] > 0


def test_prompt_and_tokens_after_eos_carry_no_loss(tiny_tokenizer, llama_factory, tmp_path, monkeypatch):
    """Rows that stop early (an EOS, then tokens the decoder went on writing, as a batch's unfinished rows make
    it do): every trained-on row has -100 on its prompt and nothing after its first EOS."""
    eos, real_sample = tiny_tokenizer.eos_token_id, on_policy.sample

    def stopping_early(model, input_ids, *args, **kwargs):
        out = real_sample(model, input_ids, *args, **kwargs)
        out.sequences[0, input_ids.shape[1] + 2] = eos  # row 0 stops after 2 tokens, then 9 more tokens follow
        out.sequences[1, input_ids.shape[1]] = eos      # row 1 stops at once
        return out

    monkeypatch.setattr(on_policy, "sample", stopping_early)
    trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path, lmbda=1.0, max_new_tokens=12, max_steps=2)
    seen = spy_on_loss(trainer)
    trainer.train()
    for inputs, _ in seen:
        lengths = []
        for ids, labels, mask in zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]):
            start = int((labels != IGNORE_INDEX).int().argmax())
            assert (labels[:start] == IGNORE_INDEX).all() and start >= 3  # the dataset's prompt, unlabelled
            kept = labels[mask.bool()][start:].tolist()
            assert eos not in kept[:-1]  # nothing after the first EOS
            assert (labels[~mask.bool()] == IGNORE_INDEX).all() and (ids[~mask.bool()] == tiny_tokenizer.pad_token_id).all()
            lengths.append(len(kept))
        assert lengths[:2] == [3, 1] and inputs["labels"][0][inputs["labels"][0] != IGNORE_INDEX][-1] == eos
        assert inputs["attention_mask"][0].sum() == start_of(inputs, 0) + 3


def start_of(inputs, row) -> int:
    return int((inputs["labels"][row] != IGNORE_INDEX).int().argmax())


def test_seq_kd_trains_on_the_teachers_samples(tiny_tokenizer, llama_factory, tmp_path):
    teacher = llama_factory(seed=1, num_hidden_layers=3)
    teacher0 = copy.deepcopy(teacher)
    trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path, teacher=teacher, seq_kd=True, max_steps=2)
    seen = spy_on_loss(trainer)
    trainer.train()
    for step, (inputs, _) in enumerate(seen):
        assert inputs[ROLLOUT_KEY] == "teacher"
        expected = reference_samples(teacher0, tiny_tokenizer, split_prompts(inputs), rollout_seed(0, step, 0, 0), 6)
        assert completions_of(inputs) == expected
    assert all(h.get("on_policy_fraction") == 0.0 for h in trainer.state.log_history if "loss" in h)


def test_peft_student_samples_with_its_adapter_in_eval_mode(tiny_tokenizer, llama_factory, tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model

    student = get_peft_model(llama_factory(seed=2), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)  # an adapter that changes what the model writes
    merged = copy.deepcopy(student).merge_and_unload()
    without = copy.deepcopy(student)
    calls, real_sample = [], on_policy.sample

    def watching(model, *args, **kwargs):
        calls.append((type(model), any(m.training for m in model.modules())))
        return real_sample(model, *args, **kwargs)

    monkeypatch.setattr(on_policy, "sample", watching)
    trainer = make_trainer(tiny_tokenizer, llama_factory, tmp_path, student=student, lmbda=1.0, rollout_temperature=0.0,
                           learning_rate=0.0, max_new_tokens=8)
    seen = spy_on_loss(trainer)
    trainer.train()
    assert calls == [(type(student), False)] and issubclass(calls[0][0], PeftModel)
    assert trainer.model.training  # restored for the backward
    prompts = split_prompts(seen[0][0])
    with_adapter = reference_samples(merged, tiny_tokenizer, prompts, 0, 8, do_sample=False)
    assert completions_of(seen[0][0]) == with_adapter
    with without.disable_adapter():  # the adapter really matters: the base model alone writes something else
        assert reference_samples(without, tiny_tokenizer, prompts, 0, 8, do_sample=False) != with_adapter


# ----------------------------------------------------------------------------- 2 gloo ranks

@pytest.mark.slow
def test_two_gloo_ranks_run_on_policy_steps_and_resume(saved_pair, tmp_path, one_thread):
    rows = opening_rows([{"text": t, "source": str(i)} for i, t in enumerate(_texts(saved_pair))],
                        prompt_chars=60, response_chars=60)
    data = write_jsonl(tmp_path / "openings.jsonl", rows)
    script = REPO_ROOT / "scripts" / "distill.py"

    def args(out, *extra):
        return ["--teacher_model", str(saved_pair["teacher"]), "--student_model", str(saved_pair["student"]),
                "--dataset", str(data), "--eval_dataset", "", "--max_length", "48", "--max_steps", "4",
                "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--warmup_steps", "0",
                "--alpha", "1.0", "--loss_type", "jsd", "--lmbda", "0.5", "--max_new_tokens", "6",
                "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out),
                "--use_cpu", "true", *extra]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch_two_ranks(script, args(full), tmp_path)
    logs = train_logs(full)
    assert sorted(logs) == [1, 2, 3, 4]
    fractions = [logs[s]["on_policy_fraction"] for s in logs]
    assert set(fractions) <= {0.0, 1.0} and 1.0 in fractions  # both ranks draw the same coin per micro-batch
    assert all(logs[s]["rollout_mean_length"] > 0 for s in logs if logs[s]["on_policy_fraction"] == 1.0)
    launch_two_ranks(script, args(resumed, "--resume_from_checkpoint", str(full / "checkpoint-2")), tmp_path)
    logs_r = train_logs(resumed)
    for step in (3, 4):  # the rollouts are seeded per (step, micro-batch, rank): the resumed steps are the same
        assert logs_r[step]["loss"] == pytest.approx(logs[step]["loss"], rel=1e-5)
        assert logs_r[step]["on_policy_fraction"] == logs[step]["on_policy_fraction"]
    final = weights(full)
    for name, value in weights(resumed).items():
        torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6)


def _texts(paths) -> list[str]:
    with open(paths["train"], encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]
