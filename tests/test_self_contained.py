"""The repository is self-contained: no code under src/, tests/ or benchmarks/ reaches for a
file outside the repository, so a fresh clone with nothing beside it runs everything.

Checked statically on the syntax tree of every Python file: string literals that climb out
of the repository ("../...") or name absolute paths on the developer's machine, and
`Path(__file__)` ancestors (`.parents[k]`, `.parent.parent...`) above the repository root.
Paths built at run time from the environment or from temporary folders are not files of
the repository and are not checked; a line that uses such text as data, not as a path (a
hostile value for a parser), says so with a `not a path` comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = sorted(p for folder in ("src", "tests", "benchmarks", "scripts") for p in (REPO / folder).rglob("*.py"))
CHECKED += [REPO / "predict.py"]
ABSOLUTE_ROOTS = tuple(f"/{top}/" for top in ("work", "home", "root", "opt", "mnt", "data"))  # a machine's own files


def _ancestor_depth(node: ast.AST) -> int | None:
    """How many folders up from the file `node` climbs, for `Path(__file__)...parents[k]` or
    `....parent.parent`; None if `node` is not such an expression."""
    depth = 0
    while True:
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            if not isinstance(node.slice, ast.Constant) or not isinstance(node.slice.value, int):
                return None
            depth, node = depth + node.slice.value + 1, node.value.value
        elif isinstance(node, ast.Attribute) and node.attr == "parent":
            depth, node = depth + 1, node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "resolve":
            node = node.func.value
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Path" and node.args:
            arg = node.args[0]
            return depth if isinstance(arg, ast.Name) and arg.id == "__file__" else None
        else:
            return None


def outside_references(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    data_lines = {i for i, line in enumerate(source.splitlines(), 1) if "# not a path" in line}
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.lineno not in data_lines:
            text = node.value
            if text.startswith("../") or "/../" in text or text.startswith(ABSOLUTE_ROOTS):  # not a path
                found.append(f"line {node.lineno}: string {text[:60]!r}")
        depth = _ancestor_depth(node)
        if depth and not path.parents[depth - 1].is_relative_to(REPO):
            found.append(f"line {node.lineno}: {depth} folders above {path.name}, outside the repository")
    return found


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_no_file_reaches_outside_the_repository(path):
    assert outside_references(path) == []


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The check itself: each way out of the repository is caught."""
    inside = REPO / "tests" / "test_self_contained.py"
    bad = (
        'CONFIG = "../shared/configs/model.yaml"\n'
        'DATA = "/work/shared/REFERENCE.md"\n'
        "from pathlib import Path\n"
        "ROOT = Path(__file__).resolve().parents[2]\n"
        "UP = Path(__file__).parent.parent.parent\n"
    )
    probe = inside.with_name("_probe_outside.py")
    probe.write_text(bad)
    try:
        assert len(outside_references(probe)) == 4
    finally:
        probe.unlink()
