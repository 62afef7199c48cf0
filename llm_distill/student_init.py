"""A student initialised from its teacher's layers (DistilBERT, distil-whisper): which layers, and the exact copy.

The copy is strict (every student weight from exactly one teacher weight) and verified: the student is saved,
reloaded with ``from_pretrained`` and run once before it is handed over.
"""

from __future__ import annotations

import copy
import logging
import tempfile

import torch
from transformers import PreTrainedModel

from llm_distill.layers import keep_layers_in_config, layer_stack_path, renumber_layer_idx

logger = logging.getLogger(__name__)


def select_teacher_layers(num_teacher_layers: int, num_student_layers: int, strategy: str = "linspace") -> list[int]:
    """Teacher layer indices a student copies.

    ``linspace`` keeps the first and the last layer and spreads the rest evenly (distil-whisper);
    ``every_other`` takes layers 0, 2, 4, ... (DistilBERT, Sanh et al. 2019). For an explicit list see
    :func:`check_teacher_layers`.
    """
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ValueError(f"student_num_layers={num_student_layers} must be between 1 and the teacher's "
                         f"{num_teacher_layers} layers.")
    if strategy == "every_other":
        layers = list(range(0, num_teacher_layers, 2))[:num_student_layers]
        if len(layers) < num_student_layers:
            raise ValueError(f"every_other gives only {len(layers)} layers of {num_teacher_layers}; ask for fewer "
                             "student layers or use student_layer_strategy=linspace.")
        return layers
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [round(i * step) for i in range(num_student_layers)]


def check_teacher_layers(layers: list[int], num_teacher_layers: int) -> list[int]:
    """An explicit layer list (``student_layers``), checked: non-empty, increasing, within the teacher."""
    layers = [int(i) for i in layers]
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= num_teacher_layers:
        raise ValueError(f"student_layers={layers} must be a non-empty increasing list of teacher layer indices in "
                         f"[0, {num_teacher_layers - 1}] (the teacher has {num_teacher_layers} layers).")
    return layers


def student_from_teacher(teacher: PreTrainedModel, layers: list[int], verify: bool = True) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only the transformer blocks ``layers`` (DistilBERT's initialisation).

    Embeddings, the kept blocks, the final norm and the head are copied; the config's layer count and its per-layer
    lists (``layer_types`` ...) follow the kept layers, and the blocks' ``layer_idx`` (KV-cache slot) is the new
    position. Works for decoders (Llama, Qwen, Mistral: ``model.layers``; GPT-2: ``transformer.h``) and encoders
    (BERT: ``bert.encoder.layer``; DistilBERT: ``distilbert.transformer.layer``), see ``llm_distill.layers.LAYER_STACKS``.

    The copy is strict - every student weight comes from exactly one teacher weight and every teacher weight outside
    the dropped blocks is used - and, with ``verify``, the student is saved, reloaded with ``from_pretrained`` and run
    once; its logits must equal the in-memory student's (distil-whisper's ``create_student_model.py`` does the same).
    """
    stack = layer_stack_path(teacher)
    n_teacher = teacher.config.num_hidden_layers
    layers = check_teacher_layers(layers, n_teacher)
    config = copy.deepcopy(teacher.config)
    keep_layers_in_config(config, layers)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        logger.warning("scale_attn_by_inverse_layer_idx=True: a copied GPT-2 block scales its attention by its new "
                       "position, so the student's blocks do not compute exactly what the teacher's did.")
    student = type(teacher)(config).to(teacher.dtype)
    student.load_state_dict(_mapped_state_dict(teacher.state_dict(), student.state_dict(), f"{stack}.", layers),
                            strict=True)
    renumber_layer_idx(student.get_submodule(stack))
    student.eval()
    if verify:
        _check_reloads(student)
    return student


def _mapped_state_dict(teacher_sd: dict, student_sd: dict, prefix: str, layers: list[int]) -> dict:
    """Student key -> teacher tensor; raises naming every key without a source and every unused teacher weight."""
    mapped, missing = {}, []
    for key in student_sd:
        source = key
        if key.startswith(prefix):
            idx, tail = key[len(prefix):].split(".", 1)
            source = f"{prefix}{layers[int(idx)]}.{tail}"
        if source in teacher_sd and teacher_sd[source].shape == student_sd[key].shape:
            mapped[key] = teacher_sd[source]
        else:
            missing.append(f"{key} <- {source}")
    unused = sorted(k for k in teacher_sd if not k.startswith(prefix) and k not in student_sd)
    if missing or unused:
        raise ValueError(f"Student-from-teacher copy is not exact: student weights without a teacher source "
                         f"{missing[:5]}, teacher weights not copied {unused[:5]}. The student must have the "
                         "teacher's architecture with fewer layers.")
    return mapped


def _check_reloads(student: PreTrainedModel) -> None:
    """Save, ``from_pretrained`` strictly, and compare one forward pass with the in-memory student."""
    with tempfile.TemporaryDirectory(prefix="student-from-teacher-") as tmp:
        student.save_pretrained(tmp)
        reloaded, info = type(student).from_pretrained(tmp, dtype=student.dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"The student built from the teacher does not reload cleanly with from_pretrained: {problems}")
    device = next(student.parameters()).device
    reloaded.to(device).eval()
    ids = (torch.arange(8, device=device) % student.config.vocab_size)[None]  # (1, 8)
    with torch.no_grad():
        want, got = student(input_ids=ids).logits, reloaded(input_ids=ids).logits
    if (want - got).abs().max().item() > 1e-4 * max(1.0, want.abs().max().item()):
        raise RuntimeError("The reloaded student's logits differ from the in-memory student's "
                           f"(max |diff| {(want - got).abs().max().item():.3g}): the copy did not round-trip.")


