"""Least squares when every task has only a few more samples than the rank (n just above k).

Problem: ``LinearEnvironment(50, 8, delta=0, noise=0.5, seed=0)``, T = 500 source tasks of n samples
(``Generator(1)``), n = 10, 12, 16, 24, 50, float64, one thread. For each n, FROZENREP's least-squares
fit (:func:`adaptrep.solvers.fit_source` with its defaults, as ``FrozenRep`` runs it) and the
random-effects fit (:func:`adaptrep.solvers.fit_random_effects`, what ``fit_source`` uses when no
task has more samples than the rank): seconds, iterations, the least-squares stop reason and the subspace distance
``||P - P*||_2`` to the true representation.

Also least squares started at the random-effects fit (``LS from RE``), with the least-squares
objective of both. With n close to k each head nearly interpolates its task, the least-squares
objective is flat in many directions and alternating minimisation crawls; started at the
random-effects fit it moves away from it, to a lower objective and a worse representation: the
least-squares estimate itself, not the solver, is what falls behind. ``docs/methods.md`` ("Known limits") quotes the output. Run from the
repository root (about four minutes)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/few_samples.py
"""

from __future__ import annotations

import time

import torch

from adaptrep.environments import LinearEnvironment
from adaptrep.metrics import subspace_distance
from adaptrep.solvers import fit_random_effects, fit_source, task_statistics


def main() -> None:
    torch.set_num_threads(1)
    d, k, T = 50, 8, 500
    env = LinearEnvironment(d, k, delta=0.0, noise=0.5, seed=0)
    print(f"d = {d}, k = {k}, T = {T}, delta = 0, sigma = 0.5")
    for n in (10, 12, 16, 24, 50):
        source = env.sample_tasks(T, n, torch.Generator().manual_seed(1))
        G, c, q = task_statistics(source.X, source.y)
        start = time.perf_counter()
        effects = fit_random_effects(G, c, q, k)
        fits = [("random effects", effects, time.perf_counter() - start)]
        for name, inits in (("least squares", None), ("LS from RE", effects.B.unsqueeze(0))):
            start = time.perf_counter()
            result = fit_source(G, c, q, k, inits=inits, select_after=1 if inits is not None else 25)
            fits.append((name, result, time.perf_counter() - start))
        for name, result, seconds in fits:
            distance = subspace_distance(result.B, env.representation)
            # the random-effects fit always says "degenerate"; its objective is a likelihood, not the least-squares one
            stop = f"stop {result.stop_reason:9s}  objective {result.objective:.5f}" if name != "random effects" else " " * 35
            print(f"n = {n:3d}  {name:15s} {seconds:7.2f} s  {result.iterations:5d} iterations  {stop}  ||P - P*|| = {distance:.3f}", flush=True)


if __name__ == "__main__":
    main()
