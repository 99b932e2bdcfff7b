"""Why ADAPTREP misses the opt block of ``linear-hard`` at d = 30, k = 5, T = 25, n = 100, eps = 1/6, sigma = 1.

Problem: ``LinearHardEnvironment(30, 5, eps=1/6, noise=sigma, seed)`` with ``T`` source tasks of ``n``
samples from ``env.sample_tasks(T, n, Generator(seed * 1000 + 1))``, seeds 0 and 1, float64 CPU.
``share`` is :func:`adaptrep.metrics.block_share` of the learned representation in the opt block.

Printed:

1. ``share`` of :func:`adaptrep.solvers.fit_source` (default restarts) for penalties ``mu`` from
   FROZENREP (inf) down to 0.03, for (T, sigma) = (25, 1), (25, 0) (noiseless), (100, 1); and, for
   (25, 1), the same fits started at the true opt block (``inits``, ``select_after=1``): the same
   objective and share means the fit is not a local minimum the restarts fall into.
2. The eigenvalues of ``sum_t a_t a_t^T`` for the opt part ``a_t = sqrt(1/(2 eps)) u_t`` and the delta
   part ``a_t = v_t`` of the true task parameters: when the smallest opt eigenvalue is below the
   largest delta one, even the noiseless problem's best k-dimensional span of the task parameters
   trades its least-used opt direction for the most-used delta direction.

Run from the repository root (about a minute with one thread)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/linear_hard_tasks.py
"""

from __future__ import annotations

import math

import torch

from adaptrep.environments import LinearHardEnvironment
from adaptrep.metrics import block_share
from adaptrep.solvers import fit_source

PENALTIES = [math.inf, 1.0, 0.5, 0.25, 0.1, 0.03]


def main() -> None:
    torch.set_num_threads(1)
    for T, sigma in ((25, 1.0), (25, 0.0), (100, 1.0)):
        shares: dict[float, list[float]] = {mu: [] for mu in PENALTIES}
        from_opt: dict[float, list[str]] = {mu: [] for mu in PENALTIES}
        for seed in range(2):
            env = LinearHardEnvironment(30, 5, eps=1 / 6, noise=sigma, seed=seed)
            source = env.sample_tasks(T, 100, torch.Generator().manual_seed(seed * 1000 + 1))
            G, c, q = source.gram()
            for mu in PENALTIES:
                fit = fit_source(G, c, q, 5, penalty=mu, max_iter=600)
                shares[mu].append(block_share(fit.B, env.opt_block))
                if (T, sigma) == (25, 1.0):
                    start = fit_source(G, c, q, 5, penalty=mu, inits=env.opt_block.unsqueeze(0), select_after=1, max_iter=600)
                    from_opt[mu].append(f"{fit.objective:.4f}/{start.objective:.4f} share {block_share(start.B, env.opt_block):.2f}")
        print(f"T = {T}, sigma = {sigma}: mean opt-block share by penalty mu")
        print("   " + "  ".join(f"mu={mu:g}: {sum(v) / len(v):.2f}" for mu, v in shares.items()))
        if (T, sigma) == (25, 1.0):
            print("   objective default restarts / started at the opt block (per seed):")
            for mu, values in from_opt.items():
                print(f"     mu={mu:g}: " + "; ".join(values))
    print("eigenvalues of sum_t a_t a_t^T of the true parameters (opt part | delta part)")
    for T in (25, 100):
        for seed in range(3):
            env = LinearHardEnvironment(30, 5, eps=1 / 6, noise=1.0, seed=seed)
            beta = env.sample_parameters(T, torch.Generator().manual_seed(seed * 1000 + 1))
            opt, delta = beta[:, :5], beta[:, -5:]
            eig = [torch.linalg.eigvalsh(a.T @ a).tolist() for a in (opt, delta)]
            print(f"   T = {T} seed {seed}: " + " ".join(f"{x:.1f}" for x in eig[0]) + " | " + " ".join(f"{x:.1f}" for x in eig[1]))


if __name__ == "__main__":
    main()
