"""Loading teachers and students, checking they can be distilled, building students from teachers.

Hub ids and local paths go through the same ``from_pretrained`` call; ``embedded:*`` names are resolved
to the offline default first (``llm_distill.tiny``). Causal LMs load with ``AutoModelForCausalLM``, masked LMs
(BERT, DistilBERT, RoBERTa ...) with ``AutoModelForMaskedLM``: :func:`lm_kind` tells them apart from the config.
"""

from __future__ import annotations

import inspect
import logging
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

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


def _load_kwargs(dtype: str, attn_implementation: str | None, trust_remote_code: bool) -> dict:
    kwargs = {"dtype": to_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def _load(auto_class, name_or_path: str, dtype: str, attn_implementation: str | None, trust_remote_code: bool):
    kwargs = _load_kwargs(dtype, attn_implementation, trust_remote_code)
    from llm_distill.pruning import is_pruned_dir, load_pruned

    path = tiny.resolve(name_or_path)
    if is_pruned_dir(path):  # written by scripts/prune.py: per-layer shapes may differ from config.json's
        return load_pruned(path, **kwargs)
    return auto_class.from_pretrained(path, **kwargs)


def load_causal_lm(name_or_path: str, dtype: str = "auto", attn_implementation: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    return _load(AutoModelForCausalLM, name_or_path, dtype, attn_implementation, trust_remote_code)


def lm_kind(config, trust_remote_code: bool = False) -> str:
    """``"masked"`` for a masked-LM checkpoint, else ``"causal"``. ``config``: a ``PretrainedConfig`` or a name / path.

    A saved checkpoint names its class in ``architectures`` (``...ForMaskedLM``); a config built in code has none,
    and then an encoder family with a masked-LM head (BERT, DistilBERT, RoBERTa ...) not configured as a decoder
    (``is_decoder``) is a masked LM."""
    if isinstance(config, str):
        config = AutoConfig.from_pretrained(tiny.resolve(config), trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return "masked" if any(a.endswith("ForMaskedLM") for a in architectures) else "causal"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    masked = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    return "masked" if masked else "causal"


def load_masked_lm(name_or_path: str, dtype: str = "auto", attn_implementation: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    return _load(AutoModelForMaskedLM, name_or_path, dtype, attn_implementation, trust_remote_code)


def load_lm(name_or_path: str, dtype: str = "auto", attn_implementation: str | None = None,
            trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal or masked LM, whichever the checkpoint is (:func:`lm_kind`)."""
    config = AutoConfig.from_pretrained(tiny.resolve(name_or_path), trust_remote_code=trust_remote_code)
    load = load_masked_lm if lm_kind(config) == "masked" else load_causal_lm
    return load(name_or_path, dtype, attn_implementation, trust_remote_code)


def fresh_lm(config_source: str, seed: int, dtype: str = "float32", trust_remote_code: bool = False):
    """A randomly initialised model with ``config_source``'s architecture, causal or masked (seeded: same seed,
    same weights). A pruned folder gives its real per-layer shapes (the train-from-scratch baseline of pruning)."""
    from llm_distill.pruning import fresh_pruned, is_pruned_dir

    path = tiny.resolve(config_source)
    if is_pruned_dir(path):  # config.json alone may describe the unpruned skeleton
        return fresh_pruned(path, seed=seed, dtype=_DTYPES.get(dtype, torch.float32))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if lm_kind(config) == "masked" else AutoModelForCausalLM
    model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return model.to(_DTYPES.get(dtype, torch.float32))


def vocab_size_of(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class VocabularyMismatchError(ValueError):
    pass


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes its KV cache under: transformers 5.x renamed ``past_key_values`` to ``cache``
    (the old name is removed in 5.40), while older 5.x releases and custom models know only ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards take **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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


def student_from_teacher(teacher: PreTrainedModel, layers: list[int], verify: bool = True) -> PreTrainedModel:
    """A copy of ``teacher`` keeping only the transformer blocks ``layers`` (DistilBERT's initialisation).

    Embeddings, the kept blocks, the final norm and the head are copied; the config's layer count and its per-layer
    lists (``layer_types`` ...) follow the kept layers, and the blocks' ``layer_idx`` (KV-cache slot) is the new
    position. Works for decoders (Llama, Qwen, Mistral: ``model.layers``; GPT-2: ``transformer.h``) and encoders
    (BERT: ``bert.encoder.layer``; DistilBERT: ``distilbert.transformer.layer``), see :data:`LAYER_STACKS`.

    The copy is strict - every student weight comes from exactly one teacher weight and every teacher weight outside
    the dropped blocks is used - and, with ``verify``, the student is saved, reloaded with ``from_pretrained`` and run
    once; its logits must equal the in-memory student's (distil-whisper's ``create_student_model.py`` does the same).
    """
    import copy

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


def apply_lora(student, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap the student in a LoRA adapter (only the adapter is trained and saved)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules[0] if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(student, config)
    return model
