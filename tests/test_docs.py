"""Every code example in README.md and under docs/ runs, so that no page drifts from the code.

- A ```python block runs; the blocks of one page share one namespace and run in order, from the
  repository's root.
- In a ```console block each line that starts with `$ ` is a command, run from the root; the
  lines after it, up to the next command, are what it prints. It must exit 0, or N where those
  lines show `[exit N]`. The lines shown must appear in the output as written, one run of
  consecutive lines per stretch between lines `…` (what the page leaves out); a `…` inside a
  line stands for any text, and a run's duration (`in 0.07s`) is not compared.
  `backprop-check …` and `python -m backprop_check …` run in this process (`NAME=value` before
  them sets a variable for that command); any other command runs in a shell, with this Python
  first on PATH and this checkout first on PYTHONPATH.
- ```text blocks (and yaml, toml, ini, json, xml) do not run; a fence without a language is a
  failure, so that nothing is left out by accident.

The pages are found, not listed: a page added under docs/ is tested without a change here.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = {"python", "console"}
NOT_RUN = {"text", "yaml", "toml", "ini", "json", "xml"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,})(?P<lang>[^`\s]*)[^`]*$")
EXIT = re.compile(r"^\[exit (\d+)\]$")
SECONDS = re.compile(r"\bin \d+(?:\.\d+)?s\b")
ELLIPSIS = "…"
SHELL_TIMEOUT = 120  # seconds for one shell command (pytest on a case file takes a few)


@dataclass
class Block:
    """One fenced code block: its language, its first line's number in the page, its text."""

    lang: str
    line: int
    text: str


@dataclass
class Command:
    """A `$ ` line of a console block, with the output the page shows for it."""

    line: int
    command: str
    shown: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        codes = [int(m.group(1)) for m in map(EXIT.match, self.shown) if m]
        return codes[-1] if codes else 0

    @property
    def expected(self) -> list[str]:
        return [line for line in self.shown if not EXIT.match(line)]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent, start = match.group("fence"), len(match.group("indent")), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        found.append(Block(match.group("lang").lower(), start, "\n".join(body) + "\n"))
        i += 1
    return found


def commands(block: Block) -> list[Command]:
    found: list[Command] = []
    for offset, line in enumerate(block.text.splitlines(), 1):
        if line.startswith("$ "):
            found.append(Command(block.line + offset, line[2:].strip()))
        elif found:
            found[-1].shown.append(line.rstrip())
    return found


def _normal(line: str) -> str:
    return SECONDS.sub("in …s", line.rstrip())


def _line_matches(shown: str, actual: str) -> bool:
    if ELLIPSIS not in shown:
        return shown == actual
    pattern = ".*".join(re.escape(part) for part in shown.split(ELLIPSIS))
    return re.fullmatch(pattern, actual) is not None


def missing(shown: list[str], output: str) -> str | None:
    """Why the output does not show the lines `shown` (None when it does)."""
    actual = [_normal(line) for line in output.splitlines()]
    stretches: list[list[str]] = [[]]
    for line in shown:
        if line.strip() == ELLIPSIS:
            stretches.append([])
        else:
            stretches[-1].append(_normal(line))
    start = 0
    for stretch in stretches:
        while stretch and stretch[-1] == "":  # a blank line that closes the block
            stretch.pop()
        if not stretch:
            continue
        for at in range(start, len(actual) - len(stretch) + 1):
            if all(_line_matches(s, a) for s, a in zip(stretch, actual[at:])):
                start = at + len(stretch)
                break
        else:
            return "these lines are not in the output, in this order:\n" + "\n".join(stretch)
    return None


def in_process(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`backprop-check argv` in this process: its exit status and what it printed."""
    from backprop_check.commands.cli import main

    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                code = main(argv)
            except SystemExit as exc:  # --help, --version and argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    return code, captured.getvalue()


def in_shell(command: str) -> tuple[int, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=SHELL_TIMEOUT
    )
    return done.returncode, done.stdout + done.stderr


def execute(command: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[:1] == ["backprop-check"]:
        return in_process(words[1:], env, monkeypatch)
    if words[:3] == ["python", "-m", "backprop_check"]:
        return in_process(words[3:], env, monkeypatch)
    return in_shell(command)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_example_on_the_page_runs_and_prints_what_it_shows(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("COLUMNS", raising=False)  # reports into a pipe are 100 columns wide
    monkeypatch.setenv("NO_COLOR", "1")
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for block in blocks(page):
        where = f"{page_id(page)}:{block.line}"
        if block.lang == "python":
            exec(compile(block.text, where, "exec"), namespace)  # noqa: S102 - the page's own example
        elif block.lang == "console":
            for command in commands(block):
                code, output = execute(command.command, monkeypatch)
                at = f"{page_id(page)}:{command.line}: $ {command.command}"
                assert code == command.exit_code, f"{at}\nexited {code}, the page shows {command.exit_code}:\n{output}"
                why = missing(command.expected, output)
                assert why is None, f"{at}\n{why}\n--- the output was:\n{output}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_code_block_says_its_language(page: Path) -> None:
    unlabelled = [f"{page_id(page)}:{b.line}: ```{b.lang}" for b in blocks(page) if b.lang not in RUN | NOT_RUN]
    assert not unlabelled, f"label each block python, console (these run) or text: {unlabelled}"


def test_the_front_page_is_short() -> None:
    assert (ROOT / "README.md").stat().st_size < 12 * 1024


def test_a_console_block_is_checked_line_by_line_with_gaps_and_wildcards() -> None:
    output = "case run\nlinear cpu f64 ok\n\n2 ok in 0.31s (exit 0)\n"
    assert missing(["linear cpu f64 ok"], output) is None
    assert missing(["case run", "…", "2 ok in 9.99s (exit 0)"], output) is None
    assert missing(["linear … ok"], output) is None
    assert missing(["case run", "2 ok in 0.31s (exit 0)"], output) is not None  # not consecutive
    assert missing(["linear cpu f64 mismatch"], output) is not None
    assert Command(1, "x", ["out", "[exit 5]"]).exit_code == 5
    assert Command(1, "x", ["out"]).exit_code == 0


def test_every_command_line_option_is_documented() -> None:
    """Each option of each command (and the plugin's `--bc-` ones) is named on a docs page."""
    import argparse

    from backprop_check.commands.cli import parser
    from backprop_check.options import OPTIONS

    documented = "\n".join(page.read_text(encoding="utf-8") for page in PAGES[1:])
    top = parser()
    (commands_,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    wanted = {f"--bc-{option.name}" for option in OPTIONS}
    for name, child in commands_.choices.items():
        wanted.add(f"`{name}`")
        for action in child._actions:
            wanted.update(s for s in action.option_strings if s not in ("-h", "--help"))
    missing_ = sorted(option for option in wanted if option not in documented)
    assert not missing_, f"not named on any page under docs/: {missing_}"
