"""Final hidden states + ``lm_head`` of a model, for the fused-linear loss (``losses.chunked_distillation_loss``).

The fused path needs, instead of logits, the tensor the model's ``lm_head`` reads and the head's weight. That is
only exact when ``logits == lm_head(final_hidden_state)``: no logit soft-capping (Gemma 2/3), no logit scaling
(Cohere, Granite), a plain ``nn.Linear`` head (not a LoRA-wrapped or quantised one), and weights that are whole on
this rank (not FSDP / ZeRO-3 shards). :class:`LMHeadPath` checks all of this once per model, with a cheap probe
on the first batch, and otherwise falls back - with one warning - to the model's own logits (the loss is then
still chunked, only the ``(B, S, V)`` logits are built by the model).

How the features are obtained, never bypassing a training wrapper:
- the student (possibly DDP-wrapped): ``model(**inputs, output_hidden_states=True, logits_to_keep=1)`` through the
  wrapper; ``hidden_states[-1]`` is the post-norm ``last_hidden_state`` in transformers 5 (``capture_outputs``
  ties it), and ``logits_to_keep=1`` keeps the model from projecting every position. The per-layer states it also
  returns are the ones autograd keeps for backward anyway.
- the teacher (frozen, never wrapped for training under DDP): its decoder (``get_decoder()``) directly, which
  returns only ``last_hidden_state`` (``output_hidden_states`` would keep every layer's states alive).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_distill.distributed import is_sharded

logger = logging.getLogger(__name__)

# Config attributes that put something between lm_head and the logits (value that means "nothing").
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_softcapping": None, "logit_scale": 1.0,
                     "logits_scaling": 1.0, "output_multiplier_scale": 1.0}


@dataclass
class HeadFeatures:
    """``features`` is ``(B, S, H)`` final hidden states with ``weight`` ``(V, H)``, or ``(B, S, V)`` logits with
    ``weight=None`` (fallback). ``hidden`` is the ``(B, S, H)`` last hidden state (for the triple loss's cosine
    term) when it was asked for: the fused path has it anyway, the fallback asks the model for it."""

    outputs: object
    features: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def _base(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # a DeepSpeed engine / DDP wrapper
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model


def plain_lm_head(model: torch.nn.Module) -> tuple[torch.nn.Linear | None, str]:
    """The model's output projection when the fused path can use it, else ``(None, why not)``."""
    if is_sharded(model):
        return None, "its weights are sharded (FSDP / ZeRO-3)"
    base = _base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # exact type: a LoRA / quantised head computes something else
        return None, f"its output head is {type(head).__name__}, not a plain torch.nn.Linear"
    config = getattr(base, "config", None)
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value != neutral and not (neutral is None and value in (0, 0.0)):
            return None, f"its config sets {name}={value} (logits are not lm_head(hidden))"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None, "its forward has no logits_to_keep argument"
    return head, ""


class LMHeadPath:
    """Per-model decision (made on the first batch) and feature extraction for the fused loss."""

    def __init__(self, role: str, quiet: bool = False):
        self.role = role  # "student" (trained, possibly wrapped) or "teacher" (frozen, called directly)
        self.fused: bool | None = None
        self.quiet = quiet  # evaluation: the decision is logged at DEBUG (it is made once per evaluated model)

    def __call__(self, model: torch.nn.Module, inputs: dict, need_hidden: bool = False) -> HeadFeatures:
        if self.fused is None:
            self.fused = self._decide(model, inputs)
        if not self.fused:
            if not need_hidden:
                outputs = model(**inputs)
                return HeadFeatures(outputs, outputs.logits)
            outputs = model(**inputs, output_hidden_states=True)  # e.g. BERT: the MLM head is not a plain Linear
            return HeadFeatures(outputs, outputs.logits, hidden=outputs.hidden_states[-1])
        head, _ = plain_lm_head(model)
        outputs, hidden = self._hidden(model, inputs)
        return HeadFeatures(outputs, hidden, head.weight, head.bias, hidden=hidden)

    def _hidden(self, model, inputs):
        if self.role == "teacher":
            decoder = _base(model).get_decoder()
            outputs = decoder(**inputs)
            return outputs, outputs.last_hidden_state
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        return outputs, outputs.hidden_states[-1]

    def _decide(self, model, inputs) -> bool:
        head, why = plain_lm_head(model)
        if head is not None and self.role == "teacher" and not hasattr(_base(model), "get_decoder"):
            head, why = None, "it has no get_decoder()"
        if head is not None:
            why = self._probe(model, inputs, head)
        if why and self.quiet:
            logger.debug("Memory-lean path: the %s's logits are built in full because %s.", self.role, why)
        elif why:
            logger.warning("Memory-lean loss: the %s's logits are built in full because %s; the loss is still "
                           "computed in chunks.", self.role, why)
        else:
            logger.info("Memory-lean loss: the %s's logits are never materialised (fused lm_head path).", self.role)
        return not why

    def _probe(self, model, inputs, head) -> str:
        """Check ``lm_head(features) == logits`` on the first row's first 32 positions (no grad, ~free)."""
        small = {k: v[:1, :32] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in inputs.items()}
        try:
            with torch.no_grad():
                outputs, hidden = self._hidden(model, small)
                if self.role == "teacher":  # the decoder gave no logits: ask the full model for the last one
                    outputs = model(**small, logits_to_keep=1)
                want = outputs.logits[:, -1].float()  # (1, V)
                got = F.linear(hidden[:, -1], head.weight, head.bias).float()  # (1, V)
        except Exception as err:  # noqa: BLE001 - any failure only means "use the model's own logits"
            return f"the hidden-state forward failed ({type(err).__name__}: {err})"
        if got.shape != want.shape or (got - want).abs().max().item() > 1e-3 * max(1.0, want.abs().max().item()):
            return "lm_head(final hidden state) does not reproduce the model's logits"
        return ""
