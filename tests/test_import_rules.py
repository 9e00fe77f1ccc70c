"""The layering of the package (docs/architecture.md#layering), checked on the source: every ``import`` and
``from ... import`` anywhere in a module (top level or inside a function) counts, and so does a lazy registry entry
(a ``"visalign.x.y:Name"`` string)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "visalign"

# layer → the visalign subpackages it must never reach
FORBIDDEN = {
    "scorers": ("train", "rewards", "shapes", "objectives", "generators", "text"),
    "rewards": ("train", "shapes", "objectives"),
    "generators": ("train", "rewards", "shapes", "objectives", "scorers"),
    "objectives": ("train", "shapes"),
    "train": ("shapes",),
    "text": ("shapes",),
    "reductions.py": ("scorers", "rewards", "train", "shapes", "objectives", "generators"),
}
_LAZY = re.compile(r"^visalign\.([a-z_]+)(\.[a-z_.]+)?:[A-Za-z_]+$")


def imported_subpackages(path: Path) -> set[tuple[str, int]]:
    """``(subpackage, line)`` of every visalign module a file imports, or names in a lazy ``module:Name`` string."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "visalign"
                                     else [])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := _LAZY.match(node.value)):
            names = [f"visalign.{m.group(1)}"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "visalign" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def layer_files(layer: str) -> list[Path]:
    target = PACKAGE / layer
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    files = layer_files(layer)
    assert files, f"no module found for layer {layer}"
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports visalign.{sub}" for path in files
           for sub, line in sorted(imported_subpackages(path)) if sub.removesuffix(".py") in FORBIDDEN[layer]
           or f"{sub}.py" in FORBIDDEN[layer]]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_and_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from visalign.shapes.oracle import grade\n"
                     "TABLE = {'x': 'visalign.train.loop:Trainer'}\nimport visalign.rewards.spec\n")
    assert {sub for sub, _ in imported_subpackages(probe)} == {"shapes", "train", "rewards"}
