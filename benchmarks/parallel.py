"""Benchmark 4: `pytest cases/` serial against `pytest -n 2 cases/` (pytest-xdist), in fresh
processes, on the built-in suite and on a heavier run of it (`--bc-points 12`: four times the
random points, so that the checks rather than the start-up dominate).

Each row gives the median wall-clock time and the median CPU time (user + system, of pytest and
its workers), which a busy neighbour disturbs less than the wall clock. `--before TREE` adds the
same rows for another checkout (e.g. `mkdir /tmp/old && git archive 779e364 | tar -x -C /tmp/old`),
run from that folder, whose package then comes first on sys.path, with this environment's
pytest and torch.

    .venv/bin/python benchmarks/parallel.py [--repeats N] [--before TREE]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from measure import Timing, seconds, table, verdict

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "cases/"]
RUNS = {
    "built-in suite, serial": [],
    "built-in suite, -n 2": ["-n", "2"],
    "--bc-points 12, serial": ["--bc-points", "12"],
    "--bc-points 12, -n 2": ["--bc-points", "12", "-n", "2"],
}


def time_command(argv: list[str], tree: Path | None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this child and its children) and the exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=tree or ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def run(repeats: int = 3, before: Path | None = None) -> tuple[str, list[tuple[str, bool]]]:
    trees: dict[str, Path | None] = {"": None}
    if before is not None:
        trees[f" [{before}]"] = before
    commands = {f"{name}{label}": (PYTEST + extra, tree) for label, tree in trees.items() for name, extra in RUNS.items()}
    for argv, tree in commands.values():  # warm the page cache, untimed
        time_command(argv, tree)
    walls = {name: Timing(name) for name in commands}
    cpus = {name: Timing(name) for name in commands}
    codes: dict[str, set[int]] = {name: set() for name in commands}
    for _ in range(repeats):  # interleaved rounds
        for name, (argv, tree) in commands.items():
            wall, cpu, code = time_command(argv, tree)
            walls[name].seconds.append(wall)
            cpus[name].seconds.append(cpu)
            codes[name].add(code)
    rows = []
    for name in commands:
        serial = name.replace(", -n 2", ", serial")
        ratio = walls[name].median / walls[serial].median
        rows.append([name, repeats, seconds(walls[name].median), walls[name].spread + " s", seconds(cpus[name].median),
                     f"{ratio:.2f}×", ",".join(map(str, sorted(codes[name])))])
    small = walls["built-in suite, -n 2"].median / walls["built-in suite, serial"].median
    heavy = walls["--bc-points 12, -n 2"].median / walls["--bc-points 12, serial"].median
    targets = [
        (f"-n 2 on the built-in suite within 1.25× of serial: {small:.2f}×", small <= 1.25),
        (f"-n 2 faster than serial on the heavier run: {heavy:.2f}×", heavy < 1.0),
    ]
    lines = [
        f"fresh processes from {ROOT}, {repeats} interleaved runs each; `{' '.join(PYTEST[1:])} ...`",
        "",
        table(["run", "n", "median wall", "range", "median CPU", "vs serial", "exit"], rows),
        "",
    ]
    lines.extend(f"  {verdict(ok)}  {text}" for text, ok in targets)
    return "\n".join(lines), targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, metavar="N")
    parser.add_argument("--before", type=Path, metavar="TREE", help="also time another checkout of the package")
    args = parser.parse_args(argv)
    text, _ = run(args.repeats, args.before)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
