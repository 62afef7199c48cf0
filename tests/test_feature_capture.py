"""The Q/K/V hooks capture what the attention uses: recomputing ``softmax(q k^T * scaling + mask) v`` from the
captured tensors reproduces the attention module's output (the input of its output projection), for a Llama model
with grouped-query attention under SDPA, GPT-2 and BERT; hidden states match ``output_hidden_states``."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llm_distill.features.capture import FeatureCapture, attention_module, transformer_blocks
from llm_distill.features.losses import attention_probs


def llama(attn="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval(), True


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval(), True


def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return BertForMaskedLM(config).eval(), False


def output_projection(attn):
    return getattr(attn, "o_proj", None) or getattr(attn, "c_proj", None)


@pytest.mark.parametrize("build", [llama, gpt2, bert], ids=["llama_gqa_sdpa", "gpt2", "bert"])
def test_captured_qkv_reproduce_the_attention_output(build):
    model, causal = build()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding on row 1
    capture = FeatureCapture(model, hidden_layers=[0, 1], qkv_layers=[1])
    attn = attention_module(transformer_blocks(model)[1])
    seen = {}
    if output_projection(attn) is not None:
        output_projection(attn).register_forward_pre_hook(lambda m, a: seen.setdefault("out", a[0]))
    else:  # BERT: the self-attention module's own output is the context layer
        attn.register_forward_hook(lambda m, a, o: seen.setdefault("out", o[0]))
    with torch.no_grad(), capture.capturing():
        outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    qkv = capture.qkv(1)
    assert qkv.q.shape == qkv.k.shape == qkv.v.shape == (2, 4, 9, 8)  # GQA keys / values repeated to 4 heads
    probs = attention_probs(qkv.q, qkv.k, mask.bool(), causal, qkv.scaling)  # (B, H, S, S)
    recomputed = (probs @ qkv.v.float()).transpose(1, 2).flatten(2)  # (B, S, H*d)
    valid = mask.bool()
    torch.testing.assert_close(recomputed[valid], seen["out"].float()[valid], atol=1e-5, rtol=1e-4)
    # hidden state of block 0 = hidden_states[1] (block 1 of a pre-norm decoder is before the final norm)
    torch.testing.assert_close(capture.hidden_state(0), outputs.hidden_states[1])
    if not causal:
        torch.testing.assert_close(capture.hidden_state(-1), outputs.hidden_states[-1])


def test_nothing_is_recorded_outside_capturing():
    model, _ = llama()
    capture = FeatureCapture(model, hidden_layers=[0], qkv_layers=[0])
    with torch.no_grad():
        model(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert capture.hidden == {}
    capture.remove()
    with torch.no_grad(), capture.capturing():
        model(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert capture.hidden == {}
