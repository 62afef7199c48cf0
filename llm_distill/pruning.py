"""Structured pruning: remove attention heads, MLP neurons and whole layers from a transformers v5 model.

transformers v5 removed ``prune_heads`` / ``_prune_heads`` / ``head_mask``; this module is the replacement,
for decoders (Llama, Mistral, Qwen2, Qwen3, GPT-2) and encoders (BERT, DistilBERT). A :class:`PruningPlan`
names what to remove, in the model's own indices; :func:`prune` checks the whole plan first (an invalid
plan raises before any weight is touched), then slices the weight matrices *in place* (same modules,
dtype, device and ``requires_grad``), drops layers, renumbers ``layer_idx`` (the KV cache is indexed by
it) and updates the config.

Saving: :func:`save_pruned` writes ``save_pretrained`` output plus a ``pruning.json`` sidecar (every
layer's shape, the plan). When all layers have the same shape and the config class can express it
(Llama-family head counts get an explicit ``head_dim``), the config is updated and the folder reloads
bit-exactly with plain ``AutoModelForCausalLM.from_pretrained``. Otherwise (per-layer head counts or widths,
or GPT-2 / BERT / DistilBERT with fewer heads: their configs derive ``head_dim = hidden / heads``) the
config keeps the pre-pruning sizes as a skeleton plus the per-layer shapes (``llm_distill_layer_shapes``,
so a later ``save_pretrained``, e.g. by ``Trainer``, keeps them), plain ``from_pretrained`` fails on the
shape mismatch, and :func:`load_pruned` builds the skeleton, shrinks each layer and loads the weights strictly.

Indices: a :class:`PruningPlan` speaks the indices of the model it is applied to. :func:`prune_heads` keeps the
v4 ``PreTrainedModel.prune_heads`` semantics instead: heads are numbered as in the *original* model, repeated calls
accumulate, and heads already removed are ignored. Every head removal (either way) is recorded in
``config.pruned_heads`` (``{layer: [original head indices]}``, v4's name and meaning, renumbered when layers are
dropped), so the record survives ``save_pretrained`` / reload and later calls still speak original indices.

GQA: query head ``h`` reads KV head ``h // (H / KV)``. Removing query heads must leave every kept KV head
with the same number of query heads, so ``gqa`` says how: ``"groups"`` removes whole KV groups (a KV head
with all its query heads; the KV cache shrinks too), ``"per_group"`` keeps every KV head and removes the
same number of query heads from each group. Models without GQA remove a head's K and V with its query.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from llm_distill.errors import UserError
from llm_distill.layers import keep_layers_in_config, renumber_layer_idx

logger = logging.getLogger(__name__)

PRUNING_FILE = "pruning.json"
SHAPES_KEY = "llm_distill_layer_shapes"  # config.json key with every layer's shape when the config cannot express them
GQA_MODES = ("groups", "per_group")


class PruningPlanError(UserError):
    """A pruning plan that cannot be applied to this model; nothing was modified."""


# ------------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its blocks, head projections and MLP, as paths from the model / a block."""

    layers: str                  # the ModuleList of blocks, from ``model.base_model``
    attention: str               # block -> the module whose attributes count heads
    q: tuple[str, ...]           # block -> projections whose outputs are query heads
    kv: tuple[str, ...]          # block -> projections whose outputs are key / value heads
    o: str                       # block -> projection whose *input* is the concatenated head outputs
    mlp_in: tuple[str, ...]      # block -> projections whose outputs are the MLP neurons
    mlp_out: str                 # block -> projection whose input is the MLP neurons
    head_dim: str                # attention attribute holding the size of one head
    attrs: dict                  # attention attributes to update: name -> heads | kv_heads | groups | width
    intermediate: str            # config field of the MLP width
    kv_config: str | None = None  # config field of the KV head count (GQA families)
    head_dim_config: bool = False  # the config may carry an explicit head_dim
    fused_qkv: bool = False      # GPT-2: one Conv1D whose outputs are [q | k | v]


LLAMA = Family(
    layers="layers", attention="self_attn", q=("self_attn.q_proj",), kv=("self_attn.k_proj", "self_attn.v_proj"),
    o="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj", head_dim="head_dim",
    attrs={"num_key_value_groups": "groups"}, intermediate="intermediate_size", kv_config="num_key_value_heads",
    head_dim_config=True,
)
FAMILIES = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "gpt2": Family(
        layers="h", attention="attn", q=("attn.c_attn",), kv=(), o="attn.c_proj", mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj", head_dim="head_dim", attrs={"num_heads": "heads", "split_size": "width"},
        intermediate="n_inner", fused_qkv=True,
    ),
    "bert": Family(
        layers="encoder.layer", attention="attention.self", q=("attention.self.query",),
        kv=("attention.self.key", "attention.self.value"), o="attention.output.dense", mlp_in=("intermediate.dense",),
        mlp_out="output.dense", head_dim="attention_head_size",
        attrs={"num_attention_heads": "heads", "all_head_size": "width"}, intermediate="intermediate_size",
    ),
    "distilbert": Family(
        layers="transformer.layer", attention="attention", q=("attention.q_lin",),
        kv=("attention.k_lin", "attention.v_lin"), o="attention.out_lin", mlp_in=("ffn.lin1",), mlp_out="ffn.lin2",
        head_dim="attention_head_size", attrs={"n_heads": "heads"}, intermediate="hidden_dim",
    ),
}


def family_of(model) -> Family:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"Expected a transformers PreTrainedModel, got {type(model).__name__}; prune before wrapping "
                        "the model (PEFT, DDP, FSDP) and merge LoRA adapters first (merge_and_unload()).")
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"Pruning supports model_type {', '.join(sorted(FAMILIES))}; got '{model_type}' "
            f"({type(model).__name__}). A new architecture needs an entry in llm_distill.pruning.FAMILIES naming its "
            "layers, q/k/v/o projections and MLP (and a test against the masked original in tests/test_pruning.py)."
        )
    if getattr(model.config, "is_heterogeneous", False):
        raise NotImplementedError(f"{type(model).__name__} has a heterogeneous config (per_layer_config); pruning "
                                  "it is not supported.")
    return FAMILIES[model_type]


def blocks(model) -> nn.ModuleList:
    return model.base_model.get_submodule(family_of(model).layers)


@dataclass(frozen=True)
class LayerShape:
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def layer_shapes(model) -> list[LayerShape]:
    """Every layer's shape as its weights say (the config only describes uniform models)."""
    family = family_of(model)
    shapes = []
    for block in blocks(model):
        head_dim = getattr(block.get_submodule(family.attention), family.head_dim)
        q_width = _n_out(block.get_submodule(family.q[0])) // (3 if family.fused_qkv else 1)
        heads = q_width // head_dim
        kv_heads = _n_out(block.get_submodule(family.kv[0])) // head_dim if family.kv else heads
        shapes.append(LayerShape(heads, kv_heads, head_dim, _n_out(block.get_submodule(family.mlp_in[0]))))
    return shapes


# ------------------------------------------------------------------------------------------ plan


@dataclass
class PruningPlan:
    """What to remove, in the indices of the model the plan is applied to.

    ``heads``: layer -> query heads to remove (with GQA see ``gqa``); ``neurons``: layer -> MLP hidden units
    to remove; ``layers``: whole blocks to remove. Heads and neurons of a removed layer are ignored.
    """

    heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    gqa: str = "groups"

    def to_dict(self) -> dict:
        return {"heads": {str(k): sorted(v) for k, v in self.heads.items()},
                "neurons": {str(k): sorted(v) for k, v in self.neurons.items()},
                "layers": sorted(self.layers), "gqa": self.gqa}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        unknown = set(data) - {"heads", "neurons", "layers", "gqa"}
        if unknown:
            raise PruningPlanError(f"Unknown pruning plan key(s) {sorted(unknown)}; expected heads, neurons, layers, gqa.")
        return cls(heads={int(k): [int(i) for i in v] for k, v in data.get("heads", {}).items()},
                   neurons={int(k): [int(i) for i in v] for k, v in data.get("neurons", {}).items()},
                   layers=[int(i) for i in data.get("layers", [])], gqa=data.get("gqa", "groups"))


def check_plan(model, plan: PruningPlan, standard_config: bool = False) -> None:
    """Raise :class:`PruningPlanError` listing every problem of ``plan`` for ``model``; modify nothing.

    ``standard_config=True`` also requires that the pruned model be describable by its own config class (every
    layer the same shape, and sizes the class accepts), i.e. that it save as a standard folder plain
    ``from_pretrained`` reloads; the error then names the nearest sizes that would be. Without it such plans are
    valid too: :func:`save_pruned` writes the per-layer shapes for :func:`load_pruned`.
    """
    shapes = layer_shapes(model)  # also refuses unsupported architectures
    n_layers = len(shapes)
    problems = []
    if plan.gqa not in GQA_MODES:
        problems.append(f"gqa={plan.gqa!r}: expected one of {', '.join(GQA_MODES)}")
    problems += _index_problems("layers", plan.layers, n_layers, "layer")
    if plan.layers and len(set(plan.layers)) >= n_layers:
        problems.append(f"layers: removing all {n_layers} layers leaves no model; keep at least one")
    if plan.layers and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        problems.append("layers: this GPT-2 config has scale_attn_by_inverse_layer_idx=True, so a block's attention "
                        "scale depends on its index and renumbered layers would reload with different scales")
    for what, table, size in (("heads", plan.heads, "num_attention_heads"), ("neurons", plan.neurons, "intermediate_size")):
        for layer, units in table.items():
            if not 0 <= layer < n_layers:
                problems.append(f"{what}: layer {layer} does not exist (the model has layers 0..{n_layers - 1})")
                continue
            total = getattr(shapes[layer], size)
            problems += _index_problems(f"{what}[{layer}]", units, total, "index")
            if units and len(set(units)) >= total:
                problems.append(f"{what}[{layer}]: removing all {total} leaves the layer empty; keep at least one "
                                "(or remove the whole layer with layers=[...])")
    if not problems and plan.gqa in GQA_MODES:
        for layer, heads in plan.heads.items():
            try:
                _kept_heads(shapes[layer], heads, plan.gqa)
            except PruningPlanError as err:
                problems.append(f"heads[{layer}]: {err}")
    if not problems and standard_config:
        problems += _standard_config_problems(model, plan, shapes)
    if problems:
        raise PruningPlanError(f"Invalid pruning plan for {type(model).__name__} (nothing was modified):\n  - "
                               + "\n  - ".join(problems))


def planned_shapes(model, plan: PruningPlan) -> list[LayerShape]:
    """The shape of every layer ``plan`` keeps, computed without touching the model (the plan must be valid)."""
    shapes, dropped, result = layer_shapes(model), set(plan.layers), []
    for i, shape in enumerate(shapes):
        if i in dropped:
            continue
        heads, kv = shape.num_attention_heads, shape.num_key_value_heads
        if plan.heads.get(i):
            keep_q, keep_kv = _kept_heads(shape, plan.heads[i], plan.gqa)
            heads, kv = len(keep_q), len(keep_kv)
        width = shape.intermediate_size - len(set(plan.neurons.get(i, [])))
        result.append(LayerShape(heads, kv, shape.head_dim, width))
    return result


def _standard_config_problems(model, plan: PruningPlan, shapes: list[LayerShape]) -> list[str]:
    """Why the pruned model would need ``pruning.json`` + :func:`load_pruned` (empty: a standard config works)."""
    after = planned_shapes(model, plan)
    if len(set(after)) > 1:
        return [f"the plan gives layers different shapes ({sorted(set(after), key=str)}), which no standard config "
                "describes; prune every layer alike (uniform), or allow a non-standard result (standard_config=False "
                "/ --standard_config false: saved with pruning.json, reloaded with llm_distill.load_pruned)"]
    target = after[0]
    cls = type(model.config).__name__
    problems = []
    if target.intermediate_size != shapes[0].intermediate_size and not _config_expresses(model, LayerShape(
            shapes[0].num_attention_heads, shapes[0].num_key_value_heads, shapes[0].head_dim, target.intermediate_size)):
        problems.append(f"{cls} cannot express an MLP width of {target.intermediate_size}")
    heads_changed = (target.num_attention_heads, target.num_key_value_heads) != (
        shapes[0].num_attention_heads, shapes[0].num_key_value_heads)
    if heads_changed and not _config_expresses(model, target):
        valid = _valid_head_counts(model, shapes[0], plan.gqa, target.intermediate_size)
        below = [n for n in valid if n < target.num_attention_heads][-1:]
        above = [n for n in valid if n > target.num_attention_heads][:1]
        hint = (f"nearest head counts it accepts: {' or '.join(map(str, below + above))}" if below + above else
                f"{cls} derives the head size from the hidden size, so it cannot describe fewer heads at all")
        problems.append(f"{cls} rejects {target.num_attention_heads} query heads / {target.num_key_value_heads} KV "
                        f"heads per layer of size {target.head_dim} ({hint}); pick one of those, or allow a "
                        "non-standard result (standard_config=False / --standard_config false: saved with "
                        "pruning.json, reloaded with llm_distill.load_pruned)")
    return problems


def _valid_head_counts(model, shape: LayerShape, gqa: str, width: int) -> list[int]:
    """Query-head counts reachable by whole removal units (see ``gqa``) that the config class accepts."""
    groups, kv = shape.kv_groups, shape.num_key_value_heads
    counts = []
    for n in range(1, shape.num_attention_heads):  # fewer heads than now: the unchanged count is no suggestion
        if kv == shape.num_attention_heads:
            n_kv = n
        elif gqa == "groups":
            if n % groups:
                continue
            n_kv = n // groups
        else:
            if n % kv:
                continue
            n_kv = kv
        if _config_expresses(model, LayerShape(n, n_kv, shape.head_dim, width)):
            counts.append(n)
    return counts


def _config_expresses(model, target: LayerShape) -> bool:
    """Whether the model's config class, given ``target``'s sizes, builds layers of exactly that shape (after the
    validation a reload runs)."""
    family = family_of(model)
    fields = {"num_attention_heads": target.num_attention_heads, family.intermediate: target.intermediate_size}
    if family.kv_config:
        fields[family.kv_config] = target.num_key_value_heads
    if family.head_dim_config:
        fields["head_dim"] = target.head_dim
    keys = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    return _expresses(model, fields, [target] * model.config.num_hidden_layers, keys)


def _index_problems(name: str, indices, size: int, what: str) -> list[str]:
    problems = []
    bad = sorted({i for i in indices if not 0 <= i < size})
    if bad:
        problems.append(f"{name}: {what} {bad} out of range 0..{size - 1}")
    if len(set(indices)) != len(indices):
        problems.append(f"{name}: repeated {what} in {sorted(indices)}")
    return problems


def _kept_heads(shape: LayerShape, removed: list[int], gqa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads kept, KV heads kept), sorted, so kept query head j reads kept KV head j // new_groups."""
    removed = set(removed)
    groups = shape.kv_groups
    keep_q = [h for h in range(shape.num_attention_heads) if h not in removed]
    if shape.num_key_value_heads == shape.num_attention_heads:  # no GQA: K and V go with their query head
        keep_kv = keep_q
    elif gqa == "groups":
        partial = {h // groups for h in removed}
        incomplete = {g: sorted(set(range(g * groups, (g + 1) * groups)) - removed) for g in sorted(partial)}
        incomplete = {g: rest for g, rest in incomplete.items() if rest}
        if incomplete:
            raise PruningPlanError(
                f"gqa=groups removes whole KV groups of {groups} query heads, but removing {sorted(removed)} "
                f"leaves group(s) partly kept ({{group: heads still kept}} = {incomplete}); remove those too, or use "
                "gqa=per_group to keep every KV head")
        keep_kv = [g for g in range(shape.num_key_value_heads) if g not in partial]
    else:
        per_group = [sum(h // groups == g for h in removed) for g in range(shape.num_key_value_heads)]
        if len(set(per_group)) > 1:
            raise PruningPlanError(
                f"gqa=per_group removes the same number of query heads from every KV group, but the groups lose "
                f"{per_group}; balance them, or use gqa=groups to remove whole groups")
        keep_kv = list(range(shape.num_key_value_heads))
    return torch.tensor(keep_q, dtype=torch.long), torch.tensor(keep_kv, dtype=torch.long)


# ------------------------------------------------------------------------------------------ surgery


def prune(model: PreTrainedModel, plan: PruningPlan, standard_config: bool = False) -> PreTrainedModel:
    """Apply ``plan`` (current indices) to ``model`` in place and return it. The plan is checked first (see
    :func:`check_plan`, also for ``standard_config``): an invalid plan changes nothing."""
    check_plan(model, plan, standard_config)
    family = family_of(model)
    shapes = layer_shapes(model)
    layer_list = blocks(model)
    dropped = set(plan.layers)
    record = pruned_heads_of(model)
    for layer, heads in plan.heads.items():
        if heads and layer not in dropped:
            keep_q, keep_kv = _kept_heads(shapes[layer], heads, plan.gqa)
            _select_heads(family, layer_list[layer], keep_q, keep_kv)
            remaining = _remaining_original_heads(record.get(layer, []), shapes[layer].num_attention_heads)
            removed_now = sorted(set(range(shapes[layer].num_attention_heads)) - set(keep_q.tolist()))
            record[layer] = sorted({*record.get(layer, []), *(remaining[h] for h in removed_now)})
    if record:
        _set_pruned_heads(model, record)
    for layer, neurons in plan.neurons.items():
        if neurons and layer not in dropped:
            removed = set(neurons)
            keep = torch.tensor([i for i in range(shapes[layer].intermediate_size) if i not in removed])
            _select_neurons(family, layer_list[layer], keep)
    if dropped:
        _drop_layers(model, family, [i for i in range(len(shapes)) if i not in dropped])
    _sync_config(model, family)
    return model


def prune_heads(model, heads: dict[int, list[int]], gqa: str = "groups"):
    """Remove attention heads, v4 ``PreTrainedModel.prune_heads`` style: ``{layer: [query heads]}`` numbered as in
    the original (unpruned) model; heads already removed by an earlier call are ignored, so repeated calls
    accumulate. Layer indices are the current ones. See the module docstring for ``gqa``."""
    shapes, record = layer_shapes(model), pruned_heads_of(model)
    current: dict[int, list[int]] = {}
    problems = []
    for layer, wanted in heads.items():
        if not 0 <= layer < len(shapes):
            problems.append(f"heads: layer {layer} does not exist (the model has layers 0..{len(shapes) - 1})")
            continue
        already = record.get(layer, [])
        remaining = _remaining_original_heads(already, shapes[layer].num_attention_heads)
        original_count = len(remaining) + len(already)
        bad = sorted({h for h in wanted if not 0 <= h < original_count})
        if bad:
            problems.append(f"heads[{layer}]: head {bad} out of range 0..{original_count - 1} (original numbering)")
        index = {h: i for i, h in enumerate(remaining)}
        current[layer] = sorted({index[h] for h in wanted if h in index})
    if problems:
        raise PruningPlanError(f"Invalid pruning plan for {type(model).__name__} (nothing was modified):\n  - "
                               + "\n  - ".join(problems))
    return prune(model, PruningPlan(heads={k: v for k, v in current.items() if v}, gqa=gqa))


def pruned_heads_of(model) -> dict[int, list[int]]:
    """``{layer: [original head indices removed]}`` recorded in ``config.pruned_heads`` (JSON turns keys into str)."""
    record = getattr(model.config, "pruned_heads", None) or {}
    return {int(k): sorted(int(h) for h in v) for k, v in record.items()}


def _set_pruned_heads(model, record: dict[int, list[int]]) -> None:
    model.config.pruned_heads = {str(k): sorted(v) for k, v in sorted(record.items()) if v}


def _remaining_original_heads(removed: list[int], current_count: int) -> list[int]:
    """Original indices of the heads a layer still has, in order (current head i is original head result[i])."""
    removed, result, h = set(removed), [], 0
    while len(result) < current_count:
        if h not in removed:
            result.append(h)
        h += 1
    return result


def prune_mlp(model, neurons: dict[int, list[int]]):
    """Remove MLP hidden units: ``{layer: [neuron indices]}``."""
    return prune(model, PruningPlan(neurons=neurons))


def drop_layers(model, layers: list[int]):
    """Remove whole blocks; later blocks are renumbered (``layer_idx``, ``layer_types``, ``num_hidden_layers``)."""
    return prune(model, PruningPlan(layers=list(layers)))


def _select_heads(family: Family, block: nn.Module, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> None:
    attn = block.get_submodule(family.attention)
    head_dim = getattr(attn, family.head_dim)
    q_rows = _head_rows(keep_q, head_dim)
    if family.fused_qkv:  # outputs are [q | k | v], each `width` wide
        fused = block.get_submodule(family.q[0])
        width = _n_out(fused) // 3
        _keep(fused, torch.cat([q_rows + i * width for i in range(3)]), outputs=True)
    else:
        for name in family.q:
            _keep(block.get_submodule(name), q_rows, outputs=True)
        for name in family.kv:
            _keep(block.get_submodule(name), _head_rows(keep_kv, head_dim), outputs=True)
    _keep(block.get_submodule(family.o), q_rows, outputs=False)
    values = {"heads": len(keep_q), "kv_heads": len(keep_kv), "groups": len(keep_q) // len(keep_kv),
              "width": len(keep_q) * head_dim}
    for attr, what in family.attrs.items():
        setattr(attn, attr, values[what])


def _select_neurons(family: Family, block: nn.Module, keep: torch.Tensor) -> None:
    for name in family.mlp_in:
        _keep(block.get_submodule(name), keep, outputs=True)
    _keep(block.get_submodule(family.mlp_out), keep, outputs=False)
    mlp = block.get_submodule(family.mlp_out.rsplit(".", 1)[0])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # (len(heads) * head_dim,)


def _n_out(layer: nn.Module) -> int:
    return layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]


def _keep(layer: nn.Module, index: torch.Tensor, outputs: bool) -> None:
    """Keep only ``index`` of ``layer``'s outputs (or inputs), in place.

    Unlike ``transformers.pytorch_utils.prune_linear_layer`` (which builds a new fp32 layer) the module
    object stays, so its dtype, device, ``requires_grad`` and any hooks are unchanged. ``nn.Linear``
    stores weight (out, in); ``Conv1D`` (GPT-2) stores it transposed, (in, out).
    """
    if not isinstance(layer, (nn.Linear, Conv1D)):
        raise TypeError(f"Cannot slice a {type(layer).__name__}: expected nn.Linear or Conv1D.")
    conv = isinstance(layer, Conv1D)
    dim = int(conv) if outputs else int(not conv)
    index = index.to(layer.weight.device)
    layer.weight = _like(layer.weight, layer.weight.detach().index_select(dim, index))
    if outputs and layer.bias is not None:
        layer.bias = _like(layer.bias, layer.bias.detach().index_select(0, index))
    if conv:
        layer.nx, layer.nf = layer.weight.shape
    else:
        layer.out_features, layer.in_features = layer.weight.shape


def _like(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)


def _drop_layers(model, family: Family, keep: list[int]) -> None:
    parent_path, _, name = family.layers.rpartition(".")
    parent = model.base_model.get_submodule(parent_path) if parent_path else model.base_model
    old = getattr(parent, name)
    setattr(parent, name, nn.ModuleList([old[i] for i in keep]))
    renumber_layer_idx(getattr(parent, name))
    keep_layers_in_config(model.config, keep)
    record = pruned_heads_of(model)
    if record:
        _set_pruned_heads(model, {new: record[old] for new, old in enumerate(keep) if old in record})


# ------------------------------------------------------------------------------------------ config


def _sync_config(model, family: Family) -> None:
    """Make the config describe the pruned model as far as its class can.

    Uniform head counts / MLP width are written into the config's own fields when the config class can
    express them - checked, not assumed: the candidate must pass the class's validation (a reload runs it)
    and a model built from it on the meta device must have exactly these shapes. What cannot be expressed
    stays at the pre-pruning value (the skeleton :func:`load_pruned` shrinks), and every layer's real shape
    is then stored under ``config.llm_distill_layer_shapes`` too, so any later ``save_pretrained`` (e.g.
    ``Trainer.save_model`` after distillation) still writes a folder :func:`load_pruned` can rebuild.
    """
    shapes = layer_shapes(model)
    first = shapes[0]
    head_fields = {"num_attention_heads": first.num_attention_heads}
    if family.kv_config:
        head_fields[family.kv_config] = first.num_key_value_heads
    if family.head_dim_config:
        head_fields["head_dim"] = first.head_dim  # explicit, or the config would derive hidden / heads
    groups = [
        (head_fields, ("num_attention_heads", "num_key_value_heads", "head_dim")),
        ({family.intermediate: first.intermediate_size}, ("intermediate_size",)),
    ]
    for fields, keys in groups:
        if all(getattr(model.config, name, None) == value for name, value in fields.items()):
            continue  # unchanged: nothing to write (and no meta model to build)
        if all(_pick(s, keys) == _pick(first, keys) for s in shapes) and _expresses(model, fields, shapes, keys):
            for name, value in fields.items():
                setattr(model.config, name, value)
    if layer_shapes(_meta_model(model, model.config)) == shapes:
        model.config.__dict__.pop(SHAPES_KEY, None)
    else:
        setattr(model.config, SHAPES_KEY, [asdict(s) for s in shapes])


def _pick(shape: LayerShape, keys) -> tuple:
    return tuple(getattr(shape, k) for k in keys)


def _meta_model(model, config):
    """The model ``config`` describes, built without memory (meta device) to read its shapes."""
    config = copy.deepcopy(config)
    config.__dict__.pop(SHAPES_KEY, None)
    with torch.device("meta"):
        return type(model)(config)


def _expresses(model, fields: dict, shapes: list[LayerShape], keys) -> bool:
    candidate = copy.deepcopy(model.config)
    for name, value in fields.items():
        setattr(candidate, name, value)
    try:
        candidate = type(candidate).from_dict(candidate.to_dict())  # what a reload does, validation included
        built = _meta_model(model, candidate)
    except (ValueError, TypeError, StrictDataclassClassValidationError) as err:
        logger.info("Config cannot express %s (%s); the per-layer shapes are stored instead.", fields, err)
        return False
    return [_pick(s, keys) for s in layer_shapes(built)] == [_pick(s, keys) for s in shapes]


# ------------------------------------------------------------------------------------------ save / load


def save_pruned(model: PreTrainedModel, path: str | Path, plan: PruningPlan | None = None, **save_kwargs) -> Path:
    """``save_pretrained`` plus ``pruning.json``: every layer's shape, whether the config alone rebuilds
    them (``config_is_complete``: then plain ``from_pretrained`` works), the architecture and the plan."""
    path = Path(path)
    model.save_pretrained(path, **save_kwargs)
    shapes = layer_shapes(model)
    info = {
        "format_version": 1,
        "architecture": type(model).__name__,
        "config_is_complete": SHAPES_KEY not in model.config.__dict__,
        "layers": [asdict(s) for s in shapes],
        "plan": plan.to_dict() if plan is not None else None,
    }
    (path / PRUNING_FILE).write_text(json.dumps(info, indent=1))
    return path


def is_pruned_dir(path) -> bool:
    """A folder :func:`load_pruned` should load: it has ``pruning.json``, or a config with per-layer shapes."""
    path = Path(str(path))
    if (path / PRUNING_FILE).is_file():
        return True
    config = path / "config.json"
    return config.is_file() and SHAPES_KEY in json.loads(config.read_text())


def load_pruned(path: str | Path, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a pruned folder (:func:`save_pruned`, or ``save_pretrained`` of a pruned model), whatever its shapes.

    The architecture's class is built from ``config.json`` (on the meta device, as ``from_pretrained``
    does), each layer is shrunk to the saved per-layer shapes, then the weights are loaded; any missing,
    unexpected or mismatched weight is an error. ``from_pretrained_kwargs`` (``dtype``, ``device_map``,
    ``attn_implementation`` ...) are passed through.
    """
    path = Path(path)
    cls, shapes = _saved_architecture(path)

    class Pruned(cls):  # from_pretrained builds the model with cls(config); shrink it before weights are loaded
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            if shapes is not None:
                _shrink_to(self, shapes, path)

    Pruned.__name__ = Pruned.__qualname__ = cls.__name__
    model, loading = Pruned.from_pretrained(path, output_loading_info=True, **from_pretrained_kwargs)
    bad = {k: sorted(map(str, v)) for k, v in loading.items() if k != "error_msgs" and v}
    if bad or loading.get("error_msgs"):
        raise RuntimeError(f"{path}: the weights do not match the saved per-layer shapes: "
                           f"{bad or loading['error_msgs']}. The folder was edited or written by something else; "
                           "prune and save_pruned it again.")
    model.__class__ = cls  # the subclass only added the shrinking constructor
    return model


def fresh_pruned(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised model with a pruned folder's architecture (the train-from-scratch baseline):
    the config's skeleton, seeded, shrunk to the saved per-layer shapes."""
    path = Path(path)
    cls, shapes = _saved_architecture(path)
    torch.manual_seed(seed)
    model = cls(AutoConfig.from_pretrained(path)).to(dtype)
    if shapes is not None:
        _shrink_to(model, shapes, path)
    return model


def _saved_architecture(path: Path):
    """(model class, per-layer shapes or None when the config is complete) of a pruned folder."""
    import transformers

    config = json.loads((path / "config.json").read_text())
    info = json.loads((path / PRUNING_FILE).read_text()) if (path / PRUNING_FILE).is_file() else {}
    name = info.get("architecture") or (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name or "", None)
    if cls is None:
        raise ValueError(f"{path}: cannot tell the model class ({name!r} is not a transformers class).")
    layers = config.get(SHAPES_KEY) or info.get("layers")
    return cls, [LayerShape(**s) for s in layers] if layers else None


def _shrink_to(model, shapes: list[LayerShape], path: Path) -> None:
    """Make each layer of a skeleton model (the config's sizes) as small as ``shapes`` says."""
    family = family_of(model)
    current = layer_shapes(model)
    if len(current) != len(shapes):
        raise ValueError(f"{path}: config.json has {len(current)} layers but the saved shapes list {len(shapes)}.")
    for i, (block, have, want) in enumerate(zip(blocks(model), current, shapes)):
        if (want.head_dim != have.head_dim or want.num_attention_heads > have.num_attention_heads
                or want.num_key_value_heads > have.num_key_value_heads
                or want.intermediate_size > have.intermediate_size):
            raise ValueError(f"{path}: saved layer {i} ({want}) does not fit inside the config's skeleton ({have}); "
                             "the folder was edited, prune and save_pruned it again.")
        if (want.num_attention_heads, want.num_key_value_heads) != (have.num_attention_heads, have.num_key_value_heads):
            _select_heads(family, block, torch.arange(want.num_attention_heads), torch.arange(want.num_key_value_heads))
        if want.intermediate_size != have.intermediate_size:
            _select_neurons(family, block, torch.arange(want.intermediate_size))
