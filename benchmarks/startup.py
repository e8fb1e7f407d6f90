"""Benchmark 2: `backprop-check run cases/` (the built-in suite, default options) in a fresh
process against a bare `python -c "import torch"`, which any torch tool pays.

A third row, `import backprop_check.cli` alone, splits the difference into what importing the
package costs and what running the suite costs.
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

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    'python -c "import backprop_check.cli"': [sys.executable, "-c", "import backprop_check.cli"],
    "backprop-check run cases/": [str(BIN / "backprop-check"), "run", "cases/"],
}


def time_command(argv: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    return time.perf_counter() - started, done.returncode


def run(repeats: int = 7) -> tuple[str, list[tuple[str, bool]]]:
    """Time each command `repeats` times, interleaved; return the section and its target."""
    for argv in COMMANDS.values():  # warm the page cache, untimed
        time_command(argv)
    timings = {name: Timing(name) for name in COMMANDS}
    codes: dict[str, set[int]] = {name: set() for name in COMMANDS}
    for _ in range(repeats):
        for name, argv in COMMANDS.items():
            elapsed, code = time_command(argv)
            timings[name].seconds.append(elapsed)
            codes[name].add(code)
    bare = timings['python -c "import torch"'].median
    rows = [
        [name, len(t.seconds), seconds(t.median), t.spread + " s", f"{t.median / bare:.2f}×",
         ",".join(map(str, sorted(codes[name])))]
        for name, t in timings.items()
    ]
    suite = timings["backprop-check run cases/"].median
    ratio = suite / bare
    lines = [
        f"fresh processes from {ROOT}, {repeats} interleaved runs each",
        "",
        table(["command", "n", "median", "range", "vs import torch", "exit"], rows),
        "",
    ]
    targets = [(f"backprop-check run cases/ within {TARGET:g}× of import torch: {ratio:.2f}× "
                f"(+{seconds(suite - bare)})", ratio <= TARGET and codes["backprop-check run cases/"] == {0})]
    lines.extend(f"  {verdict(ok)}  {text}" for text, ok in targets)
    return "\n".join(lines), targets
