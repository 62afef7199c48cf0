"""Configs: every YAML in configs/ parses, unknown keys fail with suggestions, ranges name the field."""

import re
from pathlib import Path

import pytest
import yaml

from llm_distill.config import ConfigError, parse_args_and_config
from llm_distill.config import DataArguments, DistillationConfig, ModelArguments
from llm_distill.jobs.distill import parse

from conftest import REPO_ROOT

RUN_CONFIGS = (sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml"))
               + sorted((REPO_ROOT / "configs" / "real").glob("*.yaml")))  # real: the `real` extra's model
ACCELERATE_CONFIGS = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))
TYPES = (ModelArguments, DataArguments, DistillationConfig)


def _script_of(path: Path) -> str:
    """The script a run config is for: the ``scripts/<name>.py`` of the header line that names this file
    (``--config configs/<file>``), else the first script the header names."""
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    for line in header:  # "scripts/<name>.py --config configs/<this file>": the script that reads this file
        match = re.search(r"scripts/(\w+)\.py --config \S*" + re.escape(path.name), line)
        if match:
            return match.group(1)
    for line in header:
        match = re.search(r"scripts/(\w+)\.py", line)
        if match:
            return match.group(1)
    raise AssertionError(f"{path.name}: the header comment must give the command that runs it (scripts/...py)")


def _dataclasses_for(script: str):
    """The dataclasses the named script parses its config into (a script without an entry fails the test)."""
    from llm_distill.generation import GenerateArguments
    from llm_distill.jobs.bench_speculative import BenchArguments
    from llm_distill.jobs.compress import CompressArguments
    from llm_distill.jobs.distillspec import DistillSpecArguments
    from llm_distill.jobs.prune import PruneArguments

    parsers = {"distill": TYPES, "generate": (GenerateArguments,), "prune": (PruneArguments,),
               "compress": (CompressArguments,), "bench_speculative": (BenchArguments,),
               "distillspec": (DistillSpecArguments,)}
    assert script in parsers, f"no parser known for scripts/{script}.py: add it to _dataclasses_for"
    return parsers[script]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_parses(path, tmp_path):
    types = _dataclasses_for(_script_of(path))
    extra = ["--output_dir", str(tmp_path), "--use_cpu", "true"] if types == TYPES else []
    instances = parse_args_and_config(types, ["--config", str(path), *extra])
    assert len(instances) == len(types)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert isinstance(yaml.safe_load(path.read_text()), dict)
    load_config_from_file(str(path))
    assert "accelerate launch" in path.read_text(), f"{path.name}: the header comment must give the launch command"


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("temprature: 2.0\nalpha: 0.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key\(s\) 'temprature' \(did you mean temperature"):
        parse_args_and_config(TYPES, ["--config", str(cfg)])


def test_unknown_cli_flag_is_an_error():
    with pytest.raises(ConfigError, match=r"Unknown command-line argument\(s\): --not_a_field 1\. Run with --help"):
        parse_args_and_config(TYPES, ["--output_dir", "x", "--not_a_field", "1"])


def test_cli_overrides_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("temperature: 2.0\nalpha: 0.25\noutput_dir: a\n")
    _, _, train = parse_args_and_config(TYPES, ["--config", str(cfg), "--temperature", "4"])
    assert train.temperature == 4.0 and train.alpha == 0.25


def test_default_config_is_used_without_config_flag():
    model, data, train = parse(["--output_dir", "x"])
    assert model.teacher_model == "embedded:teacher" and data.max_train_samples == 256 and train.max_steps == 300


@pytest.mark.parametrize(
    "field, value, message",
    [("temperature", "0", "temperature=0.0 is invalid"), ("alpha", "1.5", "alpha=1.5 is invalid"),
     ("loss_type", "kl", "loss_type='kl' is invalid: expected one of forward_kl"),
     ("jsd_beta", "-0.1", "jsd_beta=-0.1"), ("skew_lambda", "1.0", "skew_lambda=1.0"),
     ("student_init", "magic", "student_init='magic'"), ("max_length", "1", "max_length=1")],
)
def test_range_checks_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        parse_args_and_config(TYPES, ["--output_dir", "x", f"--{field}", value])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args_and_config(TYPES, ["--config", str(tmp_path / "none.yaml")])
