"""Preparing a frozen teacher for the training backend Accelerate selected, and small multi-process helpers.

The teacher is never *trained*, so it never needs a gradient-synchronising wrapper; what it needs depends on
how big it is relative to one device:

==============  ==========================================================================================
backend          teacher
==============  ==========================================================================================
single / DDP     replicated on every device, eval, frozen, no DDP wrapper (nothing to synchronise);
                 Accelerate's autocast wrapper applies the same mixed precision as the student's forward.
FSDP2            sharded with ``fully_shard`` (each decoder layer, then the root) with the student's
                 ``MixedPrecisionPolicy`` and mesh; parameters are gathered layer by layer in the forward
                 and freed after it (``reshard_after_forward``), so a teacher larger than one device fits.
FSDP1            wrapped in ``FullyShardedDataParallel`` with the plugin's settings (TRL's ``prepare_fsdp``).
DeepSpeed        ZeRO-3: its own inference engine built from the student's DeepSpeed config, sharded like the
                 student (TRL's ``prepare_deepspeed``); ZeRO-1/2 shard only optimiser state and gradients,
                 which a frozen teacher has none of, so it is a plain replicated engine (stage 0).
==============  ==========================================================================================

A sharded teacher's forward is a collective: every rank must call it the same number of times (the training
loop does; :func:`llm_distill.evaluation.evaluate_models` pads ranks to equal batch counts for this reason).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import socket

import torch

logger = logging.getLogger(__name__)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher is a fixed function."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_backend(accelerator) -> str:
    """Which teacher preparation ``accelerator`` calls for: ``deepspeed``, ``fsdp2``, ``fsdp1`` or ``replicated``."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if state.distributed_type == DistributedType.FSDP:
        return "fsdp2" if getattr(state.fsdp_plugin, "fsdp_version", 1) == 2 else "fsdp1"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate only turns FSDP on for accelerator devices: on CPU it silently runs plain DDP (MULTI_CPU).
        logger.warning("FSDP was requested (ACCELERATE_USE_FSDP=true) but Accelerate selected %s: the student and "
                       "the teacher are replicated, not sharded (Accelerate enables FSDP only on GPU/XPU/NPU/...).",
                       state.distributed_type)
    return "replicated"


def prepare_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Freeze ``teacher`` and prepare it for ``accelerator``'s backend (see the module docstring)."""
    freeze(teacher)
    backend = teacher_backend(accelerator)
    if backend == "deepspeed":
        return prepare_deepspeed_teacher(teacher, accelerator)
    if backend == "fsdp2":
        plugin = accelerator.state.fsdp_plugin
        if plugin.cpu_ram_efficient_loading:
            # from_pretrained then loads real weights on rank 0 only; accelerate broadcasts them for the student it
            # prepares, but a teacher sharded here would keep the other ranks' empty weights.
            raise ValueError("fsdp_cpu_ram_efficient_loading=true is not supported with a teacher: set "
                             "fsdp_cpu_ram_efficient_loading: false in the accelerate config (as in "
                             "configs/accelerate/fsdp2.yaml); the teacher is still sharded.")
        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None and accelerator.parallelism_config is not None:
            mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        return prepare_fsdp2_teacher(
            teacher, mesh=mesh, mp_policy=plugin.mixed_precision_policy,
            reshard_after_forward=plugin.reshard_after_forward, offload_policy=plugin.cpu_offload,
            layer_cls_names=plugin.transformer_cls_names_to_wrap,
        )
    if backend == "fsdp1":
        return prepare_fsdp1_teacher(teacher, accelerator)
    # evaluation_mode=True: moved to the device and autocast like the student, but never DDP-wrapped.
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def decoder_layer_class_names(model: torch.nn.Module, names: list[str] | None = None) -> set[str]:
    """Class names of the blocks to shard one by one: the configured ones present in ``model`` (the config's
    ``fsdp_transformer_layer_cls_to_wrap`` may name the student's class), else ``model._no_split_modules``."""
    present = {type(m).__name__ for m in model.modules()}
    for candidates in (names, getattr(model, "_no_split_modules", None)):
        found = set(candidates or []) & present
        if found:
            return found
    logger.warning("No decoder layer class found in %s: the teacher is sharded as one FSDP unit (its full weights "
                   "are gathered at once in the forward). Set fsdp_transformer_layer_cls_to_wrap to shard per layer.",
                   type(model).__name__)
    return set()


def prepare_fsdp2_teacher(teacher: torch.nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward=True,
                          offload_policy=None, layer_cls_names: list[str] | None = None) -> torch.nn.Module:
    """Shard a frozen ``teacher`` with FSDP2 ``fully_shard``: each decoder layer is its own unit (so only one
    layer's full weights exist at a time during the forward), then the root (embeddings, norm, LM head).

    ``mp_policy`` should be the student's ``MixedPrecisionPolicy`` so both models compute in the same dtype;
    the teacher's weights are kept in whatever dtype they were loaded in (a bf16 teacher is not upcast: it
    has no optimiser state that would need fp32 master weights). ``fully_shard`` moves one unit at a time to
    the mesh's device and keeps this rank's shard, so a CPU-loaded teacher never exists whole on one GPU.
    Sharding is in place.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    freeze(teacher)
    if isinstance(teacher, FSDPModule):
        return teacher
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy if isinstance(mp_policy, MixedPrecisionPolicy) else MixedPrecisionPolicy())
    if isinstance(offload_policy, OffloadPolicy):
        kwargs["offload_policy"] = offload_policy
    layer_names = decoder_layer_class_names(teacher, layer_cls_names)
    n_layers = 0
    for module in teacher.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module, **kwargs)
            n_layers += 1
    fully_shard(teacher, **kwargs)
    logger.info("Teacher sharded with FSDP2: %d %s units + root", n_layers, "/".join(sorted(layer_names)) or "layer")
    return teacher


def prepare_fsdp1_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Wrap a frozen teacher in FSDP1 with the student's plugin settings (as TRL's ``prepare_fsdp`` does)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(teacher, FSDP):
        return teacher
    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(teacher)
    teacher = FSDP(
        teacher, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        cpu_offload=plugin.cpu_offload, auto_wrap_policy=plugin.auto_wrap_policy,
        mixed_precision=plugin.mixed_precision_policy, sync_module_states=plugin.sync_module_states,
        forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
        param_init_fn=plugin.param_init_fn, limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device,
    )
    return freeze(teacher)


def prepare_deepspeed_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Wrap ``teacher`` in a DeepSpeed engine for inference, sharded like the student under ZeRO-3.

    The engine inherits the student's ``bf16`` / ``fp16`` section, so both models compute in the same dtype.
    """
    try:
        import deepspeed
    except ImportError as err:  # accelerate checks this too, but only when it initialises the backend
        raise ImportError("DeepSpeed is selected but not installed: pip install deepspeed (GPU machines).") from err

    plugin = accelerator.state.deepspeed_plugin
    config = copy.deepcopy(plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    cfg = getattr(teacher, "config", None)
    hidden = max(getattr(cfg, "hidden_sizes", None) or [getattr(cfg, "hidden_size", 0) or 0]) or None
    if stage == 3 and hidden is not None:
        # Same bucket sizing TRL uses: proportional to the hidden size, avoids ZeRO-3 hangs on small models
        # (and replaces "auto" values, which only the student's engine gets resolved).
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


def gathered_for_forward(model: torch.nn.Module):
    """Context in which ``model`` can run a forward on its own: a no-op, except for a model whose weights
    DeepSpeed ZeRO-3 partitioned at load time but that no engine wraps yet (the student before ``train()``),
    whose full weights are gathered on every rank for the duration (a collective: call it on all ranks)."""
    import contextlib

    in_engine = hasattr(model, "zero_optimization_partition_weights")
    if in_engine or not any(hasattr(p, "ds_id") for p in model.parameters()):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def free_port() -> int:
    """A TCP port nothing listens on right now (for ``--main_process_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model``'s forward is a collective (FSDP / DeepSpeed ZeRO-3): all ranks must call it together."""
    if hasattr(model, "zero_optimization_partition_weights"):  # a DeepSpeed engine
        return bool(model.zero_optimization_partition_weights())
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 partitioned params of an unwrapped model


def shutdown_distributed(*holders) -> None:
    """Tear the process group down explicitly (gloo intermittently aborts at interpreter exit otherwise).

    ``holders`` (trainers, accelerators, modules) may hold DDP wrappers; their C++ ``Reducer`` is released first,
    while the group is still alive. Why: a Reducer is freed with the GIL held, and when it holds the group's last
    reference (after ``destroy_process_group``) its destructor joins gloo's worker thread, which may itself wait for
    the GIL to free the tensors of a finished collective: a deadlock at exit, seen on CI after a 2-rank run
    (py-spy: ``~Reducer -> ~ProcessGroupGloo -> thread::join``, worker in ``decref_pyobject``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for ddp in _ddp_wrappers(holders):
        for attr in ("logger", "reducer"):  # the Logger holds the Reducer too
            ddp.__dict__.pop(attr, None)
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _ddp_wrappers(holders) -> list[torch.nn.Module]:
    from torch.nn.parallel import DistributedDataParallel

    candidates = []
    for h in holders:
        candidates += [h, getattr(h, "model_wrapped", None), getattr(h, "model", None)]
        accelerator = getattr(h, "accelerator", h)
        candidates += list(getattr(accelerator, "_models", []))
    found = {id(m): m for m in candidates if isinstance(m, DistributedDataParallel)}
    return list(found.values())
