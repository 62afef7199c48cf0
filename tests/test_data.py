"""Data loading: formats, labels only where the model should learn, and errors that say where and how to fix."""

import json

import pytest
from datasets import Dataset

from llm_distill.config import DataArguments
from llm_distill.data import (
    DataValidationError,
    DistillationCollator,
    load_rows,
    prepare_dataset,
    tokenize_messages,
    tokenize_prompt_response,
)
from llm_distill.losses import IGNORE_INDEX

from conftest import write_jsonl


def args(**kw):
    base = dict(dataset="unused", eval_dataset=None, max_length=64)
    base.update(kw)
    return DataArguments(**base)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], r"bad\.jsonl line 2: not valid JSON"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], r"line 2: field 'response' is missing"),
        (['{"prompt": "a", "response": "b"}', '', '{"prompt": "a", "response": 3}'],
         r"line 3: field 'response' must be a string, got int"),
        (['{"text": "fine"}', '{"text": "   "}'], r"line 2: field 'text' is empty"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r"line 1: field 'messages' has no non-empty assistant"),
        (['{"messages": [{"role": "robot", "content": "hi"}]}'], r"line 1: field 'messages\[0\]' must be an object"),
        (['{"question": "q", "answer": "a"}'], r"line 1: cannot tell the data format .*'answer', 'question'"),
        (['[1, 2]'], r"line 1: each line must be a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataValidationError, match=message):
        load_rows(str(path))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataValidationError, match="no rows"):
        load_rows(str(tmp_path / "empty.jsonl"))


def test_saved_dataset_rows_are_validated_too(tmp_path):
    Dataset.from_list([{"text": "ok"}, {"text": ""}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataValidationError, match=r"ds \[train\] row 1: field 'text' is empty"):
        load_rows(str(tmp_path / "ds"))


def test_prompt_response_labels_only_the_response(tiny_tokenizer):
    enc = tokenize_prompt_response("def add(a, b):", "    return a + b", tiny_tokenizer)
    n_prompt = len(tiny_tokenizer("def add(a, b):")["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(enc["input_ids"][n_prompt:-1]) == "    return a + b"


def test_messages_label_only_assistant_turns_and_no_double_bos(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second?"},
        {"role": "assistant", "content": "two"},
    ]
    enc = tokenize_messages(messages, tiny_tokenizer)
    learned = tiny_tokenizer.decode([t for t, y in zip(enc["input_ids"], enc["labels"]) if y != IGNORE_INDEX])
    assert learned == "one<|end|>\ntwo<|end|>\n"
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert enc["input_ids"] == tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][:2].count(tiny_tokenizer.bos_token_id) <= 1


def test_messages_without_chat_template_is_a_clear_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataValidationError, match="no chat_template"):
        tokenize_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok)


def test_packing_cuts_full_blocks_and_labels_everything(tmp_path, tiny_tokenizer, corpus_texts):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in corpus_texts[:3]])
    ds, fmt = load_rows(str(path))
    packed = prepare_dataset(ds, fmt, tiny_tokenizer, args(packing=True, max_length=32))
    total = sum(len(tiny_tokenizer(t)["input_ids"]) + 1 for t in corpus_texts[:3])
    assert len(packed) == total // 32
    assert all(len(r["input_ids"]) == 32 and r["labels"] == r["input_ids"] for r in packed)


def test_truncation_and_prompt_that_fills_max_length_is_dropped(tmp_path, tiny_tokenizer, caplog):
    rows = [{"prompt": "x = 1\n" * 40, "response": "y = 2"}, {"prompt": "a", "response": "b = 3\n" * 40}]
    path = write_jsonl(tmp_path / "pr.jsonl", rows)
    ds, fmt = load_rows(str(path))
    out = prepare_dataset(ds, fmt, tiny_tokenizer, args(max_length=16))
    assert len(out) == 1 and len(out[0]["input_ids"]) == 16
    assert "dropping 1 sequences" in caplog.text and "truncated" in caplog.text


def test_teacher_that_stopped_at_once_teaches_stop_here(tmp_path, tiny_tokenizer):
    """A generated row with an empty response and finish_reason eos is kept (generate.py writes every prompt id):
    its one label is the stop token, EOS or the chat template's end of turn. Empty elsewhere is still an error."""
    path = write_jsonl(tmp_path / "gen.jsonl", [{"id": "a", "prompt": "def f():", "response": "", "finish_reason": "eos"},
                                                 {"id": "b", "prompt": "x", "response": "y", "finish_reason": "length"}])
    ds, fmt = load_rows(str(path))
    out = prepare_dataset(ds, fmt, tiny_tokenizer, args())
    labelled = [[t for t in r["labels"] if t != IGNORE_INDEX] for r in out]
    assert labelled[0] == [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.eos_token_id not in labelled[1]  # cut at max_new_tokens: no stop is taught

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": "c", "messages": chat, "finish_reason": "eos"}])
    ds, fmt = load_rows(str(path))
    row = prepare_dataset(ds, fmt, tiny_tokenizer, args())[0]
    assert tiny_tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "<|end|>\n"

    for bad, message in (({"prompt": "p", "response": ""}, "field 'response' is empty"),
                         ({"prompt": "p", "response": " ", "finish_reason": "length"}, "field 'response' is empty"),
                         ({"messages": chat}, "field 'messages' has no non-empty assistant turn")):
        with pytest.raises(DataValidationError, match=f"line 1: {message}"):
            load_rows(str(write_jsonl(tmp_path / "bad.jsonl", [bad])))


def test_completion_is_accepted_as_response(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c", "id": 3}])
    ds, fmt = load_rows(str(path))
    assert fmt == "prompt_response"
    assert len(prepare_dataset(ds, fmt, tiny_tokenizer, args())) == 1


def test_max_samples_is_a_seeded_subset(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i} " * 3} for i in range(20)])
    ds, fmt = load_rows(str(path))
    a = prepare_dataset(ds, fmt, tiny_tokenizer, args(), max_samples=5, seed=1)
    b = prepare_dataset(ds, fmt, tiny_tokenizer, args(), max_samples=5, seed=1)
    assert len(a) == 5 and a["input_ids"] == b["input_ids"]


def test_collator_pads_right_with_masked_labels(tiny_tokenizer):
    batch = DistillationCollator(tiny_tokenizer, pad_to_multiple_of=8)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}]
    )
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1, 1:].eq(tiny_tokenizer.pad_token_id).all()
    assert batch["labels"][1].tolist() == [9] + [IGNORE_INDEX] * 7
    assert batch["attention_mask"].sum(1).tolist() == [3, 1]


def test_json_array_file_is_supported(tmp_path, tiny_tokenizer):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p", "response": "r"}]))
    ds, fmt = load_rows(str(tmp_path / "a.json"))
    assert fmt == "prompt_response" and len(ds) == 1
