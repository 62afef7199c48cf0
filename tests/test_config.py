"""Configs: every YAML in configs/ parses, unknown keys fail with suggestions, ranges name the field."""

from pathlib import Path

import pytest
import yaml

from llm_distill.cli import ConfigError, parse_args_and_config
from llm_distill.config import DataArguments, DistillationConfig, ModelArguments
from llm_distill.run import parse

from conftest import REPO_ROOT

RUN_CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))
TYPES = (ModelArguments, DataArguments, DistillationConfig)


def _dataclasses_for(path: Path):
    """Run configs of other jobs (generation, pruning, ...) declare their dataclasses in a `# parser:` header."""
    for line in path.read_text().splitlines()[:15]:
        if line.startswith("# parser:"):
            module, _, names = line.split(":", 1)[1].strip().partition(" ")
            import importlib

            mod = importlib.import_module(module)
            return tuple(getattr(mod, n) for n in names.split(","))
    return TYPES


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_parses(path, tmp_path):
    instances = parse_args_and_config(_dataclasses_for(path), ["--config", str(path), "--output_dir", str(tmp_path), "--use_cpu", "true"]
                                      if _dataclasses_for(path) == TYPES else ["--config", str(path)])
    assert instances
    header = path.read_text().splitlines()[:12]
    assert any("scripts/" in line for line in header), f"{path.name}: the header comment must give the command"


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
    with pytest.raises((ConfigError, SystemExit)):
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
