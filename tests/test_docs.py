"""The documentation's examples run and show what they claim; its tables are the committed results."""

import contextlib
import csv
import importlib.util
import io
import math
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def run_printing(code: str, name: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, name, "exec"), {})
    return printed.getvalue()


def shown_output(path: Path, code: str) -> str:
    """The ```text block that follows ``code`` in ``path`` (the output the page shows)."""
    text = path.read_text()
    after = text[text.index(code) + len(code) :]
    match = re.search(r"```text\n(.*?)```", after, re.S)
    assert match is not None, f"{path.name}: no output block after the example"
    return match.group(1)


def test_readme_python_example_runs_and_shows_its_output():
    readme = ROOT / "README.md"
    code = python_blocks(readme)[0]
    printed = run_printing(code, "README.md")
    risks = {name: float(value) for name, value in (line.split() for line in printed.splitlines())}
    assert set(risks) == {"AdaptRep", "FrozenRep", "TargetOnly"}
    assert risks["AdaptRep"] < risks["FrozenRep"] < risks["TargetOnly"]
    shown = {name: float(value) for name, value in (line.split() for line in shown_output(readme, code).splitlines())}
    assert shown.keys() == risks.keys()
    for name, value in risks.items():
        assert math.isclose(shown[name], value, rel_tol=2e-3, abs_tol=2e-4), (name, shown[name], value)


@pytest.mark.slow  # three methods trained on a CNN: minutes on a loaded 2-core machine
def test_readme_own_module_example_runs_and_shows_its_output():
    """The README's CNN on generated 5-way image tasks: every method well above chance (0.2), as shown."""
    readme = ROOT / "README.md"
    (code,) = [block for block in python_blocks(readme) if "nn.Conv2d" in block]
    assert len(code.strip().splitlines()) <= 25
    printed = run_printing(code, "README.md")
    accuracy = {line.split()[0]: float(line.split()[-1]) for line in printed.splitlines()}
    assert set(accuracy) == {"adaptrep", "frozenrep", "anil"} and min(accuracy.values()) > 0.4, printed
    shown = {line.split()[0]: float(line.split()[-1]) for line in shown_output(readme, code).splitlines()}
    # the README shows the output of a 2-core machine with default settings (as in CI); float32 sums
    # follow the threads in use and the cross-validated step counts are discrete, so elsewhere the
    # accuracies move (the README says by how much) and only the margin over chance is checked
    if torch.get_num_threads() == 2 and "OMP_NUM_THREADS" not in os.environ:
        assert all(abs(shown[name] - value) <= 0.011 for name, value in accuracy.items()), (printed, shown)


def test_meta_learning_example_runs_and_learns():
    """The docs' example of MAML on a user's ``nn.Module``: the meta loss falls, as the page shows."""
    page = ROOT / "docs" / "methods.md"
    (code,) = [block for block in python_blocks(page) if "meta_train(" in block]
    printed = run_printing(code, "methods.md")
    first, last = (float(value) for value in re.findall(r"[0-9]+\.[0-9]+", printed))
    assert last < 0.7 * first, printed
    shown_first, shown_last = (float(value) for value in re.findall(r"[0-9]+\.[0-9]+", shown_output(page, code)))
    assert math.isclose(shown_first, first, rel_tol=0.02) and math.isclose(shown_last, last, rel_tol=0.02), (printed, shown_first, shown_last)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_tables", ROOT / "docs" / "gen_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_directive_expands_from_a_committed_result_file():
    gen = load_generator()
    pages = sorted((ROOT / "docs").rglob("*.md"))
    expanded = 0
    for page in pages:
        text = page.read_text()
        count = len(gen.DIRECTIVE.findall(text))
        out = gen.expand(text, page.name)
        assert not gen.DIRECTIVE.search(out), page
        expanded += count
    assert expanded >= 10


def test_risk_table_cell_is_the_mean_of_the_committed_rows():
    """One cell recomputed by hand from the CSV (no pandas), and a directive naming a missing file fails."""
    gen = load_generator()
    with open(ROOT / "docs" / "results" / "default.csv", newline="") as handle:
        values = [float(row["excess_risk"]) for row in csv.DictReader(handle) if (row["setting"], row["method"], row["m"]) == ("linear-hard", "adaptrep", "25")]
    assert len(values) == 5 * 20
    table = gen.expand("{{ risk file=default setting=linear-hard }}")
    header, _, *rows = table.splitlines()
    column = [cell.strip() for cell in header.strip("|").split("|")].index("m = 25")
    (row,) = [line for line in rows if line.startswith("| `adaptrep` |")]
    assert row.strip("|").split("|")[column].strip() == f"{sum(values) / len(values):.4f}"
    try:
        gen.expand("{{ risk file=no-such-file setting=linear }}")
    except gen.TableError as error:
        assert "no-such-file" in str(error)
    else:
        raise AssertionError("a missing result file must fail")


def test_representation_table_has_the_source_task_errors():
    """``{{ representation }}``: ADAPTREP's largest source-task error is the mean over the committed rows
    (by hand from the CSV); methods without per-task estimates show a dash."""
    gen = load_generator()
    with open(ROOT / "docs" / "results" / "default.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["setting"] == "linear"]
    values = [float(row["source_error_max"]) for row in rows if row["method"] == "adaptrep"]
    header, _, *lines = gen.expand("{{ representation file=default setting=linear }}").splitlines()
    column = [cell.strip() for cell in header.strip("|").split("|")].index("largest source-task error")
    cells = {line.strip("|").split("|")[0].strip(): line.strip("|").split("|")[column].strip() for line in lines}
    assert cells["`adaptrep`"] == f"{sum(values) / len(values):.2f}" and cells["`oracle-ft`"] == "—"


def test_sweep_table_bolds_each_columns_best(tmp_path, monkeypatch):
    """``{{ sweep }}``: the mean over seeds per method and value, the column's smallest in bold, or its
    largest with ``best=max`` (a share, where more is better)."""
    gen = load_generator()
    (tmp_path / "toy.csv").write_text("method,x,seed,v\na,1,0,1.0\na,1,1,3.0\nb,1,0,5.0\nb,1,1,5.0\n")
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    low = gen.expand("{{ sweep file=toy by=x metric=v }}").splitlines()
    high = gen.expand("{{ sweep file=toy by=x metric=v best=max }}").splitlines()
    assert low[2:] == ["| `a` | **2.000** |", "| `b` | 5.000 |"]
    assert high[2:] == ["| `a` | 2.000 |", "| `b` | **5.000** |"]


def test_number_format():
    gen = load_generator()
    assert gen.fmt(0.123456) == "0.1235"
    assert gen.fmt(266986.69) == "2.7e5"
    assert gen.fmt(float("nan")) == "—"
    assert gen.significant(0.039612) == "0.0396"
    assert gen.significant(0.04) == "0.0400"
    assert gen.significant(2.2512) == "2.25"


def test_readme_links_and_figure_exist():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", readme)
    assert "docs/figures/linear-hard_risk.png" in targets
    for target in targets:
        assert (ROOT / target).exists(), target
    assert len(readme.splitlines()) <= 150


def test_docs_yaml_examples_are_valid_configs():
    """The sweep spec of docs/sweeps.md expands to its 3 deltas x 2 noises x 3 seeds, and the config files
    in docs/configs/ and the example of docs/cli.md resolve (every key known, every value valid)."""
    import yaml

    from adaptrep.experiment import resolve_config
    from adaptrep.sweep import SweepSpec, expand

    (spec_text,) = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "sweeps.md").read_text(), re.S)
    runs = expand(SweepSpec(**yaml.safe_load(spec_text)))
    assert len(runs) == 3 * 2 * 3
    assert sorted({(run.config.delta, run.config.noise) for run in runs}) == [(d, s) for d in (0.1, 0.3, 0.5) for s in (0.25, 0.5)]
    examples = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "cli.md").read_text(), re.S)]
    examples += [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "docs" / "configs").glob("*.yaml"))]
    assert len(examples) >= 3
    for example in examples:
        for experiment in example["experiments"]:
            config = resolve_config(experiment)
            assert config.setting == experiment["setting"]
