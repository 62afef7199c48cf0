"""The package's shape, checked: no import cycles, short functions, blocks that never reach up into jobs, and every
script and verb answering ``--help``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "llm_distill"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every ``llm_distill`` module ``path`` imports, at module level or inside functions. ``from pkg import name``
    counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "llm_distill"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "llm_distill":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert len(MODULES) > 20 and GRAPH["llm_distill.trainer"], "the import graph was not read"
    assert _cycles(GRAPH) == []


def test_building_blocks_never_import_jobs_or_the_embedded_default():
    """Jobs use blocks, blocks never reach up; ``embedded:`` names are resolved where a job starts, so no block
    imports the embedded default (it is the jobs' business)."""
    offenders = []
    for name, imported in GRAPH.items():
        if name.startswith(("llm_distill.jobs", "llm_distill.console", "llm_distill.__main__")) or name == "llm_distill":
            continue
        for target in imported:
            if target.startswith("llm_distill.jobs") or (
                    target.startswith("llm_distill.embedded") and not name.startswith("llm_distill.embedded")):
                offenders.append(f"{name} -> {target}")
    assert offenders == []


def test_no_function_longer_than_80_lines():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


SCRIPTS = sorted(p.name for p in (REPO_ROOT / "scripts").glob("*.py"))


def _run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each one mostly waits on imports), then collect them."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen(c, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_every_script_and_every_verb_answers_help():
    from llm_distill.console import VERBS

    scripts = [[sys.executable, f"scripts/{name}", "--help"] for name in SCRIPTS]
    verbs = [[sys.executable, "-m", "llm_distill", verb, "--help"] for verb in VERBS]
    results = _run_all([[sys.executable, "-m", "llm_distill", "--help"], *scripts, *verbs])
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args[1:])} exited {r.returncode}:\n{r.stderr[-2000:]}"
        assert "usage:" in r.stdout and "Traceback" not in r.stderr, f"{' '.join(r.args[1:])}: {r.stdout[:300]}"
    top = results[0].stdout
    assert all(verb in top for verb in VERBS)
    by_verb = dict(zip(VERBS, results[1 + len(scripts):]))
    assert "--mlm_probability" in by_verb["distill"].stdout and "--keep_heads" in by_verb["prune"].stdout
    assert "--top_k" in by_verb["store-logits"].stdout and "--prompts" in by_verb["generate"].stdout


def test_unknown_verb_is_one_clear_error(capsys):
    from llm_distill.console import main

    assert main(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'distil'" in err and "distill" in err
