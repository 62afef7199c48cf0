"""Byte-offset alignment of two tokenizations of the same text: the groups a cross-tokenizer loss compares.

Two tokenizers cut the same text differently ("hello world" may be ``hello|Ġworld`` on one side and
``hell|o|Ġw|orld`` on the other), so position ``t`` of the student and position ``t`` of the teacher predict
different things. What both sides *do* share is the text, so we align on it - in **bytes**, not characters or
strings: byte-level BPE splits a multi-byte UTF-8 character (``é`` = 2 bytes, an emoji = 4) into pieces that a
string buffer cannot place, while a byte offset is unambiguous (TRL's GOLD trainer moved to byte offsets for this
reason).

Each side's ``return_offsets_mapping`` spans are converted to byte spans (:func:`byte_spans`). A side may cut
*between* two of its tokens at byte ``b`` when every earlier token ends at or before ``b`` and the next one starts
at or after it (two pieces of one split character share a span, so there is never a cut between them). Bytes
that no token's span covers (whitespace a tokenizer trims from its offsets) belong to the *following* token.
The **groups** are the stretches between consecutive cut points common to both sides: each covers an identical
byte range on both sides and holds one or more tokens per side (merged until the boundaries coincide).

Special tokens have empty spans (BOS, EOS, chat-template markers once mapped to the shared text, see
``llm_distill.cross_tokenizer.data``). Where *both* sides have special tokens at the same cut (EOS after the text,
end-of-turn markers between chat turns) they form a group of their own with an empty byte range, so that "stop
here" is distilled too; special tokens on one side only (a BOS that only one tokenizer adds) are context: they
join the group of the next content token. Tokens after the last common cut (a side truncated earlier) belong to
no group.

What the divergences compare (the design choice). A group's probability is the product of its tokens'
conditionals, and the two sides factor it differently; the one factor that both sides condition on *the same
bytes* is the first (for a special group: its first special token): the student's distribution at the position before the group's first content token, and the
teacher's at the position before its own. Those two next-token distributions (over different vocabularies) are
what ``uld`` / ``hybrid`` compare, one pair per group (``Alignment.student_first`` / ``teacher_first`` minus one).
The later tokens of a multi-token group are conditioned on different partial strings on the two sides and are
left to the student's cross-entropy. A group whose first content token is at position 0 on either side (no BOS:
nothing predicts it) is not compared. With one tokenizer on both sides every group is one token and the
comparison is exactly token-level KD (``tests/test_cross_tokenizer.py`` holds ``hybrid`` to it).
"""

from __future__ import annotations

from dataclasses import dataclass

Span = tuple[int, int]


def byte_spans(text: str, char_offsets) -> list[Span]:
    """Character offsets (``return_offsets_mapping``) -> UTF-8 byte offsets into ``text``."""
    cumulative = [0]
    for ch in text:
        cumulative.append(cumulative[-1] + len(ch.encode("utf-8")))
    return [(cumulative[s], cumulative[e]) for s, e in char_offsets]


def cut_points(spans: list[Span]) -> dict[int, int]:
    """``{byte position: index of the first token after the cut}`` of one side, including the end (-> the index after
    the last content token: trailing special tokens such as EOS follow it).

    A cut before content token ``i`` exists at the furthest byte reached so far when ``i`` starts at or after it;
    the empty-span tokens just before ``i`` stay after the cut (they are context for ``i``)."""
    cuts: dict[int, int] = {}
    reach, after_previous = 0, 0
    for i, (start, end) in enumerate(spans):
        if end <= start:  # a special token: no bytes
            continue
        if start >= reach:
            cuts[reach] = after_previous
        reach, after_previous = max(reach, end), i + 1
    if after_previous:
        cuts[reach] = after_previous
    return cuts


@dataclass(frozen=True)
class Alignment:
    """Groups of tokens covering identical byte ranges on both sides.

    ``groups[k]`` is group k's byte range; ``student_tokens[k]`` / ``teacher_tokens[k]`` its ``[start, stop)`` token
    index ranges (empty-span tokens included); ``student_first[k]`` / ``teacher_first[k]`` the index of its first
    content token (the one whose conditional the losses compare, predicted from the position before it).
    """

    groups: list[Span]
    student_tokens: list[Span]
    teacher_tokens: list[Span]
    student_first: list[int]
    teacher_first: list[int]

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, side: str, n_tokens: int) -> list[int]:
        """Group index of each token of ``side`` (``"student"`` / ``"teacher"``), -1 for tokens in no group."""
        out = [-1] * n_tokens
        for k, (start, stop) in enumerate(self.student_tokens if side == "student" else self.teacher_tokens):
            out[start:stop] = [k] * (stop - start)
        return out


def _first_content(spans: list[Span], start: int) -> int:
    i = start
    while i < len(spans) and spans[i][1] <= spans[i][0]:
        i += 1
    return i


def align(student_spans: list[Span], teacher_spans: list[Span]) -> Alignment:
    """Group two tokenizations of the same text (byte spans, :func:`byte_spans`) by their common cut points.

    Where *both* sides have special tokens at the same cut (an EOS after the text on both sides, end-of-turn markers
    between chat turns) those tokens form a group of their own with an empty byte range, so that "stop here" is
    distilled too; special tokens on one side only are context of the next group."""
    cuts_s, cuts_t = cut_points(student_spans), cut_points(teacher_spans)
    common = sorted(set(cuts_s) & set(cuts_t))
    out = {name: [] for name in ("groups", "student_tokens", "teacher_tokens", "student_first", "teacher_first")}

    def add(lo, hi, tok_s, tok_t, first_s, first_t):
        for name, value in zip(out, ((lo, hi), tok_s, tok_t, first_s, first_t)):
            out[name].append(value)

    for k, lo in enumerate(common):
        s0, t0 = cuts_s[lo], cuts_t[lo]
        s_end = cuts_s[common[k + 1]] if k + 1 < len(common) else len(student_spans)
        t_end = cuts_t[common[k + 1]] if k + 1 < len(common) else len(teacher_spans)
        fs, ft = _first_content(student_spans, s0), _first_content(teacher_spans, t0)
        last = k + 1 == len(common)
        if fs > s0 and ft > t0 and (not last or (lo == max(cuts_s) and lo == max(cuts_t))):
            add(lo, lo, (s0, min(fs, s_end)), (t0, min(ft, t_end)), s0, t0)  # specials on both sides: own group
            s0, t0 = fs, ft
        if not last:
            add(lo, common[k + 1], (s0, s_end), (t0, t_end), fs, ft)
    return Alignment(**out)


def compared_positions(alignment: Alignment, student_labels: list[int], ignore_index: int = -100):
    """The loss's view of an alignment: ``(student_pos, teacher_pos, in_kd)`` lists, one entry per comparable group.

    ``student_pos`` / ``teacher_pos`` are the positions whose next-token distributions are compared (the token before
    each side's first content token); groups whose first token is at position 0 on either side are skipped.
    ``in_kd`` is True when the student's first token of the group carries a label (response-only masks: a group in
    the prompt gets no KD term)."""
    student_pos, teacher_pos, in_kd = [], [], []
    for fs, ft in zip(alignment.student_first, alignment.teacher_first):
        if fs == 0 or ft == 0:
            continue
        student_pos.append(fs - 1)
        teacher_pos.append(ft - 1)
        in_kd.append(student_labels[fs] != ignore_index)
    return student_pos, teacher_pos, in_kd
