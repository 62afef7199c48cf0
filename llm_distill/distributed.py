"""Preparing a frozen teacher for the training backend Accelerate selected.

DDP: the teacher is replicated and never wrapped (nothing to synchronise). FSDP: Accelerate shards it
for inference (``prepare_model(..., evaluation_mode=True)``). DeepSpeed: a teacher that is large enough
to matter must be sharded too under ZeRO-3, so it gets its own inference engine built from the
student's DeepSpeed config (the approach of TRL's ``prepare_deepspeed``).
"""

from __future__ import annotations

import copy

import torch


def prepare_deepspeed_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Wrap ``teacher`` in a DeepSpeed engine for inference, sharded like the student under ZeRO-3."""
    import deepspeed

    plugin = accelerator.state.deepspeed_plugin
    config = copy.deepcopy(plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
    if stage == 3 and hidden is not None:
        # Same bucket sizing TRL uses: proportional to the hidden size, avoids ZeRO-3 hangs on small models.
        config["zero_optimization"].update({
            "reduce_bucket_size": hidden * hidden,
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_prefetch_bucket_size": 0.9 * hidden * hidden,
        })
    if stage != 3:
        # ZeRO-1/2 shard only optimiser state and gradients: a frozen teacher has neither, so keep it plain.
        config["zero_optimization"] = {"stage": 0}
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
