"""Issue 15 acceptance: linear ADAPTREP source training at d = 768, T = 10,000 (one run, measured).

``python benchmarks/scaling_acceptance.py big [--n 40 --k 32 --threads 2 --max-iter K]``: ``T`` tasks of the
``linear`` environment (delta 0.3, noise 0.5), generated in chunks of 250 tasks into one
preallocated ``X`` (so that generation does not hold two copies), then ``AdaptRep(penalty=...).fit``
(noise estimate, the ``--penalty`` rule: ``theory`` by default, one fit; ``cv`` is the library's
default since 0.4.0, a path of fits; ``fit_source`` on the samples). Prints the wall time of
each phase, the fit's diagnostics, the peak resident memory and the largest principal angle
(``||P - P*||_2``) between the learned span and ``B*``.

``python benchmarks/scaling_acceptance.py compare``: at ``d = 100, T = 1000, n = 20`` and ``k = 10``
the same fit by the exact solver (dense Gram matrices, dense ``dk x dk`` B step) and by the scalable
default (samples, conjugate gradients), with their distances to ``B*``; then the same at ``k = 32``,
where no task has more samples than the rank and both run the random-effects fit (on Gram matrices
and on samples).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from adaptrep.environments import LinearEnvironment, Tasks
from adaptrep.methods import AdaptRep, theory_penalty
from adaptrep.solvers import estimate_noise, fit_source, moment_inits, task_statistics


def sin_distance(B: torch.Tensor, B_star: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(B @ B.T - B_star @ B_star.T, ord=2))


def chunked_tasks(env: LinearEnvironment, T: int, n: int, chunk: int = 250) -> Tasks:
    X = torch.empty(T, n, env.dim, dtype=torch.float64)
    y = torch.empty(T, n, dtype=torch.float64)
    beta = torch.empty(T, env.dim, dtype=torch.float64)
    for i, start in enumerate(range(0, T, chunk)):
        part = env.sample_tasks(min(chunk, T - start), n, torch.Generator().manual_seed(1000 + i))
        X[start : start + chunk], y[start : start + chunk], beta[start : start + chunk] = part.X, part.y, part.beta
    return Tasks(X, y, beta, env.representation)


def big(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    env = LinearEnvironment(dim=args.d, rank=args.k, delta=0.3, noise=0.5, seed=0)
    tasks = chunked_tasks(env, args.T, args.n)
    t1 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"data: {t1 - t0:.1f} s, X {tuple(tasks.X.shape)} {tasks.X.numel() * 8 / 1e9:.2f} GB, peak RSS {rss:.2f} GB", flush=True)
    method = AdaptRep(finetune=None, max_iter=args.max_iter, penalty=args.penalty).fit(tasks)
    t2 = time.perf_counter()
    fit = method.source_fit
    print(
        f"AdaptRep.fit: {t2 - t1:.1f} s (source_time {method.info['source_time']:.1f} s); iterations {fit.iterations}, stop {fit.stop_reason}, "
        f"converged {fit.converged}, grad_norm {fit.grad_norm:.2e}, objective {fit.objective:.6f}, b_solver {fit.b_solver}, CG iterations {fit.cg_iterations}, "
        f"penalty {method.info['source_penalty']:.4f}, noise estimate {method.noise_estimate:.4f}",
        flush=True,
    )
    print(f"||P - P*||_2 = {sin_distance(fit.B, env.representation):.4f}; perturbations nonzero {(fit.V.norm(dim=-1) > 0).float().mean():.3f}")
    start = torch.linalg.qr(moment_inits(*task_statistics(tasks.X, tasks.y)[:2], args.k)[0])[0]
    print(f"the moment start: ||P - P*||_2 = {sin_distance(start, env.representation):.4f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB; total {time.perf_counter() - t0:.1f} s")


def compare(args: argparse.Namespace) -> None:
    for k in (10, 32):  # least squares (n > k), and the random-effects fit (n <= k: fit_source's degenerate case)
        compare_one(100, k, 1000, 20)


def compare_one(d: int, k: int, T: int, n: int) -> None:
    print(f"d = {d}, k = {k}, T = {T}, n = {n}", flush=True)
    env = LinearEnvironment(dim=d, rank=k, delta=0.3, noise=0.5, seed=0)
    tasks = env.sample_tasks(T, n, torch.Generator().manual_seed(1))
    for label, representation, solver in (("exact (Gram, dense B step)", "gram", "dense"), ("scalable (samples, CG B step)", "auto", "auto")):
        stats = task_statistics(tasks.X, tasks.y, representation=representation)  # type: ignore[arg-type]
        start = time.perf_counter()
        sigma, _ = estimate_noise(*stats, n, k)
        fit = fit_source(*stats, k, penalty=theory_penalty(sigma, d, k, T, n), b_solver=solver)  # type: ignore[arg-type]
        print(
            f"{label}: {time.perf_counter() - start:.1f} s, {fit.iterations} iterations ({fit.stop_reason}), grad {fit.grad_norm:.1e}, "
            f"objective {fit.objective:.8f}, ||P - P*||_2 = {sin_distance(fit.B, env.representation):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["big", "compare"])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--T", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--penalty", default="theory", choices=["theory", "cv"], help="AdaptRep's source penalty rule")
    parser.add_argument("--max-iter", type=int, default=2000, help="cap on the alternating-minimisation iterations (for a timing run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    big(args) if args.what == "big" else compare(args)
