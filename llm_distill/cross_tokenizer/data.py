"""Each row tokenized by both tokenizers, aligned, and padded: the data path of cross-tokenizer distillation.

Both models must read the *same text*. For ``text`` and ``prompt``/``response`` rows that text is the row's; each
side adds its own special tokens (a BOS on one side only is fine: special tokens have empty spans and are context,
see ``llm_distill.cross_tokenizer.alignment``). For ``messages`` rows each side renders its *own* chat template, so
the two rendered strings differ; the shared text is then the concatenation of the messages' contents, every token
is mapped into it through a monotone map of the rendered characters (template markup -> empty spans), and only the
contents are aligned. Labels follow ``llm_distill.data`` on each side (prompt / template / non-assistant tokens
-100), so response-only masks hold on both sides, and a group gets the KD term when its student first token has a
label.

``text`` rows with ``packing`` are split into pieces of at most ``max_length`` student tokens (cut at student token
boundaries), each piece one row: packing concatenates token ids, which cannot be done for two tokenizers at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset

from llm_distill.cross_tokenizer.alignment import align, byte_spans, compared_positions
from llm_distill.data import DataValidationError, DistillationCollator, Fields, assistant_spans, subsample
from llm_distill.losses import IGNORE_INDEX


@dataclass
class SideEncoding:
    """One side's tokens of a row: ids, labels, and byte spans into the shared text (empty for special tokens)."""

    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]]

    def truncated(self, n: int) -> SideEncoding:
        return SideEncoding(self.input_ids[:n], self.labels[:n], self.spans[:n])


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _encode(text: str, tokenizer, special: bool = True):
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    if "offset_mapping" not in enc:
        raise DataValidationError(f"{type(tokenizer).__name__} gives no offsets: cross-tokenizer distillation needs "
                                  "fast tokenizers (use_fast=True) on both sides.")
    return enc["input_ids"], list(enc["offset_mapping"])


def _special_mask(tokenizer, ids: list[int]) -> list[bool]:
    specials = set(tokenizer.all_special_ids)
    return [i in specials for i in ids]


def encode_prompt_response(prompt: str, response: str, tokenizer, add_eos: bool = True) -> SideEncoding:
    """Like ``llm_distill.data.tokenize_prompt_response``; shared text = ``prompt + response``."""
    p_ids, p_off = _encode(prompt, tokenizer)
    r_ids, r_off = _encode(response, tokenizer, special=False)
    eos = _eos(tokenizer) if add_eos else []
    ids = p_ids + r_ids + eos
    offsets = [(a, b) for a, b in p_off] + [(a + len(prompt), b + len(prompt)) for a, b in r_off] + [(0, 0)] * len(eos)
    spans = _without_specials(byte_spans(prompt + response, offsets), _special_mask(tokenizer, ids))
    return SideEncoding(ids, [IGNORE_INDEX] * len(p_ids) + r_ids + eos, spans)


def encode_text(text: str, tokenizer) -> SideEncoding:
    """Like ``llm_distill.data.tokenize_text`` (loss on every token, EOS appended)."""
    ids, offsets = _encode(text, tokenizer)
    eos = _eos(tokenizer)
    ids, offsets = ids + eos, offsets + [(0, 0)] * len(eos)
    return SideEncoding(ids, list(ids), _without_specials(byte_spans(text, offsets), _special_mask(tokenizer, ids)))


def _without_specials(spans, special):
    """Special tokens cover no text, whatever offsets a tokenizer reports for them."""
    return [(0, 0) if is_special else span for span, is_special in zip(spans, special)]


def encode_messages(messages: list[dict], tokenizer) -> SideEncoding:
    """Render with this side's chat template; spans point into the concatenated message contents."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataValidationError("The data has 'messages' but a tokenizer has no chat_template: cross-tokenizer "
                                  "distillation renders each side with its own template; set both.")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    contents, cursor, shared = [], 0, ""  # (rendered start, rendered end, shared-text start) of each content
    for msg in messages:
        start = full.find(msg["content"], cursor)
        if start < 0:
            raise DataValidationError("A chat template does not copy message contents verbatim, so the two sides "
                                      "cannot be aligned on them; use prompt/response rows instead.")
        contents.append((start, start + len(msg["content"]), len(shared)))
        cursor, shared = start + len(msg["content"]), shared + msg["content"]

    def to_shared(pos: int) -> int:  # monotone: inside a content -> its shared position; between -> next content
        for start, end, offset in contents:
            if pos <= end:
                return offset + max(0, pos - start)
        return len(shared)

    assistant = assistant_spans(messages, tokenizer, full)
    ids, offsets = _encode(full, tokenizer, special=False)
    labels = [t if any(a <= s < b for a, b in assistant) else IGNORE_INDEX for t, (s, _e) in zip(ids, offsets)]
    spans = byte_spans(shared, [(to_shared(a), to_shared(b)) for a, b in offsets])
    return SideEncoding(ids, labels, _without_specials(spans, _special_mask(tokenizer, ids)))


def encode_row(row: dict, fmt: str, fields: Fields, tokenizer) -> SideEncoding:
    if fmt == "text":
        return encode_text(row[fields.text], tokenizer)
    if fmt == "prompt_response":
        key = fields.response if fields.response in row else "completion"
        return encode_prompt_response(row[fields.prompt], row[key], tokenizer,
                                      add_eos=row.get("finish_reason") != "length")
    return encode_messages(row[fields.messages], tokenizer)


def cross_tokenize(student: SideEncoding, teacher: SideEncoding) -> dict:
    """One dataset row: the student's ids / labels, the teacher's ids, and the compared positions of the groups."""
    s_pos, t_pos, in_kd = compared_positions(align(student.spans, teacher.spans), student.labels)
    return {"input_ids": student.input_ids, "labels": student.labels, "teacher_input_ids": teacher.input_ids,
            "xtok_student_pos": s_pos, "xtok_teacher_pos": t_pos, "xtok_kd": [int(k) for k in in_kd]}


def split_text(text: str, tokenizer, max_tokens: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_tokens`` tokens of ``tokenizer``, at its token boundaries."""
    _ids, offsets = _encode(text, tokenizer, special=False)
    pieces, start = [], 0
    for k in range(max_tokens, len(offsets), max_tokens):
        cut = offsets[k - 1][1]
        if cut > start:
            pieces.append(text[start:cut])
            start = cut
    if text[start:].strip():
        pieces.append(text[start:])
    return pieces


def prepare_cross_dataset(ds: Dataset, fmt: str, student_tokenizer, teacher_tokenizer, data_args,
                          max_samples: int | None = None, seed: int = 0, desc: str = "train") -> Dataset:
    """Both sides' tokens and the alignment for every row; truncated to ``max_length`` per side."""
    fields = Fields.from_args(data_args)
    if fmt == "text" and data_args.packing:
        budget = data_args.max_length - 2  # room for each side's BOS / EOS
        ds = Dataset.from_list([{fields.text: piece} for row in ds
                                for piece in split_text(row[fields.text], student_tokenizer, budget)])

    def encode(row):
        n = data_args.max_length
        return cross_tokenize(encode_row(row, fmt, fields, student_tokenizer).truncated(n),
                              encode_row(row, fmt, fields, teacher_tokenizer).truncated(n))

    out = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenizing {desc} with both tokenizers")
    out = out.filter(lambda r: any(r["xtok_kd"]) or any(t != IGNORE_INDEX for t in r["labels"][1:]))
    return subsample(out, desc, max_samples, seed)


@dataclass
class CrossTokenizerCollator:
    """Pads the student's fields (``DistillationCollator``), the teacher's ids (its own pad id) and the groups."""

    tokenizer: object
    teacher_tokenizer: object

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = DistillationCollator(self.tokenizer)(rows)
        teacher = DistillationCollator(self.teacher_tokenizer)(
            [{"input_ids": r["teacher_input_ids"], "labels": r["teacher_input_ids"]} for r in rows])
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = teacher["input_ids"], teacher["attention_mask"]
        width = max(1, max(len(r["xtok_kd"]) for r in rows))
        for name in ("xtok_student_pos", "xtok_teacher_pos", "xtok_kd"):
            column = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                column[i, : len(r[name])] = torch.as_tensor(r[name], dtype=torch.long)
            batch[name] = column
        return batch
