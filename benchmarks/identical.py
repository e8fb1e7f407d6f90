"""Whether a change keeps every result: the drop-in on a slice of op_db, every check's numbers.

    .venv/bin/python benchmarks/identical.py --out before.json [--stride 6]
    (change the code)
    .venv/bin/python benchmarks/identical.py --out after.json [--stride 6]
    .venv/bin/python benchmarks/identical.py --compare before.json after.json

Every `--stride`-th op of op_db, its first sample, through the drop-in: gradcheck in float64 and
float32 at the sample and moved by +1e3, forward mode and gradgradcheck in float64, in this
process (one thread). Per unit the verdict, and per result every check's verdict, error,
allowance, ratio and note, written as JSON. `--compare` prints the units whose numbers differ
(the first difference of each) and any verdict that changed. A refactor meant to change no result
(the referee's bookkeeping moved to numpy, a conversion dropped) shows none; ops that draw random
numbers (dropout) differ from run to run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

KINDS = (  # (kind, dtype, offset)
    ("gradcheck", torch.float64, 0.0), ("gradcheck", torch.float32, 0.0), ("gradcheck", torch.float64, 1e3),
    ("gradcheck", torch.float32, 1e3), ("forward", torch.float64, 0.0), ("gradgradcheck", torch.float64, 0.0),
)


def dump(stride: int) -> list[dict[str, Any]]:
    """Every unit's verdict and the numbers of every check the drop-in made."""
    import opinfo
    from backprop_check.commands import dropin

    reports: list[Any] = []
    run = dropin.run

    def kept(*args: Any, **kwargs: Any) -> Any:
        reports.append(run(*args, **kwargs))
        return reports[-1]

    dropin.run = kept
    rows = []
    try:
        for op in opinfo.op_db()[::stride]:
            for kind, dtype, offset in KINDS:
                if kind == "forward" and not op.supports_forward_ad or kind == "gradgradcheck" and not op.supports_gradgrad:
                    continue
                reports.clear()
                found = opinfo.run_check(op, dtype, 0, "dropin", None, kind, offset)
                results = [
                    [result.verdict, result.message]
                    + [[c.name, c.verdict, repr(c.abs_err), repr(c.allowed), repr(c.ratio), c.note] for c in result.checks]
                    for report in reports for result in report.results
                ]
                rows.append({"unit": f"{opinfo.op_name(op)}|{dtype}|{kind}|{offset:g}", "verdict": found["verdict"],
                             "why": found.get("why", "")[:200], "results": results})
    finally:
        dropin.run = run
    return rows


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    """A line per unit whose verdict or numbers differ, with the first difference."""
    old = {row["unit"]: row for row in before}
    lines = []
    for row in after:
        was = old.get(row["unit"])
        if was is None:
            lines.append(f"{row['unit']}: not in the first dump")
        elif was["verdict"] != row["verdict"]:
            lines.append(f"{row['unit']}: VERDICT {was['verdict']} -> {row['verdict']}: {row['why']}")
        elif was["results"] != row["results"]:
            pairs = [(a, b) for x, y in zip(was["results"], row["results"]) for a, b in zip(x, y) if a != b]
            first = pairs[0] if pairs else (f"{sum(map(len, was['results']))} entries", f"{sum(map(len, row['results']))} entries")
            lines.append(f"{row['unit']}: {str(first[0])[:160]} -> {str(first[1])[:160]}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write this run's dump here")
    parser.add_argument("--stride", type=int, default=6, help="every N-th op of op_db (default 6: about 550 units)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two dumps")
    args = parser.parse_args(argv)
    if args.compare:
        with open(args.compare[0], encoding="utf-8") as a, open(args.compare[1], encoding="utf-8") as b:
            lines = compare(json.load(a), json.load(b))
        print("\n".join(lines) or "every unit's numbers are the same")
        return 1 if any("VERDICT" in line for line in lines) else 0
    if not args.out:
        parser.error("give --out (a dump to write) or --compare BEFORE AFTER")
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    rows = dump(args.stride)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    print(f"{len(rows)} units in {time.perf_counter() - started:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
