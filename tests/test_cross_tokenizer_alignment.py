"""Byte-offset alignment on hand-built tokenizations and on two real tokenizers of different vocabularies."""

from __future__ import annotations

import pytest

from llm_distill.cross_tokenizer import (
    align,
    byte_spans,
    compared_positions,
    cut_points,
    encode_messages,
    encode_prompt_response,
    encode_text,
)
from llm_distill.losses import IGNORE_INDEX


def _spans(text: str, pieces: list[str | None]) -> list[tuple[int, int]]:
    """Char offsets of consecutive ``pieces`` of ``text`` (None = a special token, empty span) -> byte spans."""
    offsets, pos = [], 0
    for piece in pieces:
        if piece is None:
            offsets.append((0, 0))
            continue
        assert text.startswith(piece, pos)
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    return byte_spans(text, offsets)


def _group_text(text: str, alignment) -> list[bytes]:
    data = text.encode()
    return [data[a:b] for a, b in alignment.groups]


def test_byte_spans_count_utf8_bytes():
    assert byte_spans("aé😀b", [(0, 1), (1, 2), (2, 3), (3, 4)]) == [(0, 1), (1, 3), (3, 7), (7, 8)]


def test_bos_on_one_side_only_is_context_not_a_group():
    text = "def foo"
    student = _spans(text, ["def", " foo"])  # no BOS
    teacher = _spans(text, [None, "def", " ", "foo"])  # BOS, and the space on its own
    a = align(student, teacher)
    assert a.groups == [(0, 3), (3, 7)]
    assert a.teacher_tokens == [(0, 2), (2, 4)]  # the BOS belongs to the first group on the teacher side
    assert a.teacher_first == [1, 2] and a.student_first == [0, 1]
    # Group 0 cannot be compared (nothing predicts the student's first token); group 1 is predicted from position 0
    # on the student side (after "def") and position 1 on the teacher side (after BOS, "def").
    assert compared_positions(a, [5, 6]) == ([0], [1], [True])


def test_multibyte_character_split_differently_merges_until_boundaries_coincide():
    text = "café!"  # é = 2 bytes (3, 5)
    # student: "ca" | "f" + first byte of é | second byte of é | "!"  (byte-level BPE pieces share é's char span)
    student = [(0, 2), (2, 5), (3, 5), (5, 6)]
    # teacher: "c" | "af" | é's two bytes as two tokens | "!"
    teacher = [(0, 1), (1, 3), (3, 5), (3, 5), (5, 6)]
    assert cut_points(student) == {0: 0, 2: 1, 5: 3, 6: 4}  # never between the two pieces of é
    a = align(student, teacher)
    assert a.groups == [(0, 5), (5, 6)]
    assert _group_text(text, a) == ["café".encode(), b"!"]
    assert a.student_tokens == [(0, 3), (3, 4)] and a.teacher_tokens == [(0, 4), (4, 5)]


def test_whitespace_merged_into_a_token_on_one_side():
    text = "x = 1"
    student = _spans(text, ["x ", "= ", "1"])  # spaces glued to the left
    teacher = _spans(text, ["x", " =", " 1"])  # spaces glued to the right
    a = align(student, teacher)
    assert a.groups == [(0, 5)]  # the boundaries never coincide inside: one group
    # Trimmed offsets (a token's span leaving out its leading space) leave a gap: it belongs to the next token, so
    # the cut still coincides with a side whose token includes the space.
    trimmed = [(0, 1), (2, 3), (4, 5)]
    assert align(teacher, trimmed).groups == [(0, 1), (1, 3), (3, 5)]


def test_emoji_split_into_byte_pieces_on_one_side():
    text = "ok 😀 go"
    student = byte_spans(text, [(0, 2), (2, 3), (3, 4), (3, 4), (3, 4), (3, 4), (4, 7)])  # four byte tokens for 😀
    teacher = byte_spans(text, [(0, 0), (0, 2), (2, 4), (4, 7)])  # BOS, " 😀" in one token
    a = align(student, teacher)
    assert _group_text(text, a) == [b"ok", " 😀".encode(), b" go"]
    assert a.student_tokens == [(0, 1), (1, 6), (6, 7)]


def test_special_tokens_on_both_sides_at_the_end_form_their_own_group():
    student = [(0, 2), (2, 4), (0, 0)]  # ..., EOS
    teacher = [(0, 0), (0, 2), (2, 4), (0, 0), (0, 0)]  # BOS, ..., end-of-turn, EOS
    a = align(student, teacher)
    assert a.groups == [(0, 2), (2, 4), (4, 4)]
    assert a.student_tokens == [(0, 1), (1, 2), (2, 3)] and a.teacher_tokens == [(0, 2), (2, 3), (3, 5)]
    assert a.student_first[-1] == 2 and a.teacher_first[-1] == 3  # "stop here", predicted after the text
    assert align(student, teacher[:4]).groups[-1] == (4, 4)
    assert align(student[:2], teacher).groups[-1] == (2, 4)  # a side without trailing specials: no end group


def test_truncated_side_only_aligns_the_shared_prefix():
    student = [(0, 2), (2, 4), (4, 6)]
    teacher = [(0, 2), (2, 4)]  # truncated
    a = align(student, teacher)
    assert a.groups == [(0, 2), (2, 4)]
    assert a.group_of("student", 3) == [0, 1, -1]


# ------------------------------------------------------------------------------------- real tokenizers


TEXTS = ["def naïve(x):\n    return x  # ok 😀 \u00e9t\u00e9\n", "  leading spaces\tand tabs\r\n", "中文 and Ελληνικά",
         "emoji 👩‍👩‍👧 family, flags 🇫🇷!"]


@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizers_groups_cover_identical_bytes(tiny_tokenizer, xtok_tokenizer, text):
    s, t = encode_text(text, tiny_tokenizer), encode_text(text, xtok_tokenizer)
    assert t.input_ids[0] == xtok_tokenizer.bos_token_id and s.input_ids[0] != tiny_tokenizer.bos_token_id
    a = align(s.spans, t.spans)
    data = text.encode()
    assert a.groups[0][0] == 0 and a.groups[-1][1] == len(data)
    assert all(b == c for (_, b), (c, _) in zip(a.groups, a.groups[1:]))  # a partition of the text's bytes
    for k, (lo, hi) in enumerate(a.groups):
        for tok, (start, stop) in ((tiny_tokenizer, a.student_tokens[k]), (xtok_tokenizer, a.teacher_tokens[k])):
            ids = [i for i in (s if tok is tiny_tokenizer else t).input_ids[start:stop] if i not in tok.all_special_ids]
            assert tok.decode(ids).encode() == data[lo:hi]  # each side's tokens of the group spell its bytes


def test_response_only_masks_survive_alignment(tiny_tokenizer, xtok_tokenizer):
    prompt, response = "Question: what is 2 + 2? ", "It is 4 (four) — ✓."
    s = encode_prompt_response(prompt, response, tiny_tokenizer)
    t = encode_prompt_response(prompt, response, xtok_tokenizer)
    a = align(s.spans, t.spans)
    boundary = len(prompt.encode())
    assert boundary in [lo for lo, _ in a.groups]  # the prompt/response boundary is a group boundary
    for k, (lo, _hi) in enumerate(a.groups):
        in_response = lo >= boundary
        assert (s.labels[a.student_first[k]] != IGNORE_INDEX) == in_response
        assert (t.labels[a.teacher_first[k]] != IGNORE_INDEX) == in_response
    _sp, _tp, in_kd = compared_positions(a, s.labels)
    assert sum(in_kd) == sum(1 for lo, _ in a.groups if lo >= boundary)


def test_chat_templates_of_each_side_align_on_the_contents(tiny_tokenizer, xtok_tokenizer):
    messages = [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "The sum is 4."}]
    s, t = encode_messages(messages, tiny_tokenizer), encode_messages(messages, xtok_tokenizer)
    assert s.input_ids != t.input_ids
    a = align(s.spans, t.spans)
    shared = "".join(m["content"] for m in messages).encode()
    assert b"".join(shared[lo:hi] for lo, hi in a.groups) == shared
    user_end = len(messages[0]["content"].encode())
    for k, (lo, hi) in enumerate(a.groups):  # assistant content is labelled on both sides, the user's on neither
        if hi > lo:
            assert (s.labels[a.student_first[k]] != IGNORE_INDEX) == (lo >= user_end)
            assert (t.labels[a.teacher_first[k]] != IGNORE_INDEX) == (lo >= user_end)
    # Template markers on both sides form their own (empty) groups: the user turn's are not labelled, the
    # assistant turn's end (<|end|> / </s>: when to stop) is, on both sides.
    specials = [k for k, (lo, hi) in enumerate(a.groups) if lo == hi]
    assert [a.groups[k][0] for k in specials] == [0, user_end, len(shared)]  # turn start, user end, assistant end
    assert [s.labels[a.student_first[k]] != IGNORE_INDEX for k in specials] == [False, False, True]
    assert t.input_ids[a.teacher_first[specials[-1]]] == xtok_tokenizer.eos_token_id
