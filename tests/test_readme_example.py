"""The README's training-loop example runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path


from sipo_plugin.objectives import available_objectives

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Using the objectives in your own training loop"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, f"README.md lost the heading {HEADING!r}"
    match = re.search(r"```python\n(.*?)```", text[text.index(HEADING) :], flags=re.DOTALL)
    assert match, f"no ```python block after {HEADING!r}"
    return match.group(1)


def test_readme_training_loop_example_runs():
    code = readme_example()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme_example__"})
    printed = stdout.getvalue()
    assert "calibrated kappa" in printed
    for name in available_objectives():
        assert f"{name}: loss=" in printed, printed
