"""``GenerateArguments``: every setting of the response generator (teacher, prompts, sampling, batching, output)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_distill.checks import DTYPES, check_field

OVER_LENGTH = ("truncate_left", "skip", "error")
CHAT_TEMPLATE_MODES = ("auto", "always", "never")
BACKENDS = ("hf", "vllm")
DECODINGS = ("refill", "static")


@dataclass
class GenerateArguments:
    """Everything ``scripts/generate.py`` needs: teacher, prompts, sampling, batching, output."""

    # --- teacher
    teacher_model: str | None = field(
        default=None,
        metadata={"help": "Teacher: hub id or local path (from_pretrained); 'embedded:teacher' is the tiny offline "
                          "default (required; a bare `scripts/generate.py` runs the embedded demo config)."},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path or hub id (default: the teacher's)."})
    teacher_dtype: str = field(default="auto", metadata={"help": f"dtype of the teacher, one of {', '.join(DTYPES)}."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel, e.g. sdpa, eager."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    backend: str = field(
        default="hf",
        metadata={"help": f"Generation backend, one of {', '.join(BACKENDS)}: hf = transformers generate (batched, "
                          "left-padded; the tested default); vllm = vLLM offline inference (needs `pip install vllm`)."},
    )
    decoding: str = field(
        default="refill",
        metadata={"help": f"backend=hf only, one of {', '.join(DECODINGS)}: refill = batch_size rows in flight, a "
                          "finished row's slot goes to the next prompt at once (continuous batching; the default); "
                          "static = one model.generate per batch, every row waits for the batch's longest. Both give "
                          "the same greedy tokens and the same per-row seeded samples; models whose cache is not a "
                          "full-attention DynamicCache (sliding window, recurrent) always run static."},
    )
    # --- prompts
    prompts: str | None = field(
        default=None,
        metadata={"help": "Prompts (required): a .jsonl file (rows with prompt_field or messages_field), a .txt file (one prompt "
                          "per line), a Dataset.save_to_disk folder, or a hub dataset name."},
    )
    prompts_split: str = field(default="train", metadata={"help": "Split of a hub / saved dataset."})
    prompts_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    prompt_field: str = field(default="prompt", metadata={"help": "Column with the prompt text."})
    messages_field: str = field(
        default="messages",
        metadata={"help": "Column with a chat conversation [{'role', 'content'}, ...] ending in a user turn; used "
                          "instead of prompt_field when present."},
    )
    id_field: str = field(
        default="id",
        metadata={"help": "Column with a unique prompt id (kept in the output); without it the 0-based row index."},
    )
    prompt_max_lines: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N lines of each prompt (turns documents into completion prompts)."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    chat_template: str = field(
        default="auto",
        metadata={"help": f"One of {', '.join(CHAT_TEMPLATE_MODES)}: auto = apply the tokenizer's chat template when "
                          "it has one; always = require it; never = raw prompts (messages rows then fail)."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message prepended to every chat prompt that has none."}
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt in tokens (default: the teacher's context minus max_new_tokens)."},
    )
    over_length: str = field(
        default="truncate_left",
        metadata={"help": f"Prompts longer than max_prompt_length, one of {', '.join(OVER_LENGTH)}: truncate_left "
                          "keeps the last tokens (counted and logged), skip drops the prompt, error refuses to start."},
    )
    # --- sampling (names as in transformers.GenerationConfig)
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum tokens generated per response."})
    do_sample: bool = field(
        default=False, metadata={"help": "Sample (temperature / top_p / top_k) instead of greedy decoding."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0; with do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1] (with do_sample)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens; 0 = off (with do_sample)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL repetition penalty (1.0 = off)."})
    num_return_sequences: int = field(
        default=1, metadata={"help": "Responses per prompt (> 1 needs do_sample); rows get a sample_index."}
    )
    seed: int = field(default=42, metadata={"help": "Seed; a row's samples depend only on (seed, id, sample_index), "
                                                    "so a resumed, re-batched or re-sharded run writes the same file."})
    logprobs: int = field(
        default=0,
        metadata={"help": "Keep the teacher's top-k log-probabilities (raw, temperature 1) of every generated token "
                          "for offline logit KD; 0 = off."},
    )
    # --- execution and output
    batch_size: int = field(
        default=32,
        metadata={"help": "Prompts decoded together (per process): with decoding=refill the prompts in flight, "
                          "with static the prompts per generate call; also the unit of crash-safe appends."},
    )
    sort_by_length: bool = field(
        default=True, metadata={"help": "Batch prompts of similar length together (less padding, faster)."}
    )
    output: str = field(
        default="outputs/generate/responses.jsonl",
        metadata={"help": "Output JSONL. Shards go to <output>.parts/ while running; the run summary to "
                          "<stem>.meta.json. An existing output with the same config is resumed."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Delete an existing output (any config) and start again."})
    drop_empty: bool = field(
        default=False,
        metadata={"help": "Leave empty responses (the teacher emitted EOS first) out of the final file; they are "
                          "counted in the summary and listed in <stem>.meta.json. Off by default: every prompt id "
                          "is in the file exactly once, and scripts/distill.py trains on such a row's one label "
                          "(stop here)."},
    )
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory to use."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model replica."})

    def __post_init__(self):
        check_field(self.backend in BACKENDS, "backend", self.backend, f"one of {', '.join(BACKENDS)}")
        check_field(self.decoding in DECODINGS, "decoding", self.decoding, f"one of {', '.join(DECODINGS)}")
        check_field(self.teacher_dtype in DTYPES, "teacher_dtype", self.teacher_dtype, f"one of {', '.join(DTYPES)}")
        check_field(self.chat_template in CHAT_TEMPLATE_MODES, "chat_template", self.chat_template,
               f"one of {', '.join(CHAT_TEMPLATE_MODES)}")
        check_field(self.over_length in OVER_LENGTH, "over_length", self.over_length, f"one of {', '.join(OVER_LENGTH)}")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check_field(self.temperature > 0, "temperature", self.temperature, "a number > 0 (use do_sample=false for greedy)")
        check_field(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check_field(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        check_field(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "a number > 0")
        check_field(self.num_return_sequences >= 1, "num_return_sequences", self.num_return_sequences, "an integer >= 1")
        check_field(self.num_return_sequences == 1 or self.do_sample, "num_return_sequences", self.num_return_sequences,
               "1 with greedy decoding (greedy returns the same response every time); set do_sample=true")
        check_field(self.logprobs >= 0, "logprobs", self.logprobs, "an integer >= 0 (0 = off)")
        check_field(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        for name in ("max_prompts", "prompt_max_lines", "max_prompt_length"):
            value = getattr(self, name)
            check_field(value is None or value >= 1, name, value, "an integer >= 1 (or null for no limit)")
        check_field(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
               self.vllm_gpu_memory_utilization, "a number in (0, 1]")
        check_field(bool(self.output), "output", self.output, "a file path such as outputs/generate/responses.jsonl")

    def sampling_params(self) -> dict:
        """The parameters that decide a response (recorded in every row)."""
        params = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "seed": self.seed}
        if self.do_sample:
            params.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1.0:
            params["repetition_penalty"] = self.repetition_penalty
        return params
