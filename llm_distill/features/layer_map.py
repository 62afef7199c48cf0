"""Which student layer learns from which teacher layer: ``"0:1,1:3"`` (student:teacher, 0-based block indices,
negative = from the end) or ``"uniform"`` (TinyBERT's ``g(m) = m * Lt / Ls``: student block ``i`` <- teacher block
``(i + 1) * Lt // Ls - 1``, so the last blocks are always paired)."""

from __future__ import annotations

import re

_PAIR = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_pairs(spec: str, field: str = "hidden_layer_map") -> list[tuple[int, int]]:
    """``"0:1, 1:3"`` -> ``[(0, 1), (1, 3)]``; a clear error naming ``field`` otherwise."""
    pairs = []
    for part in spec.split(","):
        match = _PAIR.match(part)
        if not match:
            raise ValueError(f"{field}={spec!r}: {part.strip()!r} is not 'student_layer:teacher_layer'. Use e.g. "
                             f"'0:1,1:3' (0-based block indices, negative from the end)"
                             + (" or 'uniform'." if field == "hidden_layer_map" else "."))
        pairs.append((int(match[1]), int(match[2])))
    return pairs


def check_spec(spec: str, field: str = "hidden_layer_map") -> None:
    """Syntax only (the layer counts are known once the models are loaded)."""
    if not (field == "hidden_layer_map" and spec.strip() == "uniform"):
        parse_pairs(spec, field)


def resolve_pairs(spec: str, n_student: int, n_teacher: int, field: str = "hidden_layer_map") -> list[tuple[int, int]]:
    """The map as non-negative ``(student block, teacher block)`` pairs, each index checked against the depths."""
    if field == "hidden_layer_map" and spec.strip() == "uniform":
        return [(i, (i + 1) * n_teacher // n_student - 1) for i in range(n_student)]
    resolved = []
    for s, t in parse_pairs(spec, field):
        for index, n, who in ((s, n_student, "student"), (t, n_teacher, "teacher")):
            if not -n <= index < n:
                raise ValueError(f"{field}={spec!r}: the {who} has {n} layers (0..{n - 1}, or -{n}..-1), so layer "
                                 f"{index} does not exist. Fix the map, or use 'uniform'.")
        resolved.append((s % n_student, t % n_teacher))
    return resolved
