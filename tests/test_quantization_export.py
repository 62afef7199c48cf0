"""torchao int8 PTQ saved and reloaded, QAT fake-quant == the converted model, ONNX export parity and greedy text."""

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from llm_distill import DistillationCollator, DistillationConfig, DistillationTrainer  # noqa: E402
from llm_distill.export import OnnxCausalLM, export_onnx  # noqa: E402
from llm_distill.footprint import count_parameters, file_size  # noqa: E402
from llm_distill.quantization import QAT_METHOD, is_fake_quantized, prepare_qat, quantize_pretrained  # noqa: E402
from test_trainer import token_dataset  # noqa: E402


def _ids(vocab, shape=(2, 16), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic"])
def test_int8_ptq_reloads_and_gives_the_saved_outputs(llama_factory, tmp_path, method):
    model = llama_factory(seed=3, hidden_size=64, intermediate_size=128)
    model.save_pretrained(tmp_path / "fp32")
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        fp32 = model(ids).logits
        quantized = quantize_pretrained(tmp_path / "fp32", tmp_path / "q", method)
        saved = quantized(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        again = reloaded(ids).logits
    assert torch.equal(again, saved)  # from_pretrained reads back exactly what was saved
    assert type(reloaded.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"  # still int8 after reload
    assert not torch.equal(saved, fp32) and (saved - fp32).abs().max() < 0.05 * fp32.abs().max()
    assert (saved.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.9
    assert file_size(tmp_path / "q") < file_size(tmp_path / "fp32")
    assert count_parameters(reloaded)["parameters"] == count_parameters(model)["parameters"]


def test_qat_trains_fake_quantized_and_converts_to_the_same_outputs(tiny_tokenizer, llama_factory, tmp_path):
    student = prepare_qat(llama_factory(seed=2), "int8")
    assert is_fake_quantized(student) and type(student.lm_head).__name__ == "Linear"  # the head stays fp32
    args = DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                              learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True, alpha=1.0,
                              dataloader_num_workers=0, qat="int8")
    trainer = DistillationTrainer(model=student, teacher_model=llama_factory(seed=1, num_hidden_layers=3), args=args,
                                  train_dataset=token_dataset(tiny_tokenizer),
                                  data_collator=DistillationCollator(tiny_tokenizer), processing_class=tiny_tokenizer)
    before = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, student.model.layers[0].self_attn.q_proj.weight)  # it trained
    trainer.save_model(str(tmp_path / "fp32"))  # plain fp32 weights: the fake quantizers hold no state
    ids = _ids(student.config.vocab_size)
    with torch.no_grad():
        fake = student.eval()(ids).logits
        converted = quantize_pretrained(tmp_path / "fp32", tmp_path / "int8", QAT_METHOD["int8"])(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8")(ids).logits
    assert torch.allclose(converted, fake, atol=1e-5)  # what QAT trained is what ships
    assert torch.equal(reloaded, converted)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    from conftest import make_llama

    model = make_llama(tiny_tokenizer, seed=4)
    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(model, folder)
    return model, OnnxCausalLM(folder, threads=1)


@pytest.mark.parametrize("shape", [(2, 16), (1, 5), (3, 40)])
def test_onnx_logits_match_pytorch(exported, shape):
    model, onnx = exported
    ids = _ids(model.config.vocab_size, shape, seed=shape[1])
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    diff = abs(onnx.logits(ids.numpy()) - expected).max()
    assert diff <= 1e-4, diff


def test_onnx_greedy_generation_with_kv_cache_matches_pytorch(exported):
    model, onnx = exported
    prompt = _ids(model.config.vocab_size, (1, 8), seed=7)
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                  min_new_tokens=24, do_sample=False, pad_token_id=0)
    got = onnx.generate(prompt.numpy(), 24)
    assert got.shape == (1, 32)
    assert got.tolist() == expected.tolist()


def test_distill_job_with_qat_writes_the_int8_student(saved_pair, tmp_path):
    from llm_distill.config import DataArguments, ModelArguments, config_from_dict
    from llm_distill.jobs.distill import run_distillation

    values = {"teacher_model": str(saved_pair["teacher"]), "student_model": str(saved_pair["student"]),
              "dataset": str(saved_pair["train"]), "eval_dataset": str(saved_pair["eval"]), "max_length": 32,
              "packing": True, "max_train_samples": 8, "output_dir": str(tmp_path / "out"), "max_steps": 2,
              "per_device_train_batch_size": 4, "report_to": "none", "save_strategy": "no", "use_cpu": True,
              "alpha": 1.0, "qat": "int8", "target_sparsity": 0.5, "sparsity_end_step": 1, "sparsity_every": 1}
    results = run_distillation(*config_from_dict((ModelArguments, DataArguments, DistillationConfig), values))
    assert results["qat"] == "int8" and results["sparsity"] == pytest.approx(0.5, abs=1e-3)
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    int8 = AutoModelForCausalLM.from_pretrained(results["quantized_dir"])
    assert type(int8.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert file_size(results["quantized_dir"]) < file_size(tmp_path / "out")
    ids = _ids(fp32.config.vocab_size)
    with torch.no_grad():
        assert not torch.equal(int8(ids).logits, fp32(ids).logits)
    assert count_parameters(int8)["nonzeros"] <= count_parameters(fp32)["nonzeros"]  # the zeros survive int8


def test_quantizing_embeddings_and_head_too_shrinks_the_file_further(llama_factory, tmp_path):
    model = llama_factory(seed=3, hidden_size=64, intermediate_size=128)
    model.save_pretrained(tmp_path / "fp32")
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        fp32 = model(ids).logits
        saved = quantize_pretrained(tmp_path / "fp32", tmp_path / "q", "int8_weight_only", embeddings=True)(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        assert torch.equal(reloaded(ids).logits, saved)
    assert type(reloaded.lm_head.weight).__name__ != "Parameter"
    assert type(reloaded.model.embed_tokens.weight).__name__ != "Parameter"
    assert (saved - fp32).abs().max() < 0.05 * fp32.abs().max()
    linear_only = quantize_pretrained(tmp_path / "fp32", tmp_path / "q_linear", "int8_weight_only")
    assert type(linear_only.lm_head.weight).__name__ == "Parameter"  # transformers' default: head stays fp32
    assert file_size(tmp_path / "q") < 0.75 * file_size(tmp_path / "q_linear")
