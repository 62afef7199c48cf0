"""The embedded default: tiny models built offline, once, from the Python standard library's sources.

No model hub is reachable on an air-gapped machine (or in CI), yet every job of this toolkit should run
with no arguments. So the default run builds its own world, deterministically from a seed:

* corpus   - the standard library's own ``.py`` files (present on every Python install), split into
             train / held-out *by file* so held-out text is never seen in training;
* tokenizer- byte-level BPE trained with ``tokenizers``, wrapped as ``PreTrainedTokenizerFast``;
* teacher  - a small Llama-style causal LM pretrained on the train split;
* student  - a smaller Llama, freshly initialised (``student_init: teacher_layers`` in a config builds
             one from the teacher's layers instead, see ``llm_distill.student_init``).

Everything is written with ``save_pretrained`` and read back with ``from_pretrained(path)``: the same
code path as a hub id. Config files refer to these artefacts as ``embedded:teacher``,
``embedded:student``, ``embedded:tokenizer``, ``embedded:train`` and ``embedded:heldout``;
``llm_distill.embedded.resolve`` turns such a name into a local path, building the cache first if needed.

The cache lives in ``$LLM_DISTILL_CACHE`` (default ``~/.cache/llm_distill``), in a folder whose name
hashes the build recipe and the Python version, so a changed recipe never reuses stale models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|mask|>"]

# A minimal chat template for tests and users who fine-tune the tiny models on chat data. The embedded
# tokenizer does NOT carry it: the teacher was pretrained on raw code, so templated prompts would only
# produce noise in the default runs.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the embedded artefacts; its hash names the cache folder."""

    seed: int = 0
    heldout_fraction: float = 0.05
    vocab_size: int = 4096
    tokenizer_train_chars: int = 12_000_000  # BPE trained on a deterministic sample of the corpus
    seq_len: int = 256
    # Teacher: 4 layers x 256 wide, GQA (8 query heads, 4 KV heads), ~5M parameters.
    teacher: dict = field(
        default_factory=lambda: dict(
            hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
        )
    )
    teacher_steps: int = 300
    teacher_batch_size: int = 16
    teacher_lr: float = 2e-3
    # Student: 2 layers x 128 wide, ~1.4M parameters (about 3.5x smaller than the teacher).
    student: dict = field(
        default_factory=lambda: dict(
            hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    )

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + sys.version.split()[0]
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("LLM_DISTILL_CACHE", Path.home() / ".cache" / "llm_distill"))


def derived_dir(kind: str, recipe, base: TinyRecipe | None = None) -> Path:
    """The cache folder of an artefact built on top of the causal default (``embedded-<kind>-<hash>``): the hash
    covers its own recipe *and* the base recipe, so changing either rebuilds it and neither invalidates the other."""
    base = base or TinyRecipe()
    blob = json.dumps({kind: dataclasses.asdict(recipe), "base": base.digest()}, sort_keys=True)
    return cache_root() / f"embedded-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def embedded_dir(recipe: TinyRecipe | None = None) -> Path:
    recipe = recipe or TinyRecipe()
    return cache_root() / f"embedded-{recipe.digest()}"


# ---------------------------------------------------------------------------------------------- corpus


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library, sorted, excluding installed third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(relpath: str, heldout_fraction: float) -> str:
    """Assign a file to train or held-out from a hash of its path: stable across runs and machines."""
    bucket = int(hashlib.md5(relpath.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if bucket < heldout_fraction else "train"


def write_corpus(out_dir: Path, recipe: TinyRecipe) -> dict[str, int]:
    """Write ``train.jsonl`` / ``heldout.jsonl`` (one ``{"text", "source"}`` row per file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0}
    handles = {s: open(out_dir / f"{s}.jsonl", "w", encoding="utf-8") for s in counts}
    try:
        for path in stdlib_files():
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if len(text.strip()) < 200:
                continue
            rel = path.relative_to(root).as_posix()
            split = split_of(rel, recipe.heldout_fraction)
            handles[split].write(json.dumps({"text": text, "source": rel}) + "\n")
            counts[split] += 1
    finally:
        for h in handles.values():
            h.close()
    return counts


def read_texts(jsonl: Path) -> list[str]:
    with open(jsonl, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], recipe: TinyRecipe):
    """Byte-level BPE (GPT-2 style: no unknown tokens, any bytes encode) on a deterministic sample."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(texts, recipe.vocab_size, SPECIAL_TOKENS, recipe.tokenizer_train_chars, recipe.seed)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        mask_token="<|mask|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        model_max_length=2048,
    )


def train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str], max_chars: int, seed: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on a seeded sample of ``texts`` (about ``max_chars``
    characters): the same procedure for every embedded tokenizer, so each one is reproducible from its recipe."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    sample, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        sample.append(texts[i])
        total += len(texts[i])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer)
    return tok


def pack_tokens(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS and cut into ``(N, seq_len)`` blocks (run_clm's group_texts)."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ------------------------------------------------------------------------------------------- models


def llama_config(tokenizer, dims: dict, max_position_embeddings: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **dims,
    )


def pretrain_causal_lm(model, blocks: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, desc: str):
    """A plain AdamW + cosine loop: the teacher only needs to be clearly better than the student can get."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, blocks.shape[0], (batch_size,), generator=gen)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def weights_digest(model) -> str:
    """sha256 of a model's weights (sorted names, raw bytes): two builds made the same weights iff it matches.
    Recorded in ``build_info.json`` so builds on two machines can be compared without the files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def publish_build(tmp: Path, final: Path, info: dict) -> None:
    """Write ``build_info.json`` (the marker of a finished build) and move the folder in place atomically; a
    concurrent builder that finished first wins and this copy is dropped."""
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, final)


def build(recipe: TinyRecipe | None = None, force: bool = False) -> Path:
    """Build (once) and return the embedded default folder. Safe to call from many processes at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    recipe = recipe or TinyRecipe()
    final = embedded_dir(recipe)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "build_info.json").exists() and not force:
            return final
        if force and final.exists():
            shutil.rmtree(final)
        start = time.time()
        logger.warning("Building the embedded default models into %s (once; about 5 minutes on 2 CPU cores)", final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        torch.manual_seed(recipe.seed)
        counts = write_corpus(tmp / "data", recipe)
        train_texts = read_texts(tmp / "data" / "train.jsonl")

        t0 = time.time()
        tokenizer = train_tokenizer(train_texts, recipe)
        tokenizer.save_pretrained(tmp / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tokenizer")
        logger.warning("Tokenizer: byte-level BPE, %d tokens, trained in %.0fs", len(tokenizer), time.time() - t0)

        blocks = pack_tokens(tokenizer, train_texts, recipe.seq_len)
        torch.manual_seed(recipe.seed)
        teacher = LlamaForCausalLM(llama_config(tokenizer, recipe.teacher))
        pretrain_causal_lm(
            teacher, blocks, recipe.teacher_steps, recipe.teacher_batch_size, recipe.teacher_lr, recipe.seed,
            desc="pretraining embedded teacher",
        )
        teacher.save_pretrained(tmp / "teacher")
        tokenizer.save_pretrained(tmp / "teacher")

        torch.manual_seed(recipe.seed + 1)
        student = LlamaForCausalLM(llama_config(tokenizer, recipe.student))
        student.save_pretrained(tmp / "student")
        tokenizer.save_pretrained(tmp / "student")

        # Reload through the public path before declaring success (a broken save fails here, not later).
        AutoModelForCausalLM.from_pretrained(tmp / "teacher")(input_ids=blocks[:1, :8])
        info = {
            "recipe": dataclasses.asdict(recipe),
            "python": sys.version.split()[0],
            "files": counts,
            "train_tokens": int(blocks.numel()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_sha256": weights_digest(teacher),
            "student_sha256": weights_digest(student),
            "torch_threads": torch.get_num_threads(),
            "build_seconds": round(time.time() - start, 1),
        }
        publish_build(tmp, final, info)
        logger.warning(
            "Built embedded default in %s in %.0fs: teacher %.1fM params, student %.1fM params, %d train / %d held-out files",
            final, time.time() - start, info["teacher_params"] / 1e6, info["student_params"] / 1e6,
            counts["train"], counts["heldout"],
        )
    return final
