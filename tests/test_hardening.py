"""Issue 18: every error a user can cause is one `error: <file> line <n>: ...` line and exit status 2 (no traceback;
LLM_DISTILL_DEBUG=1 shows it), checked before anything heavy; example configs are bases only for bare runs; the
held-out evaluation never builds the full logits and gives the plain path's figures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, write_jsonl

from llm_distill.data import DistillationCollator, Fields, load_rows, prepare_dataset
from llm_distill.evaluation import evaluate_models, heldout_set
from llm_distill.jobs import run_cli
from llm_distill.jobs.distill import main as distill_main
from llm_distill.jobs.generate import main as generate_main
from llm_distill.jobs.prune import main as prune_main

GOOD = {"text": "def f(x):\n    return x\n"}


def _bad_files(tmp) -> dict[str, tuple[object, str]]:
    """name -> (path, the expected message after 'error: <path> ')."""
    tmp.mkdir(parents=True, exist_ok=True)
    latin = tmp / "latin1.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    surrogate = tmp / "surrogate.jsonl"
    surrogate.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "half an emoji \\ud800"}\n', encoding="utf-8")
    return {
        "latin1": (latin, "line 2: not valid UTF-8 (byte 0xe9 at column 14)"),
        "surrogate": (surrogate, "line 3: field 'text' holds a lone surrogate escape"),
        "mixed_names": (write_jsonl(tmp / "mixed.jsonl", [{"prompt": "a", "response": "b"},
                                                         {"prompt": "c", "completion": "d"}]),
                        "line 2: the response is in 'completion' but"),
        "both_names": (write_jsonl(tmp / "both.jsonl", [{"prompt": "a", "response": "b", "completion": "b"}]),
                       "line 1: the row has both 'response' and 'completion'"),
        "no_assistant": (write_jsonl(tmp / "chat.jsonl", [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "only a question"}]}]),
            "line 2: field 'messages' has no non-empty assistant turn"),
        "mixed_formats": (write_jsonl(tmp / "formats.jsonl", [{"prompt": "a", "response": "b"},
                                                              {"messages": [{"role": "user", "content": "q"}]}]),
                          "line 2: a chat ('messages') row, but"),
        "not_json": (write_jsonl(tmp / "broken.jsonl", [GOOD, '{"text": "no end']), "line 2: not valid JSON"),
    }


def _one_error(capsys, main, argv) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("case", ["latin1", "surrogate", "mixed_names", "both_names", "no_assistant",
                                  "mixed_formats", "not_json"])
def test_bad_training_rows_are_one_message_naming_file_and_line(case, saved_pair, tmp_path, capsys, monkeypatch):
    path, expected = _bad_files(tmp_path / "data")[case]
    loaded = []
    monkeypatch.setattr("llm_distill.jobs.distill.load_everything", lambda *a: loaded.append(1))
    line = _one_error(capsys, distill_main, [
        "--teacher_model", str(saved_pair["teacher"]), "--student_model", str(saved_pair["student"]),
        "--dataset", str(path), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    assert line.startswith(f"error: {path} {expected}"), line
    assert loaded == [] and not (tmp_path / "out").exists()  # refused before any model or tokenizer is loaded


def test_the_same_rows_in_the_library_raise_our_error(tmp_path):
    from llm_distill.data import DataValidationError

    for path, expected in _bad_files(tmp_path).values():
        with pytest.raises(DataValidationError) as err:
            load_rows(str(path))
        assert str(err.value).startswith(f"{path} {expected}")


def test_bad_eval_file_and_json_array_file(saved_pair, tmp_path, capsys):
    bad = tmp_path / "eval.json"
    bad.write_bytes(b'[{"text": "a"},\n {"text": "b\xe9"}]')
    line = _one_error(capsys, distill_main, [
        "--teacher_model", str(saved_pair["teacher"]), "--student_model", str(saved_pair["student"]),
        "--dataset", str(saved_pair["train"]), "--eval_dataset", str(bad), "--output_dir", str(tmp_path / "o")])
    assert line.startswith(f"error: {bad} line 2: not valid UTF-8"), line


def test_prompt_rows_missing_a_field_are_reported_once_without_id_cascade(tmp_path, capsys, saved_pair):
    """The issue's case: rows with no 'prompt' (and no id) gave 15 false "id 0 already used" errors after the real
    one. Now: one line per problem, with the count of rows that have it."""
    rows = write_jsonl(tmp_path / "p.jsonl", [{"question": f"q{i}"} for i in range(16)])
    assert run_cli(generate_main, ["--teacher_model", str(saved_pair["teacher"]), "--prompts", str(rows),
                                   "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "already used" not in err and "Traceback" not in err
    assert f"error: 16 bad prompt row(s) in {rows}:\n  {rows} line 1: field 'prompt' is missing" in err
    assert "(and 15 more row(s) with the same problem)" in err
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xe9"}\n')
    assert run_cli(generate_main, ["--teacher_model", str(saved_pair["teacher"]), "--prompts", str(latin),
                                   "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{latin} line 2: not valid UTF-8" in capsys.readouterr().err


def test_config_path_and_setting_errors_are_one_message(tmp_path, capsys, saved_pair):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("temprature: 2.0\n")
    assert _one_error(capsys, distill_main, ["--config", str(cfg)]).startswith(
        f"error: {cfg}: unknown key(s) 'temprature' (did you mean temperature")
    data = ["--dataset", str(saved_pair["train"]), "--output_dir", str(tmp_path / "o")]
    line = _one_error(capsys, distill_main, ["--teacher_model", str(saved_pair["teacher"]), "--student_model",
                                             str(tmp_path / "no-such-folder"), *data])
    assert line.startswith(f"error: tokenizer '{tmp_path / 'no-such-folder'}' (not a local folder) cannot be loaded")
    assert _one_error(capsys, distill_main, ["--teacher_model", str(saved_pair["teacher"]), *data]).startswith(
        "error: student_model is not set")
    assert "temperature=0.0 is invalid" in _one_error(capsys, distill_main, [*data, "--temperature", "0"])
    assert _one_error(capsys, prune_main, ["--dataset", str(saved_pair["train"]), "--keep_heads", "2"]).startswith(
        "error: model is not set")


def test_a_users_target_is_never_paired_with_the_embedded_draft_or_prompts(saved_pair, capsys, monkeypatch):
    """bench-speculative / distillspec: naming your own target but leaving the draft or prompts at the demo's is one
    error naming the fields, before any embedded name is built or any weights load."""
    from llm_distill import embedded
    from llm_distill.jobs.bench_speculative import main as bench_main
    from llm_distill.jobs.distillspec import main as distillspec_main

    monkeypatch.setattr(embedded, "resolve", lambda *a, **k: pytest.fail("an embedded name was resolved"))
    target = str(saved_pair["teacher"])
    line = _one_error(capsys, bench_main, ["--target_model", target])
    assert "draft_model" in line and "prompts" in line and "--draft_model ..." in line
    line = _one_error(capsys, bench_main, ["--target_model", target, "--draft_model", target])
    assert "prompts" in line and "draft_model" not in line
    line = _one_error(capsys, distillspec_main, ["--target_model", target, "--draft_model", target,
                                                  "--eval_prompts", str(saved_pair["train"])])
    assert "train_prompts" in line and "eval_prompts" not in line


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch, saved_pair):
    from llm_distill.data import DataValidationError

    path, _ = _bad_files(tmp_path)["latin1"]
    monkeypatch.setenv("LLM_DISTILL_DEBUG", "1")
    with pytest.raises(DataValidationError, match="not valid UTF-8"):
        run_cli(distill_main, ["--teacher_model", str(saved_pair["teacher"]), "--student_model",
                               str(saved_pair["student"]), "--dataset", str(path), "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_scripts_and_verbs_end_with_one_line_and_exit_2(saved_pair, tmp_path):
    """The real commands (a script and a console verb), in subprocesses: exit status 2, one `error:` line naming
    file and line, no traceback; LLM_DISTILL_DEBUG=1 prints the traceback."""
    path, expected = _bad_files(tmp_path)["latin1"]
    args = ["--teacher_model", str(saved_pair["teacher"]), "--student_model", str(saved_pair["student"]),
            "--dataset", str(path), "--output_dir", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LLM_DISTILL_DEBUG": ""}
    commands = [([sys.executable, "scripts/distill.py", *args], env),
                ([sys.executable, "-m", "llm_distill", "distill", *args], env),
                ([sys.executable, "scripts/distill.py", *args], {**env, "LLM_DISTILL_DEBUG": "1"})]
    procs = [subprocess.Popen(c, cwd=REPO_ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in commands]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]
    for code, err in results[:2]:
        assert code == 2 and "Traceback" not in err, err[-2000:]
        fix = "; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)."
        assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {path} {expected}{fix}"]
    code, err = results[2]
    assert code not in (0, 2) and "Traceback" in err and "DataValidationError" in err


# ------------------------------------------------------------------------------------------------ bases (item 2)


def test_example_config_is_a_base_only_for_a_bare_run(caplog):
    import logging

    from llm_distill.jobs.distill import parse
    from llm_distill.jobs.generate import DEFAULT_CONFIG as GENERATE_CONFIG
    from llm_distill.jobs.generate import parse as parse_generate
    from llm_distill.jobs.generate import with_base

    caplog.set_level(logging.INFO, logger="llm_distill")
    model, data, train = parse(["--output_dir", "x"])
    assert model.teacher_model == "embedded:teacher" and data.packing and train.learning_rate == 3e-3
    assert "the embedded demo" in caplog.text
    model, data, train = parse(["--teacher_model", "org/t", "--student_model", "org/s", "--dataset", "d.jsonl",
                                "--output_dir", "x"])
    assert (data.packing, data.max_train_samples, data.eval_dataset, train.learning_rate) == (False, None, None, 5e-5)
    assert "built-in defaults (you gave --teacher_model --student_model --dataset" in caplog.text
    mine = parse_generate(with_base(["--teacher_model", "org/t", "--prompts", "mine.jsonl"], GENERATE_CONFIG,
                                    ("teacher_model", "prompts")))
    assert (mine.prompt_field, mine.id_field, mine.prompt_max_lines, mine.max_prompts) == ("prompt", "id", None, None)


# ---------------------------------------------------------------------------------- lean evaluation (item 4)


def _plain(models, dataset, collator, batch_size):
    """The reference: full (B, S, V) logits from each model's own forward."""
    sums = {n: [0.0, 0, 0, 0] for n in models}
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        targets, valid = labels[:, 1:], labels[:, 1:] != -100
        argmax = {}
        for name, m in models.items():
            logits = m(**batch).logits[:, :-1][valid].float()
            sums[name][0] += F.cross_entropy(logits, targets[valid], reduction="sum").item()
            sums[name][1] += int(valid.sum())
            argmax[name] = logits.argmax(-1)
            sums[name][2] += int((argmax[name] == targets[valid]).sum())
        for name in models:
            sums[name][3] += int((argmax[name] == argmax["teacher"]).sum())
    return sums


@pytest.mark.parametrize("chunk_size", [3, 256])
def test_lean_evaluation_equals_the_plain_path_and_never_projects_every_position(chunk_size, saved_pair,
                                                                                 tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from llm_distill.config import DataArguments

    models = {n: AutoModelForCausalLM.from_pretrained(saved_pair[n]).eval() for n in ("teacher", "student")}
    data_args = DataArguments(max_length=48, packing=False)
    rows, fmt = load_rows(str(saved_pair["eval"]), fields=Fields())
    dataset = prepare_dataset(rows, fmt, tiny_tokenizer, data_args, None, 0, "eval")
    collator = DistillationCollator(tiny_tokenizer)
    with torch.no_grad():
        want = _plain(models, dataset, collator, 2)
    widest = []
    hooks = [m.lm_head.register_forward_hook(lambda mod, inp, out: widest.append(inp[0].shape[-2]))
             for m in models.values()]
    got = evaluate_models(models, dataset, collator, batch_size=2, chunk_size=chunk_size)
    for h in hooks:
        h.remove()
    assert max(widest) == 1  # only the one-position probe: lm_head never runs over a sequence
    for name, (nll, tokens, correct, agree) in want.items():
        assert got[name]["tokens"] == tokens
        assert got[name]["nll"] == pytest.approx(nll / tokens, rel=1e-6)
        assert got[name]["accuracy"] == correct / tokens and got[name]["top1_agreement"] == agree / tokens


def test_one_heldout_builder_same_figure_packed_or_not(saved_pair, tiny_tokenizer):
    """prune and distill build the held-out set with the same block: the same model, file and settings give the
    same perplexity in both; packing (as the run says) changes the set, and so the figure."""
    from transformers import AutoModelForCausalLM

    from llm_distill.config import DataArguments

    model = AutoModelForCausalLM.from_pretrained(saved_pair["teacher"])
    collator = DistillationCollator(tiny_tokenizer)
    figures = {}
    for packing in (False, True):
        sets = [heldout_set(str(saved_pair["eval"]), tiny_tokenizer, DataArguments(max_length=32, packing=packing),
                            8, 42) for _ in range(2)]
        assert sets[0]["input_ids"] == sets[1]["input_ids"]
        figures[packing] = evaluate_models({"model": model}, sets[0], collator, 4, reference=None)["model"]["perplexity"]
    assert figures[False] != figures[True]


def test_evaluate_script_gives_the_figures_of_the_shared_routine(saved_pair, tiny_tokenizer, tmp_path):
    """scripts/evaluate.py is the same held-out builder + evaluation as the jobs: same file and settings, same
    perplexities; the first model is the reference of top-1 agreement; bad --models is one usage error."""
    import importlib.util
    import json

    from transformers import AutoModelForCausalLM

    from llm_distill.config import DataArguments

    spec = importlib.util.spec_from_file_location("evaluate_script", REPO_ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "scores.json"
    scores = script.main(["--models", f"t={saved_pair['teacher']}", f"s={saved_pair['student']}", "--eval_dataset",
                          str(saved_pair["eval"]), "--max_length", "32", "--packing", "true", "--max_eval_samples", "8",
                          "--out", str(out)])
    dataset = heldout_set(str(saved_pair["eval"]), tiny_tokenizer, DataArguments(max_length=32, packing=True), 8, 42)
    models = {n: AutoModelForCausalLM.from_pretrained(saved_pair[k]) for n, k in (("t", "teacher"), ("s", "student"))}
    direct = evaluate_models(models, dataset, DistillationCollator(tiny_tokenizer), 4, reference="t")
    assert scores["s"]["perplexity"] == pytest.approx(direct["s"]["perplexity"], rel=1e-6)
    assert scores["t"]["top1_agreement"] == 1.0 and scores["s"]["top1_agreement"] < 1.0
    assert json.loads(out.read_text())["scores"]["s"]["perplexity"] == scores["s"]["perplexity"]
    with pytest.raises(SystemExit):
        script.main(["--models", "no-equals-sign"])
