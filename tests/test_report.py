"""The report layer: method styles in the figures and the 95% interval of the summary."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

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


def test_t_quantile_is_exact():
    dof = pd.Series([1, 2, 16, 20, 29, 30, 100, 0])
    expected = [12.7062, 4.3027, 2.1199, 2.0860, 2.0452, 2.0423, 1.9840]
    got = report.t_quantile_975(dof)
    assert got.iloc[:-1].tolist() == pytest.approx(expected, abs=1e-4)
    assert np.isnan(got.iloc[-1])


def test_summary_interval_uses_t_for_the_seed_count():
    seeds = 21  # 20 degrees of freedom
    values = np.linspace(0.5, 1.5, seeds)
    results = pd.DataFrame({"method": "adaptrep", "m": 10, "seed": range(seeds), "excess_risk": values})
    row = report.summarise(results).iloc[0]
    half = 2.0860 * values.std(ddof=1) / np.sqrt(seeds)
    assert row["ci_high"] - row["mean"] == pytest.approx(half, rel=1e-4)


def test_standings_pair_the_focus_method_with_the_best_other_on_the_same_targets():
    """The paired difference is the mean of per-target differences with Student's interval (scipy's
    paired t interval); a shared per-target effect that would swamp an unpaired interval cancels."""
    from scipy import stats

    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        for target in range(20):
            shared = rng.normal(scale=5.0)
            for method, shift in (("adaptrep", -0.3), ("mixed-effects", 0.0), ("target-only", 4.0)):
                rows.append(dict(method=method, m=5, seed=seed, target_task=target, query_loss=10 + shared + shift + rng.normal(scale=0.1)))
    frame = pd.DataFrame(rows)
    mean, half, n = report.paired_difference(frame, "query_loss", "adaptrep", "mixed-effects", 5)
    diff = frame[frame.method == "adaptrep"].query_loss.to_numpy() - frame[frame.method == "mixed-effects"].query_loss.to_numpy()
    low, high = stats.ttest_1samp(diff, 0.0).confidence_interval(0.95)
    assert n == 60 and mean == pytest.approx(diff.mean()) and half == pytest.approx((high - low) / 2)
    (line,) = [text for text in report.standings(frame, "query_loss") if text]
    assert "best query loss adaptrep" in line and "within its interval: mixed-effects" in line
    assert "adaptrep minus the best other (mixed-effects), paired over 60 target tasks: -0.2" in line and "(better)" in line
