"""Run configuration: the arguments dataclasses, and their parsing from YAML + command line.

One ``TrainingArguments`` subclass for the trainer, plain dataclasses for the rest. Every field carries ``help``
(it is the ``--help`` text and the YAML reference) and the range checks in ``__post_init__`` name the field and
the accepted values, so a typo fails before any model is loaded.

Parsing follows TRL's ``TrlParser.parse_args_and_config``: ``--config file.yaml`` sets defaults, the command line
overrides them, and a key that no dataclass knows fails with the closest valid names, because a silently ignored
typo (``temprature: 4``) is the worst kind of bug in a config.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from llm_distill.checks import DTYPES, check_field
from llm_distill.cross_tokenizer.losses import CROSS_TOKENIZER_MODES
from llm_distill.errors import UserError
from llm_distill.features.distiller import FeatureSettings
from llm_distill.features.layer_map import check_spec as check_layer_spec
from llm_distill.features.losses import HIDDEN_LOSSES
from llm_distill.losses import LOSS_TYPES, Divergence, LossWeights
from llm_distill.quantization import QAT_SCHEMES
from llm_distill.sparsity import SPARSITY_PATTERNS, SPARSITY_SCOPES

STUDENT_INITS = ("pretrained", "teacher_layers", "fresh")
KD_POSITIONS = ("labels", "all")
TRIPLE_WEIGHTS = ("alpha_kd", "alpha_mlm", "alpha_clm", "alpha_cos", "alpha_mse")


@dataclass
class DistillationConfig(TrainingArguments):
    """``TrainingArguments`` plus the knowledge-distillation knobs of ``DistillationTrainer``."""

    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature T applied to teacher and student logits in the KD term (> 0). "
                          "The KD term is multiplied by T^2 (Hinton et al. 2015)."},
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the KD term in [0, 1]; the cross-entropy on labels gets 1 - alpha. "
                          "alpha=0 is plain fine-tuning (the teacher is not run); alpha=1 is pure distillation."},
    )
    loss_type: str = field(
        default="forward_kl",
        metadata={"help": f"Divergence for the KD term, one of {', '.join(LOSS_TYPES)}."},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "Interpolation of the generalized JSD (loss_type=jsd) in [0, 1]: 0 = forward KL, "
                          "1 = reverse KL (GKD, Agarwal et al. 2023)."},
    )
    skew_lambda: float = field(
        default=0.1,
        metadata={"help": "Skew of skew_forward_kl / skew_reverse_kl in [0, 1) (DistiLLM, Ko et al. 2024)."},
    )
    loss_chunk_size: int = field(
        default=256,
        metadata={"help": "Memory-lean loss: compute KD + CE this many valid tokens at a time, in fp32, from the "
                          "models' final hidden states and lm_head weights, so no B x S x V logits tensor is ever "
                          "built (peak loss memory O(loss_chunk_size x V)). Same numbers as the plain path. "
                          "0 = plain path (full logits; the readable reference)."},
    )
    teacher_logits: str | None = field(
        default=None,
        metadata={"help": "Offline KD: a folder written by scripts/store_teacher_logits.py (top-k teacher "
                          "log-probabilities per token). Training then reads its rows and needs no teacher in "
                          "memory; the 'dataset' setting is not used for training."},
    )
    # DistilBERT's triple loss (Sanh et al. 2019). Opt-in: while alpha_kd / alpha_mlm / alpha_clm are all unset,
    # `alpha` sets the KD / CE weights as before; alpha_cos / alpha_mse add the hidden-state terms in either mode.
    alpha_kd: float | None = field(
        default=None,
        metadata={"help": "Triple loss: weight of the KD term (>= 0; DistilBERT's --alpha_ce, 5.0 in its training "
                          "command). Setting alpha_kd, alpha_mlm or alpha_clm switches to explicit weights: loss = "
                          "alpha_kd*kd + alpha_mlm|alpha_clm*ce + alpha_cos*cos + alpha_mse*mse (an unset weight is "
                          "0) and alpha is ignored."},
    )
    alpha_mlm: float | None = field(
        default=None,
        metadata={"help": "Triple loss: weight of the masked-LM cross-entropy on the masked tokens (>= 0; "
                          "DistilBERT: 2.0). For masked-LM students; causal students use alpha_clm."},
    )
    alpha_clm: float | None = field(
        default=None,
        metadata={"help": "Triple loss: weight of the causal-LM cross-entropy on the labels (>= 0). For causal "
                          "students; masked-LM students use alpha_mlm."},
    )
    alpha_cos: float | None = field(
        default=None,
        metadata={"help": "Weight of the cosine-embedding loss 1 - cos(h_student, h_teacher) between the last hidden "
                          "states at every non-padded position (>= 0; DistilBERT: 1.0). When the hidden sizes "
                          "differ, a learned linear projection student -> teacher is trained with the student "
                          "(saved in checkpoints, never in the student). Unset = 0."},
    )
    alpha_mse: float | None = field(
        default=None,
        metadata={"help": "Weight of the mean squared error between the last hidden states (same positions and "
                          "projection as alpha_cos; TinyBERT-style). Note: DistilBERT's alpha_mse was an MSE on "
                          "logits. Unset = 0."},
    )
    kd_positions: str = field(
        default="labels",
        metadata={"help": "Where the KD term is computed: labels = the positions with a label (causal: the "
                          "response / text tokens; masked LM: only the masked tokens, DistilBERT's "
                          "--restrict_ce_to_mask); all = every non-padded position (DistilBERT's default)."},
    )
    mlm_probability: float = field(
        default=0.15,
        metadata={"help": "Masked-LM teachers: fraction of tokens masked per training sequence (BERT's 80% "
                          "<mask> / 10% random / 10% unchanged), and of the fixed held-out masking."},
    )
    # --- Feature-level distillation (issue 17; llm_distill.features, docs/feature-kd.md). All weights 0 = off. ---
    hidden_layer_map: str = field(
        default="uniform",
        metadata={"help": "Hidden-layer map for alpha_hidden / alpha_attn_map: 'student:teacher' pairs of 0-based "
                          "block indices, e.g. '0:1,1:3' (negative = from the end), or 'uniform' (student block i <- "
                          "teacher block (i+1)*Lt/Ls - 1, TinyBERT's). A learned projection per mapped layer when "
                          "the widths differ (saved in checkpoints, never in the student)."},
    )
    hidden_loss: str = field(
        default="mse", metadata={"help": f"Loss between mapped hidden states, one of {', '.join(HIDDEN_LOSSES)}."}
    )
    alpha_hidden: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-layer map loss (FitNets / TinyBERT; >= 0, 0 = off)."}
    )
    alpha_attn_relation: float = field(
        default=0.0,
        metadata={"help": "Weight of MiniLMv2's self-attention relation KD (Q-Q, K-K, V-V relations, KL at the "
                          "valid positions; >= 0, 0 = off). Needs no width or head-count match."},
    )
    relation_heads: int | None = field(
        default=None,
        metadata={"help": "MiniLMv2 relation heads R (must divide both models' num_heads x head_dim); default: the "
                          "student's number of attention heads."},
    )
    relation_layers: str = field(
        default="-1:-1",
        metadata={"help": "The one 'student:teacher' layer pair for the relation KD (MiniLMv2: the last layer for "
                          "base-size teachers, an upper-middle one for large ones)."},
    )
    alpha_attn_map: float = field(
        default=0.0,
        metadata={"help": "Weight of TinyBERT's attention-map loss on the hidden_layer_map pairs (same number of "
                          "heads needed; maps recomputed from the captured Q/K, so SDPA works; >= 0, 0 = off)."},
    )
    alpha_rkd: float = field(
        default=0.0,
        metadata={"help": "Weight of relational KD (Park et al. 2019: distance + rkd_angle_weight x angle relations "
                          "between the batch's mean-pooled last-block embeddings; >= 0, 0 = off)."},
    )
    rkd_angle_weight: float = field(default=2.0, metadata={"help": "RKD's angle weight (the paper's 2; >= 0)."})

    # --- Compression during distillation (issue 16): gradual magnitude pruning and quantization-aware training ---
    target_sparsity: float = field(
        default=0.0,
        metadata={"help": "Gradual magnitude pruning (Zhu & Gupta 2017) of the student while it is distilled: the "
                          "share of zeros reached in each pruned weight, in [0, 1). 0 = off. With "
                          "sparsity_pattern=2:4 it must be 0.5."},
    )
    sparsity_pattern: str = field(
        default="unstructured",
        metadata={"help": f"One of {', '.join(SPARSITY_PATTERNS)}: unstructured = smallest weights of each layer; "
                          "2:4 = two zeros in every 4 consecutive inputs of each row (semi-structured)."},
    )
    sparsity_start_step: int = field(default=0, metadata={"help": "Optimizer step at which pruning starts."})
    sparsity_end_step: int | None = field(
        default=None,
        metadata={"help": "Step at which target_sparsity is reached (cubic schedule in between; the remaining steps "
                          "recover). Empty = 3/4 of max_steps."},
    )
    sparsity_every: int = field(default=10, metadata={"help": "Masks are recomputed every this many steps."})
    sparsity_scope: str = field(
        default="linear",
        metadata={"help": f"What is pruned, one of {', '.join(SPARSITY_SCOPES)}: linear = the decoder's linear "
                          "layers (not the embeddings or the output head); linear_and_head adds the head; all adds "
                          "the input embeddings."},
    )
    qat: str | None = field(
        default=None,
        metadata={"help": f"Quantization-aware distillation (torchao QAT), one of {', '.join(QAT_SCHEMES)}: the "
                          "student's linear layers (not the head) train with fake-quantized int8 activations and "
                          "int8 (or int4, group 32) weights, against the full-precision teacher. The saved weights "
                          "are fp32; <output_dir>/quantized holds the int8 model (from_pretrained reads it), whose "
                          "outputs equal the fake-quantized student's. Empty = off."},
    )

    # --- On-policy distillation (GKD, Agarwal et al. 2023; TRL's names): see llm_distill.on_policy ---------------
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Probability in [0, 1] that a batch's completions are sampled from the student itself (GKD's "
                          "lambda): its prompts are kept, the dataset's completions replaced by the student's, and the "
                          "loss covers those completion tokens only. 0 = off-policy (the dataset's completions, the "
                          "default), 1 = fully on-policy. Needs prompt/response or messages rows."},
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Sequence-level KD (GKD's seq_kd): the batches the student does not sample (probability "
                          "1 - lmbda) get completions sampled from the teacher instead of the dataset's."},
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "On-policy / seq_kd: longest sampled completion, in tokens (>= 1)."}
    )
    rollout_temperature: float = field(
        default=1.0,
        metadata={"help": "On-policy / seq_kd: sampling temperature of the completions (>= 0; 0 = greedy). Not the "
                          "KD temperature, which is 'temperature'."},
    )
    rollout_top_p: float = field(default=1.0, metadata={"help": "On-policy / seq_kd: nucleus sampling, in (0, 1]."})
    rollout_top_k: int = field(default=0, metadata={"help": "On-policy / seq_kd: top-k sampling (>= 0; 0 = off)."})

    # --- Cross-tokenizer distillation (issue 15): a teacher and a student with different vocabularies ---------
    cross_tokenizer: str = field(
        default="none",
        metadata={"help": f"One of {', '.join(CROSS_TOKENIZER_MODES)}. none = both models share one vocabulary "
                          "(token-level KD). uld = Universal Logit Distillation (Boizard et al. 2024: L1 between the "
                          "sorted probability vectors, no vocabulary map). hybrid = GOLD (TRL): loss_type on the "
                          "tokens whose strings both vocabularies share + ULD on the rest. Each row is tokenized "
                          "by both tokenizers (teacher_tokenizer) and aligned by byte offsets; see "
                          "docs/cross-tokenizer.md."},
    )

    def __post_init__(self):
        self.divergence  # noqa: B018 - builds the settings, which check loss_type / temperature / jsd_beta / skew_lambda
        check_field(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "a number in [0, 1]")
        check_field(self.loss_chunk_size >= 0, "loss_chunk_size", self.loss_chunk_size,
               "an integer >= 0 (e.g. 1024; 0 = plain full-logits path)")
        self._check_triple_loss()
        self._check_feature_kd()
        self._check_compression()
        self._check_on_policy()
        self._check_cross_tokenizer()
        super().__post_init__()

    def _check_triple_loss(self) -> None:
        for name in TRIPLE_WEIGHTS:
            value = getattr(self, name)
            check_field(value is None or (math.isfinite(value) and value >= 0.0), name, value,
                   "a number >= 0, or null (unset)")
        if self.alpha_mlm is not None and self.alpha_clm is not None:
            raise ValueError(f"alpha_mlm={self.alpha_mlm} and alpha_clm={self.alpha_clm} are both set: they are the "
                             "same weight (the label cross-entropy) for masked-LM and causal students; set only one.")
        weights = self.loss_weights()
        if self.uses_explicit_weights() and weights.kd + weights.ce + weights.cos + weights.mse == 0.0:
            raise ValueError("alpha_kd, alpha_mlm/alpha_clm, alpha_cos and alpha_mse are all 0: nothing to train on. "
                             "Set at least one > 0 (DistilBERT: alpha_kd 5.0, alpha_mlm 2.0, alpha_cos 1.0).")
        check_field(self.kd_positions in KD_POSITIONS, "kd_positions", self.kd_positions, f"one of {', '.join(KD_POSITIONS)}")
        check_field(0.0 < self.mlm_probability < 1.0, "mlm_probability", self.mlm_probability, "a number in (0, 1)")
        if self.teacher_logits and weights.uses_hidden:
            raise ValueError(f"alpha_cos / alpha_mse need the teacher's hidden states, but teacher_logits="
                             f"{self.teacher_logits!r} (offline KD) loads no teacher: unset alpha_cos / alpha_mse, or "
                             "unset teacher_logits to distil from a live teacher.")
        if self.teacher_logits and self.kd_positions != "labels":
            raise ValueError("kd_positions=all needs a live teacher: stored teacher logits cover the label positions "
                             "only. Use kd_positions=labels with teacher_logits.")

    def _check_feature_kd(self) -> None:
        for name in ("alpha_hidden", "alpha_attn_relation", "alpha_attn_map", "alpha_rkd", "rkd_angle_weight"):
            value = getattr(self, name)
            check_field(math.isfinite(value) and value >= 0.0, name, value, "a number >= 0 (0 = off)")
        check_field(self.hidden_loss in HIDDEN_LOSSES, "hidden_loss", self.hidden_loss,
                    f"one of {', '.join(HIDDEN_LOSSES)}")
        check_field(self.relation_heads is None or self.relation_heads >= 1, "relation_heads", self.relation_heads,
                    "an integer >= 1, or null (the student's head count)")
        check_layer_spec(self.hidden_layer_map, "hidden_layer_map")
        check_layer_spec(self.relation_layers, "relation_layers")
        if len(self.relation_layers.split(",")) != 1:
            raise ValueError(f"relation_layers={self.relation_layers!r}: MiniLMv2 distils one layer pair; give one "
                             "'student:teacher' pair, e.g. '-1:-1'.")
        if self.teacher_logits and self.feature_settings().active:
            raise ValueError(f"alpha_hidden / alpha_attn_relation / alpha_attn_map / alpha_rkd need the teacher's "
                             f"activations, but teacher_logits={self.teacher_logits!r} (offline KD) loads no teacher: "
                             "set them to 0, or unset teacher_logits.")

    def feature_settings(self) -> FeatureSettings:
        """The feature-KD block as the one object ``FeatureDistiller`` takes."""
        return FeatureSettings(**{f.name: getattr(self, f.name) for f in fields(FeatureSettings)})

    def _check_compression(self) -> None:
        check_field(0.0 <= self.target_sparsity < 1.0, "target_sparsity", self.target_sparsity, "a number in [0, 1)")
        check_field(self.sparsity_pattern in SPARSITY_PATTERNS, "sparsity_pattern", self.sparsity_pattern,
                    f"one of {', '.join(SPARSITY_PATTERNS)}")
        check_field(self.sparsity_scope in SPARSITY_SCOPES, "sparsity_scope", self.sparsity_scope,
                    f"one of {', '.join(SPARSITY_SCOPES)}")
        check_field(self.qat is None or self.qat in QAT_SCHEMES, "qat", self.qat,
                    f"one of {', '.join(QAT_SCHEMES)}, or empty (off)")
        check_field(self.sparsity_every >= 1, "sparsity_every", self.sparsity_every, "an integer >= 1")
        check_field(self.sparsity_start_step >= 0, "sparsity_start_step", self.sparsity_start_step, "an integer >= 0")
        if not self.target_sparsity:
            return
        if self.sparsity_pattern == "2:4":
            check_field(self.target_sparsity == 0.5, "target_sparsity", self.target_sparsity,
                        "0.5 with sparsity_pattern=2:4 (two of every four weights)")
        if self.sparsity_end_step is None:
            if self.max_steps <= 0:
                raise ValueError("target_sparsity is set but sparsity_end_step is empty and max_steps is not: set "
                                 "sparsity_end_step (the step at which the target is reached).")
            self.sparsity_end_step = max(self.sparsity_start_step, self.max_steps * 3 // 4)
        check_field(self.sparsity_end_step >= self.sparsity_start_step, "sparsity_end_step", self.sparsity_end_step,
                    f"an integer >= sparsity_start_step ({self.sparsity_start_step})")

    def _check_on_policy(self) -> None:
        check_field(0.0 <= self.lmbda <= 1.0, "lmbda", self.lmbda, "a number in [0, 1] (0 = off-policy)")
        check_field(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check_field(math.isfinite(self.rollout_temperature) and self.rollout_temperature >= 0.0,
                    "rollout_temperature", self.rollout_temperature, "a number >= 0 (0 = greedy)")
        check_field(0.0 < self.rollout_top_p <= 1.0, "rollout_top_p", self.rollout_top_p, "a number in (0, 1]")
        check_field(self.rollout_top_k >= 0, "rollout_top_k", self.rollout_top_k, "an integer >= 0 (0 = off)")
        if not self.samples_completions():
            return
        what = f"lmbda={self.lmbda}" if self.lmbda > 0 else "seq_kd=true"
        if self.teacher_logits:
            raise ValueError(f"{what} samples new completions, which the stored teacher logits (teacher_logits) do not "
                             "cover: unset teacher_logits to distil from a live teacher, or set lmbda=0, seq_kd=false.")
        if self.kd_positions != "labels" or self.loss_weights().uses_hidden:
            raise ValueError(f"{what}: the on-policy loss covers the sampled completion tokens only, but "
                             "kd_positions=all / alpha_cos / alpha_mse would add the prompt's positions: use "
                             "kd_positions=labels and unset alpha_cos / alpha_mse.")

    def samples_completions(self) -> bool:
        """Whether training replaces some batches' completions by sampled ones (lmbda > 0 or seq_kd)."""
        return self.lmbda > 0.0 or self.seq_kd

    def _check_cross_tokenizer(self) -> None:
        check_field(self.cross_tokenizer in CROSS_TOKENIZER_MODES, "cross_tokenizer", self.cross_tokenizer,
                    f"one of {', '.join(CROSS_TOKENIZER_MODES)}")
        if self.cross_tokenizer == "none":
            return
        if self.teacher_logits:
            raise ValueError(f"cross_tokenizer={self.cross_tokenizer} needs a live teacher reading its own tokens, "
                             "but teacher_logits is set (stored top-k on the student's tokens): unset one of them.")
        if self.loss_weights().uses_hidden or self.kd_positions != "labels":
            raise ValueError(f"cross_tokenizer={self.cross_tokenizer} compares aligned groups of tokens, not positions: "
                             "alpha_cos / alpha_mse and kd_positions=all do not apply (unset them).")

    @property
    def divergence(self) -> Divergence:
        """The KD divergence settings as the one object the losses take (validated when it is built)."""
        return Divergence(self.loss_type, self.temperature, self.jsd_beta, self.skew_lambda)

    def uses_explicit_weights(self) -> bool:
        """True when alpha_kd / alpha_mlm / alpha_clm set the KD and CE weights (``alpha`` is then ignored)."""
        return any(getattr(self, name) is not None for name in ("alpha_kd", "alpha_mlm", "alpha_clm"))

    def loss_weights(self) -> LossWeights:
        """The loss weights, with this precedence: explicit ``alpha_kd`` / ``alpha_mlm`` | ``alpha_clm`` when any is
        set (unset ones are 0), else ``alpha`` / ``1 - alpha``; ``alpha_cos`` / ``alpha_mse`` (unset = 0) add the
        hidden-state terms in both cases."""
        cos, mse = self.alpha_cos or 0.0, self.alpha_mse or 0.0
        if not self.uses_explicit_weights():
            return LossWeights.from_alpha(self.alpha, cos=cos, mse=mse)
        ce = self.alpha_mlm if self.alpha_mlm is not None else self.alpha_clm
        return LossWeights(kd=self.alpha_kd or 0.0, ce=ce or 0.0, cos=cos, mse=mse)

    def needs_teacher(self) -> bool:
        """Whether training runs a live teacher (a KD term without stored logits, or a hidden-state term)."""
        weights = self.loss_weights()
        return ((weights.kd > 0.0 and not self.teacher_logits) or weights.uses_hidden
                or self.feature_settings().active or self.seq_kd)


@dataclass
class ModelArguments:
    """Which teacher and student to load, and how to build the student."""

    teacher_model: str | None = field(
        default=None,
        metadata={"help": "Teacher: hub id or local path loaded with from_pretrained; 'embedded:teacher' is the "
                          "tiny offline default. Required (unless teacher_logits); a run with no model or data "
                          "arguments uses the embedded demo config."},
    )
    student_model: str | None = field(
        default=None,
        metadata={"help": "Student: hub id or local path. With student_init=fresh only its config is used; with "
                          "student_init=teacher_layers it is ignored."},
    )
    student_init: str = field(
        default="pretrained",
        metadata={"help": f"How the student's weights are made, one of {', '.join(STUDENT_INITS)}: pretrained = "
                          "from_pretrained(student_model); teacher_layers = copy embeddings and "
                          "student_num_layers teacher layers (DistilBERT-style); fresh = random init from "
                          "student_model's config."},
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Layers of a student built with student_init=teacher_layers (default: half the teacher's)."},
    )
    student_layer_strategy: str = field(
        default="linspace",
        metadata={"help": "Which teacher layers a teacher_layers student copies: linspace (evenly spaced, keeps "
                          "first and last) or every_other (DistilBERT)."},
    )
    student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit teacher layer indices a teacher_layers student copies, in increasing order, e.g. "
                          "[0, 2, 4, 7, 9, 11] (DistilBERT's extract_distilbert.py); overrides "
                          "student_layer_strategy."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer path or hub id (default: the student's, else the teacher's)."},
    )
    # --- Cross-tokenizer distillation (issue 15) ---
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={"help": "With cross_tokenizer: uld | hybrid, the teacher's own tokenizer (path or hub id; default: "
                          "the teacher's folder). Ignored otherwise (both models then share 'tokenizer')."},
    )
    teacher_dtype: str = field(
        default="auto", metadata={"help": f"dtype the teacher is loaded in, one of {', '.join(DTYPES)}."}
    )
    student_dtype: str = field(
        default="float32",
        metadata={"help": f"dtype of the student's weights, one of {', '.join(DTYPES)}. Keep float32 and set "
                          "bf16: true for mixed precision."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel for both models, e.g. sdpa, eager, flash_attention_2."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter on the student instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get LoRA adapters ('all-linear' = every linear layer but the LM head)."},
    )

    def __post_init__(self):
        check_field(self.student_init in STUDENT_INITS, "student_init", self.student_init, f"one of {', '.join(STUDENT_INITS)}")
        check_field(self.student_layer_strategy in ("linspace", "every_other"), "student_layer_strategy",
               self.student_layer_strategy, "linspace or every_other")
        for name in ("teacher_dtype", "student_dtype"):
            check_field(getattr(self, name) in DTYPES, name, getattr(self, name), f"one of {', '.join(DTYPES)}")
        check_field(self.student_num_layers is None or self.student_num_layers >= 1, "student_num_layers",
               self.student_num_layers, "an integer >= 1")
        if self.student_layers is not None:
            layers = self.student_layers
            check_field(len(layers) >= 1 and all(b > a for a, b in zip(layers, layers[1:])) and layers[0] >= 0,
                   "student_layers", layers, "a non-empty list of increasing teacher layer indices >= 0, e.g. [0, 2]")
            if self.student_init != "teacher_layers":
                raise ValueError(f"student_layers={layers} only applies to student_init=teacher_layers (got "
                                 f"student_init={self.student_init}).")
            if self.student_num_layers not in (None, len(layers)):
                raise ValueError(f"student_num_layers={self.student_num_layers} disagrees with student_layers={layers} "
                                 f"({len(layers)} layers): set only student_layers.")
        check_field(self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")


@dataclass
class DataArguments:
    """Where the training / evaluation text comes from and how it becomes token ids and labels."""

    dataset: str | None = field(
        default=None,
        metadata={"help": "Training data: a .jsonl/.json file, a folder written by Dataset.save_to_disk, or a hub "
                          "dataset name. Rows have 'text', or 'prompt' + 'response' (or 'completion'), or "
                          "'messages' (chat format)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub / saved dataset to train on."})
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out data for the final report (same formats as dataset); empty to skip."},
    )
    eval_split: str = field(default="train", metadata={"help": "Split of eval_dataset to use."})
    text_field: str = field(default="text", metadata={"help": "Column with raw text (loss on every token)."})
    prompt_field: str = field(default="prompt", metadata={"help": "Column with the prompt (no loss on it)."})
    response_field: str = field(
        default="response", metadata={"help": "Column with the response (loss only here); 'completion' also accepted."}
    )
    messages_field: str = field(
        default="messages", metadata={"help": "Column with chat messages; loss only on assistant turns."}
    )
    max_length: int = field(default=1024, metadata={"help": "Maximum tokens per training sequence (longer is truncated)."})
    packing: bool = field(
        default=False,
        metadata={"help": "For 'text' data: concatenate documents and cut into max_length blocks (no padding, "
                          "nothing truncated away)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training sequences (after packing; seeded shuffle)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation sequences."})

    def __post_init__(self):
        check_field(self.max_length >= 2, "max_length", self.max_length, "an integer >= 2")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            check_field(value is None or value >= 1, name, value, "an integer >= 1 (or null for all)")


# ------------------------------------------------------------------------------------ YAML + CLI


class ConfigError(UserError):
    """A configuration file or flag that cannot be used as given."""


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist (pass --config path/to/file.yaml).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of field: value, got {type(data).__name__}.")
    return data


def check_known_keys(data: dict, dataclass_types, source: str) -> None:
    known = {f.name for dc in dataclass_types for f in fields(dc) if f.init}
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=3)
            hints.append(f"'{key}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}. Run the script with --help for every field.")


def make_parser(dataclass_types) -> HfArgumentParser:
    """``HfArgumentParser`` whose ``--help`` works with any help text: argparse %-formats help strings, so a literal
    ``%`` (``"80% <mask>"``) would crash ``--help``; it is escaped here (``%(default)s``-style fields are kept)."""
    parser = HfArgumentParser(dataclass_types)
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    return parser


def parse_args_and_config(dataclass_types, argv: list[str] | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into one instance per dataclass type.

    Returns a tuple in the order of ``dataclass_types``. ``--config`` may appear anywhere in ``argv``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(dataclass_types)
    parser.add_argument("--config", type=str, default=None, help="YAML file with default values for any field.")
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path to a YAML file.")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    else:
        for i, arg in enumerate(argv):
            if arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
                del argv[i]
                break
    if config_path:
        data = load_yaml(config_path)
        check_known_keys(data, dataclass_types, config_path)
        parser.set_defaults(**data)
    outputs = _built(lambda: parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True))
    *instances, remaining = outputs
    remaining = [r for r in remaining if r]
    if remaining:
        raise ConfigError(f"Unknown command-line argument(s): {' '.join(remaining)}. Run with --help for every field.")
    # Drop the namespace entry for --config (HfArgumentParser returns it as an extra namespace when present).
    instances = [inst for inst in instances if type(inst) in dataclass_types]
    return tuple(instances)


def config_from_dict(dataclass_types, values: dict, base: str | Path | None = None):
    """Typed dataclasses from ``values`` on top of an optional YAML ``base``, with the same unknown-key check as the
    command line: how one job configures another (no argv strings in between)."""
    data = {**(load_yaml(base) if base else {}), **values}
    check_known_keys(data, dataclass_types, f"{base or 'config'}")
    return tuple(_built(lambda: HfArgumentParser(dataclass_types).parse_dict(data)))


def _built(make):
    """``make()``, with a ``ValueError`` raised while the dataclasses are built (a range check in ``__post_init__``,
    ours or ``TrainingArguments``') turned into a :class:`ConfigError`: a setting the user chose, so the command line
    shows one message, not a traceback. (Not prefixed with ``source``: the value may come from the command line.)"""
    try:
        return make()
    except UserError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
