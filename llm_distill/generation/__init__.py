"""Teacher-response datasets for response (sequence-level) distillation: resumable, sharded, batched.

The blocks: ``arguments`` (settings), ``prompts`` (read, validate, encode, plan), ``backends`` (HF / vLLM),
``rows`` (output rows, fingerprint) and ``store`` (crash-safe shards, resume, merge); the job that runs them is
``llm_distill.jobs.generate``.

A teacher answers prompts; the student is then fine-tuned on the answers (``scripts/distill.py`` with
``alpha: 0`` is sequence-level KD, Kim & Rush 2016; ``alpha > 0`` adds logit KD on the same rows).

Pipeline (``llm_distill.jobs.generate.run_generation``), every check before the model is loaded:

1. **Prompts** from JSONL (``prompt`` or ``messages``), a text file (one per line), a ``save_to_disk``
   folder or a hub dataset + column. Bad rows fail with file, line and field.
2. **Encode**: the chat template (``add_generation_prompt=True``) when the tokenizer has one, rendered as
   text and tokenised with ``add_special_tokens=False`` (the template already carries BOS: no double BOS);
   raw prompts are tokenised as the trainer will tokenise them. Prompts longer than the context are
   truncated from the left (counted and logged), skipped, or refused (``over_length``).
3. **Plan**: prompts sorted by token length (less padding), cut into batches of ``batch_size``; batch
   ``i`` belongs to rank ``i % world_size``. The plan depends only on the prompts and the config, never
   on the number of processes, so 1 and N processes (and a resumed run) run *the same batches* and
   greedy decoding gives bit-identical rows. (``split_between_processes`` pads the last shard with
   duplicates, which would then have to be removed; a round-robin plan never creates them.)
4. **Generate** with ``batch_size`` prompts in flight (``decoding=refill``: a row that stops on EOS or
   ``max_new_tokens`` hands its slot to the next prompt at once; ``static``: one left-padded ``generate`` per
   batch), and append a batch's rows to this rank's shard ``<output>.parts/shard-<rank>.jsonl`` with flush +
   fsync as soon as the batch's last row finishes.
5. **Resume**: on restart with the same output, a truncated last line (a kill mid-write) is cut off, the
   rows already on disk are skipped, and a batch that was only partly written is generated again whole
   (same batch => same numerics) but only its missing rows are written: every id exactly once.
   A different config on an existing output is refused unless ``overwrite``.
6. **Merge**: rank 0 reads every shard, de-duplicates by ``(id, sample_index)``, writes the rows in input
   order to ``<output>`` atomically (temp file + rename), and records a summary in ``<stem>.meta.json``.
"""

from llm_distill.generation.arguments import BACKENDS, CHAT_TEMPLATE_MODES, DECODINGS, OVER_LENGTH, GenerateArguments
from llm_distill.generation.backends import Completion, HFBackend, VLLMBackend
from llm_distill.generation.prompts import (
    Prompt,
    PromptValidationError,
    conversation,
    encode_prompts,
    load_prompts,
    plan_batches,
    use_chat_template,
)
from llm_distill.generation.rows import fingerprint_of, make_rows
from llm_distill.generation.sampling import RowSampler, row_seed
from llm_distill.generation.store import OutputExistsError, ShardStore, read_rows, repair_jsonl, row_key

__all__ = [
    "BACKENDS", "CHAT_TEMPLATE_MODES", "DECODINGS", "OVER_LENGTH", "GenerateArguments", "Completion", "HFBackend", "VLLMBackend",
    "Prompt", "PromptValidationError", "conversation", "encode_prompts", "load_prompts", "plan_batches",
    "use_chat_template", "fingerprint_of", "make_rows", "OutputExistsError", "ShardStore", "read_rows",
    "repair_jsonl", "row_key", "RowSampler", "row_seed",
]
