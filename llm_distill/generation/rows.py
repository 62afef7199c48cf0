"""Output rows (one per completion, in the format the trainer reads) and the fingerprint of what decides them."""

from __future__ import annotations

import hashlib
import json

from llm_distill.generation.arguments import GenerateArguments
from llm_distill.generation.backends import Completion
from llm_distill.generation.prompts import Prompt, conversation


def make_rows(prompt: Prompt, completions: list[Completion], tokenizer, args: GenerateArguments, chat: bool,
              teacher_name: str, params: dict) -> list[dict]:
    rows = []
    for s, c in enumerate(completions):
        response = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        row = {"id": prompt.id}
        if args.num_return_sequences > 1:
            row["sample_index"] = s
        if chat:  # the trainer renders messages with the same template, so it sees what the teacher saw
            row["messages"] = [*conversation(prompt, args.system_prompt), {"role": "assistant", "content": response}]
        else:
            row["prompt"] = prompt.prompt
        row["response"] = response  # also in chat rows: one field to read for every format (ignored by the trainer)
        row.update(finish_reason=c.finish_reason, prompt_tokens=len(prompt.input_ids), response_tokens=len(c.token_ids),
                   teacher=teacher_name, generation=params)
        if prompt.truncated:
            row["prompt_truncated"] = True
        if c.top_ids is not None:
            row["teacher_logprobs"] = {"token_ids": c.token_ids, "top_ids": c.top_ids, "top_logprobs": c.top_logprobs}
        rows.append(row)
    return rows


def fingerprint_of(args: GenerateArguments, prompts: list[Prompt], chat: bool, max_prompt_length: int) -> dict:
    """What decides the content of the output; batch size and process count do not (they may change on resume)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.prompt, p.messages], ensure_ascii=False).encode())
    return {
        "teacher_model": args.teacher_model, "tokenizer": args.tokenizer, "teacher_dtype": args.teacher_dtype,
        "backend": args.backend, "prompts": args.prompts, "prompts_sha256": h.hexdigest()[:16],
        "num_prompts": len(prompts), "chat_template": chat, "system_prompt": args.system_prompt,
        "max_prompt_length": max_prompt_length, "over_length": args.over_length, "logprobs": args.logprobs,
        "num_return_sequences": args.num_return_sequences, "drop_empty": args.drop_empty, **args.sampling_params(),
        **({"sampler": "per-row seeds (seed, id, sample_index)"} if args.do_sample else {}),
    }
