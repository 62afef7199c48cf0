"""``--config file.yaml`` sets defaults, the command line overrides them, unknown keys are errors.

The same contract as TRL's ``TrlParser.parse_args_and_config``: a YAML file is the readable record of a
run, and a flag on the command line wins over it. A key that no dataclass knows fails with the closest
valid names, because a silently ignored typo (``temprature: 4``) is the worst kind of bug in a config.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
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


def parse_args_and_config(dataclass_types, argv: list[str] | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into one instance per dataclass type.

    Returns a tuple in the order of ``dataclass_types``. ``--config`` may appear anywhere in ``argv``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
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
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *instances, remaining = outputs
    remaining = [r for r in remaining if r]
    if remaining:
        raise ConfigError(f"Unknown command-line argument(s): {' '.join(remaining)}. Run with --help for every field.")
    # Drop the namespace entry for --config (HfArgumentParser returns it as an extra namespace when present).
    instances = [inst for inst in instances if type(inst) in dataclass_types]
    return tuple(instances)
