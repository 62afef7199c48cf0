"""Loading teachers and students, and checking that they can be distilled (vocabulary, tokenizer).

Hub ids and local paths go through the same ``from_pretrained`` call (a job resolves ``embedded:*`` names to
local paths before it calls these, ``llm_distill.embedded.resolve``). Causal LMs load with ``AutoModelForCausalLM``, masked LMs
(BERT, DistilBERT, RoBERTa ...) with ``AutoModelForMaskedLM``: :func:`lm_kind` tells them apart from the config.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from llm_distill.errors import ModelLoadError, UserError
from llm_distill.pruning import fresh_pruned, is_pruned_dir, load_pruned

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_dtype(name: str):
    return "auto" if name == "auto" else _DTYPES[name]


_MARKERS = {"tokenizer": ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")}


@contextmanager
def loading(name_or_path: str, what: str = "model"):
    """Turn the error ``from_pretrained`` raises for a name it cannot load (an ``OSError``: no such folder, a hub id
    with no network; a ``ValueError``: a local folder with no config.json / tokenizer files in it) into a
    :class:`ModelLoadError` naming it and the fix: a user's path, not our bug."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as err:
        folder = Path(str(name_or_path))
        markers = _MARKERS.get(what, ("config.json",))
        if isinstance(err, ValueError) and not (folder.is_dir() and not any((folder / m).exists() for m in markers)):
            raise  # a folder with the files in it: not a path problem
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if folder.is_dir() and not any((folder / m).exists() for m in markers):
            first = f"the folder has no {' / '.join(markers)}."
        kind = "a local folder" if folder.exists() else "not a local folder"
        raise ModelLoadError(f"{what} {name_or_path!r} ({kind}) cannot be loaded: {first} Give a folder written by "
                             "save_pretrained, or a hub id (reachable, or in the local cache).") from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    with loading(name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
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
    path = name_or_path
    if is_pruned_dir(path):  # written by scripts/prune.py: per-layer shapes may differ from config.json's
        return load_pruned(path, **kwargs)
    with loading(path):
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
        with loading(config):
            config = AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
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
    with loading(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    load = load_masked_lm if lm_kind(config) == "masked" else load_causal_lm
    return load(name_or_path, dtype, attn_implementation, trust_remote_code)


def fresh_lm(config_source: str, seed: int, dtype: str = "float32", trust_remote_code: bool = False):
    """A randomly initialised model with ``config_source``'s architecture, causal or masked (seeded: same seed,
    same weights). A pruned folder gives its real per-layer shapes (the train-from-scratch baseline of pruning)."""
    path = config_source
    if is_pruned_dir(path):  # config.json alone may describe the unpruned skeleton
        return fresh_pruned(path, seed=seed, dtype=_DTYPES.get(dtype, torch.float32))
    with loading(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if lm_kind(config) == "masked" else AutoModelForCausalLM
    model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return model.to(_DTYPES.get(dtype, torch.float32))


def vocab_size_of(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class VocabularyMismatchError(UserError):
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
        + ". Token-level distillation needs the same tokenizer for both models. For a teacher and a student of "
        "different families (e.g. Qwen -> Llama) set cross_tokenizer: hybrid (or uld) and teacher_tokenizer: <the "
        "teacher's tokenizer>: each row is then tokenized by both tokenizers and the distributions are compared on "
        "byte-aligned groups (docs/cross-tokenizer.md). Otherwise use a teacher and a student of the same model family "
        "(e.g. Qwen2.5-7B-Instruct -> Qwen2.5-0.5B-Instruct), or distil on teacher-generated responses "
        "(scripts/generate.py, then alpha: 0)."
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
            f"{len(differing)} shared strings have different ids (e.g. {differing[:3]}). Set cross_tokenizer: hybrid "
            "(or uld) to distil across tokenizers (docs/cross-tokenizer.md), use a student from the teacher's model "
            "family, or set tokenizer: to the teacher's tokenizer for both."
        )


def apply_lora(student, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap the student in a LoRA adapter (only the adapter is trained and saved)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules[0] if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(student, config)
    return model
