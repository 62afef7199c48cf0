"""The embedded default's second tokenizer and a student built for it: the cross-tokenizer pair.

Cross-tokenizer distillation (``cross_tokenizer: uld | hybrid``) needs a teacher and a student that do not share a
vocabulary. The embedded teacher keeps its tokenizer (byte-level BPE, 4,096 tokens, ``<|endoftext|>`` style
specials, no BOS added); this module builds a deliberately different one on the same train split:

* 3,072 BPE tokens, trained on a different deterministic sample (other merges, other ids for shared strings);
* other special tokens (``<s>``, ``</s>``, ``<pad>``, ``[INST]`` / ``[/INST]`` in its chat template);
* a BOS (``<s>``) that it *prepends to every text*, where the teacher's tokenizer prepends nothing - the asymmetry
  that broke string-buffer alignments (Llama-3 vs Qwen).

and a fresh student of the default student's shape (2 layers x 128) with that vocabulary. Configs name them
``embedded:student_xtok`` and ``embedded:tokenizer_xtok``.

The recipe has its own cache folder (``embedded-xtok-<hash>``, hashing this recipe *and* the causal one whose
train split it trains on), so it never invalidates the causal cache or its figures. It needs only the corpus, not
the causal teacher, so it builds independently of (and in parallel with) the causal build.

    python -m llm_distill.embedded --xtok            # build (or show) the cache
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from llm_distill.embedded import causal

logger = logging.getLogger(__name__)

XTOK_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "[INST]", "[/INST]"]
# Llama-2 style: BOS in the template, the user turn in [INST] ... [/INST], the assistant turn closed by </s>.
XTOK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class XtokRecipe:
    """Everything that determines the second tokenizer and its student; its hash (with the causal recipe's) names
    the cache folder."""

    seed: int = 1
    vocab_size: int = 3072
    tokenizer_train_chars: int = 2_000_000
    student: dict = field(
        default_factory=lambda: dict(
            hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    )



def xtok_dir(base: causal.TinyRecipe | None = None, recipe: XtokRecipe | None = None) -> Path:
    return causal.derived_dir("xtok", recipe or XtokRecipe(), base)


def train_xtok_tokenizer(texts: list[str], vocab_size: int = 3072, seed: int = 1, max_chars: int = 2_000_000):
    """Byte-level BPE with ``<s>`` prepended to every encoded text and Llama-2 style specials."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = causal.train_bpe(texts, vocab_size, XTOK_SPECIAL_TOKENS, max_chars, seed)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["[INST]", "[/INST]"], chat_template=XTOK_CHAT_TEMPLATE, model_max_length=2048,
    )


def build_xtok(base: causal.TinyRecipe | None = None, recipe: XtokRecipe | None = None, force: bool = False) -> Path:
    """Build (once) and return the folder with ``tokenizer_xtok/`` and ``student_xtok/``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    base, recipe = base or causal.TinyRecipe(), recipe or XtokRecipe()
    final = xtok_dir(base, recipe)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "build_info.json").exists() and not force:
            return final
        if force and final.exists():
            shutil.rmtree(final)
        start = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        # The causal recipe's train split, written afresh (deterministic, seconds): no wait on the teacher's build.
        causal.write_corpus(tmp / "data", base)
        tokenizer = train_xtok_tokenizer(causal.read_texts(tmp / "data" / "train.jsonl"), recipe.vocab_size,
                                         recipe.seed, recipe.tokenizer_train_chars)
        shutil.rmtree(tmp / "data")
        tokenizer.save_pretrained(tmp / "tokenizer_xtok")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tokenizer_xtok")
        torch.manual_seed(recipe.seed)
        student = LlamaForCausalLM(causal.llama_config(tokenizer, recipe.student))
        student.save_pretrained(tmp / "student_xtok")
        tokenizer.save_pretrained(tmp / "student_xtok")
        AutoModelForCausalLM.from_pretrained(tmp / "student_xtok")(input_ids=torch.tensor([tokenizer("def f():")["input_ids"]]))
        info = {"recipe": dataclasses.asdict(recipe), "base": base.digest(), "python": sys.version.split()[0],
                "tokens": len(tokenizer), "student_params": sum(p.numel() for p in student.parameters()),
                "student_sha256": causal.weights_digest(student), "build_seconds": round(time.time() - start, 1)}
        causal.publish_build(tmp, final, info)
        logger.warning("Built the cross-tokenizer pair in %s in %.0fs (%d tokens)", final, time.time() - start,
                       len(tokenizer))
    return final
