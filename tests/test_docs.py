"""The README's Python examples run and show what they claim."""

import contextlib
import io
import re
from pathlib import Path


def test_readme_python_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    risks = dict(line.split() for line in printed.getvalue().splitlines())
    assert set(risks) == {"AdaptRep", "FrozenRep", "TargetOnly"}
    assert float(risks["AdaptRep"]) < float(risks["FrozenRep"]) < float(risks["TargetOnly"])


def test_readme_meta_learning_example_runs_and_learns():
    """The second example: MAML on a user's ``nn.Module``; the meta loss falls."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[1]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    first, last = (float(value) for value in re.findall(r"[0-9.]+", printed.getvalue()))
    assert last < 0.7 * first, printed.getvalue()
