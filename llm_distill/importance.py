"""What to prune: importance scores for heads, neurons and layers, and :func:`build_plan`, which keeps the best.

All functions take a model and calibration ``batches`` (dicts with ``input_ids``, ``attention_mask`` and
optionally ``labels``; without labels the causal-LM loss on ``input_ids`` is used, padding masked) and
return scores where higher = more important. Only valid (non-padding) tokens count.

* :func:`gradient_importance` - Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?":
  a mask of ones is multiplied into each head's slice of the output projection's input (and each neuron
  of the MLP's down projection input); the importance is ``sum over batches |dL/dmask|``, normalised per
  layer to unit L2 norm so layers can be compared.
* :func:`activation_importance` - Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning
  and Knowledge Distillation"): forward passes only; a head's score is the mean L2 norm of its output
  (its slice of the output projection's input), a neuron's the mean |activation| at the down projection's
  input, an embedding channel's the mean |value| at the inputs of the q and MLP-in projections.
* :func:`block_influence` - ShortGPT (Men et al. 2024): ``BI = 1 - mean cos(layer input, layer output)``;
  a layer that barely changes its input scores ~0.
* :func:`layer_removal_loss` - the loss increase when the layer is skipped (its output replaced by its input).

:func:`build_plan` turns scores into a ``PruningPlan``: "keep N heads per layer / MLP width W / drop K
layers", the same shape in every layer by default.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_distill.losses import IGNORE_INDEX
from llm_distill.pruning import LayerShape, PruningPlan, PruningPlanError, blocks, family_of, layer_shapes


@dataclass
class Importance:
    heads: list[torch.Tensor]           # one (num_heads_l,) tensor per layer
    neurons: list[torch.Tensor]         # one (intermediate_l,) tensor per layer
    channels: torch.Tensor | None = None  # (hidden,) summed over layers; activation_importance only


def gradient_importance(model, batches, normalize: bool = True) -> Importance:
    """|dL/d mask| per head and per MLP neuron (Michel et al. 2019), per-layer L2-normalised by default."""
    family, shapes = family_of(model), layer_shapes(model)
    device = _device(model)
    head_masks = [torch.ones(s.num_attention_heads, device=device, requires_grad=True) for s in shapes]
    neuron_masks = [torch.ones(s.intermediate_size, device=device, requires_grad=True) for s in shapes]
    hooks = []
    for block, shape, hm, nm in zip(blocks(model), shapes, head_masks, neuron_masks):
        hooks.append(block.get_submodule(family.o).register_forward_pre_hook(_head_mask_hook(hm, shape.head_dim)))
        hooks.append(block.get_submodule(family.mlp_out).register_forward_pre_hook(_head_mask_hook(nm, 1)))
    heads = [torch.zeros(s.num_attention_heads, device=device) for s in shapes]
    neurons = [torch.zeros(s.intermediate_size, device=device) for s in shapes]
    with _eval(model), _removing(hooks), torch.enable_grad():
        for batch in batches:
            inputs, labels = _inputs(batch, device)
            loss = _loss(model(**inputs, labels=labels, use_cache=False), model)
            grads = torch.autograd.grad(loss, head_masks + neuron_masks)
            for acc, grad in zip(heads + neurons, grads):
                acc += grad.abs()
    if normalize:  # Michel et al.: per-layer L2 normalisation makes layers comparable for global ranking
        heads = [h / (h.norm() + 1e-20) for h in heads]
        neurons = [n / (n.norm() + 1e-20) for n in neurons]
    return Importance([h.cpu() for h in heads], [n.cpu() for n in neurons])


def _head_mask_hook(mask: torch.Tensor, unit: int):
    """Forward pre-hook: multiply slice i (``unit`` wide) of the projection's input by ``mask[i]``."""

    def hook(module, args):
        x = args[0]  # (B, T, len(mask) * unit)
        scaled = x.unflatten(-1, (mask.numel(), unit)) * mask.to(x.dtype)[:, None]
        return (scaled.flatten(-2), *args[1:])

    return hook


def activation_importance(model, batches) -> Importance:
    """Minitron activation scores from forward passes over ``batches`` (means over valid tokens)."""
    family, shapes = family_of(model), layer_shapes(model)
    device = _device(model)
    state = {"valid": None, "tokens": 0}
    heads = [torch.zeros(s.num_attention_heads, device=device) for s in shapes]
    neurons = [torch.zeros(s.intermediate_size, device=device) for s in shapes]
    channels = torch.zeros(model.config.hidden_size, device=device)

    def accumulate(acc: torch.Tensor, unit: int, norm: bool):
        def hook(module, args):
            x = args[0].detach().float().unflatten(-1, (-1, unit))  # (B, T, n, unit)
            per_unit = x.norm(dim=-1) if norm else x.abs().squeeze(-1)  # (B, T, n)
            acc.add_((per_unit * state["valid"][..., None]).sum((0, 1)))
        return hook

    hooks = []
    for block, shape, h, n in zip(blocks(model), shapes, heads, neurons):
        hooks.append(block.get_submodule(family.o).register_forward_pre_hook(accumulate(h, shape.head_dim, True)))
        hooks.append(block.get_submodule(family.mlp_out).register_forward_pre_hook(accumulate(n, 1, False)))
        for name in (family.q[0], family.mlp_in[0]):
            hooks.append(block.get_submodule(name).register_forward_pre_hook(accumulate(channels, 1, False)))
    with _eval(model), _removing(hooks), torch.no_grad():
        for batch in batches:
            inputs, _ = _inputs(batch, device)
            state["valid"] = inputs["attention_mask"].float()  # (B, T)
            state["tokens"] += int(state["valid"].sum())
            model(**inputs, use_cache=False)
    tokens = max(state["tokens"], 1)
    return Importance([h.cpu() / tokens for h in heads], [n.cpu() / tokens for n in neurons], channels.cpu() / tokens)


def block_influence(model, batches) -> torch.Tensor:
    """(num_layers,) ``1 - mean cos(input, output)`` of each block over valid tokens (ShortGPT)."""
    device = _device(model)
    sims = torch.zeros(len(blocks(model)), dtype=torch.float64)
    state = {"valid": None, "tokens": 0, "inputs": {}}
    hooks = []
    for i, block in enumerate(blocks(model)):
        hooks.append(block.register_forward_pre_hook(_keep_input(state["inputs"], i), with_kwargs=True))

        def on_output(module, args, output, i=i):
            cos = F.cosine_similarity(state["inputs"][i].float(), _hidden(output).float(), dim=-1)  # (B, T)
            sims[i] += float((cos * state["valid"]).sum())

        hooks.append(block.register_forward_hook(on_output))
    with _eval(model), _removing(hooks), torch.no_grad():
        for batch in batches:
            inputs, _ = _inputs(batch, device)
            state["valid"] = inputs["attention_mask"].float()
            state["tokens"] += int(state["valid"].sum())
            model(**inputs, use_cache=False)
    return (1 - sims / max(state["tokens"], 1)).float()


def layer_removal_loss(model, batches) -> torch.Tensor:
    """(num_layers,) mean loss with the layer skipped minus the mean loss of the whole model."""
    device = _device(model)
    prepared = [_inputs(batch, device) for batch in batches]

    def mean_loss() -> float:
        losses = [float(_loss(model(**inputs, labels=labels, use_cache=False), model)) for inputs, labels in prepared]
        return sum(losses) / max(len(losses), 1)

    with _eval(model), torch.no_grad():
        base = mean_loss()
        increase = []
        for block in blocks(model):
            seen = {}  # the block's output is replaced by its input: the layer is skipped
            skip = [block.register_forward_pre_hook(_keep_input(seen, 0), with_kwargs=True),
                    block.register_forward_hook(lambda m, a, out, seen=seen: _replace_hidden(out, seen[0]))]
            with _removing(skip):
                increase.append(mean_loss() - base)
    return torch.tensor(increase)


# ------------------------------------------------------------------------------------------ scores -> plan


def build_plan(model, head_scores: list[torch.Tensor] | None = None, keep_heads: int | None = None,
               neuron_scores: list[torch.Tensor] | None = None, mlp_width: int | None = None,
               layer_scores: torch.Tensor | None = None, drop: int = 0, gqa: str = "groups",
               uniform: bool = True) -> PruningPlan:
    """Turn importance scores (higher = more important, ``llm_distill.importance``) into a plan.

    ``keep_heads`` query heads and ``mlp_width`` neurons per layer, and the ``drop`` least important layers.
    ``uniform=True`` keeps the same number in every layer (a config-expressible model, the default);
    ``uniform=False`` ranks all layers' units together (scores should then be comparable across layers,
    e.g. per-layer normalised) and keeps the same total, at least one unit per layer. With GQA the unit of
    removal is a KV group (``gqa="groups"``) or one query head from every group (``gqa="per_group"``).
    """
    shapes = layer_shapes(model)
    plan = PruningPlan(gqa=gqa)
    if drop:  # first: heads and neurons are then chosen among the layers that stay
        _need(layer_scores, "layer_scores", "drop")
        if not 0 < drop < len(shapes):
            raise PruningPlanError(f"drop={drop}: expected 0 < drop < {len(shapes)} (the model's layers).")
        plan.layers = sorted(torch.as_tensor(layer_scores).float().argsort()[:drop].tolist())
    kept = [i for i in range(len(shapes)) if i not in plan.layers]
    if keep_heads is not None:
        _need(head_scores, "head_scores", "keep_heads")
        units = {i: _head_units(shapes[i], head_scores[i], gqa) for i in kept}
        plan.heads = _remove_lowest(units, keep_heads, uniform, "keep_heads")
    if mlp_width is not None:
        _need(neuron_scores, "neuron_scores", "mlp_width")
        units = {i: [([j], float(s)) for j, s in enumerate(neuron_scores[i])] for i in kept}
        plan.neurons = _remove_lowest(units, mlp_width, uniform, "mlp_width")
    return plan


def _need(value, name: str, for_what: str) -> None:
    if value is None:
        raise PruningPlanError(f"{for_what} needs {name} (see llm_distill.importance).")


def _head_units(shape: LayerShape, scores: torch.Tensor, gqa: str) -> list[tuple[list[int], float]]:
    """The removable units of one layer's heads, each (query heads, score)."""
    scores = torch.as_tensor(scores).float()
    groups = shape.kv_groups
    if shape.num_key_value_heads == shape.num_attention_heads:
        return [([h], float(s)) for h, s in enumerate(scores)]
    if gqa == "groups":
        return [(list(range(g * groups, (g + 1) * groups)), float(scores[g * groups:(g + 1) * groups].sum()))
                for g in range(shape.num_key_value_heads)]
    # per_group: unit j = the j-th most important head of every group (so every group loses the same count)
    ranked = scores.view(shape.num_key_value_heads, groups).sort(dim=1, descending=True)
    return [([int(g * groups + ranked.indices[g, j]) for g in range(shape.num_key_value_heads)],
             float(ranked.values[:, j].sum())) for j in range(groups)]


def _remove_lowest(units: dict[int, list[tuple[list[int], float]]], keep: int, uniform: bool, name: str):
    """{layer: sorted indices to remove} so each layer keeps ``keep`` (uniform) or all keep ``keep`` on average."""
    sizes = {layer: sum(len(u) for u, _ in layer_units) for layer, layer_units in units.items()}
    unit = len(next(iter(units.values()))[0][0])
    if not 0 < keep <= min(sizes.values()) or keep % unit:
        raise PruningPlanError(f"{name}={keep}: expected a multiple of {unit} (the unit of removal) in "
                               f"1..{min(sizes.values())}.")
    if uniform:
        n_remove = {layer: (size - keep) // unit for layer, size in sizes.items()}
    else:  # global ranking: remove the lowest units anywhere, never a layer's last one
        ranked = sorted((score, layer) for layer, layer_units in units.items() for _, score in layer_units)
        budget = sum(size - keep for size in sizes.values()) // unit
        n_remove = dict.fromkeys(units, 0)
        for _, layer in ranked:
            if budget == 0:
                break
            if n_remove[layer] < len(units[layer]) - 1:
                n_remove[layer] += 1
                budget -= 1
    removed = {}
    for layer, layer_units in units.items():
        lowest = sorted(range(len(layer_units)), key=lambda j: layer_units[j][1])[:n_remove[layer]]
        if lowest:
            removed[layer] = sorted(i for j in lowest for i in layer_units[j][0])
    return removed


# ------------------------------------------------------------------------------------------ helpers


def _keep_input(store: dict, key):
    def hook(module, args, kwargs):
        store[key] = args[0] if args else kwargs["hidden_states"]
    return hook


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _inputs(batch: dict, device) -> tuple[dict, torch.Tensor]:
    """Model inputs (input_ids, attention_mask, ...) and labels; default labels = input_ids, padding masked."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    labels = batch.get("labels")
    if labels is None:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    return inputs, labels.to(device)


def _loss(output, model) -> torch.Tensor:
    if getattr(output, "loss", None) is None:
        raise ValueError(f"{type(model).__name__} returned no loss: importance needs a model with a language-model "
                         "head (e.g. AutoModelForCausalLM / AutoModelForMaskedLM) and batches it can score.")
    return output.loss


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval(model):
    """Dropout off while scoring; the previous train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _removing(hooks):
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
