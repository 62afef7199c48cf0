"""Offline distillation: run the teacher once, store its top-k next-token distribution per token, train from it.

Layout of a store folder (readable with ``datasets.load_dataset("parquet", data_dir=<folder>/data)``)::

    <folder>/manifest.json                  what was stored: teacher, k, temperature, vocab, data settings, shards
    <folder>/data/shard-00000-of-00004.parquet
        input_ids      list<int32>          the tokenised training row (the store *is* the training dataset,
        labels         list<int32>          so rows and logits cannot drift apart)
        topk_ids       list<list<int32>>    (n_valid, k) teacher's top-k token ids, most likely first
        topk_logprobs  list<list<float16>>  (n_valid, k) their log-probabilities at ``temperature``

``n_valid`` = positions whose next-token label is not ``-100`` (causal shift), in order; exactly the rows the
loss computes. Shards are written to a temporary name and renamed, so a killed run resumes where it stopped:
finished shards are skipped. ``float16`` keeps ~3 significant digits of a log-probability (bf16 only 2-3 and
parquet has no bf16), for ``6 k`` bytes per token before parquet compression.

The tail outside the top-k is handled by an explicit "other" bucket (``llm_distill.losses.topk_divergence``).

``selection: sample`` stores, in the same columns, ``k`` draws from the teacher instead of its top-k: the distinct
tokens drawn with ``log(count / k)`` (most frequent first, then zero-weight fillers at ``SAMPLE_FILL``), so the
stored distribution sums to 1 and the trainer reads it unchanged. Its forward-KL gradient is an unbiased estimate
of the full-vocabulary one (random-sampling KD, Anshumann et al. 2025), where top-k's is biased toward the head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llm_distill.head_features import LMHeadPath
from llm_distill.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

TOPK_COLUMNS = ("topk_ids", "topk_logprobs")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
LOGPROB_DTYPES = ("float16", "float32")
SELECTIONS = ("top_k", "sample")
SAMPLE_FILL = -1.0e4  # log-weight of the filler slots of a sampled row: exp() is exactly 0, finite in float16


def _shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.parquet"


def data_fingerprint(dataset) -> str:
    """sha256 of every row's input_ids and labels: a resumed run must see exactly the same rows."""
    h = hashlib.sha256()
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        h.update(np.asarray(ids, dtype=np.int32).tobytes())
        h.update(np.asarray(labels, dtype=np.int32).tobytes())
    return h.hexdigest()


@torch.no_grad()
def teacher_topk(teacher, batch: dict, k: int, temperature: float, vocab_size: int, head_path,
                 chunk_size: int = 1024, selection: str = "top_k",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(ids, logprobs)`` ``(N, k)`` of the teacher at ``temperature`` on the batch's valid positions
    (row-major), computed ``chunk_size`` positions at a time from final hidden states when possible.
    ``selection="sample"``: ``k`` draws instead (see the module docstring), from ``generator``."""
    inputs = {key: v for key, v in batch.items() if key != "labels"}
    feats = head_path(teacher, inputs)  # hidden states + lm_head, or logits (see llm_distill.head_features)
    valid = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, S-1): position t predicts label t+1
    rows = feats.features[:, :-1][valid]  # (N, H) or (N, V)
    ids, logprobs = [], []
    for start in range(0, rows.shape[0], chunk_size):
        x = rows[start:start + chunk_size]
        logits = x.float() if feats.weight is None else F.linear(x, feats.weight, feats.bias).float()
        logp = F.log_softmax(logits[:, :vocab_size] / temperature, dim=-1)  # (c, V)
        if selection == "sample":
            draws = torch.multinomial(logp.exp(), k, replacement=True, generator=generator)  # (c, k)
            counts = torch.zeros_like(logp).scatter_add_(1, draws, torch.ones_like(draws, dtype=logp.dtype))
            counts, indices = counts.topk(min(k, vocab_size), dim=-1)  # the drawn ids first, each once
            values = torch.where(counts > 0, (counts / k).log(), torch.full_like(counts, SAMPLE_FILL))
        else:
            values, indices = logp.topk(min(k, vocab_size), dim=-1)
        ids.append(indices.to(torch.int32))
        logprobs.append(values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(logprobs)


def store_teacher_logits(teacher, dataset, out_dir: str | Path, collator, *, top_k: int = 64, temperature: float = 1.0,
                         vocab_size: int, batch_size: int = 8, rows_per_shard: int = 256,
                         logprob_dtype: str = "float16", overwrite: bool = False, meta: dict | None = None,
                         device: str | torch.device | None = None, selection: str = "top_k", seed: int = 0) -> Path:
    """Run ``teacher`` over ``dataset`` (``input_ids`` / ``labels`` rows) and write the store; resumable (sampled
    stores too: shard ``i`` draws from its own generator, seeded with ``seed`` and ``i``)."""
    from datasets import Dataset, Features, List, Value
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    n_shards = max(1, -(-len(dataset) // rows_per_shard))
    manifest = {
        "format_version": FORMAT_VERSION, "top_k": top_k, "selection": selection, "temperature": temperature,
        "vocab_size": vocab_size,
        "logprob_dtype": logprob_dtype, "num_rows": len(dataset), "rows_per_shard": rows_per_shard,
        "num_shards": n_shards, "shift_labels": True, "data_sha256": data_fingerprint(dataset), **(meta or {}),
    }
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old != manifest:
            changed = sorted(key for key in set(old) | set(manifest) if old.get(key) != manifest.get(key))
            if not overwrite:
                raise FileExistsError(f"{out_dir} holds teacher logits stored with other settings ({', '.join(changed)} "
                                      "differ): pass --overwrite true to replace them, or choose another --teacher_logits.")
            for f in data_dir.glob("*.parquet"):
                f.unlink()
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2))

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = teacher.to(device).eval()
    head_path = LMHeadPath("teacher")
    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                         "topk_ids": List(List(Value("int32"))), "topk_logprobs": List(List(Value(logprob_dtype)))})
    np_dtype = np.float16 if logprob_dtype == "float16" else np.float32
    todo = [i for i in range(n_shards) if not (data_dir / _shard_name(i, n_shards)).exists()]
    if len(todo) < n_shards:
        logger.info("Resuming: %d of %d shards already stored in %s.", n_shards - len(todo), n_shards, data_dir)
    for shard in tqdm(todo, desc="storing teacher top-k", unit="shard"):
        rows = dataset.select(range(shard * rows_per_shard, min((shard + 1) * rows_per_shard, len(dataset))))
        out = {name: [] for name in features}
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + shard) if selection == "sample" else None
        for start in range(0, len(rows), batch_size):
            chunk = [rows[j] for j in range(start, min(start + batch_size, len(rows)))]
            batch = {key: v.to(device) for key, v in collator(chunk).items()}
            ids, logprobs = teacher_topk(teacher, batch, top_k, temperature, vocab_size, head_path,
                                         selection=selection, generator=generator)
            ids, logprobs = ids.cpu().numpy(), logprobs.cpu().numpy().astype(np_dtype)
            offset = 0
            for row in chunk:
                n = int(sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX))
                out["input_ids"].append(list(row["input_ids"]))
                out["labels"].append(list(row["labels"]))
                out["topk_ids"].append(ids[offset:offset + n])
                out["topk_logprobs"].append(logprobs[offset:offset + n])
                offset += n
        final = data_dir / _shard_name(shard, n_shards)
        tmp = final.with_suffix(".parquet.tmp")
        Dataset.from_dict(out, features=features).to_parquet(str(tmp))
        os.replace(tmp, final)  # atomic: a shard is either complete or absent
    return out_dir


def read_manifest(path: str | Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"teacher_logits={path!s}: no {MANIFEST} there. Create the store with "
                                f"`python scripts/store_teacher_logits.py --teacher_logits {path}`.")
    return json.loads(manifest_path.read_text())


def load_teacher_logits(path: str | Path):
    """The stored rows as a ``datasets.Dataset`` (``input_ids``, ``labels``, ``topk_ids``, ``topk_logprobs``)."""
    from datasets import load_dataset

    manifest = read_manifest(path)
    n = manifest["num_shards"]
    shards = [Path(path) / "data" / _shard_name(i, n) for i in range(n)]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise FileNotFoundError(f"teacher_logits={path!s} is incomplete: {len(missing)} of {n} shards missing (e.g. "
                                f"{missing[0]}). Re-run scripts/store_teacher_logits.py with the same settings: it "
                                "resumes and writes only the missing shards.")
    return load_dataset("parquet", data_files=[str(s) for s in shards], split="train")


def check_store_compatible(manifest: dict, student, temperature: float, loss_type: str = "forward_kl") -> None:
    """The stored distribution must be at the training temperature and index the student's vocabulary; a sampled
    store estimates forward KL only (against its sparse sample every other divergence is a different objective)."""
    if manifest.get("selection", "top_k") == "sample" and loss_type != "forward_kl":
        raise ValueError(f"The teacher logits were stored with selection=sample, an estimate of the forward KL only, "
                         f"but loss_type={loss_type!r}: train with --loss_type forward_kl, or store the top-k "
                         "(selection=top_k) for other divergences.")
    if abs(manifest["temperature"] - temperature) > 1e-6:
        raise ValueError(f"The teacher logits were stored at temperature {manifest['temperature']} but "
                         f"temperature={temperature}: the top-k tail at another temperature is unknown. Train with "
                         f"--temperature {manifest['temperature']} or store again with --temperature {temperature}.")
    v_student = student.get_output_embeddings().weight.shape[0]
    if manifest["vocab_size"] > v_student:
        raise ValueError(f"The teacher logits index a vocabulary of {manifest['vocab_size']} tokens but the student's "
                         f"lm_head has {v_student} rows: use a student with the teacher's tokenizer.")


@dataclass
class TopKCollator:
    """Wraps a collator: the base pads ``input_ids`` / ``labels``; the stored top-k rows of the batch are
    concatenated in row-major order into ``topk_ids`` ``(N, k)`` int64 and ``topk_logprobs`` ``(N, k)``."""

    base: object

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, logprobs = [], []
        for i, row in enumerate(rows):
            n = sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX)
            row_ids, row_lp = np.asarray(row["topk_ids"], dtype=np.int64), np.asarray(row["topk_logprobs"])
            if len(row_ids) != n:
                raise ValueError(f"Stored row {i} of the batch has top-k logits for {len(row_ids)} positions but its "
                                 f"labels have {n} valid ones: the rows were modified after storing (truncation?).")
            if n:
                ids.append(row_ids.reshape(n, -1))
                logprobs.append(row_lp.reshape(n, -1))
        batch = self.base([{k: v for k, v in r.items() if k not in TOPK_COLUMNS} for r in rows])
        k = ids[0].shape[1] if ids else 1
        batch["topk_ids"] = torch.from_numpy(np.concatenate(ids)) if ids else torch.zeros(0, k, dtype=torch.long)
        batch["topk_logprobs"] = torch.from_numpy(np.concatenate(logprobs)) if logprobs else torch.zeros(0, k)
        return batch
