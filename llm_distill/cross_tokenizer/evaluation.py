"""Held-out perplexity *per byte*: the one language-modelling figure that compares models across tokenizers.

Per-token perplexity depends on how many tokens a tokenizer needs for the same text (a 3k-token vocabulary spends
more, easier tokens than a 4k one), so it cannot rank a student against a teacher of another tokenizer. The total
negative log-likelihood of a text does not depend on how it is cut; dividing it by the text's UTF-8 bytes gives
``exp(total NLL / total bytes)``, comparable across tokenizers (bits per byte = ``log2`` of it).

Every text is scored from a start-of-text token so that *every* byte is predicted: the tokenizer's own BOS when it
adds one, else ``start_id`` (e.g. the EOS that separates packed documents in pretraining).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity_per_byte(model, tokenizer, texts: list[str], start_id: int | None = None, batch_size: int = 8,
                        max_tokens: int = 1024) -> dict[str, float]:
    """``{"perplexity_per_byte", "bits_per_byte", "nll", "bytes", "tokens"}`` of ``model`` on ``texts``.

    ``start_id``: the token every text is scored after when the tokenizer adds no BOS of its own (default: its BOS,
    else its EOS). Texts longer than ``max_tokens`` tokens are refused, not cut (the bytes would not match)."""
    sequences = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is None or not ids or ids[0] != bos:  # the tokenizer adds no BOS: score after start_id
            first = start_id if start_id is not None else (bos if bos is not None else tokenizer.eos_token_id)
            ids = [first] + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            raise ValueError(f"A held-out text has {len(ids)} tokens (> max_tokens={max_tokens}): split it first.")
        sequences.append(ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        tokens += int((targets != -100).sum())
    model.train(was_training)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"perplexity_per_byte": math.exp(nll / n_bytes), "bits_per_byte": nll / n_bytes / math.log(2),
            "nll": nll, "bytes": n_bytes, "tokens": tokens}
