"""The documentation's tables, generated from the committed result files in ``docs/results/``.

A page asks for a table with a directive on a line of its own, e.g.::

    {{ risk file=default setting=linear-hard }}

and this module replaces the line with the Markdown table. It is used two ways:

* as an MkDocs hook (``hooks:`` in ``mkdocs.yml``): every page's directives are expanded at build
  time, so the site's tables always show the committed numbers; a directive that names a missing
  file, setting or column fails the build;
* as a script: ``python docs/gen_tables.py docs/results.md`` prints the page with its tables
  expanded (no argument: every page under ``docs/``).

Directives (``file`` is ``docs/results/<file>.csv``, a ``results.csv`` as ``adaptrep run`` writes it;
means are over every seed and target task of a method and ``m``):

* ``risk file= setting= [metric=excess_risk] [digits=4] [label=...]``: methods x m, the mean of
  ``metric``;
* ``ratio file= setting= of=METHOD to=M1,M2,...``: per m, the mean excess risk of ``of`` divided by
  that of each method in ``to``;
* ``representation file= setting=``: per method with a representation, the mean subspace distance
  to the true representation and (hard cases) the opt-block share;
* ``meta-representation file= [labels=a,b]``: experiments (rows, labelled by their setting or by
  ``labels``) x methods, the subspace distance (and the opt-block share in brackets);
* ``meta-largest-m file= [digits=3] [labels=a,b]``: experiments x methods, the mean excess risk at
  each experiment's largest m (``digits`` significant digits);
* ``presets``: the settings' presets (``adaptrep.experiment.PRESETS``);
* ``evaluation file= [metric=query_loss] [focus=adaptrep]``: an ``adaptrep evaluate`` result, methods x
  shots with 95% intervals over target tasks and splits, and the generated sentences of its report;
* ``sweep file= by= metric= [digits=3]``: methods x values of ``by``, the mean of ``metric``;
* ``scaling [file=scaling]``: ``benchmarks/scaling.py``'s sweeps, each with its points, the fitted
  growth exponents of the time per iteration and of the peak memory, and the time over the flop bound.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

DOCS = Path(__file__).resolve().parent
RESULTS = DOCS / "results"
DIRECTIVE = re.compile(r"^\{\{ *([a-z][a-z-]*)((?: +[a-z_]+=[^ }]+)*) *\}\}[ \t]*$", re.M)


class TableError(ValueError):
    """A directive that cannot be expanded (unknown name, missing file, setting or column)."""


def fmt(value: float, digits: int = 4) -> str:
    """A mean as the tables show it: ``digits`` decimals, or ``2.7e5`` style from 1000 on; ``—`` for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 1000:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@cache
def load(name: str) -> pd.DataFrame:
    path = RESULTS / f"{name}.csv"
    if not path.is_file():
        raise TableError(f"no result file {path.relative_to(DOCS.parent)}")
    return pd.read_csv(path)


def select(frame: pd.DataFrame, setting: str) -> pd.DataFrame:
    rows = frame[frame["setting"] == setting]
    if rows.empty:
        raise TableError(f"no rows of setting {setting!r} (settings: {', '.join(pd.unique(frame['setting']))})")
    return rows


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame.columns:
        raise TableError(f"no column {name!r}")
    return frame[name]


def means(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Methods (in the order they first appear) x m: the mean of ``metric``."""
    column(frame, metric)
    table = frame.groupby(["method", "m"], sort=False)[metric].mean().unstack("m")
    return table.reindex(index=list(pd.unique(frame["method"])), columns=sorted(table.columns))


def risk(file: str, setting: str, metric: str = "excess_risk", digits: str = "4", label: str = "method") -> str:
    table = means(select(load(file), setting), metric)
    header = [label.replace("_", " ")] + [f"m = {m}" for m in table.columns]
    return markdown_table(header, [[f"`{method}`"] + [fmt(v, int(digits)) for v in row] for method, row in table.iterrows()])


def ratio(file: str, setting: str, of: str, to: str) -> str:
    table = means(select(load(file), setting), "excess_risk")
    others = to.split(",")
    for method in [of, *others]:
        if method not in table.index:
            raise TableError(f"no method {method!r} in {file} / {setting}")
    header = ["ratio"] + [f"m = {m}" for m in table.columns]
    rows = [[f"`{of}` / `{other}`"] + [f"{value:.2f}" for value in table.loc[of] / table.loc[other]] for other in others]
    return markdown_table(header, rows)


def _representation_means(frame: pd.DataFrame) -> pd.DataFrame:
    metrics = ("subspace_distance", "opt_block_share", "source_error_max", "source_error_mean")
    columns = [name for name in metrics if name in frame.columns and frame[name].notna().any()]
    if not columns:
        raise TableError("no representation metrics in these rows")
    per_method = frame.groupby("method", sort=False)[columns].mean()
    return per_method.reindex(list(pd.unique(frame["method"]))).dropna(how="all")


def representation(file: str, setting: str) -> str:
    table = _representation_means(select(load(file), setting))
    names = {
        "subspace_distance": "subspace distance to the true span",
        "opt_block_share": "opt-block share",
        "source_error_max": "largest source-task error",
        "source_error_mean": "mean source-task error",
    }
    header = ["method"] + [names[c] for c in table.columns]
    return markdown_table(header, [[f"`{method}`"] + [fmt(v, 2) for v in row] for method, row in table.iterrows()])


def groups(frame: pd.DataFrame, labels: str | None) -> list[tuple[str, pd.DataFrame]]:
    """The experiments of a results file in order, each labelled by its setting or by ``labels``
    (comma-separated, ``_`` for a space)."""
    keys = ["setting", "experiment"] if "experiment" in frame.columns else ["setting"]
    parts = [(str(key[0] if isinstance(key, tuple) else key), rows) for key, rows in frame.groupby(keys, sort=False)]
    if labels is not None:
        names = [label.replace("_", " ") for label in labels.split(",")]
        if len(names) != len(parts):
            raise TableError(f"{len(names)} labels for {len(parts)} experiments")
        parts = [(name, rows) for name, (_, rows) in zip(names, parts, strict=True)]
    return parts


def meta_representation(file: str, labels: str | None = None) -> str:
    frame = load(file)
    methods = list(pd.unique(frame["method"]))
    rows = []
    for label, part in groups(frame, labels):
        table = _representation_means(part)
        cells = []
        for method in methods:
            if method not in table.index:
                cells.append("—")
                continue
            distance = fmt(table.loc[method, "subspace_distance"], 2)
            share = table.loc[method].get("opt_block_share", math.nan)
            cells.append(distance if math.isnan(share) else f"{distance} ({fmt(share, 2)})")
        rows.append([label, *cells])
    return markdown_table(["subspace distance (opt-block share)"] + [f"`{m}`" for m in methods], rows)


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits (``0.0396`` -> ``0.0396``, ``2.251`` -> ``2.25``)."""
    if math.isnan(value) or abs(value) >= 1000:
        return fmt(value)
    return f"{value:#.{digits}g}".rstrip(".")


def meta_largest_m(file: str, digits: str = "3", labels: str | None = None) -> str:
    frame = load(file)
    methods = list(pd.unique(frame["method"]))
    rows = []
    for label, part in groups(frame, labels):
        largest = part["m"].max()
        table = means(part[part["m"] == largest], "excess_risk")
        rows.append([f"{label}, m = {largest}"] + [significant(table.loc[m, largest], int(digits)) if m in table.index else "—" for m in methods])
    return markdown_table(["mean excess risk at the largest m"] + [f"`{m}`" for m in methods], rows)


def presets() -> str:
    from adaptrep.experiment import PRESETS

    keys = ["dim", "rank", "tasks", "samples", "target_samples", "target_tasks", "delta", "eps", "noise", "scale", "seeds"]
    names = ["d", "k", "T", "n", "m", "targets", "δ", "ε", "σ", "s", "seeds"]
    rows = []
    for setting, preset in PRESETS.items():
        cells = []
        for key in keys:
            value = preset.get(key)
            cells.append("" if value is None else ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        rows.append([f"`{setting}`", *cells])
    return markdown_table(["setting", *names], rows)


def evaluation(file: str, metric: str = "query_loss", focus: str = "adaptrep") -> str:
    """An ``adaptrep evaluate`` result: methods x shots with 95% intervals, then the report's generated
    sentences (best method per shot count; ``focus`` against the best other, paired)."""
    from adaptrep.report import evaluation_table, standings

    frame = load(file)
    column(frame, metric)
    return "\n".join([evaluation_table(frame, metric), "", *standings(frame, metric, focus)]).rstrip()


def sweep(file: str, by: str, metric: str, digits: str = "3", best: str = "min") -> str:
    """Methods x values of ``by`` (e.g. delta): the mean of ``metric`` over seeds, each column's
    best value in bold (``best``: ``min``, or ``max`` for a metric where more is better)."""
    if best not in ("min", "max"):
        raise TableError(f"sweep: best must be 'min' or 'max'; got {best!r}")
    frame = load(file)
    column(frame, by)
    column(frame, metric)
    table = frame.groupby(["method", by], sort=False)[metric].mean().unstack(by).dropna(how="all")
    table = table.reindex(index=[name for name in pd.unique(frame["method"]) if name in table.index], columns=sorted(table.columns))
    top = table.min() if best == "min" else table.max()
    header = ["method"] + [f"{by} = {value:g}" for value in table.columns]
    rows = [
        [f"`{method}`"] + [f"**{fmt(v, int(digits))}**" if v == top[col] else fmt(v, int(digits)) for col, v in row.items()] for method, row in table.iterrows()
    ]
    return markdown_table(header, rows)


def scaling(file: str = "scaling") -> str:
    """Per sweep of ``benchmarks/scaling.py``: the swept values, the CPU time per iteration at each,
    the slopes of least-squares lines in log-log (time per iteration, and peak memory above the
    interpreter's baseline) and the range of time over the flop bound."""
    import numpy as np

    frame = load(file)
    for name in ("sweep", "cpu_seconds_per_iteration", "peak_rss_mb", "baseline_rss_mb", "bound_ratio"):
        column(frame, name)

    def slope(x: Any, v: Any) -> float:
        return float(np.polyfit(np.log(x), np.log(v), 1)[0])

    rows = []
    for name, part in frame.groupby("sweep", sort=False):
        x = part[name].to_numpy(float)
        seconds = part["cpu_seconds_per_iteration"].to_numpy(float)
        memory = (part["peak_rss_mb"] - part["baseline_rss_mb"]).to_numpy(float)
        bound = part["bound_ratio"]
        rows.append(
            [
                f"`{name}`",
                ", ".join(f"{v:g}" for v in x),
                ", ".join(f"{float(f'{v * 1000:.2g}'):g}" for v in seconds),
                f"{slope(x, seconds):.2f}",
                f"{slope(x, memory):.2f}",
                f"{bound.min():.1f}-{bound.max():.1f}x",
            ]
        )
    header = ["sweep", "values", "CPU ms per iteration", "time exponent", "memory exponent", "time / flop bound"]
    return markdown_table(header, rows)


DIRECTIVES: dict[str, Callable[..., str]] = {
    "scaling": scaling,
    "evaluation": evaluation,
    "sweep": sweep,
    "risk": risk,
    "ratio": ratio,
    "representation": representation,
    "meta-representation": meta_representation,
    "meta-largest-m": meta_largest_m,
    "presets": presets,
}


def expand(markdown: str, where: str = "page") -> str:
    """``markdown`` with every directive line replaced by its table."""

    def one(match: re.Match[str]) -> str:
        name, arguments = match.group(1), match.group(2).split()
        if name not in DIRECTIVES:
            raise TableError(f"{where}: unknown table directive {name!r} (known: {', '.join(DIRECTIVES)})")
        options: dict[str, Any] = dict(argument.split("=", 1) for argument in arguments)
        try:
            return DIRECTIVES[name](**options)
        except TypeError as error:
            raise TableError(f"{where}: bad options for {name!r}: {error}") from None
        except TableError as error:
            raise TableError(f"{where}: {match.group(0).strip()}: {error}") from None

    return DIRECTIVE.sub(one, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: expand the page's table directives (a directive that fails stops the build)."""
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown, page.file.src_uri)
    except TableError as error:
        raise PluginError(str(error)) from None


def main(argv: list[str]) -> int:
    pages = [Path(arg) for arg in argv] or sorted(DOCS.rglob("*.md"))
    for page in pages:
        text = page.read_text()
        if DIRECTIVE.search(text) or argv:
            print(expand(text, str(page)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
