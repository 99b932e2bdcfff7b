"""Figures and a Markdown report from a results table (a layer on top of the core)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .store import describe_labels  # noqa: E402
from .theory import oracle_head_risk, target_only_risk  # noqa: E402

#: Colour and marker of each method in the figures (every name in :data:`adaptrep.methods.METHODS`).
STYLE = {
    "adaptrep": ("tab:red", "o"),
    "frozenrep": ("tab:blue", "s"),
    "frozenrep-ft": ("tab:cyan", "D"),
    "target-only": ("tab:gray", "^"),
    "oracle-head": ("tab:green", "v"),
    "oracle-ft": ("tab:olive", "P"),
    "maml": ("tab:purple", "*"),
    "fomaml": ("tab:pink", "X"),
    "anil": ("tab:brown", "h"),
    "reptile": ("tab:orange", "<"),
    "pooled": ("black", ">"),
    "perm": ("gold", "s"),
    "spectral": ("lime", "o"),
    "mom": ("slateblue", "^"),
    "ridge-per-task": ("chocolate", "v"),
    "mixed-effects": ("darkgreen", "*"),
    "pretrain-probe": ("teal", "d"),
    "pretrain-ft": ("darkmagenta", "p"),
}

#: Styles handed out, in turn, to methods without an entry in :data:`STYLE`.
_FALLBACK_COLORS = ("navy", "teal", "darkgoldenrod", "crimson", "indigo", "sienna", "darkslategray", "magenta")
_FALLBACK_MARKERS = ("d", "p", "H", "8", "1", "2", "+", "|")


def styles(methods: list[str]) -> dict[str, tuple[str, str]]:
    """``(color, marker)`` for each method: its :data:`STYLE` entry, or else the next pair of a fallback
    cycle (colours and markers of its own), so that no two methods of one figure look the same."""
    n = len(_FALLBACK_COLORS)
    cycle = ((_FALLBACK_COLORS[i % n], _FALLBACK_MARKERS[(i + i // n) % n]) for i in range(n * n))  # every pair once
    spare = itertools.chain(cycle, itertools.repeat(("black", "x")))
    out: dict[str, tuple[str, str]] = {}
    for method in dict.fromkeys(methods):
        out[method] = STYLE[method] if method in STYLE else next(spare)
    return out


def metric_of(results: pd.DataFrame) -> str:
    """The results' main metric: ``excess_risk`` (simulated settings) or ``query_loss`` (task data)."""
    if "excess_risk" in results and results["excess_risk"].notna().any():
        return "excess_risk"
    return "query_loss"


def summarise(results: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Mean of the main metric (:func:`metric_of`) and its 95% interval per (experiment x) setting x method x m.

    Simulated settings: the interval is Student's ``mean +- t_{0.975, s-1} SE`` over the ``s``
    per-seed means (targets within a seed share a learned representation, so they are not
    independent). Task data: over every target task of every seed (each seed is a new split of
    the tasks into source and target tasks).
    """
    metric = metric or metric_of(results)
    keys = [key for key in ("experiment", "setting") if key in results] + ["method", "m"]
    unit = ["seed"] if metric == "excess_risk" else ["seed", "target_task"]
    per_seed = results.groupby([*keys, *unit], sort=False)[metric].mean().reset_index()
    out = per_seed.groupby(keys, sort=False)[metric].agg(mean="mean", std="std", seeds="count").reset_index()
    half = (t_quantile_975(out["seeds"] - 1) * out["std"] / np.sqrt(out["seeds"])).fillna(0.0)
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    return out.drop(columns="std")


def t_quantile_975(dof: pd.Series) -> pd.Series:
    """0.975 quantile of Student's t with ``dof`` degrees of freedom (exact; NaN below 1)."""
    from scipy.special import stdtrit  # not scipy.stats: that import costs a sweep's report a second

    values = dof.to_numpy(dtype=float)
    return pd.Series(np.where(values >= 1, stdtrit(np.maximum(values, 1.0), 0.975), np.nan), index=dof.index)


def risk_figure(results: pd.DataFrame, config: dict[str, Any], path: Path) -> Path:
    """Excess risk vs m (log-log), mean and 95% interval per method, closed forms overlaid."""
    summary = summarise(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    look = styles([str(method) for method in summary["method"].unique()])
    for method, part in summary.groupby("method", sort=False):
        color, marker = look[str(method)]
        ax.plot(part["m"], part["mean"], marker=marker, color=color, label=str(method))
        ax.fill_between(part["m"], part["ci_low"].clip(lower=1e-6), part["ci_high"], color=color, alpha=0.15)
    ms = np.unique(np.geomspace(min(summary["m"]), max(summary["m"]), 200).round().astype(int))
    d, k, sigma = config["dim"], config["rank"], config["noise"]
    if config["setting"] in ("linear", "linear-hard"):
        closed = [target_only_risk(d, int(m), sigma) for m in ms]
        ax.plot(ms, closed, "k--", lw=1, label=r"theory: target-only $\sigma^2 d/(m-d-1)$")
    if config["setting"] == "linear":
        ax.plot(ms, [oracle_head_risk(d, k, int(m), sigma, config["delta"]) for m in ms], ":", color="tab:green", lw=1.2, label="theory: head-only on $B^*$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    top = summary["ci_high"].max()
    ax.set_ylim(max(summary["mean"].min() / 2, 1e-4), min(top * 1.5, 50 * summary["mean"].median()))
    ax.set_xlabel("target samples m")
    ax.set_ylabel("excess risk on the target")
    target = f", {config.get('target', 'adversarial')} targets" if config["setting"] == "linear-hard" else ""
    ax.set_title(f"{config['setting']}: d={d}, k={k}, T={config['tasks']}, n={config['samples']}{target}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def representation_figure(results: pd.DataFrame, path: Path) -> Path:
    """Hard cases: share of each method's learned span in the opt block (per seed, and mean)."""
    per_seed = results.dropna(subset=["opt_block_share"]).groupby(["method", "seed"], sort=False)["opt_block_share"].first().reset_index()
    methods = list(dict.fromkeys(per_seed["method"]))
    look = styles([str(method) for method in methods])
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for i, method in enumerate(methods):
        values = per_seed.loc[per_seed["method"] == method, "opt_block_share"].to_numpy()
        color, _ = look[str(method)]
        ax.bar(i, values.mean(), color=color, alpha=0.6)
        ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("opt_block_share of the learned span")
    ax.set_title("which block does the representation keep?", fontsize=10)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: The config keys that matter for each setting, beside the sizes.
SETTING_KEYS = {
    "linear": ("noise", "delta"),
    "linear-hard": ("noise", "eps"),
    "logistic": ("delta", "scale"),
    "relu-net": ("noise", "delta"),
    "relu-hard": ("noise", "eps"),
    "sinusoid": ("noise", "inner_lr", "inner_steps", "meta_iterations"),
}


def write_report(
    results: pd.DataFrame, configs: list[dict[str, Any]], out: Path, labels: list[dict[str, Any]] | None = None, failed: pd.DataFrame | None = None
) -> Path:
    """Figures under ``out/figures`` and ``out/report.md`` with tables that link them.

    ``configs[i]`` is experiment ``i``'s config and ``labels[i]`` its sweep values (shown in its
    heading); ``failed`` lists failed runs (``id``, ``seed``, ``labels``, ``error``) to report.
    """
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    evaluation = all(config.get("kind") == "evaluate" for config in configs)
    intro = "Loss on the target tasks' query samples." if evaluation else "Mean excess risk on target tasks (95% interval over seeds in the figures)."
    lines = ["# adaptrep report", "", intro, ""]
    unique = len({config["setting"] for config in configs}) == len(configs)
    for index, config in enumerate(configs):
        setting = config["setting"]
        part = results[results["experiment"] == index] if "experiment" in results else results[results["setting"] == setting]
        if part.empty:
            continue
        if config.get("kind") == "evaluate":
            stem = setting if unique else f"{index}-{setting}"
            lines += _evaluate_section(part, config, figures, stem, describe_labels(labels[index] if labels else {}, skip=("setting",)))
            continue
        stem = setting if unique else f"{index}-{setting}"
        varied = describe_labels(labels[index] if labels else {}, skip=("setting",))
        heading = f"## {setting}" if unique else f"## experiment {index}: {setting}"
        lines += [
            f"{heading} ({varied})" if varied else heading,
            "",
            "```",
            " ".join(
                [f"{key}={config[key]}" for key in ("dim", "rank", "tasks", "samples", "target_tasks", *SETTING_KEYS[setting]) if config.get(key) is not None]
                + [f"seeds={part['seed'].nunique()}"]
            ),
            "```",
            "",
        ]
        table = summarise(part).pivot(index="method", columns="m", values="mean").reindex(list(dict.fromkeys(part["method"])))
        lines += [_markdown(table, "{:.4f}"), ""]
        if setting == "linear":
            theory = pd.DataFrame(
                {
                    m: [
                        target_only_risk(config["dim"], m, config["noise"]),
                        oracle_head_risk(config["dim"], config["rank"], m, config["noise"], config["delta"]),
                    ]
                    for m in table.columns
                },
                index=["theory: target-only", "theory: oracle-head"],
            )
            lines += ["Closed forms (expectations):", "", _markdown(theory, "{:.4f}"), ""]
        columns = [c for c in ("subspace_distance", "opt_block_share", "source_error_max", "source_error_mean") if c in part]
        rep = part.groupby("method", sort=False)[columns].mean().dropna(how="all").dropna(axis=1, how="all")
        if not rep.empty:
            lines += ["Learned representation and source-task estimates (mean over seeds):", "", _markdown(rep, "{:.3f}"), ""]
        name = risk_figure(part, config, figures / f"{stem}_risk.png").name
        lines += [f"![excess risk vs m, {setting}](figures/{name})", ""]
        if "opt_block_share" in part and part["opt_block_share"].notna().any():
            name = representation_figure(part, figures / f"{stem}_representation.png").name
            lines += [f"![representation diagnostic, {setting}](figures/{name})", ""]
    shown = {config["setting"] for config in configs}
    others = [setting for setting in SETTING_KEYS if setting not in shown]
    if others and not evaluation:
        lines += ["## Other settings", "", "Not in this run; each has a preset (the acceptance configuration) that runs with:", ""]
        lines += [f"    adaptrep run --setting {setting}" for setting in others] + [""]
    if failed is not None and not failed.empty:
        lines += ["## Failed runs", "", "| run | seed | values | error |", "|---|---|---|---|"]
        for row in failed.itertuples():
            values = describe_labels(row.labels)
            lines.append(f"| {row.id} | {row.seed} | {values} | {str(row.error).replace('|', '/')} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _evaluate_section(part: pd.DataFrame, config: dict[str, Any], figures: Path, stem: str, varied: str) -> list[str]:
    """The report's section for an evaluation on task data: query loss (and accuracy) per method x
    shots with 95% intervals over target tasks and seeds, a figure, and which method is best where."""
    source = config.get("dataset") or config.get("data")
    heading = f"## {config['setting']}" + (f" ({varied})" if varied else "")
    lines = [
        heading,
        "",
        f"Data: `{source}`; loss {config['loss']}, model {config['model']}, rank {config.get('rank') or 'chosen from the data'}; "
        f"{part['seed'].nunique()} seeds (task splits), {part.groupby('seed')['target_task'].nunique().sum()} target tasks in all.",
        "",
    ]
    metrics = [m for m in ("query_loss", "query_accuracy") if m in part and part[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        summary = summarise(part, metric)
        lines += [f"Mean {metric.replace('_', ' ')} on the query samples (± 95% interval):", "", evaluation_table(part, metric), ""]
        lines += standings(part, metric)
        look = styles([str(method) for method in summary["method"]])
        for method, rows in summary.groupby("method", sort=False):
            color, marker = look[str(method)]
            ax.plot(rows["m"], rows["mean"], marker=marker, color=color, label=str(method))
            ax.fill_between(rows["m"], rows["ci_low"], rows["ci_high"], color=color, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xticks(sorted(summary["m"].unique()), [str(m) for m in sorted(summary["m"].unique())])
        ax.minorticks_off()
        if metric == "query_loss":
            ax.set_yscale("log")
        ax.set_xlabel("shots (support samples per task, per class for classification)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{config['setting']}: target tasks' query samples", fontsize=10)
    fig.tight_layout()
    path = figures / f"{stem}_query.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    lines += [f"![query metrics, {config['setting']}](figures/{path.name})", ""]
    held = [c for c in ("source_loss_max", "source_loss_mean") if c in part]
    if held:  # --source-holdout: one value per method and seed
        table = part.groupby(["method", "seed"], sort=False)[held].first().groupby("method", sort=False).mean().dropna(how="all")
        if not table.empty:
            lines += ["Each method's own predictors of the source tasks on their held-out samples (mean over seeds):", "", _markdown(table, "{:.4f}"), ""]
    return lines


def evaluation_table(part: pd.DataFrame, metric: str) -> str:
    """Markdown table of an evaluation: methods x shots, the mean of ``metric`` ± its 95% interval."""
    summary = summarise(part, metric)
    table = summary.assign(cell=[f"{m:.4g} ± {(h - m):.2g}" for m, h in zip(summary["mean"], summary["ci_high"], strict=True)])
    pivot = table.pivot(index="method", columns="m", values="cell").reindex(list(dict.fromkeys(part["method"])))
    pivot.columns = [f"{c} shots" for c in pivot.columns]
    return _markdown_text(pivot)


def paired_difference(part: pd.DataFrame, metric: str, method: str, other: str, shots: int) -> tuple[float, float, int]:
    """Mean of ``metric`` of ``method`` minus ``other``'s at ``shots``, paired on the same target task
    of the same split, with its 95% interval's half-width and the number of pairs."""
    rows = part[part["m"] == shots]
    a = rows[rows["method"] == method].set_index(["seed", "target_task"])[metric]
    b = rows[rows["method"] == other].set_index(["seed", "target_task"])[metric]
    diff = (a - b).dropna()
    n = len(diff)
    half = float(t_quantile_975(pd.Series([n - 1])).iloc[0] * diff.std() / np.sqrt(n)) if n > 1 else float("nan")
    return float(diff.mean()), half, n


def standings(part: pd.DataFrame, metric: str, focus: str = "adaptrep") -> list[str]:
    """Generated sentences on an evaluation: per shot count the best method and those within its
    interval, and where ``focus`` (if run) stands against the best of the others, paired."""
    summary = summarise(part, metric)
    higher = metric == "query_accuracy"
    name = metric.replace("_", " ")
    lines = []
    for shots, rows in summary.groupby("m"):
        best = rows.loc[rows["mean"].idxmax() if higher else rows["mean"].idxmin()]
        tied = rows[(rows["ci_high"] >= best["ci_low"]) & (rows["ci_low"] <= best["ci_high"]) & (rows["method"] != best["method"])]
        others = f"; within its interval: {', '.join(tied['method'])}" if len(tied) else "; no other method within its interval"
        text = f"- {shots} shots: best {name} {best['method']} ({best['mean']:.4g} ± {best['ci_high'] - best['mean']:.2g}){others}."
        rivals = rows[rows["method"] != focus]
        if focus in set(rows["method"]) and len(rivals):
            rival = rivals.loc[rivals["mean"].idxmax() if higher else rivals["mean"].idxmin()]["method"]
            mean, half, n = paired_difference(part, metric, focus, str(rival), int(shots))
            better = (mean > half) if higher else (mean < -half)
            worse = (mean < -half) if higher else (mean > half)
            verdict = "better" if better else "worse" if worse else "no different within the interval"
            text += f" {focus} minus the best other ({rival}), paired over {n} target tasks: {mean:+.3g} ± {half:.2g} ({verdict})."
        lines.append(text)
    lines.append("")
    return lines


def _markdown_text(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join([str(frame.index.name or "")] + [str(c) for c in frame.columns]) + " |"
    rule = "|" + "---|" * (len(frame.columns) + 1)
    body = [
        "| " + " | ".join([str(index)] + [str(v) if pd.notna(v) else "–" for v in row]) + " |" for index, row in zip(frame.index, frame.to_numpy(), strict=True)
    ]
    return "\n".join([header, rule, *body])


def _markdown(frame: pd.DataFrame, fmt: str) -> str:
    header = "| " + " | ".join([str(frame.index.name or "")] + [str(c) for c in frame.columns]) + " |"
    rule = "|" + "---|" * (len(frame.columns) + 1)
    body = [
        "| " + " | ".join([str(index)] + [fmt.format(v) if pd.notna(v) else "–" for v in row]) + " |"
        for index, row in zip(frame.index, frame.to_numpy(), strict=True)
    ]
    return "\n".join([header, rule, *body])
