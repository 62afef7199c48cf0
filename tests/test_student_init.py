"""Student initialisation from the teacher's layers (DistilBERT's recipe) for decoders and encoders: exactly the
chosen layers are copied, the config follows, the result reloads with from_pretrained; layer selection and checks."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from llm_distill.config import ModelArguments
from llm_distill.layers import layer_stack_path
from llm_distill.models import lm_kind
from llm_distill.student_init import (
    _mapped_state_dict,
    check_teacher_layers,
    select_teacher_layers,
    student_from_teacher,
)

V = 64
TEACHERS = {  # 4-layer tiny models of each supported family, built from configs
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                                    use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(vocab_size=V, n_embd=16, n_layer=4, n_head=2, n_positions=32,
                                                 bos_token_id=0, eos_token_id=0)),
    "bert": (BertForMaskedLM, lambda: BertConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                                 num_attention_heads=2, max_position_embeddings=32)),
    "distilbert": (DistilBertForMaskedLM, lambda: DistilBertConfig(vocab_size=V, dim=16, hidden_dim=32, n_layers=4,
                                                                   n_heads=2, max_position_embeddings=32)),
}
STACKS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer",
          "distilbert": "distilbert.transformer.layer"}


def make_teacher(family, seed=0):
    cls, config = TEACHERS[family]
    torch.manual_seed(seed)
    return cls(config()).eval()


def ids(seed=0):
    return torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", TEACHERS)
def test_copies_exactly_the_chosen_layers_and_reloads(family, tmp_path):
    teacher = make_teacher(family)
    layers = [0, 3]
    student = student_from_teacher(teacher, layers)
    stack = STACKS[family]
    assert layer_stack_path(teacher) == stack and student.config.num_hidden_layers == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for key, value in s_sd.items():
        if key.startswith(stack + "."):
            idx, tail = key[len(stack) + 1:].split(".", 1)
            source = f"{stack}.{layers[int(idx)]}.{tail}"  # student block i == teacher block layers[i]
        else:
            source = key  # embeddings, final norm, head
        assert torch.equal(value, t_sd[source]), key
    for new_idx, block in enumerate(student.get_submodule(stack)):
        assert all(m.layer_idx == new_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int))
    student.save_pretrained(tmp_path)
    auto = AutoModelForMaskedLM if lm_kind(teacher.config) == "masked" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(teacher) and reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(reloaded(input_ids=ids()).logits, student(input_ids=ids()).logits)


@pytest.mark.parametrize("family", TEACHERS)
def test_keeping_every_layer_reproduces_the_teacher(family):
    teacher = make_teacher(family)
    student = student_from_teacher(teacher, [0, 1, 2, 3], verify=False)
    torch.testing.assert_close(student(input_ids=ids()).logits, teacher(input_ids=ids()).logits)


def test_per_layer_config_lists_follow_the_kept_layers():
    teacher = make_teacher("qwen2")
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = student_from_teacher(teacher, [1, 2], verify=False)
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


def test_kind_detection():
    assert [lm_kind(make_teacher(f).config) for f in TEACHERS] == ["causal", "causal", "causal", "masked", "masked"]
    assert lm_kind(BertConfig(is_decoder=True)) == "causal"


def test_layer_selection_strategies():
    assert select_teacher_layers(12, 6, "every_other") == [0, 2, 4, 6, 8, 10]
    assert select_teacher_layers(12, 6, "linspace") == [0, 2, 4, 7, 9, 11]  # DistilBERT's extract_distilbert.py list
    assert select_teacher_layers(4, 2, "linspace") == [0, 3] and select_teacher_layers(4, 1) == [3]
    assert check_teacher_layers([0, 2, 3], 4) == [0, 2, 3]
    for bad in ([], [2, 1], [0, 4], [-1, 2], [1, 1]):
        with pytest.raises(ValueError, match="increasing list of teacher layer indices in \\[0, 3\\]"):
            check_teacher_layers(bad, 4)
    with pytest.raises(ValueError, match="student_num_layers=5"):
        select_teacher_layers(4, 5)


@pytest.mark.parametrize("kw, message", [
    (dict(student_init="teacher_layers", student_layers=[2, 0]), "student_layers=\\[2, 0\\] is invalid"),
    (dict(student_init="pretrained", student_layers=[0, 2]), "only applies to student_init=teacher_layers"),
    (dict(student_init="teacher_layers", student_layers=[0, 2], student_num_layers=3), "disagrees"),
])
def test_student_layers_argument_is_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelArguments(**kw)


def test_unknown_layout_is_refused_naming_the_supported_ones():
    teacher = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=16, d_ff=32, num_layers=2, num_heads=2,
                                                  d_kv=8))
    with pytest.raises(ValueError, match="cannot tell which ModuleList.*bert.encoder.layer \\(BERT\\)"):
        student_from_teacher(teacher, [0])


def test_strict_copy_names_what_does_not_map():
    teacher = make_teacher("llama").state_dict()
    student = student_from_teacher(make_teacher("llama"), [0, 1], verify=False).state_dict()
    extra = dict(teacher, **{"model.extra_norm.weight": torch.ones(16)})
    with pytest.raises(ValueError, match="teacher weights not copied \\['model.extra_norm.weight'\\]"):
        _mapped_state_dict(extra, student, "model.layers.", [0, 1])
    wrong = dict(teacher, **{"model.norm.weight": torch.ones(8)})
    with pytest.raises(ValueError, match="model.norm.weight <- model.norm.weight"):
        _mapped_state_dict(wrong, student, "model.layers.", [0, 1])
