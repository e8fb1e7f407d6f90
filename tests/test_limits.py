"""Time limits and what a failed import keeps for --traceback."""
from __future__ import annotations

import textwrap

from backprop_check import run
from backprop_check.commands.cli import main


def test_a_case_file_that_hangs_at_import_is_an_error_and_the_others_still_run(tmp_path):
    (tmp_path / "hangs.py").write_text("while True:\n    pass\n")
    (tmp_path / "fine.py").write_text(textwrap.dedent('''
        from backprop_check import case

        @case(params={"w": 1.0})
        def fine(w):
            return w ** 2
    '''))
    report = run([tmp_path], devices=["cpu"], dtypes=["float64"], points=0, timeout=1)
    verdicts = {r.case: (r.verdict, r.message) for r in report.results}
    assert verdicts["fine"][0] == "ok"
    assert verdicts["hangs"][0] == "error"
    assert "importing the file ran past its time limit of 1s" in verdicts["hangs"][1]


def test_traceback_shows_where_a_case_file_failed_to_import(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import no_such_module_anywhere\n")
    assert main(["run", str(tmp_path / "broken.py"), "--traceback"]) == 2
    captured = capsys.readouterr()
    assert "ModuleNotFoundError" in captured.out  # the one-line report
    assert "Traceback (most recent call last)" in captured.err
    assert "import no_such_module_anywhere" in captured.err
