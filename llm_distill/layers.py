"""Where a model keeps its stack of transformer blocks, and how a config follows a changed stack.

Shared by the two kinds of layer surgery: building a student from teacher layers (``llm_distill.student_init``)
and pruning (``llm_distill.pruning``).
"""

from __future__ import annotations

import torch

# Where the stack of transformer blocks lives, per family (checked first; any other model with exactly one
# ModuleList of num_hidden_layers blocks works too).
LAYER_STACKS = {
    "model.layers": "Llama, Mistral, Qwen2/3, Gemma, Phi-3 ...",
    "transformer.h": "GPT-2",
    "bert.encoder.layer": "BERT",
    "roberta.encoder.layer": "RoBERTa",
    "distilbert.transformer.layer": "DistilBERT",
}


def layer_stack_path(model: torch.nn.Module) -> str:
    """The dotted path of ``model``'s ``ModuleList`` of transformer blocks (e.g. ``model.layers``)."""
    n = model.config.num_hidden_layers
    lists = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n}
    for path in LAYER_STACKS:
        if path in lists:
            return path
    if len(lists) == 1:
        return next(iter(lists))
    known = "; ".join(f"{path} ({families})" for path, families in LAYER_STACKS.items())
    raise ValueError(f"{type(model).__name__}: cannot tell which ModuleList holds its {n} layers (found "
                     f"{sorted(lists) or 'none'}). student_init=teacher_layers supports: {known}.")


def keep_layers_in_config(config, keep: list[int]) -> None:
    """Make ``config`` describe only the layers ``keep`` (old indices, in order): ``num_hidden_layers`` and every
    per-layer list (``layer_types``, ``mlp_layer_types``, ``no_rope_layers`` ...). A stale count or list would reload
    "successfully" with random extra layers or the wrong attention types."""
    n = config.num_hidden_layers
    for name, value in list(vars(config).items()):
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)


def renumber_layer_idx(blocks: torch.nn.ModuleList) -> None:
    """Give every module of block ``i`` that has an integer ``layer_idx`` the index ``i`` (the KV cache's slot)."""
    for new_idx, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx


