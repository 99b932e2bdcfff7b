"""Source training of a two-layer ReLU representation (``relu-net``, T = 500, n = 50, d = 50, k = 20):
time per iteration of the ADAPTREP objective's gradient, vectorised over tasks (``torch.func.vmap``,
as :func:`adaptrep.models.fit_shared` does) against a Python loop over tasks, with the same gradient.

    .venv/bin/python benchmarks/relu_source_training.py [--tasks 500] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from adaptrep.environments import ReluNetEnvironment
from adaptrep.models import _objective, relu_model, task_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    T, n, d, k = args.tasks, args.samples, args.dim, args.rank
    env = ReluNetEnvironment(d, k, delta=0.3, noise=0.1, seed=0, test_points=10)
    source = env.sample_tasks(T, n, torch.Generator().manual_seed(1))
    model, lam, gamma = relu_model(), 0.5, 1e-4
    g = torch.Generator().manual_seed(2)
    theta = {"W": torch.randn(d, k, generator=g, dtype=torch.float64).requires_grad_()}
    delta = {"W": (0.01 * torch.randn(T, d, k, generator=g, dtype=torch.float64)).requires_grad_()}
    w = torch.randn(T, k, generator=g, dtype=torch.float64).requires_grad_()
    leaves = [theta["W"], delta["W"], w]
    objective = _objective(model, lam, gamma)

    def vectorised() -> list[torch.Tensor]:
        return list(torch.autograd.grad(objective(theta, delta, w, source.X, source.y).mean(), leaves))

    def looped() -> list[torch.Tensor]:
        total = sum(
            task_loss(model, theta, {"W": delta["W"][t]}, w[t], source.X[t], source.y[t]) + gamma * (w[t] ** 2).sum() + lam * (delta["W"][t] ** 2).sum()
            for t in range(T)
        )
        return list(torch.autograd.grad(total / T, leaves))

    def timed(fn, repeats: int) -> tuple[float, list[torch.Tensor]]:
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            grads = fn()
        return (time.perf_counter() - start) / repeats, grads

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64; T={T}, n={n}, d={d}, k={k}")
    fast, reference = timed(vectorised, args.repeats)
    slow, grads = timed(looped, max(2, args.repeats // 10))
    error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, reference, strict=True))
    print(f"vectorised (vmap over tasks): {fast * 1e3:8.1f} ms per gradient of the source objective")
    print(f"per-task Python loop:         {slow * 1e3:8.1f} ms per gradient")
    print(f"speed-up: {slow / fast:.1f}x; largest relative difference between the gradients: {error:.1e}")


if __name__ == "__main__":
    main()
