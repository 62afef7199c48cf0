"""One command for multi-process runs: ``accelerate launch`` with a free port, and real CPU ranks.

    python -m llm_distill.launch --cpu-processes 2 scripts/distill.py --max_steps 20      # 2 gloo ranks, no GPU
    python -m llm_distill.launch --config_file configs/accelerate/fsdp2.yaml scripts/distill.py   # GPU configs

Why it exists: ``accelerate launch --cpu --num_processes 2`` silently starts ONE process (``--cpu`` selects
the single-process launcher), and an accelerate config with ``distributed_type: MULTI_CPU`` does the same.
What really starts N gloo ranks on CPU is::

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port <free port> script.py ...

which is exactly what ``--cpu-processes N`` runs. Every other launch gets a free ``--main_process_port``
unless one is given (two jobs on one machine otherwise collide on 29500), and anything else before the
script is passed to ``accelerate launch`` unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from llm_distill.distributed import free_port

logger = logging.getLogger(__name__)


def build_command(script: str, script_args: list[str], cpu_processes: int | None = None,
                  accelerate_args: list[str] | None = None, port: int | None = None) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line and environment for ``script``; see the module docstring."""
    accelerate_args = list(accelerate_args or [])
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cpu_processes is not None:
        if cpu_processes < 1:
            raise ValueError(f"--cpu-processes={cpu_processes} is invalid: expected an integer >= 1.")
        env["ACCELERATE_USE_CPU"] = "1"  # gloo on CPU; --cpu would pick the single-process launcher instead
        threads = max(1, (os.cpu_count() or 1) // cpu_processes)  # don't oversubscribe the cores
        cmd += ["--multi_gpu", "--num_processes", str(cpu_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads)]
    if port is not None or not _port_is_set(accelerate_args):
        # Multi-node jobs need the port every node agrees on (the config's); single-node ones just a free one.
        accelerate_args += ["--main_process_port", str(port or free_port())]
    cmd += [*accelerate_args, script, *script_args]
    return cmd, env


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _port_is_set(accelerate_args: list[str]) -> bool:
    """True when the port must be left alone: given on the command line or in the config file, or multi-node."""
    if _option(accelerate_args, "--main_process_port") is not None:
        return True
    machines = _option(accelerate_args, "--num_machines")
    config_file = _option(accelerate_args, "--config_file")
    config = {}
    if config_file is not None and os.path.isfile(config_file):
        import yaml

        config = yaml.safe_load(open(config_file, encoding="utf-8")) or {}
    machines = int(machines if machines is not None else config.get("num_machines", 1) or 1)
    return machines > 1 or config.get("main_process_port") is not None


def launch(script: str, script_args: list[str] | None = None, cpu_processes: int | None = None,
           accelerate_args: list[str] | None = None, timeout: float | None = None, capture_output: bool = False,
           env: dict | None = None, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run ``script`` under ``accelerate launch`` and wait (like ``subprocess.run``; ``env`` adds variables).

    When ``timeout`` expires the launcher gets SIGTERM, on which torch's elastic agent stops every rank (they
    run in their own sessions: ``subprocess.run``'s SIGKILL of the launcher would orphan hung ranks)."""
    cmd, full_env = build_command(script, list(script_args or []), cpu_processes, accelerate_args)
    full_env.update(env or {})
    prefix = "ACCELERATE_USE_CPU=1 " if cpu_processes else ""
    logger.info("Launching: %saccelerate launch %s", prefix, " ".join(cmd[3:]))
    if capture_output:
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, env=full_env, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # timeout or Ctrl-C: stop the launcher so that it stops its ranks
        _stop(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], str, list[str]]:
    """Split argv into our options, accelerate's options, the script and the script's arguments."""
    script_at = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    if script_at is None and any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    if script_at is None:
        raise SystemExit("usage: python -m llm_distill.launch [--cpu-processes N] [accelerate launch options] "
                         "SCRIPT.py [script args]\n(no SCRIPT.py found in the arguments)")
    parser = argparse.ArgumentParser(prog="python -m llm_distill.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-processes", type=int, default=None,
                        help="Start this many real gloo ranks on CPU (no GPU needed).")
    ours, accelerate_args = parser.parse_known_args(argv[:script_at])
    return ours, accelerate_args, argv[script_at], argv[script_at + 1:]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    ours, accelerate_args, script, script_args = parse(sys.argv[1:] if argv is None else argv)
    return launch(script, script_args, ours.cpu_processes, accelerate_args).returncode


if __name__ == "__main__":
    sys.exit(main())
