"""Gradual magnitude pruning during distillation (Zhu & Gupta 2017, "To prune, or not to prune").

The student's weights are pruned a little at a time while it is being distilled, on the cubic schedule

    s_t = s_f * (1 - (1 - (t - t_0) / (n * dt)) ** 3)      for t = t_0, t_0 + dt, ..., t_0 + n * dt

(fast at first, when many redundant weights are left, slower near the target), so the remaining weights learn to
cover for the removed ones, which one-shot pruning before distillation cannot do. Two patterns:

- ``unstructured``: each layer keeps its largest-magnitude weights; masks from ``torch.nn.utils.prune``'s
  ``L1Unstructured`` (the same ranking ``prune.l1_unstructured`` applies).
- ``2:4``: two of every four consecutive input weights of each output row are zero (NVIDIA's semi-structured
  pattern, 50%); masks from ``torch.ao.pruning.WeightNormSparsifier`` (``sparse_block_shape=(1, 4)``,
  ``zeros_per_block=2``; the sparsifier torchao's ``apply_fake_sparsity`` uses). Gradually, its ``sparsity_level``
  (the share of 4-blocks made 2:4) follows the schedule, so every block holds 2:4 once the target is reached.

Why the masks are held here, by a ``TrainerCallback``, and not as the tools' reparametrizations: both
``torch.nn.utils.prune`` and the sparsifier replace ``weight`` by ``weight_orig`` + ``weight_mask`` (or
``parametrizations.weight.original`` + ``...mask``) in the state dict. ``save_pretrained`` writes those keys as they
are, and ``from_pretrained`` of such a checkpoint reports the ``weight`` keys missing and **re-initializes them at
random** (no error). So the tools compute the masks (on a detached copy of each weight), the weights stay plain
``nn.Linear.weight`` parameters with zeros in them (every checkpoint is a normal Hugging Face folder), and the
callback re-applies the masks after every optimizer step (AdamW's moments would otherwise regrow pruned weights),
saves them next to each checkpoint (``sparsity_masks.safetensors``) and restores them on resume.
"""

from __future__ import annotations

import logging
import os

import torch
from safetensors.torch import load_file, save_file
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

SPARSITY_PATTERNS = ("unstructured", "2:4")
SPARSITY_SCOPES = ("linear", "linear_and_head", "all")
MASKS_FILE = "sparsity_masks.safetensors"  # in checkpoint folders, next to the student's weights


def scheduled_sparsity(step: int, target: float, start: int, end: int, every: int) -> float:
    """Zhu & Gupta's cubic schedule from 0 at ``start`` to ``target`` at ``end``, updated every ``every`` steps
    (constant in between; ``target`` from ``end`` on, also when ``end - start`` is not a multiple of ``every``)."""
    if step < start:
        return 0.0
    if step >= end or end <= start:
        return float(target)
    progress = ((step - start) // every) * every / (end - start)
    return float(target * (1.0 - (1.0 - progress) ** 3))


def prunable_weights(model: torch.nn.Module, scope: str = "linear") -> dict[str, torch.nn.Parameter]:
    """``{module name: weight}`` of what ``scope`` prunes: ``linear`` = every ``nn.Linear`` except the output
    head; ``linear_and_head`` adds the head; ``all`` adds the input embeddings too. A weight shared by two modules
    (tied embeddings) is listed once."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    found, seen = {}, set()
    for name, module in model.named_modules():
        is_head = module is head
        wanted = (isinstance(module, torch.nn.Linear) and (not is_head or scope != "linear")) or (
            module is embeddings and scope == "all")
        if wanted and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found[name] = module.weight
    return found


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """Boolean keep-mask (True = kept) of ``weight`` ``(out, in)`` pruned to ``sparsity`` by magnitude.

    ``unstructured``: ``prune.L1Unstructured``. ``2:4``: ``WeightNormSparsifier`` with ``sparsity_level =
    sparsity / 0.5`` (the share of 1x4 blocks that get two zeros). Weights already zero rank lowest, so masks
    only grow from one schedule step to the next."""
    w = weight.detach().float()
    if sparsity <= 0.0:
        return torch.ones_like(w, dtype=torch.bool)
    if pattern == "unstructured":
        return prune.L1Unstructured(amount=float(sparsity)).compute_mask(w, torch.ones_like(w)).bool()
    if w.shape[-1] % 4:
        raise ValueError(f"2:4 sparsity needs an input width divisible by 4, got a weight of shape {tuple(w.shape)}.")
    shell = torch.nn.Module()  # a detached copy: the sparsifier's parametrization never touches the real model
    shell.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    sparsifier = WeightNormSparsifier(sparsity_level=min(1.0, sparsity / 0.5), sparse_block_shape=(1, 4),
                                      zeros_per_block=2)
    sparsifier.prepare(shell, [{"tensor_fqn": "weight"}])
    sparsifier.step()
    return shell.parametrizations.weight[0].mask.detach().bool().clone()


def sparsity_report(model: torch.nn.Module, scope: str = "linear") -> dict[str, float]:
    """Share of zeros in the pruned weights, and over every parameter of the model."""
    weights = prunable_weights(model, scope)
    pruned_zeros = sum(int((w == 0).sum()) for w in weights.values())
    pruned_total = sum(w.numel() for w in weights.values())
    params = list(model.parameters())
    return {"sparsity": pruned_zeros / max(pruned_total, 1),
            "model_sparsity": sum(int((p == 0).sum()) for p in params) / max(sum(p.numel() for p in params), 1)}


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every 1x4 block of every row of ``weight`` has at least two zeros."""
    blocks = weight.detach().reshape(weight.shape[0], -1, 4)
    return bool(((blocks == 0).sum(-1) >= 2).all())


class GradualPruningCallback(TrainerCallback):
    """Prunes ``model``'s weights on the cubic schedule and keeps them pruned through training (see the module
    docstring for why the masks live here). Events: ``on_train_begin`` restores masks on resume;
    ``on_optimizer_step`` re-zeroes pruned weights right after each optimizer step; ``on_step_end`` moves to the
    next schedule value when one is due; ``on_save`` writes the masks into the checkpoint; ``on_train_end`` leaves
    the zeros in the weights (made permanent: the saved model is a plain, sparse checkpoint)."""

    def __init__(self, model: torch.nn.Module, target: float, start: int, end: int, every: int,
                 pattern: str = "unstructured", scope: str = "linear"):
        self.model, self.target, self.start, self.end, self.every = model, target, start, end, every
        self.pattern, self.scope = pattern, scope
        self.masks: dict[str, torch.Tensor] = {}
        self.current = 0.0  # the schedule value the masks were computed for
        self.history: list[tuple[int, float]] = []  # (step, measured sparsity) at each schedule update
        self.resume_dir: str | None = None  # the checkpoint a resumed run starts from (default: output_dir's)

    # ------------------------------------------------------------------ masks

    def update_masks(self, step: int) -> bool:
        """Recompute the masks when the schedule value at ``step`` differs from the current one."""
        value = scheduled_sparsity(step, self.target, self.start, self.end, self.every)
        if value == self.current:
            return False
        weights = prunable_weights(self.model, self.scope)
        self.masks = {name: magnitude_mask(w, value, self.pattern) for name, w in weights.items()}
        self.current = value
        self.apply_masks()
        measured = sparsity_report(self.model, self.scope)["sparsity"]
        self.history.append((step, measured))
        logger.info("step %d: pruned to %.4f sparsity (%s, schedule %.4f)", step, measured, self.pattern, value)
        return True

    @torch.no_grad()
    def apply_masks(self) -> None:
        weights = prunable_weights(self.model, self.scope)
        for name, mask in self.masks.items():
            weights[name].mul_(mask.to(device=weights[name].device, dtype=weights[name].dtype))

    def save_masks(self, folder: str) -> None:
        tensors = {name: mask.to(torch.uint8).contiguous().cpu() for name, mask in self.masks.items()}
        save_file(tensors, os.path.join(folder, MASKS_FILE), metadata={"sparsity": str(self.current)})

    def load_masks(self, folder: str, step: int) -> None:
        """Masks of a checkpoint; rebuilt from the zeros in the weights when the file is missing (they are equal:
        a masked weight is exactly zero)."""
        path = os.path.join(folder, MASKS_FILE)
        weights = prunable_weights(self.model, self.scope)
        if os.path.isfile(path):
            self.masks = {name: mask.bool() for name, mask in load_file(path).items()}
            missing = sorted(set(weights) - set(self.masks))
            if missing:
                raise ValueError(f"{path} has no mask for {missing[:3]}: it was written for a different model or "
                                 "sparsity_scope. Resume with the settings that wrote it.")
        else:
            logger.warning("%s is missing: rebuilding the masks from the zeros in the weights.", path)
            self.masks = {name: (w != 0).cpu() for name, w in weights.items()}
        self.current = scheduled_sparsity(step, self.target, self.start, self.end, self.every)

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: Trainer has loaded the weights and the state already
            folder = self.resume_dir or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.load_masks(folder, state.global_step)
            self.apply_masks()
        else:
            self.update_masks(0)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply_masks()

    def on_step_end(self, args, state, control, **kwargs):
        self.update_masks(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                self.save_masks(folder)

    def on_train_end(self, args, state, control, **kwargs):
        self.apply_masks()

    def extra_logs(self) -> dict[str, float]:
        """Added to every training log line by ``DistillationTrainer.log``."""
        return {"sparsity": round(sparsity_report(self.model, self.scope)["sparsity"], 4)}
