"""``FeatureDistiller``: the feature-level terms of one student / teacher pair, and the learned projections they own.

The trainer builds it once (``FeatureDistiller(settings, student, teacher, causal)``), runs both forwards inside
``capturing()`` and adds ``distiller(attention_mask, num_items)`` to its loss. It owns:

- the hooks (``features.capture``) that record the mapped layers' hidden states and the relation layers' Q / K / V;
- ``projections``: one ``Linear(Hs, Ht, bias=False)`` per mapped layer whose widths differ (FitNets' regressor).
  They are trained with the student but are not part of it: the trainer adds them to the optimiser, wraps them for
  DDP, saves them next to each checkpoint and leaves them out of the exported model.

Weights that are 0 switch their term off completely (no hook, no projection, no compute), so a config with every
feature weight at 0 trains exactly as without this module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from llm_distill.features.capture import FeatureCapture, num_layers
from llm_distill.features.layer_map import resolve_pairs
from llm_distill.features.losses import (
    attention_map_loss,
    attention_probs,
    attention_relation_loss,
    hidden_map_loss,
    pooled_embeddings,
    rkd_loss,
)


@dataclass(frozen=True)
class FeatureSettings:
    """The feature-KD block of ``DistillationConfig`` (see its fields' help)."""

    hidden_layer_map: str = "uniform"
    hidden_loss: str = "mse"
    alpha_hidden: float = 0.0
    alpha_attn_relation: float = 0.0
    relation_heads: int | None = None
    relation_layers: str = "-1:-1"
    alpha_attn_map: float = 0.0
    alpha_rkd: float = 0.0
    rkd_angle_weight: float = 2.0

    @property
    def active(self) -> bool:
        return any(w > 0.0 for w in (self.alpha_hidden, self.alpha_attn_relation, self.alpha_attn_map, self.alpha_rkd))


def _config(model):
    model = getattr(model, "module", model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model.config


def _width(model) -> int:
    config = _config(model)
    return int(getattr(config, "hidden_size", None) or config.n_embd)


class LayerProjections(torch.nn.Module):
    """Student width -> teacher width, one learned linear map per mapped student layer (identity where equal)."""

    def __init__(self, layers: list[int], student_width: int, teacher_width: int):
        super().__init__()
        self.maps = torch.nn.ModuleDict({str(i): torch.nn.Linear(student_width, teacher_width, bias=False)
                                         for i in layers})

    def forward(self, states: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        weight = next(self.parameters())
        return {i: self.maps[str(i)](h.to(weight.dtype)) for i, h in states.items()}


class FeatureDistiller:
    """Hidden-layer map (FitNets / TinyBERT), MiniLMv2 attention relations, TinyBERT attention maps and RKD.

    A plain object, not an ``nn.Module``: its only trained state is ``projections`` (the trainer owns its optimiser
    group, DDP wrapper and checkpoint file), and the models it hooks stay the trainer's."""

    TERMS = ("hidden_loss", "attn_relation_loss", "attn_map_loss", "rkd_loss")

    def __init__(self, settings: FeatureSettings, student, teacher, causal: bool):
        self.settings, self.causal = settings, causal
        ns, nt = num_layers(student), num_layers(teacher)
        use_map = settings.alpha_hidden > 0 or settings.alpha_attn_map > 0
        self.pairs = resolve_pairs(settings.hidden_layer_map, ns, nt) if use_map else []
        self.relation_pair = (resolve_pairs(settings.relation_layers, ns, nt, "relation_layers")[0]
                              if settings.alpha_attn_relation > 0 else None)
        self.relation_heads = settings.relation_heads or _config(student).num_attention_heads
        if settings.alpha_attn_map > 0:
            heads = [getattr(_config(m), "num_attention_heads", None) or _config(m).n_head for m in (student, teacher)]
            if heads[0] != heads[1]:
                raise ValueError(f"alpha_attn_map={settings.alpha_attn_map}: TinyBERT's attention-map loss pairs heads "
                                 f"one to one, but the student has {heads[0]} heads and the teacher {heads[1]}. Set "
                                 "alpha_attn_map to 0 and use alpha_attn_relation (MiniLMv2), which needs no match.")
        hidden_pairs = self.pairs if settings.alpha_hidden > 0 else []
        rkd = [(ns - 1, nt - 1)] if settings.alpha_rkd > 0 else []
        qkv = (self.pairs if settings.alpha_attn_map > 0 else []) + ([self.relation_pair] if self.relation_pair else [])
        self.student_capture = FeatureCapture(student, [s for s, _ in hidden_pairs + rkd], [s for s, _ in qkv])
        self.teacher_capture = FeatureCapture(teacher, [t for _, t in hidden_pairs + rkd], [t for _, t in qkv])
        hs, ht = _width(student), _width(teacher)
        self.projections = (LayerProjections(sorted({s for s, _ in hidden_pairs}), hs, ht)
                            if hidden_pairs and hs != ht else None)
        self.project = self.projections  # the module to call: the trainer swaps in its DDP wrapper

    @contextlib.contextmanager
    def capturing(self):
        """Record both models' features during the forwards inside this block."""
        self.student_capture.clear()
        self.teacher_capture.clear()
        with self.student_capture.capturing(), self.teacher_capture.capturing():
            yield

    def __call__(self, attention_mask: torch.Tensor | None, num_items_in_batch=None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(weighted sum of the active terms, {term name: detached unweighted value})`` from the last capture."""
        st, sc, tc = self.settings, self.student_capture, self.teacher_capture
        terms = {}
        if st.alpha_hidden > 0:
            student = {s: sc.hidden_state(s) for s, _ in self.pairs}
            if self.project is not None:
                student = self.project(student)
            terms["hidden_loss"] = (st.alpha_hidden, hidden_map_loss(
                [student[s] for s, _ in self.pairs], [tc.hidden_state(t) for _, t in self.pairs], attention_mask,
                loss=st.hidden_loss, num_items_in_batch=num_items_in_batch))
        if self.relation_pair is not None:
            s, t = self.relation_pair
            terms["attn_relation_loss"] = (st.alpha_attn_relation, attention_relation_loss(
                sc.qkv(s).concatenated(), tc.qkv(t).concatenated(), attention_mask,
                relation_heads=self.relation_heads, causal=self.causal, num_items_in_batch=num_items_in_batch))
        if st.alpha_attn_map > 0:
            terms["attn_map_loss"] = (st.alpha_attn_map, self._attention_maps(attention_mask, num_items_in_batch))
        if st.alpha_rkd > 0:
            terms["rkd_loss"] = (st.alpha_rkd, self._rkd(attention_mask, num_items_in_batch))
        loss = sum(weight * value for weight, value in terms.values())
        self.student_capture.clear()
        self.teacher_capture.clear()
        return loss, {name: value.detach() for name, (_, value) in terms.items()}

    def _attention_maps(self, attention_mask, num_items_in_batch) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            maps = []
            for capture, layer in ((self.student_capture, s), (self.teacher_capture, t)):
                qkv = capture.qkv(layer)
                mask = attention_mask if attention_mask is not None else torch.ones(qkv.q.shape[0], qkv.q.shape[2])
                maps.append(attention_probs(qkv.q, qkv.k, mask.bool(), self.causal, qkv.scaling))
            total = total + attention_map_loss(*maps, attention_mask, num_items_in_batch=num_items_in_batch)
        return total / len(self.pairs)

    def _rkd(self, attention_mask, num_items_in_batch) -> torch.Tensor:
        """RKD on mean-pooled last-block states; a per-batch term, weighted by this micro-batch's share of the
        step's positions so that summing micro-batches averages them like the per-position terms."""
        ns, nt = self.student_capture.num_layers, self.teacher_capture.num_layers
        student = pooled_embeddings(self.student_capture.hidden_state(ns - 1), attention_mask)
        teacher = pooled_embeddings(self.teacher_capture.hidden_state(nt - 1), attention_mask)
        loss = rkd_loss(student, teacher, angle_weight=self.settings.rkd_angle_weight)
        if num_items_in_batch is None:
            return loss
        local = (attention_mask.sum() if attention_mask is not None else student.new_tensor(student.shape[0])).float()
        return loss * local / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=torch.float32).clamp_min(1)

    def remove_hooks(self) -> None:
        self.student_capture.remove()
        self.teacher_capture.remove()
