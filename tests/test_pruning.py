"""Structured pruning: a pruned model equals the original with the same heads / neurons / layers masked out.

Every family (Llama, Mistral, Qwen2, Qwen3, GPT-2, BERT, DistilBERT) is built tiny from a config. The
reference is the *unpruned* model with forward hooks that zero the removed heads' slices of the output
projection's input (and removed neurons at the down projection's input) and skip removed layers; the pruned
model must match it to 1e-5 in fp32, with padding, and for decoders also token by token with a KV cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from llm_distill.importance import (
    activation_importance,
    block_influence,
    build_plan,
    gradient_importance,
    layer_removal_loss,
)
from conftest import _corpus_texts as corpus
from conftest import write_jsonl
from llm_distill.models import cache_kwarg, load_causal_lm
from llm_distill.pruning import (
    PruningPlan,
    PruningPlanError,
    check_plan,
    drop_layers,
    fresh_pruned,
    layer_shapes,
    load_pruned,
    prune,
    prune_heads,
    prune_mlp,
    save_pruned,
)

VOCAB = 61
ATOL = 1e-5
# Independent of the library's table: block -> (output projection, MLP down projection, its module paths).
O_PROJ = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj", "bert": "attention.output.dense",
          "distilbert": "attention.out_lin"}
DOWN = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "bert": "output.dense", "distilbert": "ffn.lin2"}
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer",
          "distilbert": "distilbert.transformer.layer"}
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
FAMILIES = DECODERS + ["bert", "distilbert"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models of a few thousand parameters gain nothing from threads; on 2 busy cores 2 threads make the file 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(name: str, seed: int = 0, layers: int = 3, **overrides):
    """Hidden 32, 4 query heads (GQA: 2 KV heads) of 8, MLP 24, a few thousand parameters, eval mode, fp32."""
    gqa = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    configs = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**gqa)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**gqa, sliding_window=None)),
        # sliding window 4 < the test sequences, on the layers >= 1: layer_types must stay aligned after drops
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**gqa, use_sliding_window=True, sliding_window=4,
                                                      max_window_layers=1)),
        # head_dim 16 != hidden / heads, q/k norms over head_dim
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**gqa, head_dim=16)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=layers, n_inner=24, vocab_size=VOCAB,
                                                   n_positions=64)),
        "bert": lambda: BertForMaskedLM(BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=layers,
                                                   intermediate_size=24, vocab_size=VOCAB, max_position_embeddings=64)),
        "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(dim=32, n_heads=4, n_layers=layers, hidden_dim=24,
                                                                     vocab_size=VOCAB, max_position_embeddings=64)),
    }
    torch.manual_seed(seed)
    model = configs[name]()
    for key, value in overrides.items():
        setattr(model.config, key, value)
    with torch.no_grad():  # some inits leave biases / norms at 0 / 1: randomise so every slice is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def kind(model) -> str:
    t = model.config.model_type
    return "llama" if t in ("llama", "mistral", "qwen2", "qwen3") else t


def masked_reference(model, heads=None, neurons=None, layers=()):
    """A copy of the unpruned model whose removed heads / neurons contribute zero and removed layers are skipped."""
    ref = copy.deepcopy(model)
    k = kind(ref)
    blocks = ref.get_submodule(LAYERS[k])
    head_dim = layer_shapes(ref)[0].head_dim

    def zero(indices, unit):
        def hook(module, args):
            x = args[0].clone()
            for i in indices:
                x[..., i * unit:(i + 1) * unit] = 0
            return (x, *args[1:])
        return hook

    for layer, idx in (heads or {}).items():
        blocks[layer].get_submodule(O_PROJ[k]).register_forward_pre_hook(zero(idx, head_dim))
    for layer, idx in (neurons or {}).items():
        blocks[layer].get_submodule(DOWN[k]).register_forward_pre_hook(zero(idx, 1))
    for layer in layers:
        seen = {}
        blocks[layer].register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.update(x=a[0] if a else kw["hidden_states"]),
                                                with_kwargs=True)
        blocks[layer].register_forward_hook(
            lambda m, a, out, seen=seen: (seen["x"], *out[1:]) if isinstance(out, tuple) else seen["x"])
    return ref


def batch(seed: int = 1, b: int = 3, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_close_on_valid(a, b, mask):
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], atol=ATOL, rtol=0)


def assert_equivalent(pruned, reference):
    inputs = batch()
    assert_close_on_valid(outputs(pruned, inputs), outputs(reference, inputs), inputs["attention_mask"])
    if pruned.config.model_type in DECODERS:
        assert_cached_decoding_matches(pruned, reference)


def assert_cached_decoding_matches(pruned, reference, prompt: int = 5, t: int = 10):
    """Prefill ``prompt`` tokens, then one token at a time through the KV cache == the reference's full forward."""
    ids = batch(seed=3, b=2, t=t)["input_ids"]
    full = outputs(reference, {"input_ids": ids})
    with torch.no_grad():
        cache = {cache_kwarg(pruned): DynamicCache(config=pruned.config)}  # filled in place, call after call
        out = pruned(input_ids=ids[:, :prompt], use_cache=True, **cache)
        steps = [out.logits[:, -1]]
        for i in range(prompt, t - 1):
            out = pruned(input_ids=ids[:, i:i + 1], use_cache=True, **cache)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt - 1:t - 1], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_heads_equal_masked_original(name):
    model = tiny_model(name)
    gqa = model.config.model_type in ("llama", "mistral", "qwen2", "qwen3")
    heads = {0: [0, 1], 2: [2, 3]} if gqa else {0: [1], 1: [0, 2, 3], 2: [3]}  # GQA: whole groups
    reference = masked_reference(model, heads=heads)
    prune_heads(model, heads)
    assert [s.num_attention_heads for s in layer_shapes(model)] == ([2, 4, 2] if gqa else [3, 1, 3])
    assert_equivalent(model, reference)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_gqa_per_group_keeps_every_kv_head(name):
    model = tiny_model(name)
    heads = {0: [1, 2], 1: [0, 3]}  # one query head from each of the 2 KV groups
    reference = masked_reference(model, heads=heads)
    prune_heads(model, heads, gqa="per_group")
    shapes = layer_shapes(model)
    assert [(s.num_attention_heads, s.num_key_value_heads) for s in shapes] == [(2, 2), (2, 2), (4, 2)]
    assert model.model.layers[0].self_attn.num_key_value_groups == 1
    assert_equivalent(model, reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_mlp_equals_masked_original(name):
    model = tiny_model(name)
    neurons = {0: list(range(0, 24, 2)), 1: [5], 2: list(range(20))}
    reference = masked_reference(model, neurons=neurons)
    prune_mlp(model, neurons)
    assert [s.intermediate_size for s in layer_shapes(model)] == [12, 23, 4]
    assert_equivalent(model, reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_dropped_layers_equal_skipped_layers_and_are_renumbered(name):
    model = tiny_model(name, layers=4)
    layer_types = getattr(model.config, "layer_types", None)
    reference = masked_reference(model, layers=[1, 2])
    drop_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.get_submodule(LAYERS[kind(model)])) == 2
    for new_idx, block in enumerate(model.get_submodule(LAYERS[kind(model)])):
        assert all(m.layer_idx == new_idx for m in block.modules() if hasattr(m, "layer_idx"))
    if layer_types is not None:  # Qwen2: full, sliding, sliding, sliding -> full, sliding
        assert model.config.layer_types == [layer_types[0], layer_types[3]]
    assert_equivalent(model, reference)


@pytest.mark.parametrize("name", DECODERS)
def test_combined_plan_with_cache(name):
    model = tiny_model(name, layers=4)
    gqa = name not in ("gpt2",)
    plan = PruningPlan(heads={0: [2, 3], 3: [0, 1]} if gqa else {0: [2], 3: [0, 1]}, neurons={0: [1, 2], 2: [0]},
                       layers=[1])
    reference = masked_reference(model, heads=plan.heads, neurons=plan.neurons, layers=plan.layers)
    prune(model, plan)
    assert_equivalent(model, reference)


def test_eager_attention_matches_too():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    heads = {1: [2, 3]}
    reference = masked_reference(model, heads=heads)
    prune_heads(model, heads)
    assert_equivalent(model, reference)


# ------------------------------------------------------------------------------------------ dtype, device, grads


def test_bf16_stays_bf16_and_requires_grad_is_kept():
    model = tiny_model("llama").to(torch.bfloat16)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    prune(model, PruningPlan(heads={0: [0, 1]}, neurons={0: [3]}, layers=[2]))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert model.model.layers[0].mlp.gate_proj.weight.requires_grad
    loss = model(**batch(), labels=batch()["input_ids"]).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.shape == (16, 32)


# ------------------------------------------------------------------------------------------ invalid plans


@pytest.mark.parametrize("plan, message", [
    (PruningPlan(heads={5: [0]}), r"heads: layer 5 does not exist"),
    (PruningPlan(heads={0: [4]}), r"heads\[0\]: index \[4\] out of range 0..3"),
    (PruningPlan(heads={0: [0, 1, 2, 3]}), r"removing all 4 leaves the layer empty"),
    (PruningPlan(heads={0: [0]}), r"gqa=groups removes whole KV groups of 2 query heads"),
    (PruningPlan(heads={0: [0, 1]}, gqa="per_group"), r"groups lose \[2, 0\]"),
    (PruningPlan(neurons={1: [3, 3]}), r"repeated index"),
    (PruningPlan(layers=[0, 1, 2]), r"removing all 3 layers"),
    (PruningPlan(layers=[-1]), r"layer \[-1\] out of range"),
    (PruningPlan(gqa="some"), r"gqa='some'"),
])
def test_invalid_plans_raise_before_anything_changes(plan, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    valid_part = PruningPlan(neurons={2: [0, 1]}, layers=[1])  # a valid part in the same plan must not be applied
    plan = PruningPlan(heads=plan.heads, neurons={**valid_part.neurons, **plan.neurons},
                       layers=plan.layers or valid_part.layers, gqa=plan.gqa)
    with pytest.raises(PruningPlanError, match=message):
        prune(model, plan)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.config.to_dict() == config_before


def test_all_problems_are_listed_at_once():
    with pytest.raises(PruningPlanError) as err:
        prune(tiny_model("gpt2"), PruningPlan(heads={0: [9]}, neurons={7: [0]}, layers=[1, 1]))
    assert str(err.value).count("\n  - ") == 3


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                             intermediate_size=24, vocab_size=VOCAB))
    with pytest.raises(NotImplementedError, match="supports model_type .*llama.*got 'gpt_neox'"):
        drop_layers(model, [0])


def test_gpt2_scaled_by_layer_index_refuses_layer_drops():
    model = tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(PruningPlanError, match="scale_attn_by_inverse_layer_idx"):
        drop_layers(model, [0])


# ------------------------------------------------------------------------------------------ save / reload


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_uniform_plan_reloads_bit_exactly_with_plain_from_pretrained(name, tmp_path):
    model = tiny_model(name, layers=4)
    prune(model, PruningPlan(heads={i: [2, 3] for i in range(4)}, neurons={i: [0, 5, 7] for i in range(4)}, layers=[2]))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert model.config.head_dim == (16 if name == "qwen3" else 8) and model.config.intermediate_size == 21
    save_pruned(model, tmp_path)
    info = json.loads((tmp_path / "pruning.json").read_text())
    assert info["config_is_complete"] and info["plan"] is None
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    inputs = batch()
    assert torch.equal(outputs(reloaded, inputs), outputs(model, inputs))
    assert torch.equal(outputs(load_pruned(tmp_path).eval(), inputs), outputs(model, inputs))


@pytest.mark.parametrize("name", FAMILIES)
def test_non_uniform_plan_reloads_through_load_pruned_only(name, tmp_path):
    model = tiny_model(name)
    heads = {0: [0, 1]} if name in ("llama", "mistral", "qwen2", "qwen3") else {0: [1], 1: [0, 2]}
    plan = PruningPlan(heads=heads, neurons={1: [0, 1, 2], 2: [4]})
    prune(model, plan)
    save_pruned(model, tmp_path, plan)
    info = json.loads((tmp_path / "pruning.json").read_text())
    assert not info["config_is_complete"] and info["plan"]["heads"] == {str(k): v for k, v in heads.items()}
    with pytest.raises(RuntimeError, match="mismatch"):
        type(model).from_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path).eval()
    assert type(reloaded) is type(model) and layer_shapes(reloaded) == layer_shapes(model)
    inputs = batch()
    assert torch.equal(outputs(reloaded, inputs), outputs(model, inputs))
    if name in DECODERS:
        assert_cached_decoding_matches(reloaded, model)


def test_uniform_gpt2_head_pruning_needs_load_pruned(tmp_path):
    """GPT-2's config derives head_dim = n_embd / n_head, so fewer heads cannot be written into it."""
    model = tiny_model("gpt2")
    prune_heads(model, {i: [0, 1] for i in range(3)})
    assert model.config.n_head == 4  # the skeleton; the sidecar has the truth
    save_pruned(model, tmp_path)
    assert not json.loads((tmp_path / "pruning.json").read_text())["config_is_complete"]
    assert torch.equal(outputs(load_pruned(tmp_path).eval(), batch()), outputs(model, batch()))


def test_llama_head_count_not_dividing_hidden_size_uses_the_sidecar(tmp_path):
    """LlamaConfig refuses hidden_size % num_attention_heads != 0 even with head_dim set: 3 heads of a 32 width."""
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)).eval()
    prune_heads(model, {0: [1], 1: [2]})
    assert model.config.num_attention_heads == 4  # the skeleton; the shapes ride in the config and the sidecar
    save_pruned(model, tmp_path)
    assert torch.equal(outputs(load_pruned(tmp_path).eval(), batch()), outputs(model, batch()))


def test_load_pruned_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    prune_mlp(model, {0: [1]})
    save_pruned(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="up_proj"):
        load_pruned(tmp_path)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "distilbert"])
def test_prune_heads_speaks_original_indices_and_accumulates(name):
    """v4 ``prune_heads`` semantics: the second call names heads as in the original model, repeats an already-removed
    one (ignored) and adds new ones; the result equals the original with all of them masked."""
    model = tiny_model(name)
    # Llama here has GQA (2 KV groups of 2): whole groups go; the others lose heads one at a time.
    first, second = ({0: [0, 1]}, {0: [0, 1], 1: [2, 3]}) if name == "llama" else ({0: [1]}, {0: [1, 2, 0], 1: [3]})
    union = {layer: sorted(set(first.get(layer, [])) | set(second.get(layer, []))) for layer in (0, 1)}
    reference = masked_reference(model, heads=union)
    prune_heads(model, first)
    prune_heads(model, second)
    assert model.config.pruned_heads == {str(k): v for k, v in union.items()}
    assert [s.num_attention_heads for s in layer_shapes(model)] == [4 - len(union[0]), 4 - len(union[1]), 4]
    assert_equivalent(model, reference)


def test_prune_heads_original_index_out_of_range_changes_nothing():
    model = tiny_model("gpt2")
    prune_heads(model, {0: [0]})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningPlanError, match=r"heads\[0\]: head \[4\] out of range 0\.\.3 \(original numbering\)"):
        prune_heads(model, {0: [4]})  # the layer has 3 heads left, but original indices go up to 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_pruned_heads_record_survives_reload_and_follows_dropped_layers(tmp_path):
    model = tiny_model("llama", layers=3)
    prune_heads(model, {2: [2, 3]})  # KV group 1 of layer 2
    drop_layers(model, [0])  # layer 2 becomes layer 1
    assert model.config.pruned_heads == {"1": [2, 3]}
    save_pruned(model, tmp_path)  # layers now differ (4 and 2 heads): pruning.json + load_pruned
    reloaded = load_pruned(tmp_path).eval()
    assert reloaded.config.pruned_heads == {"1": [2, 3]}
    shapes = layer_shapes(reloaded)
    prune_heads(reloaded, {1: [2, 3]})  # already removed: ignored, nothing changes
    assert layer_shapes(reloaded) == shapes
    with pytest.raises(PruningPlanError, match=r"removing all 2 leaves the layer empty"):
        prune_heads(reloaded, {1: [0, 1, 3]})  # original numbering: 0 and 1 are the layer's last two heads
    reference = masked_reference(reloaded, heads={0: [0, 1]})
    prune_heads(reloaded, {0: [1, 0]})
    assert reloaded.config.pruned_heads == {"0": [0, 1], "1": [2, 3]}
    assert_equivalent(reloaded, reference)


def test_standard_config_plans_are_checked_against_the_config_class_first():
    """A uniform 3-of-4-heads Llama plan: LlamaConfig refuses hidden 32 % 3 heads, so with standard_config the plan
    fails before any weight changes and names the counts it would accept; GPT-2 cannot describe fewer heads at all."""
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningPlanError, match=r"LlamaConfig rejects 3 query heads .*nearest head counts it accepts: 2"):
        prune(model, PruningPlan(heads={0: [1], 1: [2]}), standard_config=True)
    with pytest.raises(PruningPlanError, match="layers different shapes"):
        prune(model, PruningPlan(heads={0: [1, 2]}), standard_config=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.config.num_attention_heads == 4 and getattr(model.config, "pruned_heads", None) is None
    prune(model, PruningPlan(heads={0: [1, 2], 1: [0, 3]}), standard_config=True)  # 2 heads: expressible
    assert model.config.num_attention_heads == 2 and model.config.head_dim == 8
    with pytest.raises(PruningPlanError, match="derives the head size from the hidden size"):
        check_plan(tiny_model("gpt2"), PruningPlan(heads={i: [0] for i in range(3)}), standard_config=True)
    check_plan(tiny_model("gpt2"), PruningPlan(neurons={i: [0] for i in range(3)}), standard_config=True)


def test_pruning_a_loaded_pruned_model_again(tmp_path):
    model = tiny_model("qwen2", layers=4)
    prune(model, PruningPlan(heads={0: [0, 1]}, layers=[3]))
    save_pruned(model, tmp_path / "a")
    again = load_pruned(tmp_path / "a").eval()
    reference = masked_reference(again, neurons={1: [0]}, layers=[2])
    prune(again, PruningPlan(neurons={1: [0]}, layers=[2]))
    save_pruned(again, tmp_path / "b")
    assert_equivalent(load_pruned(tmp_path / "b").eval(), reference)


def test_fresh_pruned_has_the_pruned_architecture(tmp_path):
    model = tiny_model("llama")
    prune(model, PruningPlan(heads={1: [2, 3]}, neurons={0: [0, 1]}))
    save_pruned(model, tmp_path)
    fresh = fresh_pruned(tmp_path, seed=3)
    assert layer_shapes(fresh) == layer_shapes(model)
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(fresh_pruned(tmp_path, seed=3).lm_head.weight, fresh.lm_head.weight)
    # student_init: fresh on a pruned folder (the from-scratch baseline) gets the pruned shapes, not the skeleton's
    from llm_distill.models import fresh_lm

    assert layer_shapes(fresh_lm(str(tmp_path), seed=3)) == layer_shapes(model)


# ------------------------------------------------------------------------------------------ importance


def calibration(n: int = 2):
    return [batch(seed=10 + i) for i in range(n)]


def kill_head(model, layer: int, head: int):
    """Zero a head's value rows: its output is exactly 0 whatever the input."""
    attn = model.model.layers[layer].self_attn
    kv = head // attn.num_key_value_groups
    with torch.no_grad():
        attn.v_proj.weight[kv * 8:(kv + 1) * 8] = 0


def test_dead_heads_and_neurons_score_zero():
    model = tiny_model("llama")
    kill_head(model, 1, 2)  # KV head 1 serves query heads 2 and 3
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5] = 0  # neuron 5: act(gate) * 0
    for scores in (gradient_importance(model, calibration()), activation_importance(model, calibration())):
        assert scores.heads[1][2] == 0 and scores.heads[1][3] == 0 and scores.heads[1][:2].min() > 0
        assert scores.neurons[0][5] == 0 and scores.neurons[0].sum() > 0
        assert [len(h) for h in scores.heads] == [4, 4, 4] and [len(n) for n in scores.neurons] == [24, 24, 24]


def test_gradient_importance_is_per_layer_normalised_and_matches_autograd():
    model = tiny_model("gpt2")
    scores = gradient_importance(model, calibration(1))
    for layer in scores.heads + scores.neurons:
        assert layer.norm() == pytest.approx(1.0, abs=1e-5)
    raw = gradient_importance(model, calibration(1), normalize=False)
    # d loss / d (scale of head h at layer 0) == the head's contribution: sum(grad_o_input_slice * o_input_slice)
    cache = {}
    c_proj = model.transformer.h[0].attn.c_proj
    handle = c_proj.register_forward_pre_hook(lambda m, a: cache.update(x=a[0]) or (a[0].requires_grad_(True),))
    inputs = calibration(1)[0]
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels).loss
    (grad,) = torch.autograd.grad(loss, cache["x"])
    handle.remove()
    expected = (grad * cache["x"]).unflatten(-1, (4, 8)).sum((0, 1, 3)).abs()
    torch.testing.assert_close(raw.heads[0], expected.detach(), atol=1e-6, rtol=1e-4)


def test_activation_importance_is_a_mean_norm():
    model = tiny_model("bert")
    scores = activation_importance(model, calibration(1))
    assert scores.channels.shape == (32,) and (scores.channels > 0).all()
    with torch.no_grad():  # doubling a head's value rows doubles its output norm (BERT: no RoPE / GQA)
        model.bert.encoder.layer[0].attention.self.value.weight[8:16] *= 2
        model.bert.encoder.layer[0].attention.self.value.bias[8:16] *= 2
    doubled = activation_importance(model, calibration(1))
    assert float(doubled.heads[0][1]) == pytest.approx(2 * float(scores.heads[0][1]), rel=1e-4)
    assert float(doubled.heads[0][0]) == pytest.approx(float(scores.heads[0][0]), rel=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_score_runs_on_every_family(name):
    model = tiny_model(name)
    data = calibration(1)
    for scores in (gradient_importance(model, data), activation_importance(model, data)):
        assert [h.shape for h in scores.heads] == [(4,)] * 3 and [n.shape for n in scores.neurons] == [(24,)] * 3
        assert all(torch.isfinite(h).all() and (h >= 0).all() for h in scores.heads + scores.neurons)
    for layer_scores in (block_influence(model, data), layer_removal_loss(model, data)):
        assert layer_scores.shape == (3,) and torch.isfinite(layer_scores).all()


def make_identity_layer(model, layer: int):
    """Zero the layer's output projections: its residual block returns its input unchanged."""
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_layer_importance_finds_an_identity_layer():
    model = tiny_model("llama", layers=4)
    make_identity_layer(model, 2)
    bi = block_influence(model, calibration())
    loss = layer_removal_loss(model, calibration())
    assert bi.shape == loss.shape == (4,)
    assert bi[2] == pytest.approx(0, abs=1e-6) and bi.argmin() == 2 and (bi[[0, 1, 3]] > 1e-4).all()
    assert loss[2] == pytest.approx(0, abs=1e-6) and loss.abs().argmin() == 2
    assert not model.training  # eval stays eval
    model.train()
    block_influence(model, calibration())
    assert model.training  # and train mode is restored


# ------------------------------------------------------------------------------------------ plan builder


def scores_for(model, table):
    return [torch.tensor(row, dtype=torch.float) for row in table]


def test_build_plan_uniform_groups_per_group_and_layers():
    model = tiny_model("llama", layers=3)
    heads = scores_for(model, [[1, 2, 9, 8], [5, 6, 1, 0], [3, 0, 3, 0]])
    plan = build_plan(model, head_scores=heads, keep_heads=2, gqa="groups")
    assert plan.heads == {0: [0, 1], 1: [2, 3], 2: [0, 1]}  # group sums (3, 17), (11, 1), (3, 3): first on ties
    plan = build_plan(model, head_scores=heads, keep_heads=2, gqa="per_group")
    assert plan.heads == {0: [0, 3], 1: [0, 3], 2: [1, 3]}  # the weaker head of each group
    neurons = [torch.arange(24.0), torch.arange(24.0).flip(0), torch.ones(24)]
    plan = build_plan(model, neuron_scores=neurons, mlp_width=20, layer_scores=torch.tensor([0.5, 0.1, 0.9]), drop=1)
    assert plan.layers == [1] and plan.neurons == {0: [0, 1, 2, 3], 2: [0, 1, 2, 3]}  # none planned for layer 1
    prune(model, plan)  # a built plan is always valid
    with pytest.raises(PruningPlanError, match="keep_heads=3: expected a multiple of 2"):
        build_plan(model, head_scores=heads, keep_heads=3)


def test_build_plan_global_ranking_keeps_the_total_and_one_unit_per_layer():
    model = tiny_model("gpt2", layers=3)
    heads = scores_for(model, [[9, 8, 7, 6], [0.1, 0.2, 0.3, 0.4], [5, 5, 5, 5]])
    plan = build_plan(model, head_scores=heads, keep_heads=2, uniform=False)
    kept = [4 - len(plan.heads.get(i, [])) for i in range(3)]
    assert sum(kept) == 6 and kept[1] == 1  # the weak layer keeps only its best head (never zero)
    assert plan.heads[1] == [0, 1, 2]
    with_drop = build_plan(model, head_scores=heads, keep_heads=2, uniform=False, layer_scores=torch.tensor([1, 2, 0]),
                           drop=1)
    assert with_drop.layers == [2] and sum(len(v) for v in with_drop.heads.values()) == 4  # 4 kept in 2 layers
    prune(model, plan)
    assert [s.num_attention_heads for s in layer_shapes(model)] == kept


# ------------------------------------------------------------------------------------------ the job


def test_prune_script_then_distil_the_pruned_student(saved_pair, tmp_path):
    """scripts/prune.py on a saved tiny Llama (non-uniform plan), then scripts/distill.py recovers it."""
    from llm_distill.jobs.prune import format_report
    from llm_distill.jobs.prune import main as run_pruning
    from llm_distill.jobs.distill import main as run_distillation

    out = tmp_path / "pruned"
    common = ["--dataset", str(saved_pair["train"]), "--eval_dataset", str(saved_pair["eval"]), "--max_length", "32",
              "--calibration_samples", "4", "--max_eval_samples", "4", "--batch_size", "2"]
    results = run_pruning(["--model", str(saved_pair["teacher"]), "--output_dir", str(out), "--keep_heads", "2",
                           "--mlp_width", "32", "--drop_layers", "1", "--uniform", "false", "--importance", "gradient",
                           "--layer_importance", "loss", *common])
    assert results["before"]["layers"] == 3 and results["after"]["layers"] == 2
    assert results["after"]["heads"] == 4 and results["after"]["parameters"] < results["before"]["parameters"]
    assert "perplexity" in results["after"] and "held-out perplexity" in format_report(results)
    assert (out / "tokenizer.json").exists() and json.loads((out / "prune_results.json").read_text())["plan"]
    distilled = run_distillation(
        ["--teacher_model", str(saved_pair["teacher"]), "--student_model", str(out), "--student_init", "pretrained",
         "--dataset", str(saved_pair["train"]), "--eval_dataset", str(saved_pair["eval"]), "--packing", "true",
         "--max_length", "32", "--max_train_samples", "8", "--max_eval_samples", "4", "--max_steps", "2",
         "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "distilled"), "--use_cpu", "true"])
    assert distilled["steps"] == 2
    # Trainer.save_model wrote no pruning.json, but the config carries the per-layer shapes: still loadable
    assert not (tmp_path / "distilled" / "pruning.json").exists()
    assert layer_shapes(load_causal_lm(str(tmp_path / "distilled"))) == layer_shapes(load_pruned(out))


def test_prune_script_refuses_a_head_count_the_config_rejects_before_scoring(tmp_path, monkeypatch, tiny_tokenizer):
    """keep_heads 3 of 4 on a hidden-32 Llama: LlamaConfig would reject it, so the job stops before any data is
    read or scored, naming the counts that work; --standard_config false accepts it (pruning.json sidecar)."""
    from llm_distill.jobs import prune as prune_run

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tiny_tokenizer)))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "--output_dir", str(tmp_path / "out"), "--keep_heads", "3"]
    real_data = prune_run._data
    monkeypatch.setattr(prune_run, "_data", lambda *a: pytest.fail("the data was read before the plan was checked"))
    with pytest.raises(PruningPlanError, match="nearest head counts it accepts: 2"):
        prune_run.main(args)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(prune_run, "_data", real_data)
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": t[:800]} for t in corpus()[:3]])
    results = prune_run.main([*args, "--standard_config", "false", "--dataset", str(texts), "--eval_dataset",
                                     str(texts), "--max_length", "32", "--calibration_samples", "2",
                                     "--max_eval_samples", "2", "--batch_size", "2", "--latency_repeats", "2"])
    assert results["after"]["heads_per_layer"] == 3 and results["after"]["latency_ms"] > 0
    assert layer_shapes(load_pruned(tmp_path / "out"))[0].num_attention_heads == 3


@pytest.mark.parametrize("flag, value, message", [
    ("keep_heads", "0", "keep_heads=0 is invalid"), ("drop_layers", "-1", "drop_layers=-1"),
    ("gqa", "all", "gqa='all' is invalid"), ("importance", "magic", "importance='magic'"),
    ("layer_importance", "cos", "layer_importance='cos'"), ("max_length", "1", "max_length=1"),
])
def test_prune_arguments_name_the_field(flag, value, message):
    from llm_distill.jobs.prune import parse

    with pytest.raises(ValueError, match=message):
        parse([f"--{flag}", value, "--drop_layers", "1"] if flag != "drop_layers" else [f"--{flag}", value])


def test_nothing_to_prune_is_an_error(tmp_path):
    from llm_distill.config import parse_args_and_config
    from llm_distill.jobs.prune import PruneArguments

    with pytest.raises(ValueError, match="Nothing to prune"):
        parse_args_and_config((PruneArguments,), ["--output_dir", str(tmp_path)])
