"""`backprop-check`: run, list (and the commands registered in COMMANDS).

Exit status: 0 all ok; 1 at least one mismatch; 2 a usage error or a broken case (2 wins);
5 nothing was checked, or a device asked for by name is not available (1 and 2 win);
130 interrupted (Ctrl-C), after writing the partial report.
A user's mistake is one line naming the file, case and reason; `--traceback` shows the rest.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from backprop_check.commands import baseline
from backprop_check.commands import explain
from backprop_check.commands import trace
from backprop_check.errors import UsageError
from backprop_check.formats import FORMATS, STDOUT, check_writable, text, write
from backprop_check.model.loader import load
from backprop_check.options import add_to_argparse, plan_from
from backprop_check.records import EXIT_INTERRUPTED, Interrupted, Report, Verdict
from backprop_check.engine.runner import run_plan
from backprop_check.formats.terminal import Progress, style_for

DEFAULT_PATHS = ["cases/"]


def add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", help="case files or folders (default: cases/)")
    parser.add_argument("-k", dest="select", metavar="EXPR", help="select cases by name: 'linear and not mse'")
    add_to_argparse(parser)
    parser.add_argument("--format", choices=sorted(FORMATS), default="text", help="report format (default: text)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE instead of stdout ('-' is stdout; a missing folder on the way is created; a regular file is replaced atomically)")
    parser.add_argument("--allow-empty", action="store_true", help="exit 0 when nothing was checked (no case defined or selected, every result skipped) instead of 5")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of a broken case")
    baseline.add_to_argparse(parser)


def command_run(args: argparse.Namespace) -> int:
    from backprop_check.engine import ranks

    if ranks.launched():  # started by torchrun: rank 0 runs and reports, the others serve it
        from backprop_check.engine.distributed import under_launcher

        return under_launcher(args.paths or DEFAULT_PATHS, lambda: _run(args))
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr)  # does nothing unless stderr is a terminal
    plan = replace(plan_from(lambda name: getattr(args, name), select=args.select), progress=progress)
    gate = baseline.from_args(args)
    if args.output:
        check_writable(args.output, "--output")  # now, not after a long run
    try:
        if getattr(args, "interrupted", False):  # Ctrl-C before the run could start (console.py)
            raise Interrupted(Report(partial=True))
        report = run_plan(args.paths or DEFAULT_PATHS, plan)
    except Interrupted as interrupted:
        report = interrupted.report
        print(f"backprop-check: interrupted; the report holds the {len(report.results)} results computed so far", file=sys.stderr)
    finally:
        progress.close()
    report.allow_empty = args.allow_empty
    for line in gate.apply(report) if gate else []:
        print(line, file=sys.stderr)
    if args.format == "text" and (not args.output or args.output == STDOUT):  # the terminal's width and colour
        rendered = text.render(report, style_for(sys.stdout))
    else:
        rendered = FORMATS[args.format](report)
    if args.output and args.output != STDOUT:
        try:
            write(args.output, rendered)
        except OSError as exc:
            raise UsageError(f"cannot write the report to {args.output}: {exc.strerror or exc}") from None
        print(f"{report.summary['total']} results written to {args.output} (exit {report.exit_code})")
        for line in failing(report):  # so that the CI log says what failed
            print(line)
    else:
        sys.stdout.write(rendered)
    if report.not_checked and not report.partial:  # an interrupted run did not get to check
        missing_device = report.strict_devices and report.summary["skipped"]
        accept = "--allow-skip skips it instead" if missing_device else "--allow-empty accepts that"
        print(f"backprop-check: {report.not_checked}; {accept}", file=sys.stderr)
    if args.traceback:
        _print_tracebacks(report)
    return report.exit_code


def failing(report: Report) -> list[str]:
    """One line per mismatch or error: its run, where it is defined, and its message."""
    lines = []
    for result in report.results:
        if result.verdict in (Verdict.MISMATCH, Verdict.ERROR):
            where = f" ({result.file}:{result.line})" if result.file and result.line and result.device != "-" else ""
            name = result.id if result.device != "-" else result.case
            lines.append(f"{result.verdict}: {name}{where}: {' '.join(result.message.split())}")
    return lines


def add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", help="case files or folders (default: cases/)")
    parser.add_argument("-k", dest="select", metavar="EXPR", help="select cases by name")


def command_list(args: argparse.Namespace) -> int:
    from backprop_check.selection import matches

    cases, failures = load(args.paths or DEFAULT_PATHS)
    for case in cases:
        if args.select and not matches(args.select, case.name):
            continue
        shapes = ", ".join(case.params) or ("(module)" if case.module else "(no parameters)")
        way = "three-way" if case.manual_fn else "two-way"
        print(f"{case.name:<24} {case.where:<36} {way:<9} {shapes}")
    for failure in failures:
        print(f"error: {failure.where}: {failure.reason}", file=sys.stderr)
    return 2 if failures else 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = [
    ("run", add_run, command_run),
    ("list", add_list, command_list),
    ("explain", explain.add_arguments, explain.command),
    ("trace", trace.add_arguments, trace.command),
]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="backprop-check",
        description="Check hand-derived (manual), numerical and autograd gradients against each other.",
        epilog="exit status: 0 all ok, 1 a gradient mismatch, 2 a usage error or a broken case, "
        "5 nothing was checked (or a device named with --device is missing), 130 interrupted",
    )
    top.add_argument("--version", action="version", version=_version())
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add, handler in COMMANDS:
        doc = (handler.__doc__ or "").strip().splitlines()
        child = sub.add_parser(name, help=doc[0] if doc else None)
        add(child)
        child.set_defaults(handler=handler)
    return top


def _version() -> str:
    import torch

    from backprop_check.version import __version__

    return f"backprop-check {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})"


def main(argv: Sequence[str] | None = None, *, interrupted: bool = False) -> int:
    """The console script: parse `argv`, run the command, return the exit status.
    `interrupted`: Ctrl-C was pressed before the command could start (while torch loaded):
    `run` writes its empty report, marked partial, and every command exits 130."""
    try:
        args = parser().parse_args(argv)
        if interrupted and args.handler is not command_run:
            raise KeyboardInterrupt
        args.interrupted = interrupted
        return args.handler(args)
    except UsageError as exc:
        print(f"backprop-check: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backprop-check: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _print_tracebacks(report) -> None:  # noqa: ANN001
    for result in report.results:
        if result.verdict == Verdict.ERROR and result.traceback:
            print(f"--- {result.id}\n{result.traceback}", file=sys.stderr)


command_run.__doc__ = "check every case: manual vs numerical vs autograd"
command_list.__doc__ = "list the cases a path defines"
