"""The report layer: method styles in the figures and the 95% interval of the summary."""

import matplotlib.pyplot as plt
import pandas as pd

from adaptrep import report
from adaptrep.methods import METHODS


def test_every_method_has_a_style_of_its_own():
    pairs = [report.STYLE[name] for name in METHODS]  # KeyError: a method without an entry
    assert len(set(pairs)) == len(pairs)


def test_unknown_methods_get_distinct_fallback_styles():
    names = [*METHODS, "new-a", "new-b", "new-c"]
    look = report.styles(names)
    assert [look[name] for name in METHODS] == [report.STYLE[name] for name in METHODS]
    assert len(set(look.values())) == len(names)


def test_risk_figure_draws_each_method_in_its_own_style(tmp_path, monkeypatch):
    names = [*METHODS, "new-a", "new-b"]
    rows = [
        {"method": name, "m": m, "seed": seed, "excess_risk": 0.1 * (i + 1) / m * (1 + 0.1 * seed)}
        for i, name in enumerate(names)
        for m in (10, 40)
        for seed in (0, 1)
    ]
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)  # keep the figure to look at its lines
    config = {"setting": "sinusoid", "dim": 1, "rank": 1, "noise": 0.1, "tasks": 5, "samples": 10}
    report.risk_figure(pd.DataFrame(rows), config, tmp_path / "risk.png")
    lines = {line.get_label(): (line.get_color(), line.get_marker()) for line in figures[0].axes[0].get_lines()}
    plt.close(figures[0])
    assert set(names) <= set(lines)
    assert len({lines[name] for name in names}) == len(names)
