"""Capture a model's per-layer hidden states and attention queries / keys / values with forward hooks.

Why hooks: the feature terms need what the model computes anyway, on whichever path the trainer takes (full logits,
the memory-lean fused path whose teacher forward returns only the last hidden state, a PEFT or DDP-wrapped student),
without asking the model for ``output_hidden_states`` / ``output_attentions`` (the latter needs eager attention).

- Hidden state of layer ``i`` (0-based): the output of transformer block ``i`` (for pre-norm decoders, before the
  final norm). Blocks are the model's ``ModuleList`` of ``num_hidden_layers`` modules.
- Q / K / V of layer ``i``: forward hooks on the attention module's projections (``q_proj`` / ``k_proj`` /
  ``v_proj`` for the Llama family, ``c_attn`` for GPT-2, ``query`` / ``key`` / ``value`` for BERT) plus a pre-hook
  on the attention module itself for the rotary ``position_embeddings``; the queries and keys are then put through
  the model's own ``q_norm`` / ``k_norm`` (Qwen3-style, when present) and ``apply_rotary_pos_emb``, and grouped
  keys / values are repeated to every query head (GQA): exactly the tensors the attention kernel (eager, SDPA or
  flash) receives, which ``tests/test_feature_capture.py`` checks by recomputing the attention output.

Recording is off unless inside ``capturing()``, and each hook keeps only the module's last call: probes the trainer
runs on the first batch, and recomputation under gradient checkpointing, never pile up.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

# attribute names of the projections, per family: (query, key, value) or one fused (c_attn)
_SEPARATE = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP / DeepSpeed
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def num_layers(model: torch.nn.Module) -> int:
    config = _unwrap(model).config
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's ``ModuleList`` of ``num_hidden_layers`` blocks (Llama ``model.layers``, GPT-2 ``transformer.h``,
    BERT ``encoder.layer`` ...)."""
    n = num_layers(model)
    for _, module in _unwrap(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"Feature distillation: no list of {n} transformer blocks found in {type(_unwrap(model)).__name__}"
                     "; it supports Llama-family, GPT-2 and BERT-style models.")


def attention_module(block: torch.nn.Module) -> torch.nn.Module:
    """The attention module inside ``block``: the first submodule with q/k/v projections (or GPT-2's ``c_attn``)."""
    for _, module in block.named_modules():
        if hasattr(module, "c_attn") or any(all(hasattr(module, n) for n in names) for names in _SEPARATE):
            return module
    raise ValueError("Feature distillation: no attention projections (q_proj/k_proj/v_proj, query/key/value or "
                     f"c_attn) in {type(block).__name__}: attention relations / maps are not supported for this model.")


@dataclass
class QKV:
    """Queries, keys, values of one attention layer: each ``(B, H, S, d)``, keys / values repeated to ``H`` heads."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scaling: float

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)`` as ``(B, S, H * d)``: all heads side by side (MiniLMv2's relation input)."""
        return tuple(x.transpose(1, 2).flatten(2) for x in (self.q, self.k, self.v))


class _AttentionRecorder:
    """Hooks on one attention module; ``result()`` assembles the last call's ``QKV``."""

    def __init__(self, attn: torch.nn.Module, is_on):
        self.attn, self.is_on, self.raw, self.position_embeddings = attn, is_on, {}, None
        self.head_dim = getattr(attn, "head_dim", None) or attn.attention_head_size
        hooks = [attn.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if hasattr(attn, "c_attn"):
            hooks.append(attn.c_attn.register_forward_hook(self._fused))
        else:
            names = next(names for names in _SEPARATE if all(hasattr(attn, n) for n in names))
            for role, name in zip("qkv", names):
                hooks.append(getattr(attn, name).register_forward_hook(self._store(role)))
        self.hooks = hooks

    def _pre(self, module, args, kwargs):
        if self.is_on():
            self.position_embeddings = kwargs.get("position_embeddings")

    def _fused(self, module, args, output):
        if self.is_on():
            self.raw = dict(zip("qkv", output.split(output.shape[-1] // 3, dim=-1)))

    def _store(self, role):
        def hook(module, args, output):
            if self.is_on():
                self.raw[role] = output
        return hook

    def result(self) -> QKV:
        attn, d = self.attn, self.head_dim
        q, k, v = (self.raw[r].unflatten(-1, (-1, d)) for r in "qkv")  # (B, S, heads, d)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms, before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, S, d)
        if self.position_embeddings is not None:
            cos, sin = self.position_embeddings
            q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # GQA: every query head reads its group's key / value head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scaling = getattr(attn, "scaling", None) or d ** -0.5
        return QKV(q, k, v, float(scaling))


class FeatureCapture:
    """Forward hooks on ``model`` recording the hidden states of ``hidden_layers`` and the Q/K/V of ``qkv_layers``
    (0-based block indices; negative counts from the end) while ``capturing()`` is active."""

    def __init__(self, model: torch.nn.Module, hidden_layers=(), qkv_layers=()):
        blocks = transformer_blocks(model)
        n = len(blocks)
        self._on = False
        self.hidden: dict[int, torch.Tensor] = {}
        self._handles = []
        for i in sorted({i % n for i in hidden_layers}):
            self._handles.append(blocks[i].register_forward_hook(self._store_hidden(i)))
        self._attention = {i % n: _AttentionRecorder(attention_module(blocks[i % n]), lambda: self._on)
                           for i in qkv_layers}
        for recorder in self._attention.values():
            self._handles.extend(recorder.hooks)
        self.num_layers = n

    def _store_hidden(self, i):
        def hook(module, args, output):
            if self._on:
                self.hidden[i] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    @contextlib.contextmanager
    def capturing(self):
        self._on = True
        try:
            yield self
        finally:
            self._on = False

    def hidden_state(self, layer: int) -> torch.Tensor:
        return self.hidden[layer % self.num_layers]

    def qkv(self, layer: int) -> QKV:
        return self._attention[layer % self.num_layers].result()

    def clear(self) -> None:
        self.hidden.clear()
        for recorder in self._attention.values():
            recorder.raw, recorder.position_embeddings = {}, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
