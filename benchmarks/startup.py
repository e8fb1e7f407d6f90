"""Benchmark 2: `backprop-check run cases/` (the built-in suite, default options) in a fresh
process against a bare `python -c "import torch"`, which any torch tool pays.

A third row, `import backprop_check.commands.cli` alone, splits the difference into what importing the
package costs and what running the suite costs. Exit codes are shown: the suite must pass.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from measure import Timing, seconds, table, verdict

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET = 1.5

SUITE = "backprop-check run cases/"
COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    'python -c "import backprop_check.commands.cli"': [sys.executable, "-c", "import backprop_check.commands.cli"],
    SUITE: [str(BIN / "backprop-check"), "run", "cases/"],
}
# The first call of `torch.unravel_index` goes through `torch._check_with`, which imports
# torch.fx.experimental.symbolic_shapes and with it sympy and mpmath (~500 modules): the one
# import a run adds to `import torch`. While the package still calls it, a fourth row runs the
# suite with it replaced by numpy's, to measure what the fix would save.
PATCHED = "  same, torch.unravel_index → numpy's (proposed fix)"
PATCH = (
    "import sys, numpy, torch\n"
    "torch.unravel_index = lambda i, shape: numpy.unravel_index(int(i), tuple(shape))\n"
    "from backprop_check.commands.cli import main\n"
    "sys.exit(main(['run', 'cases/']))"
)


def uses_torch_unravel() -> bool:
    package = ROOT / "backprop_check"
    return any("torch.unravel_index" in p.read_text(encoding="utf-8") for p in package.rglob("*.py"))


def time_command(argv: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    return time.perf_counter() - started, done.returncode


def run(repeats: int = 5) -> tuple[str, list[tuple[str, bool]]]:
    """Time each command `repeats` times, interleaved; return the section and its target."""
    commands = dict(COMMANDS)
    if uses_torch_unravel():
        commands[PATCHED] = [sys.executable, "-c", PATCH]
    for argv in commands.values():  # warm the page cache, untimed
        time_command(argv)
    timings = {name: Timing(name) for name in commands}
    codes: dict[str, set[int]] = {name: set() for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            elapsed, code = time_command(argv)
            timings[name].seconds.append(elapsed)
            codes[name].add(code)
    bare = timings['python -c "import torch"'].median
    rows = [
        [name, len(t.seconds), seconds(t.median), t.spread + " s", f"{t.median / bare:.2f}×",
         ",".join(map(str, sorted(codes[name])))]
        for name, t in timings.items()
    ]
    suite = timings[SUITE].median
    ratio = suite / bare
    lines = [
        f"fresh processes from {ROOT}, {repeats} interleaved runs each",
        "",
        table(["command", "n", "median", "range", "vs import torch", "exit"], rows),
        "",
    ]
    targets = [(f"backprop-check run cases/ within {TARGET:g}× of import torch: {ratio:.2f}× "
                f"(+{seconds(suite - bare)})", ratio <= TARGET and codes[SUITE] == {0})]
    lines.extend(f"  {verdict(ok)}  {text}" for text, ok in targets)
    return "\n".join(lines), targets
