"""Ragged tasks cost about what equal-size tasks cost: source training of ADAPTREP and FROZENREP on
T tasks whose sizes are drawn uniformly from 10..60, against T tasks of the same total number of
samples split equally (35 each), on the same `linear` environment.

    python benchmarks/ragged.py [--tasks 2000] [--dim 20] [--rank 3] [--repeats 3] [--loss squared|logistic]

Prints the median wall time of ``fit`` for both layouts and their ratio (the padded layout holds
T x 60 rows where the equal one holds T x 35, so the Gram matrices cost up to 60/35 as much; the
alternating minimisation itself works on d x d statistics and does not see the sizes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from adaptrep import LinearEnvironment, LogisticEnvironment, Tasks
from adaptrep.methods import AdaptRep, FrozenRep


def layouts(tasks: int, dim: int, rank: int, loss: str, seed: int = 0) -> tuple[Tasks, Tasks]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 61, size=tasks)
    total = int(sizes.sum())
    env = (LogisticEnvironment if loss == "logistic" else LinearEnvironment)(dim, rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    beta = env.sample_parameters(tasks, g)
    equal = env.sample_tasks(tasks, total // tasks, g, beta=beta)
    full = env.sample_tasks(tasks, int(sizes.max()), g, beta=beta)
    xs = [full.X[t, :n].numpy() for t, n in enumerate(sizes)]
    ys = [full.y[t, :n].numpy() for t, n in enumerate(sizes)]
    ragged = Tasks.from_arrays(xs, ys, loss=loss)
    return ragged, equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss", default="squared", choices=["squared", "logistic"])
    args = parser.parse_args()
    ragged, equal = layouts(args.tasks, args.dim, args.rank, args.loss)
    print(
        f"T={args.tasks}, d={args.dim}, k={args.rank}, loss={args.loss}: ragged sizes 10..60 ({int(ragged.counts.sum())} samples), equal {equal.num_samples} each"
    )
    for method in (AdaptRep, FrozenRep):
        times: dict[str, list[float]] = {"ragged": [], "equal": []}
        for _ in range(args.repeats):
            for name, tasks in (("ragged", ragged), ("equal", equal)):
                start = time.perf_counter()
                method(rank=args.rank, intercept=False, standardize=False).fit(tasks)
                times[name].append(time.perf_counter() - start)
        r, e = statistics.median(times["ragged"]), statistics.median(times["equal"])
        print(f"{method.__name__:9s} ragged {r:7.2f} s   equal {e:7.2f} s   ratio {r / e:5.2f}")


if __name__ == "__main__":
    main()
