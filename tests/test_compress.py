"""``llm-distill compress`` end to end on a miniature config: every stage saved, scored and tabulated."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from llm_distill.jobs.compress import CompressArguments, format_table, main, run_compression  # noqa: E402
from llm_distill.sparsity import prunable_weights, sparsity_report  # noqa: E402


def _miniature(tmp_path, saved_pair):
    (tmp_path / "prune.yaml").write_text(
        f"keep_heads: 2\ndrop_layers: 1\ngqa: groups\nimportance: activation\ndataset: {saved_pair['train']}\n"
        "calibration_samples: 4\nmax_length: 32\nbatch_size: 2\n")
    (tmp_path / "distill.yaml").write_text(
        f"dataset: {saved_pair['train']}\npacking: true\nmax_length: 32\nmax_train_samples: 16\nalpha: 1.0\n"
        "per_device_train_batch_size: 4\nlearning_rate: 1.0e-2\nuse_cpu: true\ndataloader_num_workers: 0\n")
    return ["--teacher", str(saved_pair["teacher"]), "--student", str(saved_pair["student"]),
            "--output_dir", str(tmp_path / "out"), "--prune_config", str(tmp_path / "prune.yaml"),
            "--distill_config", str(tmp_path / "distill.yaml"), "--distill_steps", "4", "--sparsify_steps", "8",
            "--eval_dataset", str(saved_pair["eval"]), "--max_eval_samples", "4", "--max_length", "32",
            "--new_tokens", "4", "--prompt_tokens", "4", "--latency_repeats", "1",
            "--results_json", str(tmp_path / "compress.json"), "--plot", str(tmp_path / "compress.png")]


@pytest.mark.slow
def test_compress_runs_every_stage_end_to_end(tmp_path, saved_pair, capsys):
    results = main(["--config", "configs/compress.yaml", *_miniature(tmp_path, saved_pair)])
    rows = {r["stage"]: r for r in results["rows"]}
    assert list(rows) == ["teacher", "prune", "distill", "sparsify unstructured 50%", "torchao int8_weight_only",
                          "torchao int8_dynamic", "torchao int8_weight_only+emb", "onnx fp32",
                          "onnx int8 (ort dynamic)"]
    out = tmp_path / "out"
    for folder in ("1-prune", "2-distill", "3-sparsify", "4-quantize-int8_weight_only", "5-export-onnx"):
        assert (out / folder).is_dir(), folder
    assert rows["prune"]["parameters"] < rows["teacher"]["parameters"]
    sparse = AutoModelForCausalLM.from_pretrained(out / "3-sparsify")
    assert sparsity_report(sparse)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    linear = sum(w.numel() for w in prunable_weights(sparse).values())
    assert rows["sparsify unstructured 50%"]["nonzeros"] == pytest.approx(
        rows["distill"]["nonzeros"] - linear // 2, abs=linear * 0.002)
    assert rows["torchao int8_weight_only"]["file_bytes"] < rows["sparsify unstructured 50%"]["file_bytes"]
    assert rows["torchao int8_weight_only+emb"]["file_bytes"] < rows["torchao int8_weight_only"]["file_bytes"]
    # ONNX parity shows up in the table: same held-out perplexity and agreement as the model it was exported from
    assert rows["onnx fp32"]["perplexity"] == pytest.approx(rows["sparsify unstructured 50%"]["perplexity"], rel=1e-5)
    assert rows["onnx fp32"]["nonzeros"] == rows["sparsify unstructured 50%"]["nonzeros"]
    for row in results["rows"]:
        assert row["perplexity"] > 1 and 0 <= row["top1_agreement"] <= 1 and row["file_bytes"] > 0
        assert all(v > 0 for v in row["tokens_per_s"].values())
    assert json.loads((tmp_path / "compress.json").read_text())["rows"][0]["stage"] == "teacher"
    assert (tmp_path / "compress.png").stat().st_size > 10_000
    table = format_table(results["rows"])
    assert table.count("\n| ") == len(rows) + 1


def test_a_subset_runs_in_pipeline_order(tmp_path, saved_pair):
    argv = _miniature(tmp_path, saved_pair)
    from llm_distill.jobs.compress import parse

    args = parse(["--config", "configs/compress.yaml", *argv, "--stages", "quantize", "distill", "--quantize",
                  "int8_dynamic", "--latency_repeats", "0", "--plot", "", "--learning_rate", "1e-2",
                  "--distill_steps", "8"])
    assert args.stages == ["distill", "quantize"]
    results = run_compression(args)
    assert [r["stage"] for r in results["rows"]] == ["teacher", "student (start)", "distill", "torchao int8_dynamic"]
    assert results["rows"][1]["perplexity"] > results["rows"][2]["perplexity"]  # distillation helped


def test_bad_stage_is_one_clear_error():
    with pytest.raises(ValueError, match="stages"):
        CompressArguments(stages=["prune", "distil"])
    with pytest.raises(ValueError, match="quantize"):
        CompressArguments(quantize=["int3"])
    assert torch.get_num_threads() >= 1
