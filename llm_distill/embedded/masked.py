"""The embedded default for encoders: a small BERT-style masked-LM teacher, built offline, once.

Built the same way as the causal default (``llm_distill.embedded.causal``), on top of it: :func:`build_mlm_teacher` first
calls ``causal.build()`` (corpus = the standard library's sources split by file, byte-level BPE tokenizer, which
already has ``<|mask|>`` as its mask token), then pretrains a ``BertForMaskedLM`` with BERT's masking (30% of the
tokens; 80% ``<mask>`` / 10% random / 10% unchanged) on a deterministic sample of the train split, and saves it
with ``save_pretrained`` next to a copy of the tokenizer. Configs refer to it as ``embedded:mlm_teacher``; the
held-out split (``embedded:heldout``) is shared with the causal default.

The recipe is its own frozen dataclass with its own cache folder (``embedded-mlm-<hash>``, the hash covering this
recipe *and* the causal recipe it builds on), so changing it never invalidates the causal cache or its figures.

    python -m llm_distill.embedded --mlm            # build (or show) the cache
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from filelock import FileLock

from llm_distill.data import masked_lm_collator
from llm_distill.embedded import causal
from llm_distill.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyMLMRecipe:
    """Everything that determines the embedded masked-LM teacher; its hash (with the causal recipe's) names the
    cache folder."""

    seed: int = 0
    # Teacher: BERT, 4 layers x 256 wide, 4 heads, FFN 2x (not BERT's 4x: half the build time), ~3.4M parameters
    # (a half-depth student has 2 layers).
    teacher: dict = field(
        default_factory=lambda: dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    )
    max_position_embeddings: int = 512
    train_chars: int = 6_000_000  # a deterministic sample of the train split (the build only sees steps x batch x seq)
    seq_len: int = 128
    # Pretraining masks 30%, not BERT's 15%: twice the targets per step for the same encoder cost (Wettig et al.
    # 2023, "Should You Mask 15% in MLM?"). With 15% (or lr 2e-3), 250 steps never left the unigram plateau
    # (held-out masked-token ppl ~800, the same for every model distilled from it); 800 steps at 30% / 1e-3 reach
    # ~400. Distillation and evaluation still mask 15% (DistillationConfig.mlm_probability).
    mlm_probability: float = 0.3
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3



def mlm_dir(base: causal.TinyRecipe | None = None, recipe: TinyMLMRecipe | None = None) -> Path:
    return causal.derived_dir("mlm", recipe or TinyMLMRecipe(), base)


def bert_config(tokenizer, dims: dict, max_position_embeddings: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                      pad_token_id=tokenizer.pad_token_id, type_vocab_size=1, **dims)


class MaskedLMObjective(torch.nn.Module):
    """Lets ``causal.pretrain_causal_lm``'s loop (``model(input_ids=, labels=).loss``) pretrain a ``BertForMaskedLM``:
    each batch is masked by a seeded ``DataCollatorForLanguageModeling`` (the masking the distillation runs use), and
    the MLM head runs on the masked positions only (the same loss as ``BertForMaskedLM(labels=...)``, at ~15% of
    the head's cost - on 2 CPU cores that is most of a step)."""

    def __init__(self, model, tokenizer, mlm_probability: float, seed: int):
        super().__init__()
        self.model = model
        self.collator = masked_lm_collator(tokenizer, mlm_probability, seed)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        batch = self.collator([{"input_ids": row} for row in input_ids.tolist()])
        masked = batch["labels"] != IGNORE_INDEX  # (B, S)
        hidden = self.model.bert(input_ids=batch["input_ids"]).last_hidden_state[masked]  # (N, H)
        logits = self.model.cls(hidden)  # (N, V)
        return SimpleNamespace(loss=F.cross_entropy(logits, batch["labels"][masked]))


def sample_texts(texts: list[str], chars: int, seed: int) -> list[str]:
    """Whole files in a seeded order until ``chars`` characters."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sample, total = [], 0
    for i in order:
        if total >= chars:
            break
        sample.append(texts[i])
        total += len(texts[i])
    return sample


def build_mlm_teacher(base: causal.TinyRecipe | None = None, recipe: TinyMLMRecipe | None = None,
                      force: bool = False) -> Path:
    """Build (once) and return the folder of the embedded masked-LM teacher (model + tokenizer). Safe to call from
    many processes at once."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

    base, recipe = base or causal.TinyRecipe(), recipe or TinyMLMRecipe()
    root = causal.build(base)  # corpus + tokenizer, shared with the causal default
    final = mlm_dir(base, recipe)
    with FileLock(str(final) + ".lock"):
        if (final / "build_info.json").exists() and not force:
            return final / "teacher"
        if force and final.exists():
            shutil.rmtree(final)
        start = time.time()
        logger.warning("Building the embedded masked-LM teacher into %s (once; about 6 minutes on 2 CPU cores)", final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        texts = sample_texts(causal.read_texts(root / "data" / "train.jsonl"), recipe.train_chars, recipe.seed)
        blocks = causal.pack_tokens(tokenizer, texts, recipe.seq_len)  # (N, seq_len)
        torch.manual_seed(recipe.seed)
        teacher = BertForMaskedLM(bert_config(tokenizer, recipe.teacher, recipe.max_position_embeddings))
        causal.pretrain_causal_lm(
            MaskedLMObjective(teacher, tokenizer, recipe.mlm_probability, recipe.seed), blocks, recipe.steps,
            recipe.batch_size, recipe.lr, recipe.seed, desc="pretraining embedded masked-LM teacher",
        )
        teacher.save_pretrained(tmp / "teacher")
        tokenizer.save_pretrained(tmp / "teacher")
        # Reload through the public path before declaring success (a broken save fails here, not later).
        AutoModelForMaskedLM.from_pretrained(tmp / "teacher")(input_ids=blocks[:1, :8])
        info = {
            "recipe": dataclasses.asdict(recipe),
            "base": str(root),
            "python": sys.version.split()[0],
            "train_tokens": int(blocks.numel()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "teacher_sha256": causal.weights_digest(teacher),
            "build_seconds": round(time.time() - start, 1),
        }
        causal.publish_build(tmp, final, info)
        logger.warning("Built the embedded masked-LM teacher (BERT, %.1fM params, %d steps on %d tokens) in %s in %.0fs",
                       info["teacher_params"] / 1e6, recipe.steps, info["train_tokens"], final, time.time() - start)
    return final / "teacher"
