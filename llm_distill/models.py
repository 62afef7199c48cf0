"""Loading teachers and students, checking they can be distilled, building students from teachers.

Hub ids and local paths go through the same ``from_pretrained`` call; ``embedded:*`` names are resolved
to the offline default first (``llm_distill.tiny``).
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llm_distill import tiny

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_dtype(name: str):
    return "auto" if name == "auto" else _DTYPES[name]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(tiny.resolve(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often ship without a pad token; EOS is the usual stand-in (masked in labels).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "auto", attn_implementation: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    kwargs = {"dtype": to_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(tiny.resolve(name_or_path), **kwargs)


def fresh_causal_lm(config_source: str, seed: int, dtype: str = "float32", trust_remote_code: bool = False):
    """A randomly initialised model with ``config_source``'s architecture (seeded: same seed, same weights)."""
    config = AutoConfig.from_pretrained(tiny.resolve(config_source), trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model.to(_DTYPES.get(dtype, torch.float32))


def vocab_size_of(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class VocabularyMismatchError(ValueError):
    pass


def check_vocab_compatible(teacher, student, tokenizer=None) -> int:
    """Return the vocabulary size both models share, or raise with both sizes and the fix.

    Distillation compares the two next-token distributions entry by entry, so token id ``i`` must mean the
    same string for both models. Embedding matrices padded to a multiple of 64/128 (e.g. Qwen2.5's 151936
    vs 152064 rows) are fine: the extra rows are never real tokens and the logits are sliced to the shared
    prefix. Anything else (a different tokenizer) is refused.
    """
    v_t, v_s = vocab_size_of(teacher), vocab_size_of(student)
    shared = min(v_t, v_s)
    if v_t == v_s:
        return shared
    n_tokens = len(tokenizer) if tokenizer is not None else None
    if n_tokens is not None and n_tokens <= shared:
        logger.info("Teacher (%d) and student (%d) embedding sizes differ only by padding; the tokenizer has %d "
                    "tokens, so logits are compared on the first %d entries.", v_t, v_s, n_tokens, shared)
        return shared
    raise VocabularyMismatchError(
        f"Teacher vocabulary size {v_t} != student vocabulary size {v_s}"
        + (f" and the tokenizer has {n_tokens} tokens (more than {shared})" if n_tokens else "")
        + (". If the difference is only embedding padding, pass the tokenizer (processing_class=tokenizer) so the "
           "shared vocabulary can be checked" if n_tokens is None else "")
        + ". Logit distillation needs the same tokenizer for both models: use a teacher and a student of the same "
        "model family (e.g. Qwen2.5-7B-Instruct -> Qwen2.5-0.5B-Instruct), or distil on teacher-generated "
        "responses instead (scripts/generate.py, then alpha: 0)."
    )


def check_tokenizers_compatible(teacher_tokenizer, student_tokenizer) -> None:
    """Refuse two tokenizers whose vocabularies map ids to different strings."""
    vt, vs = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if vt == vs:
        return
    common = set(vt) & set(vs)
    differing = [tok for tok in common if vt[tok] != vs[tok]]
    if differing or len(common) < 0.99 * min(len(vt), len(vs)):
        raise VocabularyMismatchError(
            f"Teacher tokenizer ({len(vt)} tokens) and student tokenizer ({len(vs)} tokens) differ: "
            f"{len(differing)} shared strings have different ids (e.g. {differing[:3]}). Use a student from the "
            "teacher's model family, or set tokenizer: to the teacher's tokenizer for both."
        )


def select_teacher_layers(num_teacher_layers: int, num_student_layers: int, strategy: str = "linspace") -> list[int]:
    """Teacher layer indices a student copies.

    ``linspace`` keeps the first and the last layer and spreads the rest evenly (distil-whisper);
    ``every_other`` takes layers 0, 2, 4, ... (DistilBERT, Sanh et al. 2019).
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


def student_from_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of a decoder-only ``teacher`` keeping only ``layers`` (embeddings, norm and head copied too).

    Works for every model whose decoder blocks live in ``model.layers`` (Llama, Mistral, Qwen2/3, Gemma,
    Phi-3 ...). The copy is checked strictly: every student weight comes from exactly one teacher weight.
    """
    import copy

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(teacher)(config).to(teacher.dtype)
    teacher_sd = teacher.state_dict()
    prefix = _layers_prefix(teacher)
    mapped = {}
    for key in student.state_dict():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            idx, tail = rest.split(".", 1)
            mapped[key] = teacher_sd[f"{prefix}{layers[int(idx)]}.{tail}"]
        else:
            mapped[key] = teacher_sd[key]
    missing, unexpected = student.load_state_dict(mapped, strict=True)
    assert not missing and not unexpected
    for new_idx, layer in enumerate(_decoder_layers(student)):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by it
    return student


def _decoder_layers(model):
    base = getattr(model, model.base_model_prefix, model)
    if not hasattr(base, "layers"):
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers at .{model.base_model_prefix}.layers; "
                         "student_init=teacher_layers supports Llama-style decoders.")
    return base.layers


def _layers_prefix(model) -> str:
    _decoder_layers(model)
    return f"{model.base_model_prefix}.layers."


def apply_lora(student, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap the student in a LoRA adapter (only the adapter is trained and saved)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules[0] if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(student, config)
    return model
