"""Sweep throughput: a 40-run CPU-bound grid with 1 and 2 workers (parallel efficiency), and the
store's per-run overhead (register, claim, commit the results) and read-back time.

    .venv/bin/python benchmarks/sweep_throughput.py            # the 40-run grid
    .venv/bin/python benchmarks/sweep_throughput.py --runs 10  # a quicker look

Timings include everything a user waits for: starting the worker processes (which import torch),
computing, and committing every run to the SQLite store.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from adaptrep.store import Store
from adaptrep.sweep import InProcess, ProcessPool, SweepSpec, compute, execute, expand


def grid(runs: int) -> SweepSpec:
    base = dict(setting="linear", dim=20, rank=3, tasks=100, samples=25, target_samples=[40], target_tasks=20, methods=["adaptrep", "frozenrep", "target-only"])
    return SweepSpec(base=base, grid={"delta": [0.2, 0.4]}, seeds=runs // 2)


def timed_sweep(spec: SweepSpec, backend_factory, folder: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with Store(folder / "sweep.db") as store:
        outcome = execute(expand(spec), store, backend_factory())
    return time.perf_counter() - start, outcome.done


def store_overhead(count: int, folder: Path) -> None:
    run = expand(grid(2))[0]
    rows, seconds, versions = compute(run.stored_config(), run.seed)
    metrics = rows.shape[0] * (rows.shape[1] - 5)
    with Store(folder / "overhead.db") as store:
        start = time.perf_counter()
        for i in range(count):
            run_id = f"bench{i:06d}"
            store.add(run_id, run.stored_config(), i, {})
            store.claim(run_id)
            store.finish(run_id, rows, seconds, versions)
        per_run = (time.perf_counter() - start) / count
        start = time.perf_counter()
        table = store.results()
        read = time.perf_counter() - start
    print(f"store: {per_run * 1e3:.1f} ms per run to register, claim and commit {rows.shape[0]} result rows ({metrics} values);")
    print(f"       reading back {len(table)} rows of {count} runs as one table: {read:.2f} s; a run of this grid computes in {seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40, help="runs in the grid (even)")
    args = parser.parse_args()
    spec = grid(args.runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; a grid of {args.runs} runs (linear, d=20, k=3, T=100, n=25, m=40, 3 methods)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one, done = timed_sweep(spec, InProcess, root / "one")
        print(f"1 worker  (in this process, {torch.get_num_threads()} threads): {one:6.1f} s  ({done} runs)")
        torch.set_num_threads(1)
        single, _ = timed_sweep(spec, InProcess, root / "single")
        torch.set_num_threads(2)
        print(f"1 worker  (in this process, 1 thread):  {single:6.1f} s")
        two, done = timed_sweep(spec, lambda: ProcessPool(2), root / "two")
        print(f"2 workers (process pool, 1 thread each): {two:6.1f} s  ({done} runs)")
        print(f"speed-up of 2 workers: {one / two:.2f}x over 1 worker with 2 threads, {single / two:.2f}x over 1 worker with 1 thread")
        store_overhead(200, root)


if __name__ == "__main__":
    main()
