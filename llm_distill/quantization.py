"""Quantization of the student with torchao: int8 post-training quantization, and quantization-aware training.

Why torchao: it is PyTorch's own quantization library, runs on CPU with our pinned torch, and transformers reads and
writes its models (``TorchAoConfig``), so a quantized student is a normal folder that ``from_pretrained`` loads.
optimum / optimum-quanto are not options here: optimum needs transformers < 4.58 (we are on 5.x).

What is quantized, and why the file shrinks by less than 4x on a tiny model: ``TorchAoConfig`` quantizes the linear
layers of the decoder, not the input embeddings nor the output head (transformers' default,
``include_input_output_embeddings=False``; quantizing the head costs the most quality). Those two stay fp32, and in
a small-vocabulary-heavy model they are most of the bytes.

Saving: ``save_pretrained`` of a model quantized in memory with ``quantize_`` fails in torchao 0.18 + transformers
5.x ("invalid python storage"), so the one path is the documented one: save fp32, load it with
``quantization_config=TorchAoConfig(...)`` (quantized while loading), save that (:func:`quantize_pretrained`).
Reloading needs nothing special: ``AutoModelForCausalLM.from_pretrained(folder)``.

QAT (:func:`prepare_qat`): ``torchao.quantization.qat.QATConfig(base, step="prepare")`` swaps the student's linear
layers (not the head) for ``FakeQuantizedLinear``: the forward pass rounds weights and activations the way the int8
kernels will, the backward pass goes straight through, so distillation teaches the student to be good *after*
quantization. Its state dict keeps plain ``weight`` keys, so checkpoints and the final save are ordinary fp32 folders;
converting one with :func:`quantize_pretrained` and the same base config gives exactly the fake-quantized outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PTQ_METHODS = ("int8_weight_only", "int8_dynamic", "int8_intx", "int4_intx")
QAT_SCHEMES = ("int8", "int4")  # QAT trains toward these PTQ methods:
QAT_METHOD = {"int8": "int8_intx", "int4": "int4_intx"}
INSTALL_HINT = "pip install 'llm-distill[compress]' (torchao, onnx, onnxruntime, onnxscript)"


def require(module: str):
    """Import an optional compression dependency, or fail with the command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for quantization / export: {INSTALL_HINT}.") from err


def torchao_config(method: str):
    """The torchao config of a method name.

    - ``int8_weight_only``: int8 per-channel weights, fp32 activations (smallest change, weights 4x smaller).
    - ``int8_dynamic``: int8 weights and int8 activations quantized per token at run time (int8 matmuls).
    - ``int8_intx`` / ``int4_intx``: ``Int8DynamicActivationIntxWeightConfig`` with int8 per-channel / int4
      group-32 weights: the schemes torchao's QAT can train for (``QATConfig`` refuses the two above)."""
    quantization = require("torchao.quantization")
    from torchao.quantization.granularity import PerAxis, PerGroup

    if method == "int8_weight_only":
        return quantization.Int8WeightOnlyConfig()
    if method == "int8_dynamic":
        return quantization.Int8DynamicActivationInt8WeightConfig()
    if method == "int8_intx":
        return quantization.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if method == "int4_intx":
        return quantization.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                  weight_granularity=PerGroup(32))
    raise ValueError(f"Unknown quantization method {method!r}: use one of {', '.join(PTQ_METHODS)}.")


def quantize_pretrained(source: str | Path, output_dir: str | Path, method: str = "int8_weight_only",
                        embeddings: bool = False):
    """Quantize the fp32 model folder ``source`` while loading it (``TorchAoConfig``) and save it to ``output_dir``;
    returns the quantized model. ``AutoModelForCausalLM.from_pretrained(output_dir)`` reads it back.

    ``embeddings=True`` also quantizes the output head (with ``method``) and the input embeddings (int8 per row,
    ``IntxWeightOnlyConfig``: a lookup table needs no activation quantization): what it takes to get close to 4x
    smaller when, as in small models, embeddings and head are a large share of the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, TorchAoConfig

    require("torchao")
    quant_type = torchao_config(method)
    if embeddings:
        from torchao.quantization import IntxWeightOnlyConfig, ModuleFqnToConfig
        from torchao.quantization.granularity import PerAxis

        with torch.device("meta"):  # the embeddings' module name, without loading any weight
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        table = skeleton.get_input_embeddings()
        name = next(n for n, m in skeleton.named_modules() if m is table)
        quant_type = ModuleFqnToConfig({"_default": quant_type, name: IntxWeightOnlyConfig(
            weight_dtype=torch.int8, granularity=PerAxis(0))})
    config = TorchAoConfig(quant_type, include_input_output_embeddings=embeddings)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.float32)
    model.eval().save_pretrained(output_dir)
    logger.info("Quantized %s (%s%s) -> %s", source, method, " + embeddings and head" if embeddings else "", output_dir)
    return model


def _qat_filter(model: torch.nn.Module):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return lambda module, fqn: isinstance(module, torch.nn.Linear) and module is not head


def prepare_qat(model: torch.nn.Module, scheme: str = "int8") -> torch.nn.Module:
    """Fake-quantize ``model``'s linear layers (not the output head, which ``TorchAoConfig`` leaves fp32 too) for
    ``QAT_METHOD[scheme]``, in place; returns ``model``."""
    require("torchao")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if scheme not in QAT_SCHEMES:
        raise ValueError(f"Unknown QAT scheme {scheme!r}: use one of {', '.join(QAT_SCHEMES)}.")
    quantize_(model, QATConfig(torchao_config(QAT_METHOD[scheme]), step="prepare"), filter_fn=_qat_filter(model))
    return model


def is_fake_quantized(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
