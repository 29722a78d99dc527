"""Every ```python block of docs/*.md runs as written, and every `dask-influence` command line
of the docs names a real subcommand with real options.

The blocks of one page run in order as ONE script in a fresh process (the way a reader pastes
them into a file): their `if __name__ == "__main__":` guards are what the embedded Dask
cluster's worker processes need, since they import the main script. A block that cannot run
here says so, with its reason, in an HTML comment on the line before it:

    <!-- not run: needs a Kubernetes cluster -->

Any other block that fails fails its page's test. Pages whose blocks another test runs are
listed in COVERED_ELSEWHERE (with the README, run by tests/test_readme.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from dask_influence.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COVERED_ELSEWHERE = {
    "tasks.md": "tests/test_docs_tasks.py",
    "evaluation.md": "tests/evaluate/test_docs_example.py",
}
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", flags=re.S | re.M
)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.*?)\s*-->")
SHELL = {"bash", "sh", "shell", "console", ""}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason given in the marker before it

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for match in FENCE.finditer(text):
        indent = len(match["indent"])
        code = "\n".join(line[indent:] for line in match["body"].splitlines()) + "\n"
        before = [line for line in text[: match.start()].splitlines() if line.strip()]
        marker = NOT_RUN.search(before[-1]) if before else None
        line = text.count("\n", 0, match.start()) + 1
        out.append(Block(page, line, match["lang"], code, marker["reason"] if marker else None))
    return out


PAGES = sorted(DOCS.glob("*.md"))
RUN_PAGES = [p for p in PAGES if p.name not in COVERED_ELSEWHERE and any(b.lang == "python" for b in blocks_of(p))]


def test_the_pages_with_python_blocks_are_run():
    """Every page with Python blocks is run here or by the test named for it."""
    with_python = {p.name for p in PAGES if any(b.lang == "python" for b in blocks_of(p))}
    assert {"getting-started.md", "index.md", "scaling.md", "solvers.md"} <= {p.name for p in RUN_PAGES}
    for page, test in COVERED_ELSEWHERE.items():
        assert page in with_python, f"{page} has no Python blocks any more; drop it from COVERED_ELSEWHERE"
        assert (ROOT / test).is_file() and page in (ROOT / test).read_text(), f"{test} does not run docs/{page}"


def test_not_run_markers_give_a_reason_and_sit_before_a_block():
    for page in [*PAGES, ROOT / "README.md"]:
        text = page.read_text()
        marked = {b.line for b in blocks_of(page) if b.not_run is not None}
        for b in blocks_of(page):
            if b.not_run is not None:
                assert b.not_run, f"{b.where}: say why the block is not run (<!-- not run: REASON -->)"
        for match in NOT_RUN.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            following = [n for n in range(line + 1, line + 3) if n in marked]
            assert following, f"{page.name}:{line}: a 'not run' marker must be the line right before a code block"


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.name)
def test_the_python_blocks_of_a_page_run_as_written(page, tmp_path):
    runnable = [b for b in blocks_of(page) if b.lang == "python" and b.not_run is None]
    lines: list[str] = []
    starts: list[tuple[int, Block]] = []  # (first script line of the block, block)
    for b in runnable:
        lines.append(f"# ---- {b.where} ----")
        starts.append((len(lines) + 1, b))
        lines.extend(b.code.splitlines())
    script = tmp_path / f"docs_{page.stem.replace('-', '_')}.py"
    script.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
    )
    if done.returncode != 0:
        failed = [int(n) for n in re.findall(rf'File "[^"]*{re.escape(script.name)}", line (\d+)', done.stderr)]
        block = next((b for start, b in reversed(starts) if failed and failed[-1] >= start), None)
        where = f"the block at {block.where}" if block else f"{page.name} (before its first block)"
        pytest.fail(
            f"{where} failed as written (exit {done.returncode}); fix the docs, or mark the block "
            f"<!-- not run: REASON --> if it cannot run here.\n{done.stderr[-4000:]}"
        )


# -- dask-influence command lines -----------------------------------------------------------------
def _command_lines() -> list[tuple[str, str]]:
    """``(where, "dask-influence SUBCOMMAND ARGS...")`` from every code block and inline code
    span of the docs, the README and the examples' guides."""
    pages = [*PAGES, ROOT / "README.md", *sorted((ROOT / "examples").rglob("*.md"))]
    found = []
    for page in pages:
        name = page.relative_to(ROOT)
        for b in blocks_of(page):
            if b.lang == "python":
                continue
            for k, line in enumerate(b.code.replace("\\\n", " ").splitlines()):
                for m in re.finditer(r"\bdask[- ]influence\s+(?=[a-z-])", line):
                    rest = line[m.end() :].split("`", 1)[0]  # a block of prose with code spans: up to the span's end
                    found.append((f"{name}:{b.line + k + 1}", "dask-influence " + rest))
        prose = FENCE.sub("", page.read_text())
        for m in re.finditer(r"`dask[- ]influence ([^`]+)`", prose):
            found.append((f"{name} (inline)", "dask-influence " + m[1]))
    return found


def _help_options(command: str) -> set[str]:
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"dask-influence {command} --help failed: {result.output}"
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.output))


def _options_of(command_line: str) -> tuple[str, list[str]]:
    """The subcommand and the options written after it (synopses' ``[--a [--b]]`` and
    ``--by mean|min|max`` and ``[-n 20 | --all]`` included; comments and what follows ``&&`` or
    ``;`` dropped)."""
    text = re.split(r"\s#|\s&&\s|;", command_line, maxsplit=1)[0]
    text = re.sub(r"[\[\]|]", " ", text)
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    sub = words[1] if len(words) > 1 else ""
    return sub, [w.split("=", 1)[0] for w in words[2:] if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", w)]


def _command_problems(lines: list[tuple[str, str]]) -> list[str]:
    commands = set(cli.commands)
    helps: dict[str, set[str]] = {}
    problems = []
    for where, line in lines:
        sub, options = _options_of(line)
        if sub.startswith("-"):  # dask-influence --version / --help
            options, sub = [sub, *options], ""
        if sub and sub not in commands:
            if re.fullmatch(r"[A-Z_.]+|\w+\.\w+", sub):  # a placeholder or a file name, not a command
                continue
            problems.append(f"{where}: no subcommand {sub!r} in `{line.strip()}` (there are {sorted(commands)})")
            continue
        known = helps.setdefault(sub, _help_options(sub) if sub else {"--version", "--help", "-h"})
        missing = [o for o in options if o not in known]
        if missing:
            problems.append(f"{where}: `dask-influence {sub}` has no option {', '.join(missing)}: `{line.strip()}`")
    return problems


def test_every_documented_command_and_option_exists():
    lines = _command_lines()
    assert len(lines) > 30  # the docs' commands were found
    problems = _command_problems(lines)
    assert not problems, "\n".join(problems)


def test_the_command_check_finds_wrong_subcommands_and_options():
    lines = [
        ("a", "dask-influence rank STORE [--by mean|min|max] [-n 20 | --all] [--format text|csv|json] [-o FILE]"),
        ("b", "dask-influence run job.toml --resume --no-such-flag   # a comment --ignored"),
        ("c", "dask-influence rnu job.toml"),
        ("d", "dask-influence --version"),
    ]
    problems = _command_problems(lines)
    assert len(problems) == 2
    assert problems[0].startswith("b:") and "has no option --no-such-flag:" in problems[0]
    assert problems[1].startswith("c:") and "'rnu'" in problems[1]
