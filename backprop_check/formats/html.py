"""The HTML report a reviewer opens: the summary first, then what needs a look, then the ok
results (compact) and the skipped ones (one line per reason).

`render` is the page `--format html` writes: one self-contained file (inline CSS, no script, no
request of any kind), light and dark, from a phone's width to a wide screen. `fragment` is the
same report for a notebook cell (`Report._repr_html_`): every rule is scoped under `.bpc`, so
nothing leaks into the notebook. Every text from a result is escaped: a case name or a message
may hold `<`, `&` or quotes.
"""
from __future__ import annotations

import platform
import re
from collections import defaultdict
from datetime import datetime, timezone
from html import escape

from backprop_check.formats.markdown import worst
from backprop_check.formats.notices import notices
from backprop_check.model.arrays import NUMPY_NOTE
from backprop_check.records import EXIT_INTERRUPTED, EXIT_NOT_CHECKED, VERDICTS, Check, Report, Result, Verdict

# What needs a look, in the order a reviewer reads it: what fails the run first, then the kinks.
LOOK_AT = (Verdict.MISMATCH, Verdict.ERROR, Verdict.NONDIFFERENTIABLE)
# A number with an exponent: `1.5e-09` may break after its hyphen, so it is kept on one line.
EXPONENT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)e[-+]?\d+")

CSS = """
.bpc{--fg:#1f2328;--muted:#59636e;--bg:#fff;--card:#f6f8fa;--line:#d1d9e0;--ok:#1a7f37;--mismatch:#cf222e;
--nondifferentiable:#9a6700;--error:#8250df;--skipped:#59636e;--mark:#fff8c5;
color:var(--fg);background:var(--bg);font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
text-align:left;overflow-wrap:anywhere}
@media (prefers-color-scheme:dark){.bpc{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;--card:#151b23;
--line:#3d444d;--ok:#3fb950;--mismatch:#f85149;--nondifferentiable:#d29922;--error:#ab7df8;
--skipped:#9198a1;--mark:#3b2e00}}
body[data-jp-theme-light=true] .bpc,body.vscode-light .bpc{--fg:#1f2328;--muted:#59636e;--bg:#fff;
--card:#f6f8fa;--line:#d1d9e0;--ok:#1a7f37;--mismatch:#cf222e;--nondifferentiable:#9a6700;
--error:#8250df;--skipped:#59636e;--mark:#fff8c5}
body[data-jp-theme-light=false] .bpc,body.vscode-dark .bpc{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;
--card:#151b23;--line:#3d444d;--ok:#3fb950;--mismatch:#f85149;--nondifferentiable:#d29922;
--error:#ab7df8;--skipped:#9198a1;--mark:#3b2e00}
.bpc *{box-sizing:border-box}
.bpc p,.bpc li,.bpc dt,.bpc dd,.bpc h1,.bpc h2,.bpc h3,.bpc summary,.bpc th,.bpc td{color:inherit;font-family:inherit}
.bpc.bpc-page{max-width:90rem;margin:0 auto;padding:.75rem 1rem 2rem}
.bpc .bpc-title{font-size:1.3rem;margin:0;line-height:1.3;font-weight:600}
.bpc .bpc-h2{font-size:1.05rem;margin:.9rem 0 .35rem;font-weight:600}
.bpc .bpc-p{margin:.15rem 0}
.bpc .bpc-code{font:.93em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:nowrap}
.bpc .bpc-case{font-weight:600}
.bpc .num{white-space:nowrap;font-variant-numeric:tabular-nums}
.bpc .bpc-muted{color:var(--muted)}
.bpc .bpc-v{font-weight:600;white-space:nowrap}
.bpc .bpc-ok{color:var(--ok)}.bpc .bpc-mismatch{color:var(--mismatch)}.bpc .bpc-error{color:var(--error)}
.bpc .bpc-nondifferentiable{color:var(--nondifferentiable)}.bpc .bpc-skipped{color:var(--skipped)}
.bpc .bpc-top{display:flex;flex-wrap:wrap;align-items:baseline;gap:.1rem 1.5rem;margin:0 0 .2rem}
.bpc .bpc-counts{display:flex;flex-wrap:wrap;gap:.25rem 1rem;margin:0;padding:0;list-style:none}
.bpc .bpc-counts li{white-space:nowrap}
.bpc .bpc-counts .bpc-zero{color:var(--muted);font-weight:400}
.bpc .bpc-meta{display:flex;flex-wrap:wrap;gap:0 1.25rem;margin:0;color:var(--muted)}
.bpc .bpc-meta div{display:flex;gap:.35rem;min-width:0}
.bpc .bpc-meta dt{font-weight:600;white-space:nowrap}.bpc .bpc-meta dd{margin:0;min-width:0}
.bpc .bpc-notice{margin:.2rem 0;padding:.2rem .5rem;border-left:3px solid var(--mismatch);background:var(--card)}
.bpc .bpc-card{position:relative;margin:0 0 .4rem;padding:.3rem .6rem .35rem;background:var(--card);
border:1px solid var(--line);border-left:4px solid var(--line);border-radius:6px}
.bpc .bpc-card-mismatch{border-left-color:var(--mismatch)}
.bpc .bpc-card-error{border-left-color:var(--error)}
.bpc .bpc-card-nondifferentiable{border-left-color:var(--nondifferentiable)}
.bpc .bpc-head{display:flex;flex-wrap:wrap;align-items:baseline;gap:0 .7rem;margin:0;padding-right:4.5rem;
font-size:1em;font-weight:400}
.bpc .bpc-culprit-value{background:var(--mark);border-radius:3px;padding:0 .15rem}
.bpc .bpc-hint{margin:.1rem 0 0}
.bpc .bpc-hint b,.bpc .bpc-message b{font-weight:600}
.bpc .bpc-card details{margin:0}
.bpc .bpc-card summary{position:absolute;top:.3rem;right:.6rem;cursor:pointer;color:var(--muted)}
.bpc .bpc-card details[open]{margin-top:.3rem;border-top:1px solid var(--line);padding-top:.25rem}
.bpc .bpc-scroll{overflow-x:auto;max-width:100%}
.bpc .bpc-table{border-collapse:collapse;margin:.2rem 0;font-size:.93em}
.bpc .bpc-table th,.bpc .bpc-table td{padding:.1rem .6rem .1rem 0;text-align:left;vertical-align:baseline;
border:0;border-bottom:1px solid var(--line);background:none;color:var(--fg)}
.bpc .bpc-table th{font-weight:600;white-space:nowrap}
.bpc .bpc-table td{overflow-wrap:normal}.bpc .bpc-table td.bpc-note{overflow-wrap:break-word;min-width:16rem}
.bpc .bpc-table td.num{text-align:right}
.bpc .bpc-traceback{font:.85em ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;margin:.2rem 0}
.bpc .bpc-skips{margin:0;padding:0;list-style:none}
.bpc .bpc-skips summary{cursor:pointer}
.bpc .bpc-footer{margin-top:1rem;color:var(--muted);font-size:.85em}
@media (max-width:40rem){.bpc .bpc-head{padding-right:0}
.bpc .bpc-card summary{position:static}}
"""


def render(report: Report) -> str:
    """The report as a page: what `--format html` writes, one file that needs nothing else."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"color-scheme\" content=\"light dark\">\n"
        f"<title>{escape(_headline(report))}</title>\n<style>{CSS}body{{margin:0;background:var(--bg)}}"
        ":root{--bg:#fff}@media (prefers-color-scheme:dark){:root{--bg:#0d1117}}</style>\n</head>\n<body>\n"
        f"{_body(report, 'bpc bpc-page')}</body>\n</html>\n"
    )


def fragment(report: Report) -> str:
    """The same report for a notebook cell: its styles travel with it, scoped under `.bpc`."""
    return _body(report, "bpc", f"<style>{CSS}</style>")


def _body(report: Report, classes: str, style: str = "") -> str:
    parts = [f"<div class=\"{classes}\">", style, _summary(report), _look_at(report), _ok(report), _skipped(report)]
    parts.append(f"<p class=\"bpc-footer\">backprop-check {_version()} · {report.summary['total']} {_plural('result', report.summary['total'])}</p>")
    return "\n".join(part for part in parts if part) + "\n</div>\n"


# -- the summary ------------------------------------------------------------------------------


def _headline(report: Report) -> str:
    summary, code = report.summary, report.exit_code
    results = f"{summary['total']} {_plural('result', summary['total'])}"
    if code == EXIT_INTERRUPTED:
        return f"backprop-check interrupted: a partial report of {results}"
    if code == EXIT_NOT_CHECKED:
        return "backprop-check: not checked"
    if code == 0:
        return f"backprop-check passed: {summary['ok']} ok of {results}"
    failing = [f"{summary[v]} {_plural(v, summary[v])}" for v in (Verdict.ERROR, Verdict.MISMATCH) if summary[v]]
    return f"backprop-check failed: {' and '.join(failing)} of {results}"


def _summary(report: Report) -> str:
    summary = report.summary
    status = "ok" if report.exit_code == 0 else "mismatch"
    counts = "\n".join(
        f"<li class=\"bpc-v bpc-{v}{'' if summary[v] else ' bpc-zero'}\"><span class=\"num\">{summary[v]}</span> {v}</li>"
        for v in VERDICTS
    )
    counts += f"\n<li class=\"bpc-v\">exit <span class=\"num\">{report.exit_code}</span></li>"
    lines = [
        "<header class=\"bpc-summary\">",
        f"<div class=\"bpc-top\"><h1 class=\"bpc-title bpc-{status}\">{escape(_headline(report))}</h1>",
        f"<ul class=\"bpc-counts\">{counts}</ul></div>",
        *(f"<p class=\"bpc-notice\">{_prose(line)}</p>" for line in notices(report)),
        "<dl class=\"bpc-meta\">",
        *(f"<div><dt>{name}</dt> <dd>{value}</dd></div>" for name, value in _meta(report)),
        "</dl>",
        "</header>",
    ]
    return "\n".join(lines)


def _meta(report: Report) -> list[tuple[str, str]]:
    """(name, HTML) pairs: when, how long, with which options and which versions."""
    started = datetime.fromtimestamp(report.started, timezone.utc)
    when = f"<time datetime=\"{started.isoformat(timespec='seconds')}\">{started:%Y-%m-%d %H:%M:%S} UTC</time>"
    cases = sum(len(names) for names in report.files.values())
    read = f" · {len(report.files)} {_plural('case file', len(report.files))}, {cases} {_plural('case', cases)}" if report.files else ""
    meta = [("run", f"{when} · <span class=\"num\">{report.seconds:.2f} s</span>{read}")]
    meta.append(("versions", " · ".join(escape(v) for v in _versions())))
    plan = report.plan
    if plan is not None:
        options = [
            f"--device {','.join(plan.devices)}" + ("" if plan.strict_devices else " (skipped when missing)"),
            f"--dtype {','.join(plan.dtypes)}",
            f"--points {plan.points}",
            f"--seed {plan.seed}",
            f"--timeout {plan.timeout:g}" if plan.timeout is not None else "no timeout",
        ]
        options += ["--full"] if plan.full else []
        options += [f"-k '{plan.select}'"] if plan.select else []
        meta.append(("options", " · ".join(f"<span class=\"bpc-code\">{escape(o)}</span>" for o in options)))
    return meta


def _versions() -> list[str]:
    import torch

    return [f"backprop_check {_version()}", f"torch {torch.__version__}", f"Python {platform.python_version()}", platform.system()]


def _version() -> str:
    from backprop_check.version import __version__

    return __version__


# -- what needs a look ------------------------------------------------------------------------


def _look_at(report: Report) -> str:
    flagged = sorted((r for r in report.results if r.verdict in LOOK_AT), key=lambda r: LOOK_AT.index(r.verdict))
    if not flagged:
        return ""
    groups = _grouped(flagged)
    cases = len({group[0].case for group in groups})
    heading = f"<h2 class=\"bpc-h2\">Needs a look: {len(flagged)} {_plural('result', len(flagged))} in {cases} {_plural('case', cases)}</h2>"
    return "<section class=\"bpc-look\">\n" + heading + "\n" + "\n".join(_card(group) for group in groups) + "\n</section>"


def _grouped(results: list[Result]) -> list[list[Result]]:
    """Results that say the same thing (a case's float64 and float32 runs with the same verdict,
    culprit, worst element and hints) as one group: one card, each run's message inside."""
    groups: dict[tuple[object, ...], list[Result]] = {}
    for result in results:
        check = worst(result)
        key = (result.case, result.verdict, result.culprit, check.label if check else None, tuple(result.hints), result.first_bad_node)
        groups.setdefault(key, []).append(result)
    return list(groups.values())


def _card(group: list[Result]) -> str:
    first = group[0]
    check = worst(first)
    runs = _runs(group)
    facts = [f"<span class=\"bpc-v bpc-{first.verdict}\">{first.verdict}</span>", f"<span class=\"bpc-code bpc-case\">{escape(first.case)}</span>"]
    facts += [f"<span class=\"bpc-muted\">{escape(runs)}</span>"] if runs else []
    if first.culprit:
        facts.append(f"<span>culprit <b class=\"bpc-culprit\">{escape(first.culprit)}</b></span>")
    if check is not None:
        facts.append(f"<span>element <span class=\"bpc-code bpc-element\">{escape(check.label)}</span></span>")
        facts += _values(check, first.culprit)
    if first.first_bad_node:
        facts.append(f"<span>first bad node <span class=\"bpc-code\">{escape(first.first_bad_node)}</span></span>")
    lines = [f"<article class=\"bpc-card bpc-card-{first.verdict}\">", f"<h3 class=\"bpc-head\">{chr(10).join(facts)}</h3>"]
    lines += [f"<p class=\"bpc-hint\"><b>hint</b> {_prose(hint)}</p>" for hint in first.hints]
    if not first.hints:  # then the message is what the reviewer reads first
        lines.append(f"<p class=\"bpc-hint bpc-message\">{_prose(first.message)}</p>")
    shown = None if first.hints else first.message
    lines += ["<details><summary>details</summary>", *(_details(result, shown) for result in group), "</details>", "</article>"]
    return "\n".join(lines)


def _values(check: Check, culprit: str | None) -> list[str]:
    """The three values at the worst element, the odd one out marked, the numerical one with
    its error bar (how far past its tolerance the difference is: in the details)."""
    shown = []
    for source in ("manual", "numerical", "autograd"):
        value = getattr(check, source)
        if value is None:
            continue
        text = _num(value) + (f" ± {check.error_bar:.2g}" if source == "numerical" and check.error_bar is not None else "")
        marked = " bpc-culprit-value" if source == culprit else ""
        shown.append(f"<span>{source} <span class=\"num{marked}\">{escape(text)}</span></span>")
    return shown


def _details(result: Result, shown: str | None = None) -> str:
    """One run's whole story: its message (unless the card `shown` it already), where the case
    is, the failing checks, its notes, an error's traceback."""
    where = f"{result.file}:{result.line}" if result.file and result.line else result.file or ""
    about = [f"<b>{escape(_run(result))}</b>" if result.device != "-" else ""]
    about += [f"<span class=\"bpc-code\">{escape(where)}</span>"] if where else []
    about += [f"at the {escape(result.point)}"] if result.point else []
    about += [f"seed {result.seed}"] if result.seed is not None else []
    about += [f"{result.points} points"] if result.points else []
    lines = [f"<p class=\"bpc-p bpc-muted\">{' · '.join(a for a in about if a)}</p>"]
    if result.message != shown:
        lines.append(f"<p class=\"bpc-p bpc-message\">{_prose(result.message)}</p>")
    failing = [c for c in result.checks if c.verdict != Verdict.OK]
    if failing:
        lines.append(_checks(failing, len(result.checks) - len(failing)))
    notes = result.notes + ([NUMPY_NOTE] if result.numpy else [])
    lines += [f"<p class=\"bpc-p bpc-muted\">note: {_prose(note)}</p>" for note in notes]
    if result.traceback:
        lines.append(f"<pre class=\"bpc-traceback\">{escape(result.traceback)}</pre>")
    return "\n".join(lines)


def _checks(checks: list[Check], agreeing: int) -> str:
    head = "".join(f"<th>{name}</th>" for name in ("element", "kind", "verdict", "culprit", "manual", "numerical", "±", "autograd", "× tolerance", "note"))
    rows = []
    for check in checks:
        ratio = "" if not check.ratio else ("∞" if check.ratio == float("inf") else f"{check.ratio:.3g}")
        cells = [
            f"<td class=\"bpc-code\">{escape(check.label)}</td>",
            f"<td>{check.kind}</td>",
            f"<td class=\"bpc-v bpc-{check.verdict}\">{check.verdict}</td>",
            f"<td>{escape(check.culprit or '')}</td>",
            *(f"<td class=\"num\">{_num(v)}</td>" for v in (check.manual, check.numerical)),
            f"<td class=\"num\">{'' if check.error_bar is None else f'{check.error_bar:.2g}'}</td>",
            f"<td class=\"num\">{_num(check.autograd)}</td>",
            f"<td class=\"num\">{ratio}</td>",
            f"<td class=\"bpc-note\">{_prose(check.note or '')}</td>",
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    more = f"<p class=\"bpc-p bpc-muted\">and {agreeing} more {_plural('tensor', agreeing)} that agree</p>" if agreeing else ""
    return f"<div class=\"bpc-scroll\"><table class=\"bpc-table\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>{more}"


# -- ok and skipped ---------------------------------------------------------------------------


def _ok(report: Report) -> str:
    results = [r for r in report.results if r.verdict == Verdict.OK]
    if not results:
        return ""
    head = "".join(f"<th>{name}</th>" for name in ("case", "run", "closest call", "of its tolerance", "points", "time"))
    rows = []
    for result in results:
        check = max(result.checks, key=lambda c: c.ratio, default=None)
        cells = [
            f"<td class=\"bpc-code\">{escape(result.case)}</td>",
            f"<td class=\"num\">{escape(_run(result))}</td>",
            f"<td class=\"bpc-code\">{escape(check.label) if check else ''}</td>",
            f"<td class=\"num\">{f'{check.ratio:.2g}×' if check else ''}</td>",
            f"<td class=\"num\">{result.points}</td>",
            f"<td class=\"num\">{result.seconds:.2f} s</td>",
        ]
        rows.append(f"<tr class=\"bpc-ok-row\">{''.join(cells)}</tr>")
    return (
        f"<section class=\"bpc-oks\">\n<h2 class=\"bpc-h2\"><span class=\"bpc-ok\">{len(results)} ok</span>: "
        "manual, numerical and autograd agree</h2>\n"
        f"<div class=\"bpc-scroll\"><table class=\"bpc-table\"><thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table></div>\n</section>"
    )


def _skipped(report: Report) -> str:
    reasons: dict[str, list[str]] = defaultdict(list)
    for result in report.results:
        if result.verdict == Verdict.SKIPPED:
            reasons[result.message].append(result.id)
    if not reasons:
        return ""
    items = [
        f"<li><details><summary><span class=\"bpc-v bpc-skipped\">{len(ids)} skipped</span>: {_prose(reason)}</summary>\n"
        f"<p class=\"bpc-p bpc-muted\">{escape(', '.join(ids))}</p></details></li>"
        for reason, ids in reasons.items()
    ]
    return "<section class=\"bpc-skips-section\">\n<h2 class=\"bpc-h2\">Skipped</h2>\n<ul class=\"bpc-skips\">\n" + "\n".join(items) + "\n</ul>\n</section>"


# -- text -------------------------------------------------------------------------------------


def _prose(text: str) -> str:
    """A message or hint, escaped, with every number that has an exponent kept on one line."""
    return EXPONENT.sub(lambda m: f"<span class=\"num\">{m.group(0)}</span>", escape(text))


def _runs(results: list[Result]) -> str:
    """`cpu float64, float32 · cuda float32`: the runs of a group, by device."""
    dtypes: dict[str, list[str]] = defaultdict(list)
    for result in results:
        if result.device != "-":
            dtypes[result.device].append(result.dtype)
    return " · ".join(f"{device} {', '.join(names)}" for device, names in dtypes.items())


def _run(result: Result) -> str:
    return f"{result.device} {result.dtype}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.8g}"


def _plural(word: str, count: int) -> str:
    if word == Verdict.MISMATCH:
        return "mismatch" if count == 1 else "mismatches"
    return word if count == 1 else f"{word}s"
