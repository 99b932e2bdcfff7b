"""Where does the frozen objective of ``relu-hard`` have its minimum? (the evidence in docs/environments.md)

For each seed of the ``relu-hard`` preset, FROZENREP's source objective is trained (the default
``fit_shared``) from 17 starts: the 4 moment starts that the method uses, 12 random first layers and
the opt block itself. Each line prints, sorted by final objective, ``start:objective/share`` with the
share of the learned span in the opt block (1 = the opt block, what fine-tuning-aware training keeps).

    python benchmarks/relu_hard_frozen_minimum.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from adaptrep.experiment import PRESETS, keyed_generator, resolve_config
from adaptrep.metrics import block_share
from adaptrep.models import fit_shared, model_for
from adaptrep.solvers import moment_inits, sufficient_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--random-starts", type=int, default=12)
    args = parser.parse_args()
    config = resolve_config(dict(PRESETS["relu-hard"]))
    model, key = model_for("squared", "relu")
    for seed in range(args.seeds):
        start = time.perf_counter()
        env = config.environment(seed)
        source = env.sample_tasks(config.tasks, config.samples, keyed_generator(seed, 1))
        G, c, _ = sufficient_statistics(source.X, source.y)
        starts = [(f"moment{i}", W) for i, W in enumerate(moment_inits(G, c, config.rank))]
        g = torch.Generator().manual_seed(100 + seed)
        starts += [(f"random{i}", torch.randn(config.dim, config.rank, generator=g, dtype=torch.float64)) for i in range(args.random_starts)]
        starts += [("opt-block", env.opt_block)]
        found = []
        for name, W in starts:
            fit = fit_shared(model, {key: W}, source.X, source.y, lam=None, gamma=1e-4)
            found.append((fit.objective, name, block_share(fit.theta[key], env.opt_block)))
        found.sort()
        print(f"seed {seed} ({time.perf_counter() - start:.0f} s):", " ".join(f"{n}:{o:.4f}/{s:.2f}" for o, n, s in found))


if __name__ == "__main__":
    main()
