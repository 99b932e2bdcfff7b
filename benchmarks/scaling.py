"""Scaling of linear source training (``fit_source`` on :func:`adaptrep.solvers.task_statistics`).

Problem: ``LinearEnvironment(dim=d, rank=k, delta=0.3, noise=0.5, seed=0)``, ``T`` tasks of ``n``
samples from ``env.sample_tasks(T, n, torch.Generator().manual_seed(1))``, float64 on the CPU;
ADAPTREP with the theory penalty at the true noise level, ``theory_penalty(0.5, d, k, T, n)``.
The statistics are chosen by shape (the samples when ``n < d``, else the ``d x d`` Gram matrices)
and the ``B`` step as ``fit_source`` chooses it (dense up to ``d k = DENSE_MAX`` on Gram matrices,
conjugate gradients above and on samples).

Each point runs in a fresh subprocess (so that its peak resident memory, ``ru_maxrss``, is its
own: data, statistics and solver) and times two runs ``fit_source(..., max_iter=K, tol=0, gtol=0,
select_after=1)`` with ``K = K_lo`` and ``K_hi``: the time of one (single-restart) iteration is
their difference over ``K_hi - K_lo``, so that the fixed cost (moment inits, Lipschitz constants,
the first batched iteration, final heads) cancels. The flops of one iteration are counted from the
code (``iteration_flops``, with the measured conjugate-gradient iterations per ``B`` step), and the
flop bound is ``flops / peak`` with ``peak`` a 1024 x 1024 float64 matmul on the same threads.
Both the wall time and the process CPU time are recorded; the exponents are fitted to the CPU
time, which is less disturbed when other processes share the machine (with one thread, the
default, they agree on an idle machine).

Sweeps around a base point ``d = 256, k = 8, n = 20, T = 1000``: ``T`` in 100 ... 10,000, ``d`` in
20 ... 1024, ``n`` in 10 ... 200 and ``k`` in 2 ... 16 (``k < n``: with ``n <= k`` a task's head
fits its samples exactly and the objective does not depend on ``B``). For each sweep the growth
exponent of the time per iteration (and of the peak memory above the interpreter's baseline) is
the slope of a least-squares line in log-log.

Writes ``docs/results/scaling.csv`` and ``docs/figures/scaling.png``. Run from the repository root::

    .venv/bin/python benchmarks/scaling.py            # all sweeps, about 10 minutes on 2 idle cores
    .venv/bin/python benchmarks/scaling.py --quick    # short sweeps, about 1 minute
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = {"d": 256, "k": 8, "n": 20, "T": 1000}
SWEEPS = {
    "T": [100, 316, 1000, 3162, 10000],
    "d": [20, 64, 128, 256, 512, 1024],
    "n": [10, 20, 50, 100, 200],
    "k": [2, 4, 8, 16],
}
QUICK_BASE = {"d": 128, "k": 4, "n": 20, "T": 300}
QUICK_SWEEPS = {"T": [100, 300, 1000], "d": [32, 128, 512], "n": [10, 20, 50], "k": [2, 4, 8]}
#: the time that the exponents are fitted to: process CPU time, which other processes on a shared
#: machine disturb less than wall time (both are in the CSV)
TIME = "cpu_seconds_per_iteration"
FIELDS = [
    "sweep",
    "T",
    "d",
    "n",
    "k",
    "statistics",
    "b_solver",
    "seconds_per_iteration",
    "cpu_seconds_per_iteration",
    "cg_per_iteration",
    "gflops_per_iteration",
    "flop_bound_seconds",
    "bound_ratio",
    "peak_rss_mb",
    "baseline_rss_mb",
    "setup_seconds",
]


def iteration_flops(T: int, d: int, n: int, k: int, samples: bool, dense_b: bool, cg: float, inner: int) -> float:
    """Flops of one single-restart ``fit_source`` iteration (ADAPTREP), counted from the code.

    Samples (``n < d``): the basis product ``X B`` (``2 T n d k``), per FISTA step the kernel
    products and head reductions (``4 T n^2 + 4 T n k``), the right-hand side ``X^T (y - K a)``
    (``2 T n d + 2 T d k``) and per conjugate-gradient iteration ``G_t (P w_t)`` and the outer
    products (``4 T n d + 4 T d k``). Dense Gram matrices: ``G B`` (``2 T d^2 k``), per FISTA step
    ``G z`` (``2 T d^2``), and the same ``B`` step on ``G_t``.
    A dense ``B`` step builds ``sum_t G_t (x) w_t w_t^T`` (``2 T d^2 k^2``, plus ``2 T n d^2`` to form
    the ``G_t`` from samples) and factors it (``(d k)^3 / 3``).
    """
    if samples:
        basis, step, rhs, product = 2 * T * n * d * k, 4 * T * n * n + 4 * T * n * k, 2 * T * n * d + 2 * T * d * k, 4 * T * n * d
        build = 2 * T * n * d * d
    else:
        basis, step, rhs, product = 2 * T * d * d * k, 2 * T * d * d + 4 * T * d * k, 2 * T * d * d + 2 * T * d * k, 2 * T * d * d
        build = 0
    objective = 2 * T * n * k + 4 * T * n * n if samples else 2 * T * d * d + 2 * T * d * k
    if dense_b:
        b_step = build + 2 * T * d * d * k * k + (d * k) ** 3 / 3
    else:
        b_step = (cg + 1) * (product + 4 * T * d * k + 2 * d * d * k + 2 * d * k * k)
    return basis + 2 * T * n * k * k + (inner + 3) * step + rhs + b_step + objective


def peak_flops(size: int = 1024, repeats: int = 3) -> float:
    """Float64 flops per second of a square matmul on this process's threads."""
    import torch

    a = torch.randn(size, size, dtype=torch.float64)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_point(T: int, d: int, n: int, k: int, k_lo: int, k_hi: int) -> dict[str, float | int | str]:
    """One measurement (in this process): returns the CSV fields of the point."""
    import torch

    from adaptrep.environments import LinearEnvironment
    from adaptrep.methods import theory_penalty
    from adaptrep.solvers import DENSE_MAX, SampleGram, fit_source, task_statistics

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    env = LinearEnvironment(dim=d, rank=k, delta=0.3, noise=0.5, seed=0)
    tasks = env.sample_tasks(T, n, torch.Generator().manual_seed(1))
    stats = task_statistics(tasks.X, tasks.y)
    del tasks
    mu = theory_penalty(0.5, d, k, T, n)
    setup = time.perf_counter() - start
    runs = []
    for K in (k_lo, k_hi):
        t0, c0 = time.perf_counter(), time.process_time()
        fit = fit_source(*stats, k, penalty=mu, max_iter=K, tol=0.0, gtol=0.0, select_after=1)
        runs.append((time.perf_counter() - t0, time.process_time() - c0, fit.cg_iterations))
    per_iteration = (runs[1][0] - runs[0][0]) / (k_hi - k_lo)
    cpu_per_iteration = (runs[1][1] - runs[0][1]) / (k_hi - k_lo)
    cg = (runs[1][2] - runs[0][2]) / (k_hi - k_lo)
    samples = isinstance(stats.gram, SampleGram)
    dense_b = not samples and d * k <= DENSE_MAX
    flops = iteration_flops(T, d, n, k, samples, dense_b, cg, inner=10)
    bound = flops / peak_flops()
    return {
        "T": T,
        "d": d,
        "n": n,
        "k": k,
        "statistics": "samples" if samples else "gram",
        "b_solver": "dense" if dense_b else "cg",
        "seconds_per_iteration": per_iteration,
        "cpu_seconds_per_iteration": cpu_per_iteration,
        "cg_per_iteration": cg,
        "gflops_per_iteration": flops / 1e9,
        "flop_bound_seconds": bound,
        "bound_ratio": cpu_per_iteration / bound,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline,
        "setup_seconds": setup,
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sweeps (about a minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point (CPU time is summed over threads)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scaling.csv")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "scaling.png")
    parser.add_argument("--point", type=int, nargs=4, metavar=("T", "D", "N", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, nargs=2, default=None, help="K_lo K_hi of the timing runs")
    args = parser.parse_args()
    k_lo, k_hi = args.iterations or ((1, 4) if args.quick else (2, 7))
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_point(*args.point, k_lo, k_hi)))
        return
    base, sweeps = (QUICK_BASE, QUICK_SWEEPS) if args.quick else (BASE, SWEEPS)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rows: list[dict[str, float | int | str]] = []
    started = time.perf_counter()
    for sweep, values in sweeps.items():
        for value in values:
            point = dict(base, **{sweep: value})
            command = [sys.executable, __file__, "--point", *(str(point[key]) for key in ("T", "d", "n", "k")), "--threads", str(args.threads)]
            command += ["--iterations", str(k_lo), str(k_hi)]
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            row = {"sweep": sweep, **json.loads(result.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(
                f"{sweep}={value:>6}: {row['statistics']:>7} {row['b_solver']:>5} {float(row['seconds_per_iteration']):8.3f} s/it"
                f" (CPU {float(row['cpu_seconds_per_iteration']):.3f} s)"
                f" (bound {float(row['flop_bound_seconds']):.3f} s, CPU/bound {float(row['bound_ratio']):5.1f}x; CG {float(row['cg_per_iteration']):4.1f}/it)"
                f"  peak {float(row['peak_rss_mb']):7.0f} MB  [{time.perf_counter() - started:5.0f} s]",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print("growth exponents (log-log least squares):")
    exponents = {}
    for sweep in sweeps:
        part = [row for row in rows if row["sweep"] == sweep]
        xs = [float(row[sweep]) for row in part]
        time_slope = slope(xs, [float(row[TIME]) for row in part])
        memory_slope = slope(xs, [float(row["peak_rss_mb"]) - float(row["baseline_rss_mb"]) for row in part])
        exponents[sweep] = (time_slope, memory_slope)
        print(f"  {sweep}: time per iteration ~ {sweep}^{time_slope:.2f}, peak memory above baseline ~ {sweep}^{memory_slope:.2f}")
    plot(rows, sweeps, exponents, args.figure)
    print(f"wrote {args.out} and {args.figure} in {time.perf_counter() - started:.0f} s")


def plot(rows: list[dict[str, float | int | str]], sweeps: dict[str, list[int]], exponents: dict[str, tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(4 * len(sweeps), 3.6))
    for ax, sweep in zip(axes, sweeps, strict=True):
        part = [row for row in rows if row["sweep"] == sweep]
        xs = [float(row[sweep]) for row in part]
        ax.loglog(xs, [float(row[TIME]) for row in part], "o-", label=f"CPU time / iteration (~{sweep}^{exponents[sweep][0]:.2f})")
        ax.loglog(xs, [float(row["seconds_per_iteration"]) for row in part], "x:", color="tab:gray", label="wall time / iteration")
        ax.loglog(xs, [float(row["flop_bound_seconds"]) for row in part], "s--", label="flop bound")
        ax.set_xlabel(sweep)
        ax.set_ylabel("seconds")
        twin = ax.twinx()
        twin.loglog(xs, [float(row["peak_rss_mb"]) for row in part], "^:", color="tab:green", label=f"peak RSS (~{sweep}^{exponents[sweep][1]:.2f} above base)")
        twin.set_ylabel("MB")
        lines = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="upper left")
    fig.suptitle("linear ADAPTREP source training: one iteration (samples when n < d; CG B step on samples or when dk > 512)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
