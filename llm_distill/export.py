"""ONNX export of a causal LM with its KV cache, and greedy generation with onnxruntime.

Why ``torch.onnx.export(dynamo=True)`` and not optimum: optimum-onnx needs transformers < 4.58 (we are on 5.x); the
dynamo exporter traces the Hugging Face model as it is. The exported graph takes the past keys / values as flat
inputs ``past.<layer>.key|value`` ``(B, kv_heads, past, head_dim)`` and returns ``logits`` plus
``present.<layer>.key|value``, so one graph serves the prompt (past length 0) and every next token (past length
> 0): generation runs the model once per token on one new token, like ``generate`` with its cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from llm_distill.quantization import require

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"


def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class _WithCache(torch.nn.Module):
    """The model as a function of flat tensors: (input_ids, attention_mask, past...) -> (logits, present...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, past_key_values):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(len(past_key_values) // 2):
            cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        flat = []
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def input_output_names(config) -> tuple[list[str], list[str]]:
    layers = _kv_shape(config)[0]
    past = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *(n.replace("past", "present") for n in past)]


def export_onnx(model, output_dir: str | Path) -> Path:
    """Export ``model`` (fp32, eval) with its KV cache to ``<output_dir>/model.onnx``; returns the path.

    The example inputs use a past length of 5 and a new length of 3 (not 0 / 1), so the exporter keeps every
    length dynamic instead of specialising on it."""
    require("onnxscript")
    layers, kv_heads, head_dim = _kv_shape(model.config)
    names_in, names_out = input_output_names(model.config)
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    ids = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    past_kv = [torch.zeros(2, kv_heads, 5, head_dim) for _ in range(2 * layers)]
    mask = torch.ones(2, 8, dtype=torch.long)
    os.makedirs(output_dir, exist_ok=True)
    path = Path(output_dir) / ONNX_FILE
    with torch.no_grad():
        program = torch.onnx.export(
            _WithCache(model.eval()).eval(), (ids, mask, past_kv), dynamo=True, input_names=names_in,
            output_names=names_out, verbose=False,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                            "past_key_values": [{0: batch, 2: past}] * (2 * layers)})
    program.save(str(path))
    model.config.save_pretrained(output_dir)  # the generation loop reads the cache shape from it
    logger.info("Exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


class OnnxCausalLM:
    """An exported model run by onnxruntime on CPU: ``logits`` for scoring, ``generate`` for greedy decoding.

    ``threads`` sets onnxruntime's intra-op threads (0 = its default, all cores)."""

    def __init__(self, folder: str | Path, threads: int = 0):
        from transformers import AutoConfig

        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        path = Path(folder) / ONNX_FILE if Path(folder).is_dir() else Path(folder)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = AutoConfig.from_pretrained(path.parent)
        self.names_in, _ = input_output_names(self.config)
        _, self.kv_heads, self.head_dim = _kv_shape(self.config)

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.names_in[2:]}

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """``(B, S, V)`` logits of a whole sequence (no past)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask,
                                             **self._empty_past(ids.shape[0])})[0]

    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with the KV cache: the prompt once, then one token per step. Returns prompt + new tokens
        ``(B, S + n)``; stops early only when every row has produced ``eos_token_id``."""
        seq = np.asarray(input_ids, dtype=np.int64)
        current, past = seq, self._empty_past(seq.shape[0])
        done = np.zeros(seq.shape[0], dtype=bool)
        for _ in range(max_new_tokens):
            out = self.session.run(None, {"input_ids": current, "attention_mask": np.ones_like(seq), **past})
            nxt = out[0][:, -1].argmax(-1)[:, None]  # (B, 1)
            seq = np.concatenate([seq, nxt], axis=1)
            current, past = nxt, dict(zip(self.names_in[2:], out[1:]))
            if eos_token_id is not None:
                done |= nxt[:, 0] == eos_token_id
                if done.all():
                    break
        return seq
