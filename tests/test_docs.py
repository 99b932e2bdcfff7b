"""The README's Python example runs and shows what it claims (ADAPTREP beats FROZENREP at m = 40)."""

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
