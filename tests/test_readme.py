"""The README's code blocks work: every one is run or checked, so an example cannot rot.

- Python blocks run, in order and in one namespace, in a temporary current folder holding
  `song.wav` and `song.mp3` (2 s of generated stereo audio), with `$STEMSEP_WEIGHTS_DIR`
  pointing at a small random checkpoint saved under the default 1297 file names. A
  `print(...)  # text` line must print exactly `text`.
- Shell blocks: each `stemsep ...` command is parsed by the real argument parser (every
  subcommand and flag shown exists); any other command must start with a tool in
  `KNOWN_TOOLS`, so a new kind of command is a deliberate choice.
- The README opens with the two commands (separate a song; run the tests), and the second
  is exactly what CI runs.
- The `stemsep` commands of the other documents parse too; relative links and the paths
  named in the README exist; no document refers to files outside the repository.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCUMENTS = sorted([README, REPO / "DESIGN.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("**/*.md")])

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
SKIPPED = {"text", "json", "yaml", "typescript", "ts", "javascript", "js", "toml", ""}  # output, data, other languages

# Commands the README may show besides `stemsep` (by the file name of the program).
KNOWN_TOOLS = {"python3.11", "python", "pip", "stemsep", "bash", "source", "export", "cog", "curl", "apt-get", "sqlite3"}
OPERATORS = {"&&", "||", ";", "|", "&"}

CHECKPOINT_STEM = "model_bs_roformer_ep_317_sdr_12.9755"  # the default model's file names, .ckpt and .yaml
SONG_RATE, SONG_SECONDS = 44100, 2.0


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced (```) blocks of a markdown file."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if lang is None:
            if fence:
                lang, start, body = fence.group(1).lower(), number, []
        elif fence and not fence.group(1):
            blocks.append(Block(path, start, lang, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"{path.name}:{start}: code block never closed"
    return blocks


def shell_commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line number, argv) of each command in a shell block: continuation lines and quoted
    strings over several lines joined, comments dropped, split at &&, ||, ;, | and &; leading VAR=value assignments removed.
    In a console block only `$ ` lines are commands (the rest is output)."""
    lines = block.text.splitlines()
    if block.lang == "console":
        lines = [line[2:] if line.startswith("$ ") else "" for line in lines]
    commands, pending, first = [], "", 0
    for offset, line in enumerate(lines, 1):
        if not pending:
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lexer = shlex.shlex(pending + line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # a quoted string goes on over the next line
            pending += line + "\n"
            continue
        argv: list[str] = []
        for token in [*tokens, ";"]:
            if token in OPERATORS:
                while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                    argv.pop(0)
                if argv:
                    commands.append((first, argv))
                argv = []
            else:
                argv.append(token)
        pending = ""
    assert not pending, f"{block.where}: unfinished shell command: {pending!r}"
    return commands


def parse_stemsep(argv: list[str]) -> str | None:
    """None if the real parser accepts `stemsep argv[1:]`, else what it said."""
    from stemsep.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        if exc.code:
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {exc.code}"
    return None


README_BLOCKS = code_blocks(README)


def test_every_block_has_a_language_the_test_knows():
    unknown = [f"{b.where}: ```{b.lang}" for b in README_BLOCKS if b.lang not in PYTHON | SHELL | SKIPPED]
    assert not unknown, f"give each block a language this test runs or knowingly skips: {unknown}"
    assert any(b.lang in PYTHON for b in README_BLOCKS) and any(b.lang in SHELL for b in README_BLOCKS)


def test_readme_opens_with_the_two_commands_and_the_second_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci_command = next(line.strip() for line in ci if line.startswith("python3.11 -m venv"))
    first, second = README_BLOCKS[:2]
    assert first.lang in SHELL and second.lang in SHELL
    assert len(first.text.strip().splitlines()) == 1 and len(second.text.strip().splitlines()) == 1
    tools = [Path(argv[0]).name for _, argv in shell_commands(first)]
    assert tools[0] == "python3.11" and "stemsep" in tools, first.text  # sets up, then separates
    assert second.text.strip() == ci_command, "the README's test command and .ci/run's must be identical"
    before_first_block = README.read_text(encoding="utf-8").splitlines()[: first.line - 1]
    assert sum(line.startswith("## ") for line in before_first_block) == 0, "the README must open with the commands"


@pytest.mark.parametrize("block", [b for b in README_BLOCKS if b.lang in SHELL], ids=lambda b: b.where)
def test_shell_block_commands_exist(block):
    problems = []
    for line, argv in shell_commands(block):
        tool = Path(argv[0]).name
        if tool not in KNOWN_TOOLS:
            problems.append(f"README.md:{line}: {tool!r} is not in KNOWN_TOOLS (add it there if it belongs in the README)")
        elif tool == "stemsep":
            error = parse_stemsep(argv)
            if error:
                problems.append(f"README.md:{line}: {shlex.join(argv)}: {error}")
    assert not problems, "\n".join(problems)


def test_stemsep_commands_in_the_other_documents_parse():
    problems = []
    for path in DOCUMENTS:
        if path == README:
            continue
        for block in code_blocks(path):
            if block.lang not in SHELL:
                continue
            for line, argv in shell_commands(block):
                if Path(argv[0]).name == "stemsep" and (error := parse_stemsep(argv)):
                    problems.append(f"{path.relative_to(REPO)}:{line}: {shlex.join(argv)}: {error}")
    assert not problems, "\n".join(problems)


# Python blocks -------------------------------------------------------------------------------


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """A current folder with the README's song files, and a small random model in a weights
    folder under the default model's file names."""
    from stemsep.testing import TINY_MODEL, config_dict, make_model_files

    weights = tmp_path / "weights"
    make_model_files(weights, config_dict(model=TINY_MODEL), name=CHECKPOINT_STEM)
    monkeypatch.setenv("STEMSEP_WEIGHTS_DIR", str(weights))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    t = np.arange(int(SONG_RATE * SONG_SECONDS)) / SONG_RATE
    rng = np.random.default_rng(0)
    song = np.stack([0.2 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    song += 0.02 * rng.standard_normal(song.shape)
    sf.write("song.wav", song, SONG_RATE, subtype="PCM_16")
    sf.write("song.mp3", song, SONG_RATE, format="MP3")
    return work


def _expected_prints(source: str) -> list[str]:
    """The `text` of each `print(...)  # text` line."""
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", source, re.MULTILINE)]


@pytest.mark.filterwarnings("ignore:.*samples clipped")  # random weights may clip a stem
def test_python_blocks_run_against_a_small_random_model(readme_folder):
    blocks = [b for b in README_BLOCKS if b.lang in PYTHON]
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        out = io.StringIO()
        code = compile("\n" * block.line + block.text, str(README), "exec")  # tracebacks show README lines
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
        expected = _expected_prints(block.text)
        printed = out.getvalue().splitlines()
        assert printed[: len(expected)] == expected, f"{block.where}: what the comments say the prints show"
        for path in re.findall(r"['\"](separated/[\w.-]+)['\"]", block.text):
            assert (readme_folder / path).is_file(), f"{block.where}: {path} was not written"


# links and references ------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
BACKTICKED_PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yaml|json|txt)|[\w-]+\.(?:py|md))`")


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_exist(path):
    text = path.read_text(encoding="utf-8")
    missing = [target for target in LINK.findall(text)
               if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists()]
    assert not missing, f"{path.relative_to(REPO)} links to missing files: {missing}"


def test_paths_the_readme_names_exist():
    """`src/...`, `benchmarks/...`, `predict.py`, a module name like `model.py` (under
    src/stemsep/): each must exist, so a rename shows here."""
    text = README.read_text(encoding="utf-8")
    missing = sorted({name for name in BACKTICKED_PATH.findall(text)
                      if not any((base / name).exists() for base in (REPO, REPO / "src" / "stemsep"))})
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_the_layout_paragraph_names_every_module():
    """The README's "Layout:" paragraph names each module of src/stemsep/ (and each package,
    as `name/`), so a new module is described where readers look for it."""
    layout = re.search(r"^Layout: (.+?)(?:\n\n|\Z)", README.read_text(encoding="utf-8"), re.S | re.M).group(1)
    package = REPO / "src" / "stemsep"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    named = set(re.findall(r"`([\w-]+(?:\.py|/))`", layout))
    assert not modules - named, f"the Layout paragraph does not name {sorted(modules - named)}"


# Files beside the repository, or how the project was made, mean nothing to a reader of a clone.
OUTSIDE = re.compile(r"REFERENCE\.md|DEVELOPERS(\.md)?|\.\./shared|\bshared/|tech design|\blent\b|\bsessions?\b", re.IGNORECASE)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_documents_refer_only_to_the_repository(path):
    hits = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
