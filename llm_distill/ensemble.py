"""``EnsembleLM``: several language models of one vocabulary answering as one teacher (born-again ensembles).

Its logits are ``log(mean_i softmax(logits_i))``: the ensemble's predictive distribution (Furlanello et al. 2018
average the generations' predictions), so any KD divergence at T=1 compares the student with the mean of the
members' distributions. At T != 1 the loss tempers that mean distribution (not each member's). The ensemble has no
``get_decoder``, so the trainer's memory-lean path falls back to these logits (the loss is still chunked); feature
terms (hidden maps, relations) need a single teacher.
"""

from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import MaskedLMOutput

from llm_distill.models import vocab_size_of


class EnsembleLM(torch.nn.Module):
    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("EnsembleLM needs at least one member model.")
        sizes = {vocab_size_of(m) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"Ensemble members have different vocabulary sizes {sorted(sizes)}: average only models "
                             "that share one tokenizer (e.g. born-again generations of one student).")
        self.members = torch.nn.ModuleList(members)
        self.config = members[0].config

    def get_output_embeddings(self):
        return self.members[0].get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs.pop("output_hidden_states", None)
        log_probs = [m(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.float().log_softmax(-1)
                     for m in self.members]  # each (B, S, V)
        logits = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))  # log mean probability
        return MaskedLMOutput(logits=logits)
