"""Sweep throughput: a grid of twenty CPU-bound runs of about 1-1.5 s with 1 and 2 workers (parallel
efficiency), and the store's per-run overhead (register, claim, commit the results) and read-back time.

    .venv/bin/python benchmarks/sweep_throughput.py            # the 20-run grid
    .venv/bin/python benchmarks/sweep_throughput.py --runs 40  # a longer look
    .venv/bin/python benchmarks/sweep_throughput.py --cli      # also the adaptrep sweep command, end to end

The runs are small (d = 20, five methods, five target sizes) so that they are bound mostly by
per-operation overhead rather than by arithmetic that a second thread would share, and the speed-up
of 2 workers measures the sweep machinery rather than intra-operation parallelism.

Timings include everything a user waits for: starting the worker processes (which import torch),
computing, and committing every run to the SQLite store; with ``--cli`` also starting the command
and writing the report. Run it on an otherwise idle machine with at least 2 cores: the speed-up of
2 workers is a ratio of wall times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from adaptrep.store import Store
from adaptrep.sweep import InProcess, ProcessPool, SweepSpec, compute, execute, expand


def grid(runs: int) -> SweepSpec:
    base = dict(
        setting="linear",
        dim=20,
        rank=3,
        tasks=100,
        samples=25,
        target_samples=[10, 20, 40, 80, 160],
        target_tasks=20,
        methods=["adaptrep", "frozenrep", "target-only", "perm", "spectral"],
    )
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


def timed_command(spec: SweepSpec, workers: int, folder: Path) -> float:
    """Wall time of ``adaptrep sweep SPEC --workers N`` in a fresh process (imports, runs, report)."""
    folder.mkdir()
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump()))
    command = [sys.executable, "-m", "adaptrep.cli", "sweep", str(path), "--out", str(folder / "out"), "--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs in the grid (even)")
    parser.add_argument("--cli", action="store_true", help="also time the adaptrep sweep command with 1 and 2 workers")
    args = parser.parse_args()
    spec = grid(args.runs)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; a grid of {args.runs} runs (linear, d=20, k=3, T=100, n=25, m=10 to 160, 5 methods: 1-1.5 s each)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one, done = timed_sweep(spec, InProcess, root / "one")
        print(f"1 worker  (in this process, {threads} threads): {one:6.1f} s  ({done} runs)")
        single = one
        if threads > 1:
            torch.set_num_threads(1)
            single, _ = timed_sweep(spec, InProcess, root / "single")
            torch.set_num_threads(threads)
            print(f"1 worker  (in this process, 1 thread):  {single:6.1f} s")
        two, done = timed_sweep(spec, lambda: ProcessPool(2), root / "two")
        print(f"2 workers (process pool, 1 thread each): {two:6.1f} s  ({done} runs)")
        print(f"speed-up of 2 workers: {one / two:.2f}x over 1 worker with {threads} threads, {single / two:.2f}x over 1 worker with 1 thread")
        if args.cli:
            alone, pair = timed_command(spec, 1, root / "cli-one"), timed_command(spec, 2, root / "cli-two")
            print(f"adaptrep sweep, end to end: --workers 1 {alone:.1f} s, --workers 2 {pair:.1f} s: {alone / pair:.2f}x")
        store_overhead(200, root)


if __name__ == "__main__":
    main()
