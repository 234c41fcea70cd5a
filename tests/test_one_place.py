"""Each fact in one place: where a front end must repeat one, it is tested equal to the
library's; and the library's modules import one another without a cycle.

The Cog model (predict.py) lists its inputs' choices and defaults as literals, because
`cog build` reads them from the source without running Python: they are read here the
same way and compared with :mod:`stemsep.choices`, the catalogue and the compressed
formats' default bitrates.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from stemsep import catalogue
from stemsep.choices import BIT_DEPTHS, DEFAULT_BIT_DEPTH, DEFAULT_FORMAT, MAX_OVERLAP, OUTPUT_FORMATS
from stemsep.compressed import default_bitrate

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


# predict.py's literals ---------------------------------------------------------------------


def _cog_inputs() -> dict[str, dict]:
    """Each input of predict.py's Runner.run: its Input() keywords, literals evaluated (a name
    bound at module level to a literal stands for that literal)."""
    tree = ast.parse((REPO / "predict.py").read_text(encoding="utf-8"))
    constants = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
    }
    run = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "run")
    args = run.args.args[len(run.args.args) - len(run.args.defaults):]
    inputs = {}
    for arg, default in zip(args, run.args.defaults):
        inputs[arg.arg] = {
            k.arg: ast.literal_eval(constants[k.value.id] if isinstance(k.value, ast.Name) else k.value)
            for k in default.keywords
        }
    return inputs


COG_INPUTS = _cog_inputs()


def test_the_cog_models_are_catalogue_models_with_its_default():
    model = COG_INPUTS["model"]
    assert model["default"] == catalogue.DEFAULT
    assert model["choices"][0] == catalogue.DEFAULT and set(model["choices"]) <= set(catalogue.MODELS)


def test_the_cog_formats_and_bit_depths_are_the_librarys():
    assert COG_INPUTS["output_format"]["choices"] == list(OUTPUT_FORMATS)
    assert COG_INPUTS["output_format"]["default"] == DEFAULT_FORMAT
    assert COG_INPUTS["bit_depth"]["choices"] == [str(depth) for depth in BIT_DEPTHS]
    assert COG_INPUTS["bit_depth"]["default"] == str(DEFAULT_BIT_DEPTH)


def test_the_cog_overlap_range_is_the_librarys():
    assert (COG_INPUTS["overlap"]["ge"], COG_INPUTS["overlap"]["le"]) == (1, MAX_OVERLAP)
    assert f"(1 to {MAX_OVERLAP})" in COG_INPUTS["overlap"]["description"]


@pytest.mark.parametrize("text", [COG_INPUTS["bitrate"]["description"], (REPO / "README.md").read_text(encoding="utf-8")],
                         ids=["predict.py", "README.md"])
def test_the_default_bitrates_stated_are_the_librarys(text):
    """predict.py's bitrate description ("320 for mp3, ...") and the README's input table
    ("empty: 320, 256, 160") state the stereo defaults of stemsep.compressed."""
    defaults = {fmt: default_bitrate(fmt, 44100, 2) for fmt in ("mp3", "m4a", "opus")}
    stated = re.search(r"(\d+) for mp3, (\d+) for m4a, (\d+) for opus", text) or re.search(
        r"\| `bitrate` \|[^\n]*empty: (\d+), (\d+), (\d+) \|", text
    )
    assert stated, "no default bitrates found"
    assert tuple(map(int, stated.groups())) == tuple(defaults.values())


# the import graph ----------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((SRC / "stemsep").rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The stemsep modules that module `name` imports anywhere in its body (in functions too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_library_has_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_cycles_and_reads_imports_in_functions():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert "stemsep.separator" in imports_of("stemsep")  # __init__ imports it lazily, in a function
