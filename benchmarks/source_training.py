"""Benchmark of ADAPTREP and FROZENREP source training (``adaptrep.solvers.fit_source``).

Problem: ``T`` source tasks (T = 100 and 1000) of ``LinearEnvironment(dim=100, rank=10, delta=0.4,
noise=0.5, seed=0)`` with n = 50 samples each, from ``env.sample_tasks(T, 50,
torch.Generator().manual_seed(1))``, float64 on the CPU. ADAPTREP uses the theory penalty
``theory_penalty(estimate_noise(G, c, q, n, k)[0], d, k, T, n)``, FROZENREP ``penalty = inf``.
``fit_source`` runs S = 4 restarts (the moment inits) as one batch for its first ``select_after``
iterations, then only the best one (S = 1); each iteration does ``inner_steps = 10`` FISTA steps.

What is printed, per T and method:

1. Source training. The time of one alternating-minimisation iteration is
   ``(t(K_hi) - t(K_lo)) / (K_hi - K_lo)`` from two ``fit_source(..., max_iter=K, tol=0, gtol=0)``
   runs, so that the fixed cost cancels ((K_lo, K_hi) = (5, 25); (1, 3) for the batched runs at
   T = 1000, whose iterations take seconds). It is measured twice: with the S = 4 restarts batched
   (``select_after=K``, so that both runs end with the same single-restart final heads) and after
   the selection, S = 1 (``select_after=1``). ``setup`` is the fixed cost of a run (moment inits,
   Lipschitz constants, final exact heads, which for ADAPTREP are 10 * inner_steps FISTA steps,
   and the stationarity check of the result): the S = 1 run's ``t(K_lo)`` less its one batched
   and ``K_lo - 1`` single-restart iterations. A run with the default settings gives the time to
   convergence, the iterations, the final objective and ``grad_norm``; when its worst case
   (``max_iter`` iterations) could exceed ``--converge-budget`` seconds, ``max_iter`` is capped, or
   the run is skipped when not even the batched phase fits, and the output says so.
2. A lower bound for one iteration on this machine, ``max(bytes / bandwidth, flops / peak)``.
   Bytes: the T Gram matrices read once per restart (``S * T * d^2 * 8``). Flops, counted from the
   code: the batched ``G @ v`` products (2 per FISTA step, then the final heads, the right-hand
   side ``c - G V`` and the objective; FROZENREP only the last two), the head build ``G @ B``, the
   ``dk x dk`` normal-matrix build ``G.reshape(T, d*d).T @ WW`` and its Cholesky solve; the
   stationarity check every 5 iterations is left out. Bandwidth: a 400 MB tensor copy (read +
   write traffic, best of 5); peak: a 2048 x 2048 float64 matmul (best of 5).
3. The batched iteration against a per-task Python loop doing the same work for ONE restart: for
   each task separately the exact head, the FISTA steps on ``v_t`` with ``fit_perturbation``'s
   formulas (ADAPTREP only) and its contribution to the normal matrix, then the same ``dk x dk``
   solve; the batched version is ``HeadSolver.build(B.unsqueeze(-3), G)`` + ``fit_perturbation``
   + ``solve_representation`` on a single-restart batch, as in ``fit_source``. The maximum
   absolute differences of V, W and the new (not yet orthonormalised) B check that both compute
   the same thing.

Run from the repository root::

    .venv/bin/python benchmarks/source_training.py            # T = 100 and 1000, 2 to 3 minutes
    .venv/bin/python benchmarks/source_training.py --quick    # T = 100 only

Threads: ``--threads`` defaults to 2 (the machine's cores). ``fit_source`` solves its ``dk x dk``
systems by Cholesky: batched LU solves (``torch.linalg.solve``) on matrices larger than about
150 x 150 hang with two threads on torch 2.13 + MKL (pytorch/pytorch#142815).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor

from adaptrep.environments import LinearEnvironment
from adaptrep.methods import theory_penalty
from adaptrep.solvers import HeadSolver, SourceFit, estimate_noise, fit_perturbation, fit_source, lipschitz, moment_inits, penalty_prox, solve_representation

R = TypeVar("R")

DIM, RANK, NUM_SAMPLES = 100, 10, 50
RESTARTS = 4  # moment_inits gives 4 starting representations
FLOAT = 8  # bytes per float64
DEFAULTS = {name: par.default for name, par in inspect.signature(fit_source).parameters.items() if par.default is not inspect.Parameter.empty}
INNER_STEPS: int = DEFAULTS["inner_steps"]
MAX_ITER: int = DEFAULTS["max_iter"]
SELECT_AFTER: int | None = DEFAULTS.get("select_after")  # None: the restarts stay batched to the end
# (K_lo, K_hi) of the timing runs: batched S = 4 iterations at T = 1000 cost seconds each, so fewer there
BATCHED_PAIRS = {100: (5, 25), 1000: (1, 3)}
SINGLE_PAIR = (5, 25)


# ---------------------------------------------------------------------------------------------
# timing helpers and machine figures


def timed(fn: Callable[[], R]) -> tuple[float, R]:
    """Wall time of one call and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_of(fn: Callable[[], R], repeats: int) -> tuple[float, R]:
    """Smallest wall time over ``repeats`` (at least one) calls, and the first call's result."""
    best, result = timed(fn)
    for _ in range(repeats - 1):
        best = min(best, timed(fn)[0])
    return best, result


def copy_bandwidth(megabytes: int = 400, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy, counting read + write traffic."""
    src = torch.ones(megabytes * 1_000_000 // FLOAT, dtype=torch.float64)
    dst = torch.empty_like(src)
    seconds, _ = best_of(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * FLOAT / seconds


def gemm_peak(size: int = 2048, repeats: int = 5) -> float:
    """Float64 flops per second of a square matmul."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen, dtype=torch.float64)
    b = torch.randn(size, size, generator=gen, dtype=torch.float64)
    seconds, _ = best_of(lambda: a @ b, repeats)
    return 2 * size**3 / seconds


# ---------------------------------------------------------------------------------------------
# the problem


@dataclass
class Problem:
    """Source statistics of T tasks and the ADAPTREP penalty for them."""

    T: int
    G: Tensor
    c: Tensor
    q: Tensor
    sigma: float
    mu: float


def make_problem(T: int) -> Problem:
    env = LinearEnvironment(dim=DIM, rank=RANK, delta=0.4, noise=0.5, seed=0)
    tasks = env.sample_tasks(T, NUM_SAMPLES, torch.Generator().manual_seed(1))
    G, c, q = tasks.gram()
    sigma, _ = estimate_noise(G, c, q, NUM_SAMPLES, RANK)
    return Problem(T, G, c, q, sigma, theory_penalty(sigma, DIM, RANK, T, NUM_SAMPLES))


# ---------------------------------------------------------------------------------------------
# 1. source training


@dataclass
class PairTiming:
    """Two ``fit_source`` runs that differ only in the number of iterations."""

    it_lo: int
    it_hi: int
    t_lo: float
    t_hi: float

    @property
    def per_iter(self) -> float:
        return (self.t_hi - self.t_lo) / (self.it_hi - self.it_lo)


def setup_time(batched: PairTiming, single: PairTiming | None) -> float:
    """Fixed cost of a run: ``t(K_lo)`` less its iterations, from the single-restart pair when there is one (its error is smaller)."""
    if single is None:
        return batched.t_lo - batched.it_lo * batched.per_iter
    return single.t_lo - batched.per_iter - (single.it_lo - 1) * single.per_iter


@dataclass
class Convergence:
    max_iter: int  # 0: skipped
    seconds: float | None = None
    fit: SourceFit | None = None
    worst_case: float = 0.0  # projected seconds for MAX_ITER iterations


def time_pair(p: Problem, penalty: float, pair: tuple[int, int], batched: bool) -> PairTiming:
    """Time ``fit_source`` for ``K_lo`` and ``K_hi`` iterations, the restarts batched (S = 4) or after selection (S = 1)."""
    runs = []
    for K in pair:
        options: dict[str, Any] = {"max_iter": K, "tol": 0.0}
        if "gtol" in DEFAULTS:
            options["gtol"] = 0.0
        if SELECT_AFTER is not None:
            options["select_after"] = K if batched else 1
        seconds, fit = timed(partial(fit_source, p.G, p.c, p.q, RANK, penalty=penalty, **options))
        runs.append((fit.iterations, seconds))
    (it_lo, t_lo), (it_hi, t_hi) = runs
    return PairTiming(it_lo, it_hi, t_lo, t_hi)


def time_convergence(p: Problem, penalty: float, batched: PairTiming, single: PairTiming | None, budget: float) -> Convergence:
    """The default ``fit_source``, with ``max_iter`` capped so that its worst case fits ``budget`` seconds."""
    switch = SELECT_AFTER if SELECT_AFTER is not None else MAX_ITER
    p4, p1 = batched.per_iter, (single or batched).per_iter
    setup = setup_time(batched, single)

    def worst(K: int) -> float:
        return setup + min(K, switch) * p4 + max(K - switch, 0) * p1

    if worst(MAX_ITER) <= budget:
        max_iter = MAX_ITER
    elif worst(switch) > budget:
        return Convergence(0, worst_case=worst(MAX_ITER))
    else:
        max_iter = switch + int((budget - worst(switch)) / p1)
    seconds, fit = timed(lambda: fit_source(p.G, p.c, p.q, RANK, penalty=penalty, max_iter=max_iter))
    return Convergence(max_iter, seconds, fit, worst(MAX_ITER))


# ---------------------------------------------------------------------------------------------
# 2. lower bound for one iteration


@dataclass
class IterationCost:
    bytes_read: float
    matvecs: int  # batched G @ v products, each S * T * 2 d^2 flops
    matvec_flops: float
    head_flops: float
    normal_flops: float
    solve_flops: float

    @property
    def flops(self) -> float:
        return self.matvec_flops + self.head_flops + self.normal_flops + self.solve_flops


def iteration_cost(T: int, S: int, frozen: bool, d: int = DIM, k: int = RANK) -> IterationCost:
    """Bytes and flops of one ``fit_source`` iteration with S restarts, counted from the code.

    ADAPTREP: 2 ``G @ v`` per FISTA step (the head's ``c - G z`` and the gradient's ``G beta``), the
    heads before and after FISTA, the two per-task objectives of the monotone safeguard, the
    right-hand side ``c - G V`` and the objective's ``G beta``.
    FROZENREP: ``heads(c)`` needs no ``G @ v``; the right-hand side (V = 0) and the objective do.
    """
    matvecs = 2 if frozen else 2 * INNER_STEPS + 6
    return IterationCost(
        bytes_read=S * T * d * d * FLOAT,
        matvecs=matvecs,
        matvec_flops=matvecs * S * T * 2 * d * d,
        head_flops=S * T * 2 * d * d * k,  # HeadSolver.build: G @ B
        normal_flops=S * 2 * (d * d) * T * (k * k),  # G.reshape(T, d*d).T @ WW
        solve_flops=S * (1 / 3) * (d * k) ** 3,  # Cholesky of the dk x dk normal matrix
    )


# ---------------------------------------------------------------------------------------------
# 3. batched iteration against a per-task loop (one restart)


@dataclass
class Step:
    W: Tensor
    V: Tensor
    B: Tensor  # solution of the normal equations, before the QR


def batched_step(B: Tensor, p: Problem, L: Tensor, penalty: float, frozen: bool) -> Step:
    """One iteration's head/perturbation/normal-equation work for a single-restart batch, as in ``fit_source``."""
    B1 = B.unsqueeze(0)  # (1, d, k): a batch of one restart
    heads = HeadSolver.build(B1.unsqueeze(-3), p.G)
    V = torch.zeros(1, p.T, DIM, dtype=p.G.dtype)
    if frozen:
        W = heads(p.c)
    else:
        strength = torch.full((p.T,), penalty, dtype=p.G.dtype)
        W, V = fit_perturbation(heads, p.c, L, V, penalty_prox, strength, INNER_STEPS)
    B_new = solve_representation(W, p.G, p.c - (p.G @ V.unsqueeze(-1)).squeeze(-1))
    return Step(W[0], V[0], B_new[0])


def loop_step(B: Tensor, p: Problem, L: Tensor, penalty: float, frozen: bool) -> Step:
    """The same work task by task: exact head, FISTA on ``v_t`` (``fit_perturbation``'s formulas), normal-matrix contribution."""
    d, k = B.shape
    Bt = B.T
    strength = torch.as_tensor(penalty, dtype=B.dtype)
    W = torch.empty(p.T, k, dtype=B.dtype)
    V = torch.zeros(p.T, d, dtype=B.dtype)
    normal = torch.zeros(d * d, k * k, dtype=B.dtype)  # sum_t vec(G_t) vec(w_t w_t^T)^T
    rhs = torch.zeros(d, k, dtype=B.dtype)  # sum_t (c_t - G_t v_t) w_t^T
    for t in range(p.T):
        Gt, ct, step = p.G[t], p.c[t], 1 / L[t]
        pinv = torch.linalg.pinv(Bt @ (Gt @ B), hermitian=True)
        v = torch.zeros(d, dtype=B.dtype)
        if not frozen:
            z, s = v, 1.0
            for _ in range(INNER_STEPS):
                w = pinv @ (Bt @ (ct - Gt @ z))
                grad = 2 * (Gt @ (B @ w + z) - ct)
                v_next = penalty_prox(z - grad * step, strength, step)
                s_next = (1 + math.sqrt(1 + 4 * s * s)) / 2
                z = v_next + ((s - 1) / s_next) * (v_next - v)
                v, s = v_next, s_next
        r = ct - Gt @ v
        w = pinv @ (Bt @ r)
        normal.addr_(Gt.reshape(-1), torch.outer(w, w).reshape(-1))
        rhs.addr_(r, w)
        W[t], V[t] = w, v
    M = normal.reshape(d, d, k, k).permute(0, 2, 1, 3).reshape(d * k, d * k)
    jitter = 1e-12 * torch.diagonal(M).mean() * torch.eye(d * k, dtype=M.dtype)
    B_new = torch.linalg.solve(M + jitter, rhs.reshape(d * k, 1)).reshape(d, k)
    return Step(W, V, B_new)


@dataclass
class LoopComparison:
    loop: float
    batched: float
    dV: float
    dW: float
    dB: float


def compare_loop(p: Problem, penalty: float, frozen: bool, repeats: int) -> LoopComparison:
    B = torch.linalg.qr(moment_inits(p.G, p.c, RANK))[0][0]  # fit_source's first start
    L = lipschitz(p.G)
    t_batched, batched = best_of(lambda: batched_step(B, p, L, penalty, frozen), repeats)
    t_loop, loop = best_of(lambda: loop_step(B, p, L, penalty, frozen), repeats)

    def diff(a: Tensor, b: Tensor) -> float:
        return float((a - b).abs().max())

    return LoopComparison(t_loop, t_batched, diff(loop.V, batched.V), diff(loop.W, batched.W), diff(loop.B, batched.B))


# ---------------------------------------------------------------------------------------------
# output


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(f"\n{title}")
    print(line(header))
    for row in rows:
        print(line(row))


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def pair_cells(pair: PairTiming | None) -> list[str]:
    if pair is None:
        return ["-", "-"]
    return [f"{pair.it_lo}/{pair.it_hi}", ms(pair.per_iter)]


def convergence_cells(conv: Convergence) -> list[str]:
    if conv.fit is None or conv.seconds is None:
        return ["skipped", "-", "-", "-", "-"]
    capped = conv.max_iter != MAX_ITER and not conv.fit.converged
    iters = f"{conv.fit.iterations}" + (" (cap)" if capped else "")
    return [f"{conv.seconds:.2f}", iters, "yes" if conv.fit.converged else "no", f"{conv.fit.objective:.6f}", f"{conv.fit.grad_norm:.2e}"]


def run_T(T: int, bandwidth: float, peak: float, budget: float) -> None:
    p = make_problem(T)
    methods = {"ADAPTREP": (p.mu, False), "FROZENREP": (math.inf, True)}
    print(f"\n=== T = {T} tasks, n = {NUM_SAMPLES}, d = {DIM}, k = {RANK}, S = {RESTARTS} restarts, inner_steps = {INNER_STEPS}")
    print(f"    sigma_hat = {p.sigma:.4f}, ADAPTREP penalty mu = {p.mu:.4f}")

    batched = {name: time_pair(p, penalty, BATCHED_PAIRS.get(T, BATCHED_PAIRS[1000]), batched=True) for name, (penalty, _) in methods.items()}
    # without restart selection in fit_source there is no S = 1 phase to time
    single = {name: time_pair(p, penalty, SINGLE_PAIR, batched=False) if SELECT_AFTER is not None else None for name, (penalty, _) in methods.items()}
    conv = {name: time_convergence(p, penalty, batched[name], single[name], budget) for name, (penalty, _) in methods.items()}
    rows = []
    for name in methods:
        b = batched[name]
        rows.append([name, *pair_cells(b), *pair_cells(single[name]), f"{setup_time(b, single[name]):.2f}", *convergence_cells(conv[name])])
    header = ["method", "K S=4", "iter ms S=4", "K S=1", "iter ms S=1", "setup s", "converge s", "iters", "converged", "objective", "grad_norm"]
    print_table("1. source training: per-iteration time from fit_source(max_iter=K_lo and K_hi, tol=0, gtol=0); convergence with the defaults", header, rows)
    select = f"select_after={SELECT_AFTER}" if SELECT_AFTER is not None else "no restart selection"
    print(f"  defaults: max_iter={MAX_ITER}, tol={DEFAULTS.get('tol')}, gtol={DEFAULTS.get('gtol')}, {select}")
    for name, c in conv.items():
        if c.fit is None:
            print(f"  {name}: convergence run SKIPPED, its worst case ({MAX_ITER} iterations) is about {c.worst_case:.0f} s and not even the")
            print(f"    batched phase fits the {budget:.0f} s budget (rerun with --converge-budget {math.ceil(c.worst_case)} to lift the cap)")
        elif c.max_iter != MAX_ITER and not c.fit.converged:
            print(f"  {name}: NOT converged, max_iter capped at {c.max_iter} (default {MAX_ITER}) to fit the {budget:.0f} s budget")

    rows = []
    for name, (_, frozen) in methods.items():
        for S, pair in ((RESTARTS, batched[name]), (1, single[name])):
            if pair is None:
                continue
            cost = iteration_cost(T, S, frozen)
            t_mem, t_flop = cost.bytes_read / bandwidth, cost.flops / peak
            bound = max(t_mem, t_flop)
            gflop = [cost.matvec_flops, cost.head_flops, cost.normal_flops, cost.solve_flops, cost.flops]
            cells = [f"{cost.bytes_read / 1e6:.0f}", str(cost.matvecs), *(f"{f / 1e9:.2f}" for f in gflop)]
            rows.append([name, str(S), *cells, ms(t_mem), ms(t_flop), ms(bound), ms(pair.per_iter), f"{pair.per_iter / bound:.1f}"])
    header = ["method", "S", "G MB", "G@v", "G@v GF", "G@B GF", "normal GF", "solve GF", "total GF", "mem ms", "flop ms", "bound ms", "measured ms", "ratio"]
    print_table("2. lower bound for one iteration = max(mem, flop); ratio = measured / bound", header, rows)

    rows = []
    for name, (penalty, frozen) in methods.items():
        cmp = compare_loop(p, penalty, frozen, repeats=3 if T <= 100 else 2)
        diffs = [f"{cmp.dV:.1e}", f"{cmp.dW:.1e}", f"{cmp.dB:.1e}"]
        s1 = single[name]
        fit_iters = [ms(s1.per_iter if s1 is not None else None), ms(batched[name].per_iter)]
        rows.append([name, ms(cmp.loop), ms(cmp.batched), f"{cmp.loop / cmp.batched:.1f}x", *diffs, *fit_iters])
    header = ["method", "loop ms", "batched ms", "speed-up", "max|dV|", "max|dW|", "max|dB|", "fit_source iter ms S=1", f"fit_source iter ms S={RESTARTS}"]
    print_table("3. one iteration for one restart: per-task Python loop vs batched (best of 3, T = 1000: of 2)", header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 100 only")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--converge-budget", type=float, default=30.0, help="worst-case seconds allowed for each default-settings convergence run (default 30)")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    print("ADAPTREP / FROZENREP source-training benchmark")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, float64; load average at start {os.getloadavg()[0]:.2f}")

    bandwidth, peak = copy_bandwidth(), gemm_peak()
    print(f"copy bandwidth (400 MB copy, read + write, best of 5): {bandwidth / 1e9:.1f} GB/s")
    print(f"GEMM peak (2048 x 2048 float64 matmul, best of 5):     {peak / 1e9:.1f} GFLOP/s")

    for T in (100,) if args.quick else (100, 1000):
        run_T(T, bandwidth, peak, args.converge_budget)

    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
