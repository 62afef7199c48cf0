"""Teacher-response generation: prompts, chat encoding, batching, resume after SIGKILL, 2 processes, training."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, make_llama, write_jsonl


from llm_distill.embedded import causal as tiny
from llm_distill.generation import (
    GenerateArguments,
    HFBackend,
    OutputExistsError,
    Prompt,
    PromptValidationError,
    encode_prompts,
    load_prompts,
    plan_batches,
)
from llm_distill.jobs.generate import parse, run_generation

PY = str(REPO_ROOT / ".venv" / "bin" / "python")
if not Path(PY).exists():
    PY = sys.executable

PROMPTS = [
    "def add(a, b):", "import os\n", "class Stack:\n    def push(self, x):", "# sort a list\n", "for i in range(",
    "if __name__ == '__main__':", "def fib(n):\n    if n < 2:", "return", "x = [", "with open(path) as f:",
    "try:\n    import json\nexcept ImportError:", "@property\ndef name(self):", "while True:", "print(",
    "lambda x:", "from collections import", "assert isinstance(", "raise ValueError(", "yield from", "async def",
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gen") / "teacher"
    make_llama(tiny_tokenizer, seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])


def gen_args(teacher_dir, prompts, output, **kw) -> GenerateArguments:
    base = dict(teacher_model=str(teacher_dir), prompts=str(prompts), output=str(output), chat_template="never",
                max_new_tokens=12, batch_size=4, seed=0)
    base.update(kw)
    return GenerateArguments(**base)


def cli(args: GenerateArguments) -> list[str]:
    """The same config for a subprocess: every field in a YAML file next to the output."""
    import yaml

    path = Path(args.output).with_suffix(".config.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(vars(args)))
    return ["--config", str(path)]


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ----------------------------------------------------------------------------------------- config


def test_config_checks_name_the_field():
    for kw, name in [(dict(temperature=0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(batch_size=0), "batch_size"),
                     (dict(num_return_sequences=2), "num_return_sequences"), (dict(over_length="cut"), "over_length"),
                     (dict(backend="tgi"), "backend"), (dict(max_prompts=0), "max_prompts"),
                     (dict(decoding="paged"), "decoding")]:
        with pytest.raises(ValueError, match=name):
            GenerateArguments(**kw)
    GenerateArguments(num_return_sequences=2, do_sample=True)


def test_yaml_configs_parse():
    args = parse(["--config", str(REPO_ROOT / "configs" / "generate.yaml"), "--max_prompts", "3"])
    assert args.teacher_model == "embedded:teacher" and args.max_prompts == 3 and args.prompt_max_lines == 8
    from llm_distill.jobs.distill import parse as parse_distill

    _, data_args, train_args = parse_distill(["--config", str(REPO_ROOT / "configs" / "two-stage-response-kd.yaml")])
    assert data_args.dataset == "outputs/generate/responses.jsonl" and train_args.alpha == 0.0


# ---------------------------------------------------------------------------------------- prompts


def test_prompt_sources(tmp_path, prompts_file):
    jsonl = load_prompts(GenerateArguments(prompts=str(prompts_file)))
    assert [p.id for p in jsonl][:2] == ["p0", "p1"] and jsonl[2].prompt == PROMPTS[2]
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert [(p.id, p.prompt) for p in load_prompts(GenerateArguments(prompts=str(txt)))] == [(0, "first prompt"),
                                                                                              (1, "second prompt")]
    from datasets import Dataset

    Dataset.from_dict({"question": ["a?", "b?"]}).save_to_disk(str(tmp_path / "ds"))
    ds = load_prompts(GenerateArguments(prompts=str(tmp_path / "ds"), prompt_field="question"))
    assert [p.prompt for p in ds] == ["a?", "b?"]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert load_prompts(GenerateArguments(prompts=str(chat)))[0].messages == [{"role": "user", "content": "hi"}]
    capped = load_prompts(GenerateArguments(prompts=str(prompts_file), max_prompts=3, prompt_max_lines=1))
    assert len(capped) == 3 and capped[2].prompt == "class Stack:\n"


def test_bad_prompts_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": 1, "prompt": "ok"},
        '{"id": 2, "prompt": "unterminated',
        {"id": 3, "question": "wrong field"},
        {"id": 4, "prompt": "   "},
        {"id": 1, "prompt": "duplicate id"},
        {"id": 6, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    with pytest.raises(PromptValidationError) as err:
        load_prompts(GenerateArguments(prompts=str(path)))
    msg = str(err.value)
    assert "5 bad prompt row(s)" in msg
    for expected in ("line 2: not valid JSON", "line 3: field 'prompt' is missing", "line 4: field 'prompt' is empty",
                     "line 5: id 1 already used at", "line 6: field 'messages' ends with an assistant turn"):
        assert f"{path} {expected}" in msg


def test_chat_template_applied_once_without_double_bos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_bos_token = True  # the tokenizer adds BOS ...
    tok.chat_template = "{{ bos_token }}" + tiny.CHAT_TEMPLATE  # ... and so does the template, like Llama 3
    prompts = [Prompt(0, "a", prompt="def f():"), Prompt(1, "b", messages=[{"role": "user", "content": "hi"}])]
    encoded, _ = encode_prompts(copy.deepcopy(prompts), tok, chat=True, max_prompt_length=100,
                                over_length="error", system_prompt="Be brief.")
    bos = tok.bos_token_id
    for p in encoded:
        assert p.input_ids[0] == bos and p.input_ids[1] != bos
        assert tok.decode(p.input_ids).endswith("<|assistant|>\n")  # add_generation_prompt=True
    assert tok.decode(encoded[0].input_ids) == "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\ndef f():<|end|>\n<|assistant|>\n"
    raw, _ = encode_prompts(copy.deepcopy(prompts[:1]), tok, chat=False, max_prompt_length=100, over_length="error")
    assert raw[0].input_ids == tok("def f():")["input_ids"]  # exactly what data.tokenize_prompt_response sees


def test_over_length_policies(tiny_tokenizer):
    long, short = "x = 1\n" * 40, "y = 2"
    make = lambda: [Prompt(0, 0, prompt=long), Prompt(1, 1, prompt=short)]  # noqa: E731
    full = tiny_tokenizer(long)["input_ids"]
    kept, stats = encode_prompts(make(), tiny_tokenizer, False, 10, "truncate_left")
    assert kept[0].input_ids == full[-10:] and kept[0].truncated and stats["truncated"] == 1
    kept, stats = encode_prompts(make(), tiny_tokenizer, False, 10, "skip")
    assert [p.id for p in kept] == [1] and stats["skipped_ids"] == [0]
    with pytest.raises(PromptValidationError, match="Prompt 0 has .* tokens, more than max_prompt_length=10"):
        encode_prompts(make(), tiny_tokenizer, False, 10, "error")


def test_plan_is_sorted_longest_first_and_independent_of_world_size(tiny_tokenizer):
    prompts = [Prompt(i, i, prompt=p, input_ids=tiny_tokenizer(p)["input_ids"]) for i, p in enumerate(PROMPTS)]
    plan = plan_batches(prompts, 4)
    lengths = [len(p.input_ids) for b in plan for p in b]
    assert lengths == sorted(lengths, reverse=True) and sum(len(b) for b in plan) == len(PROMPTS)
    assert sorted(p.id for b in plan for p in b) == list(range(len(PROMPTS)))


# ------------------------------------------------------------------------------------- generation


def encoded(tiny_tokenizer, texts):
    return [Prompt(i, i, prompt=t, input_ids=tiny_tokenizer(t)["input_ids"]) for i, t in enumerate(texts)]


@pytest.mark.parametrize("decoding", ["static", "refill"])
def test_left_padded_batch_equals_one_at_a_time(tiny_tokenizer, llama_factory, decoding):
    model = llama_factory(seed=1)
    backend = HFBackend(model, tiny_tokenizer, GenerateArguments(max_new_tokens=10, decoding=decoding))
    prompts = encoded(tiny_tokenizer, PROMPTS[:6])  # lengths differ, so the batch is left-padded
    batched = backend.generate(prompts, seed=0)
    for p, comps in zip(prompts, batched):
        alone = backend.generate([p], seed=0)[0][0]
        assert comps[0].token_ids == alone.token_ids and comps[0].finish_reason == alone.finish_reason


def test_finish_reason_and_top_k_logprobs(tiny_tokenizer, llama_factory):
    model = llama_factory(seed=1)
    args = GenerateArguments(max_new_tokens=6, logprobs=3)
    out = HFBackend(model, tiny_tokenizer, args).generate(encoded(tiny_tokenizer, PROMPTS[:3]), seed=0)
    for (c,) in out:
        assert c.finish_reason == "length" and len(c.token_ids) == 6 == len(c.top_ids) == len(c.top_logprobs)
        for tok, ids, lps in zip(c.token_ids, c.top_ids, c.top_logprobs):
            assert ids[0] == tok and len(ids) == 3 and lps == sorted(lps, reverse=True) and lps[0] <= 0
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy picks id 0, which is EOS
    assert tiny_tokenizer.eos_token_id == 0
    (c,), = HFBackend(model, tiny_tokenizer, args).generate(encoded(tiny_tokenizer, PROMPTS[:1]), seed=0)
    assert c.finish_reason == "eos" and c.token_ids == [] and c.top_ids == []


def test_sampling_is_seeded_and_several_samples_per_prompt(tiny_tokenizer, llama_factory):
    backend = HFBackend(llama_factory(seed=1), tiny_tokenizer,
                        GenerateArguments(max_new_tokens=8, do_sample=True, num_return_sequences=3))
    prompts = encoded(tiny_tokenizer, PROMPTS[:2])
    a, b = backend.generate(prompts, seed=5), backend.generate(prompts, seed=5)
    assert [[c.token_ids for c in p] for p in a] == [[c.token_ids for c in p] for p in b]
    assert len(a) == 2 and all(len(p) == 3 for p in a)
    assert len({tuple(c.token_ids) for c in a[0]}) > 1


# --------------------------------------------------------------------------- output, resume, merge


def test_rows_metadata_and_input_order(teacher_dir, prompts_file, tmp_path):
    args = gen_args(teacher_dir, prompts_file, tmp_path / "out.jsonl")
    summary = run_generation(args)
    rows = read(args.output)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(PROMPTS))]  # input order, not length order
    r = rows[3]
    assert r["prompt"] == PROMPTS[3] and r["teacher"] == str(teacher_dir) and r["finish_reason"] in ("eos", "length")
    assert r["generation"] == {"max_new_tokens": 12, "do_sample": False, "seed": 0}
    assert r["prompt_tokens"] > 0 and 0 <= r["response_tokens"] <= 12
    assert summary["world_size"] == 1 and summary["rows_written"] == len(PROMPTS)
    assert not Path(str(args.output) + ".parts").exists()
    again = run_generation(args)  # same config, complete: nothing to do
    assert again["status_at_start"] == "complete" and again["rows_generated_this_run"] == 0
    assert read(args.output) == rows


def test_resume_repairs_truncated_line_and_matches_uninterrupted(teacher_dir, prompts_file, tmp_path):
    full = gen_args(teacher_dir, prompts_file, tmp_path / "full.jsonl")
    run_generation(full)
    reference = read(full.output)

    # A crash: two batches on disk (rows in plan order), the third cut mid-line, no final file.
    part = gen_args(teacher_dir, prompts_file, tmp_path / "part.jsonl")
    store_meta = json.loads((tmp_path / "full.meta.json").read_text())
    (tmp_path / "part.meta.json").write_text(json.dumps({"fingerprint": store_meta["fingerprint"], "complete": False}))
    shard = tmp_path / "part.jsonl.parts" / "shard-00000.jsonl"
    shard.parent.mkdir()
    by_id = {r["id"]: r for r in reference}
    written = [by_id[f"p{i}"] for i in (0, 5, 7, 10, 11, 16, 18, 2, 3)]
    shard.write_text("".join(json.dumps(r) + "\n" for r in written) + json.dumps(by_id["p4"])[:25])
    summary = run_generation(part)
    assert summary["rows_already_done"] == len(written) and summary["status_at_start"] == "resume"
    assert summary["rows_generated_this_run"] == len(PROMPTS) - len(written)
    assert read(part.output) == reference


def test_different_config_is_refused_unless_overwrite(teacher_dir, prompts_file, tmp_path):
    args = gen_args(teacher_dir, prompts_file, tmp_path / "out.jsonl", max_prompts=4)
    run_generation(args)
    changed = gen_args(teacher_dir, prompts_file, tmp_path / "out.jsonl", max_prompts=4, max_new_tokens=5)
    with pytest.raises(OutputExistsError, match="max_new_tokens: 12 -> 5.*--overwrite"):
        run_generation(changed)
    changed.overwrite = True
    run_generation(changed)
    assert all(r["generation"]["max_new_tokens"] == 5 for r in read(changed.output))
    (tmp_path / "foreign.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(OutputExistsError, match="not written by this generator"):
        run_generation(gen_args(teacher_dir, prompts_file, tmp_path / "foreign.jsonl"))


def test_vllm_backend_missing_gives_clear_error(teacher_dir, prompts_file, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install vllm"):
        run_generation(gen_args(teacher_dir, prompts_file, tmp_path / "v.jsonl", backend="vllm"))


# ------------------------------------------------------------------------------------------ training


def test_generated_rows_train_with_sequence_and_logit_kd(teacher_dir, prompts_file, tmp_path, tiny_tokenizer):
    from llm_distill.config import DataArguments
    from llm_distill.data import load_rows, prepare_dataset
    from llm_distill.losses import IGNORE_INDEX
    from llm_distill.jobs.distill import main as run_distillation

    args = gen_args(teacher_dir, prompts_file, tmp_path / "gen.jsonl", logprobs=2)
    run_generation(args)
    ds, fmt = load_rows(args.output)
    assert fmt == "prompt_response"
    rows = read(args.output)
    tokenized = prepare_dataset(ds, fmt, tiny_tokenizer, DataArguments(max_length=64))
    for row, tok in zip(rows, tokenized):
        n_prompt = len(tiny_tokenizer(row["prompt"])["input_ids"])
        assert tok["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # loss on the response only
        ends_with_eos = tok["input_ids"][-1] == tiny_tokenizer.eos_token_id
        assert ends_with_eos == (row["finish_reason"] == "eos")     # no EOS after a cut response

    student = tmp_path / "student"
    make_llama(tiny_tokenizer, seed=2, hidden_size=16, intermediate_size=32).save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)
    for alpha in ("0.0", "0.5"):
        result = run_distillation([
            "--config", str(REPO_ROOT / "configs" / "two-stage-response-kd.yaml"), "--dataset", str(args.output),
            "--teacher_model", str(teacher_dir), "--student_model", str(student), "--eval_dataset", str(args.output),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "64", "--alpha", alpha,
            "--output_dir", str(tmp_path / f"out-{alpha}"), "--use_cpu", "true", "--logging_steps", "1",
        ])
        assert result["steps"] == 2 and result["student_perplexity_after"] < result["student_perplexity_before"]


def test_chat_rows_are_messages_the_trainer_reads(teacher_dir, tmp_path, tiny_tokenizer):
    from llm_distill.data import load_rows

    prompts = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "def add(a, b):"}]},
        {"id": "b", "prompt": "import os"},
    ])
    args = gen_args(teacher_dir, prompts, tmp_path / "chat_out.jsonl", chat_template="auto")
    run_generation(args)
    rows = read(args.output)
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"]
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": rows[0]["response"]}
    if all(r["response"].strip() for r in rows):
        assert load_rows(args.output)[1] == "messages"


# --------------------------------------------------------------------------- real processes (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "LLM_DISTILL_PRINT_JSON": "1", "PYTHONPATH": str(REPO_ROOT)}


def summary_of(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(teacher_dir, tmp_path):
    n = 60
    many = write_jsonl(tmp_path / "many.jsonl", [{"id": i, "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // 20)}
                                                 for i in range(n)])
    script = [PY, str(REPO_ROOT / "scripts" / "generate.py")]
    small = dict(batch_size=2, max_new_tokens=8)
    reference = gen_args(teacher_dir, many, tmp_path / "ref.jsonl", **small)
    run_generation(reference)

    args = gen_args(teacher_dir, many, tmp_path / "killed.jsonl", **small)
    shard = tmp_path / "killed.jsonl.parts" / "shard-00000.jsonl"
    proc = subprocess.Popen(script + cli(args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 2:  # at least one complete batch on disk
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the generator finished before it could be killed:\n" + proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = shard.read_text().count("\n")
    assert 2 <= done_at_kill < n and not Path(args.output).exists()

    out = subprocess.run(script + cli(args), env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = summary_of(out.stdout)
    assert summary["status_at_start"] == "resume" and summary["rows_already_done"] >= done_at_kill - 2
    rows = read(args.output)
    assert sorted(r["id"] for r in rows) == list(range(n))       # every id exactly once
    assert rows == read(reference.output)                          # identical to the uninterrupted greedy run


@pytest.mark.slow
def test_two_processes_match_one_process(teacher_dir, tmp_path):
    many = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": PROMPTS[i % len(PROMPTS)] + "\n" * (i % 3)}
                                              for i in range(16)])
    one = gen_args(teacher_dir, many, tmp_path / "one.jsonl", batch_size=4, max_new_tokens=8)
    assert run_generation(one)["world_size"] == 1

    two = gen_args(teacher_dir, many, tmp_path / "two.jsonl", batch_size=4, max_new_tokens=8)
    def launch(args):
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO_ROOT / "scripts" / "generate.py")]
        return subprocess.run(cmd + cli(args), env={**env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True,
                              text=True, timeout=300)

    out = launch(two)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = summary_of(out.stdout)
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["per_rank"]] == [0, 1]
    assert all(r["rows"] > 0 for r in summary["per_rank"])           # both ranks really generated
    assert read(two.output) == read(one.output)
    # A refusal on the main process (another config on the same output) stops both ranks, none hangs at a barrier.
    start = time.time()
    refused = launch(gen_args(teacher_dir, many, tmp_path / "two.jsonl", batch_size=4, max_new_tokens=9))
    assert refused.returncode != 0 and "max_new_tokens" in refused.stderr and time.time() - start < 120
    assert "The main process stopped" in refused.stderr  # the other rank's own error names the cause too


def test_repair_jsonl_keeps_every_complete_row_before_a_long_truncated_one(tmp_path):
    """A truncated last row longer than the 1 MiB scan window (many logprobs): only that row is cut."""
    from llm_distill.generation import repair_jsonl

    path = tmp_path / "shard.jsonl"
    complete = json.dumps({"id": "a", "response": "x" * 1000}) + "\n" + json.dumps({"id": "b", "response": "y"}) + "\n"
    truncated = b'{"id": "c", "response": "' + b"z" * (3 << 20)  # killed mid-write
    path.write_bytes(complete.encode() + truncated)
    removed = repair_jsonl(path)
    assert path.read_bytes() == complete.encode() and removed == len(truncated)
    assert repair_jsonl(path) == 0  # a clean file is left alone
    path.write_bytes(b'{"id": "only", "resp')
    repair_jsonl(path)
    assert path.read_bytes() == b""


@pytest.mark.parametrize("drop_empty", [False, True])
def test_empty_responses_are_kept_unless_dropped_on_request(tmp_path, drop_empty):
    """By default every prompt id is in the final file once, an empty answer (EOS first) included: the trainer
    learns "stop here" from it. ``drop_empty`` leaves such rows out and lists each one in the summary."""
    from llm_distill.generation import ShardStore

    rows = [{"id": "p0", "response": "x = 1", "finish_reason": "eos"},
            {"id": "p1", "response": "", "finish_reason": "eos"},
            {"id": "p1", "sample_index": 1, "response": "y", "finish_reason": "length"}]
    store = ShardStore(tmp_path / "out.jsonl")
    assert store.prepare({"config": 1}, overwrite=False) == "new"
    with store.open_shard(0) as handle:
        store.append(handle, rows)
    expected = {("p0", 0), ("p1", 0), ("p1", 1)}
    merged = store.merge({"p0": 0, "p1": 1}, expected, drop_empty)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert merged["finish_reasons"] == {"eos": 2, "length": 1}
    if drop_empty:
        assert written == [rows[0], rows[2]] and merged["rows_written"] == 2 and merged["empty_dropped"] == 1
        assert merged["empty_dropped_rows"] == [{"id": "p1", "sample_index": 0}]
    else:
        assert written == rows and merged["rows_written"] == 3 and merged["empty_dropped"] == 0
    assert GenerateArguments.__dataclass_fields__["drop_empty"].default is False


# ------------------------------------------------------------------------------ per-row seeded sampling (#18)


def test_sampled_rows_do_not_depend_on_batch_size(teacher_dir, prompts_file, tmp_path):
    """A row's samples depend only on (seed, id, sample_index): batch 2 and batch 8 write the same file."""
    common = dict(do_sample=True, temperature=1.0, top_k=20, num_return_sequences=2, max_new_tokens=8)
    small = gen_args(teacher_dir, prompts_file, tmp_path / "b2.jsonl", batch_size=2, **common)
    large = gen_args(teacher_dir, prompts_file, tmp_path / "b8.jsonl", batch_size=8, **common)
    run_generation(small)
    run_generation(large)
    rows = read(small.output)
    assert rows == read(large.output) and len(rows) == 2 * len(PROMPTS)
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["id"], set()).add(r["response"])
    assert any(len(v) > 1 for v in by_prompt.values())           # two samples of one prompt do differ: sampled
    other = gen_args(teacher_dir, prompts_file, tmp_path / "s1.jsonl", batch_size=2, **{**common, "seed": 1})
    run_generation(other)
    assert read(other.output) != rows                            # and the seed matters


def test_row_sampler_draws_from_the_warped_distribution(tiny_tokenizer, llama_factory):
    """The per-row sampler is a sampler of the right distribution: top_k=1 is greedy, and its draws at T=1 follow
    softmax(logits) (chi-square-free check: the empirical frequency of the most likely token within 5 sigma)."""
    from llm_distill.generation import RowSampler

    model = llama_factory(seed=1)
    greedy = HFBackend(model, tiny_tokenizer, GenerateArguments(max_new_tokens=6))
    top1 = HFBackend(model, tiny_tokenizer, GenerateArguments(max_new_tokens=6, do_sample=True, top_k=1))
    prompts = encoded(tiny_tokenizer, PROMPTS[:4])
    assert [[c.token_ids for c in p] for p in greedy.generate(prompts, seed=0)] == \
        [[c.token_ids for c in p] for p in top1.generate(prompts, seed=3)]
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = RowSampler()
    n = 4000
    sampler.start(list(range(n)))
    drawn = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, 4).clone()).argmax(-1)
    p = torch.softmax(logits, -1)[0, 0].item()
    freq = (drawn == 0).float().mean().item()
    assert abs(freq - p) < 5 * (p * (1 - p) / n) ** 0.5


@pytest.mark.slow
def test_sampled_two_processes_batch_3_match_one_process_batch_8(teacher_dir, prompts_file, tmp_path):
    """Sampled generation re-sharded (2 processes) and re-batched (3 vs 8) writes the identical file."""
    common = dict(do_sample=True, num_return_sequences=2, max_new_tokens=8)
    one = gen_args(teacher_dir, prompts_file, tmp_path / "one.jsonl", batch_size=8, **common)
    run_generation(one)
    two = gen_args(teacher_dir, prompts_file, tmp_path / "two.jsonl", batch_size=3, **common)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO_ROOT / "scripts" / "generate.py")]
    out = subprocess.run(cmd + cli(two), env={**env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert summary_of(out.stdout)["world_size"] == 2
    assert read(two.output) == read(one.output)


# ------------------------------------------------------------------------- refill decoding (#18, item 4)


def eos_prone(model, tokenizer, prompts, max_new_tokens=16, scale=1.05):
    """``model`` changed so that rows stop at EOS after different numbers of tokens: EOS's output row becomes
    ``scale`` x that of the token the model generates most, so EOS wins wherever that token would have."""
    backend = HFBackend(model, tokenizer, GenerateArguments(max_new_tokens=max_new_tokens, decoding="static"))
    counts = {}
    for (c,) in backend.generate(prompts, seed=0):
        for t in c.token_ids[1:]:
            counts[t] = counts.get(t, 0) + 1
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = scale * model.lm_head.weight[max(counts, key=counts.get)]
    return model


def by_index(backend, prompts, batch_size, seed=0):
    """Every prompt's completions through ``generate_batches``, keyed by prompt index."""
    out = {}
    for batch, completions in backend.generate_batches(plan_batches(prompts, batch_size), seed=seed):
        out.update({p.index: [(c.token_ids, c.finish_reason, c.top_ids, c.top_logprobs) for c in comps]
                    for p, comps in zip(batch, completions)})
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_refill_greedy_equals_one_at_a_time_as_rows_finish_at_different_steps(tiny_tokenizer, llama_factory, seed):
    """Refill keeps 3 rows in flight over 14 prompts; rows end at EOS after 1..15 tokens or at max_new_tokens, their
    slots are refilled (cache rows cut out, new prompts prefilled and joined): every row equals one-prompt generate."""
    prompts = encoded(tiny_tokenizer, PROMPTS[:14])
    model = eos_prone(llama_factory(seed=seed), tiny_tokenizer, prompts)
    static = HFBackend(model, tiny_tokenizer, GenerateArguments(max_new_tokens=16, decoding="static"))
    alone = {p.index: [(c.token_ids, c.finish_reason, None, None) for c in static.generate([p], seed=0)[0]]
             for p in prompts}
    lengths = {len(v[0][0]) for v in alone.values()}
    assert {v[0][1] for v in alone.values()} == {"eos", "length"} and len(lengths) >= 4  # rows do end apart
    for rows in (1, 3, 14):
        refill = HFBackend(model, tiny_tokenizer, GenerateArguments(max_new_tokens=16, batch_size=rows))
        assert refill.refill and by_index(refill, prompts, rows) == alone


def test_refill_sampled_rows_equal_static_rows_under_per_row_seeds(tiny_tokenizer, llama_factory):
    """Sampling (top-k, 2 samples a prompt, rows stopping at EOS): refill with 2 or 8 rows in flight writes the
    static path's samples, since each row draws from its own (seed, id, sample_index) generator."""
    prompts = encoded(tiny_tokenizer, PROMPTS[:10])
    model = eos_prone(llama_factory(seed=1), tiny_tokenizer, prompts, scale=2.0)
    common = dict(max_new_tokens=12, do_sample=True, top_k=20, num_return_sequences=2)
    static = by_index(HFBackend(model, tiny_tokenizer, GenerateArguments(decoding="static", **common)), prompts, 4, 7)
    for rows in (1, 4):  # batch_size prompts in flight: 2 and 8 rows
        refill = HFBackend(model, tiny_tokenizer, GenerateArguments(batch_size=rows, **common))
        assert by_index(refill, prompts, rows, 7) == static
    assert any(a[0] != b[0] for a, b in static.values())                # the two samples differ: sampled
    assert {r[1] for rs in static.values() for r in rs} == {"eos", "length"}


def test_refill_penalty_and_top_logprobs_equal_one_at_a_time(tiny_tokenizer, llama_factory):
    """Repetition penalty over each row's own tokens and the raw top-k log-probs: refill equals one-prompt generate
    (the static path's padded batches would also penalise the pad id)."""
    prompts = encoded(tiny_tokenizer, PROMPTS[:8])
    model = eos_prone(llama_factory(seed=2), tiny_tokenizer, prompts)
    args = dict(max_new_tokens=12, repetition_penalty=1.3, logprobs=3)
    static = HFBackend(model, tiny_tokenizer, GenerateArguments(decoding="static", **args))
    refill = by_index(HFBackend(model, tiny_tokenizer, GenerateArguments(batch_size=3, **args)), prompts, 3)
    for p in prompts:
        (c,) = static.generate([p], seed=0)[0]
        (tokens, reason, top_ids, top_logprobs), = refill[p.index]
        assert (tokens, reason, top_ids) == (c.token_ids, c.finish_reason, c.top_ids)
        assert torch.allclose(torch.tensor(top_logprobs), torch.tensor(c.top_logprobs), atol=1e-4)


def test_refill_needs_a_full_attention_cache(tiny_tokenizer):
    """A sliding-window model (its cache layers cannot be joined by row) runs the static path, with a warning."""
    from transformers import MistralConfig, MistralForCausalLM

    from llm_distill.generation.refill import supports_refill

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                           pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    sliding = MistralForCausalLM(config).eval()
    assert not supports_refill(sliding)
    backend = HFBackend(sliding, tiny_tokenizer, GenerateArguments(max_new_tokens=4))
    assert not backend.refill and len(backend.generate(encoded(tiny_tokenizer, PROMPTS[:2]), seed=0)) == 2
