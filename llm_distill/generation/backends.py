"""Generation backends behind one interface: ``generate_batches(batches, seed)`` yields each batch with its
completions as soon as the batch is done (``generate(batch, seed)`` for one batch).

``HFBackend`` (transformers; the tested default: refill decoding, or one left-padded ``model.generate`` per batch)
and ``VLLMBackend`` (vLLM offline inference, for GPU machines).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessorList

from llm_distill.generation.arguments import GenerateArguments
from llm_distill.generation.prompts import Prompt
from llm_distill.generation.refill import RefillDecoder, Row, left_pad, supports_refill
from llm_distill.generation.sampling import RowSampler, row_generator, row_seed

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """One response of the teacher to one prompt."""

    token_ids: list[int]             # generated tokens, without EOS and padding
    finish_reason: str               # "eos" or "length"
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class HFBackend:
    """transformers decoding: refill (continuous batching, :mod:`llm_distill.generation.refill`) by default, or one
    left-padded ``model.generate`` per batch (``decoding=static``, and for models whose cache refill cannot cut)."""

    def __init__(self, model, tokenizer, args: GenerateArguments):
        self.model, self.args = model.eval(), args
        self.eos_ids = set(eos_token_ids(model, tokenizer))
        self.pad_id = pad_token_id(tokenizer)
        # do_sample=False: sampling is RowSampler's, row by row (a row's draws depend on (seed, id, sample_index) only)
        self.generation_config = make_generation_config(
            sorted(self.eos_ids), self.pad_id, tokenizer.bos_token_id, max_new_tokens=args.max_new_tokens,
            do_sample=False, repetition_penalty=args.repetition_penalty, output_logits=args.logprobs > 0)
        self.sampler = RowSampler(args.temperature, args.top_k, args.top_p) if args.do_sample else None
        self.refill = args.decoding == "refill" and supports_refill(self.model)
        if args.decoding == "refill" and not self.refill:
            logger.warning("decoding=refill needs a full-attention DynamicCache; %s has another cache, so each batch is "
                           "one model.generate call (decoding=static).", type(model).__name__)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate(self, batch: list[Prompt], seed: int) -> list[list[Completion]]:
        """``num_return_sequences`` completions per prompt, in batch order. Sampled rows depend only on ``(seed,
        prompt id, sample_index)`` (:class:`RowSampler`), never on the batch around them."""
        (_, completions), = self.generate_batches([batch], seed)
        return completions

    def generate_batches(self, batches: list[list[Prompt]], seed: int) -> Iterator[tuple[list[Prompt], list]]:
        """Yield ``(batch, completions per prompt)`` for every batch as soon as all its rows are done. With refill
        decoding, ``batch_size`` prompts are in flight at any time and a finished row's slot goes to the next prompt,
        so a batch's rows may run beside the next batch's (batches can finish out of order)."""
        if not self.refill:
            for batch in batches:
                yield batch, self._generate_static(batch, seed)
            return
        n = self.args.num_return_sequences
        decoder = RefillDecoder(self.model, max_rows=self.args.batch_size * n, max_new_tokens=self.args.max_new_tokens,
                                eos_ids=self.eos_ids, pad_id=self.pad_id, sampler=self.sampler,
                                repetition_penalty=self.args.repetition_penalty, logprobs=self.args.logprobs)
        rows = (Row((b, i, s), p.input_ids, None if self.sampler is None else
                    row_generator(row_seed(seed, p.id, s), self.device))
                for b, batch in enumerate(batches) for i, p in enumerate(batch) for s in range(n))
        done = [[[None] * n for _ in batch] for batch in batches]
        left = [len(batch) * n for batch in batches]
        for row in decoder.run(rows):
            b, i, s = row.key
            done[b][i][s] = Completion(row.tokens, row.finish_reason, *((row.top_ids, row.top_logprobs)
                                                                        if self.args.logprobs else ()))
            left[b] -= 1
            if left[b] == 0:
                yield batches[b], done[b]

    @torch.inference_mode()
    def _generate_static(self, batch: list[Prompt], seed: int) -> list[list[Completion]]:
        """One left-padded ``model.generate`` for the batch: every row runs until the batch's longest is done."""
        input_ids, attention_mask = left_pad([p.input_ids for p in batch], self.pad_id, self.device)  # (B, P)
        k, n = self.args.logprobs, self.args.num_return_sequences
        extra = {}
        if n > 1:  # each prompt n times in a row (generate's own expansion is for sampling mode only)
            input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        if self.sampler is not None:  # prompt-major, then sample: the rows' order
            self.sampler.start([row_seed(seed, p.id, s) for p in batch for s in range(n)])
            extra["logits_processor"] = LogitsProcessorList([self.sampler])
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  generation_config=self.generation_config, **extra)
        new = out.sequences[:, input_ids.shape[1]:].tolist()               # (B * n, <= max_new_tokens)
        if k > 0:  # raw teacher logits (before temperature / top-k warping), one (B * n, V) tensor per step
            top = [torch.log_softmax(step.float(), dim=-1).topk(k, dim=-1) for step in out.logits]
        completions = []
        for row, tokens in enumerate(new):
            stop = first_eos(tokens, self.eos_ids)
            tokens = tokens if stop is None else tokens[:stop]
            c = Completion(tokens, "length" if stop is None else "eos")
            if k > 0:
                c.top_ids = [top[s].indices[row].tolist() for s in range(len(tokens))]
                c.top_logprobs = [[round(v, 5) for v in top[s].values[row].tolist()] for s in range(len(tokens))]
            completions.append(c)
        return [completions[i * n : (i + 1) * n] for i in range(len(batch))]


class VLLMBackend:
    """vLLM offline inference behind the same ``generate_batches(batches, seed)`` interface.

    Not installable on the CPU machines this project is tested on, so it is covered only by the "clear
    error when missing" test. Use a large ``batch_size`` (e.g. 1024): vLLM schedules within the call
    (continuous batching), and each finished call is still one crash-safe append.
    """

    def __init__(self, model_path: str, tokenizer, args: GenerateArguments):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("backend=vllm needs vLLM: `pip install vllm` (Linux + CUDA GPU), or use backend=hf.") from err
        self.args, self.SamplingParams = args, SamplingParams
        self.eos_ids = {tokenizer.eos_token_id}
        self.llm = LLM(model=model_path, tokenizer=args.tokenizer,
                       dtype=args.teacher_dtype, seed=args.seed, trust_remote_code=args.trust_remote_code,
                       gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                       tensor_parallel_size=args.vllm_tensor_parallel_size)

    def generate_batches(self, batches: list[list[Prompt]], seed: int) -> Iterator[tuple[list[Prompt], list]]:
        """One ``llm.generate`` call per batch (vLLM schedules continuously within the call)."""
        for batch in batches:
            yield batch, self.generate(batch, seed)

    def generate(self, batch: list[Prompt], seed: int) -> list[list[Completion]]:
        a = self.args
        params = [self.SamplingParams(
            n=a.num_return_sequences, max_tokens=a.max_new_tokens, seed=row_seed(seed, p.id, 0),
            temperature=a.temperature if a.do_sample else 0.0, top_p=a.top_p if a.do_sample else 1.0,
            top_k=(a.top_k or -1) if a.do_sample else -1, repetition_penalty=a.repetition_penalty,
            logprobs=a.logprobs or None) for p in batch]
        outputs = self.llm.generate([{"prompt_token_ids": p.input_ids} for p in batch], params, use_tqdm=False)
        result = []
        for out in outputs:
            comps = []
            for o in out.outputs:
                tokens = [t for t in o.token_ids if t not in self.eos_ids]
                c = Completion(tokens, "eos" if o.finish_reason == "stop" else "length")
                if a.logprobs and o.logprobs:
                    ranked = [sorted(step.items(), key=lambda kv: -kv[1].logprob)[: a.logprobs] for step in o.logprobs]
                    c.top_ids = [[t for t, _ in step] for step in ranked][: len(tokens)]
                    c.top_logprobs = [[round(lp.logprob, 5) for _, lp in step] for step in ranked][: len(tokens)]
                comps.append(c)
            result.append(comps)
        return result


# ------------------------------------------------------------------ the one batched decoding path
# HFBackend (the response generator) and llm_distill.on_policy (the student's rollouts during training) both
# decode through these functions: one place for EOS / padding / sampling settings and seeding.


def eos_token_ids(model, tokenizer) -> list[int]:
    """The model's stop tokens (its generation_config's, else the tokenizer's EOS), as a sorted list."""
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]))


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_generation_config(eos_ids: list[int], pad_id: int, bos_id: int | None, *, max_new_tokens: int,
                           do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                           num_return_sequences: int = 1, repetition_penalty: float = 1.0,
                           output_logits: bool = False):
    """A ``GenerationConfig`` with every knob explicit: greedy decoding does not inherit sampling knobs from the
    model's own generation_config, and the KV cache is always on (training may have switched it off)."""
    from transformers import GenerationConfig

    params = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                  repetition_penalty=repetition_penalty, eos_token_id=list(eos_ids), pad_token_id=pad_id,
                  bos_token_id=bos_id, return_dict_in_generate=True, output_logits=output_logits, use_cache=True)
    if do_sample:
        params.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        params.update(temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**params)


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config, seed: int):
    """Batched, KV-cached ``model.generate`` from a left-padded batch; sampling draws from the global RNG, seeded
    here (callers that must not disturb it wrap the call in ``torch.random.fork_rng``)."""
    torch.manual_seed(seed)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)


def first_eos(tokens: list[int], eos_ids) -> int | None:
    """Index of the first stop token in ``tokens``, or None."""
    return next((i for i, t in enumerate(tokens) if t in eos_ids), None)
