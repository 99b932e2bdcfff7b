"""The delta sweep on ``linear``: source-task error and target excess risk against the perturbation size.

Problem: ``LinearEnvironment(dim=30, rank=5, delta, noise=1, seed)`` for every delta of ``--deltas``
(0 = a representation shared exactly) and seeds ``0 .. --seeds - 1``; ``T = 50`` source tasks of
``n = 100`` samples from ``env.sample_tasks(50, 100, Generator(seed * 1000 + 1))``; for every target
size ``m`` of ``--target-samples`` (10, 20, 50), ``--target-tasks`` fresh random targets (new heads and
perturbations of the same size delta) from ``Generator(seed * 1000 + 2 + m)``. float64 on the CPU.

Methods (``adaptrep.methods.make_method`` names, and ADAPTREP with each source penalty):

* ``adaptrep``: the default ``AdaptRep()``: the source penalty cross-validated on the source
  tasks (:mod:`adaptrep.adaptive`), and fine-tuning on the target with the strength that the source
  tasks' perturbation variance sets (``FineTune(strength="source")``);
* ``adaptrep-theory``: ``AdaptRep(penalty="theory")``, the theory formula for the source penalty
  (the default before 0.4.0), the same target step;
* ``adaptrep-cvft``: ``AdaptRep(finetune=FineTune(strength="cv"))``, the default source penalty and
  the target strength cross-validated on the target's own samples (the target step before 0.4.0);
* ``adaptrep-prior``: ``AdaptRep(prior=True)``, the defaults plus the source heads' population as the
  target head's prior (the empirical-Bayes posterior mean; the default for data without ground truth);
* ``frozenrep`` (ERM), ``perm``, ``spectral``, ``mom`` (:mod:`adaptrep.competitors`), ``target-only``.

Per method, delta and seed: the source-task error (max and mean over the 50 source tasks of
``||beta_hat_t - beta_t||_2`` for the method's ``source_predictors``; none for target-only), the
source-training time, and the mean exact excess risk ``||beta_hat - beta||^2`` over the targets for
every ``m``. Written to ``--csv`` (one row per method x delta x seed); the table printed is the mean
over seeds; the figure ``--figure`` plots those means against delta (source max error, and the target
risk for each ``m``).

Run from the repository root (about 15 minutes with one thread)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/delta_sweep.py

It also prints adaptrep's source max error minus ``perm``'s and ``adaptrep-theory``'s, paired by seed.
The source tasks alone, with 40 seeds (``docs/results/delta_sweep_source.csv``, about six minutes)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/delta_sweep.py --seeds 40 --target-samples none \\
        --methods adaptrep,adaptrep-theory,frozenrep,perm,spectral,mom --csv docs/results/delta_sweep_source.csv
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
import torch

from adaptrep.environments import LinearEnvironment
from adaptrep.finetune import FineTune
from adaptrep.methods import AdaptRep, Method, make_method
from adaptrep.metrics import source_task_errors

METHODS = ["adaptrep", "adaptrep-theory", "adaptrep-cvft", "adaptrep-prior", "frozenrep", "perm", "spectral", "mom", "target-only"]


def build(name: str) -> Method:
    if name == "adaptrep-theory":
        return AdaptRep(penalty="theory")
    if name == "adaptrep-cvft":
        return AdaptRep(finetune=FineTune(strength="cv"))
    if name == "adaptrep-prior":
        return AdaptRep(prior=True)
    return make_method(name)


def run(deltas: list[float], seeds: int, ms: list[int], target_tasks: int, methods: list[str]) -> pd.DataFrame:
    rows = []
    for delta in deltas:
        for seed in range(seeds):
            env = LinearEnvironment(30, 5, delta=delta, noise=1.0, seed=seed)
            source = env.sample_tasks(50, 100, torch.Generator().manual_seed(seed * 1000 + 1))
            targets = {m: env.sample_tasks(target_tasks, m, torch.Generator().manual_seed(seed * 1000 + 2 + m)) for m in ms}
            for name in methods:
                method = build(name)
                start = time.perf_counter()
                method.fit(source)
                row: dict[str, object] = {"delta": delta, "seed": seed, "method": name, "source_time": time.perf_counter() - start}
                if method.source_predictors is not None:
                    row.update(source_task_errors(method.source_predictors, source.beta))
                else:
                    row.update(source_error_max=math.nan, source_error_mean=math.nan)
                row["source_penalty"] = method.info.get("source_penalty", math.nan)
                for m, target in targets.items():
                    beta_hat = method.adapt(target, torch.Generator().manual_seed(seed * 1000 + 3 + m)).beta
                    row[f"risk_m{m}"] = float(env.excess_risk(beta_hat, target.beta).mean())
                rows.append(row)
            print(f"delta {delta} seed {seed} done", flush=True)
    return pd.DataFrame(rows)


def paired(results: pd.DataFrame) -> pd.DataFrame:
    """Per delta, ``adaptrep``'s source max error minus each of ``perm``'s and ``adaptrep-theory``'s,
    paired by seed: mean, standard error and the number of seeds where adaptrep is not behind.
    (Its margin over FROZENREP is at least the theory penalty's exactly when it is not behind that.)"""
    errors = results.pivot_table(index=["delta", "seed"], columns="method", values="source_error_max")
    rows = []
    for other in ("perm", "adaptrep-theory"):
        if {"adaptrep", other} <= set(errors.columns):
            difference = (errors["adaptrep"] - errors[other]).groupby(level="delta")
            not_behind = difference.apply(lambda d: int((d <= 0).sum()))
            frame = pd.DataFrame({"mean": difference.mean(), "se": difference.sem(), "not_behind": not_behind, "seeds": difference.size()})
            rows.append(frame.assign(minus=other).reset_index())
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def figure(summary: pd.DataFrame, ms: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["source_error_max"] + [f"risk_m{m}" for m in ms]
    titles = ["source tasks: max ||beta_hat_t - beta_t||"] + [f"target excess risk, m = {m}" for m in ms]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8))
    for ax, column, title in zip(axes, columns, titles, strict=True):
        for name, group in summary.groupby("method", sort=False):
            if group[column].notna().any():
                ax.plot(group["delta"], group[column], marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("delta")
        if column != "source_error_max":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)  # every method has target risks; target-only has no source predictors
    fig.suptitle("linear: d = 30, k = 5, T = 50, n = 100, sigma = 1 (mean over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltas", default="0,0.15,0.3,0.6,1.0,1.5")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--target-samples", default="10,20,50", help="target sizes m; 'none' for the source tasks only (no figure)")
    parser.add_argument("--target-tasks", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--csv", default="docs/results/delta_sweep.csv")
    parser.add_argument("--figure", default="docs/figures/delta_sweep.png")
    parser.add_argument("--from-csv", action="store_true", help="summarise and plot an existing --csv instead of running")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deltas = [float(x) for x in args.deltas.split(",")]
    ms = [] if args.target_samples == "none" else [int(x) for x in args.target_samples.split(",")]
    if args.from_csv:
        results = pd.read_csv(args.csv)
    else:
        results = run(deltas, args.seeds, ms, args.target_tasks, args.methods.split(","))
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        results.to_csv(args.csv, index=False)
    columns = ["source_error_max", "source_error_mean", *[f"risk_m{m}" for m in ms], "source_time"]
    summary = results.groupby(["delta", "method"], sort=False)[columns].mean().reset_index()
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(summary.round(4).to_string(index=False))
        print("adaptrep's source max error minus another method's, paired by seed:")
        print(paired(results).round(4).to_string(index=False))
    if ms:
        figure(summary, ms, Path(args.figure))


if __name__ == "__main__":
    main()
