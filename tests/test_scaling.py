"""Linear source training at scale: the samples representation, ragged tasks, conjugate gradients.

Every path is checked against an independent computation: dense Gram matrices built here, the
dense ``dk x dk`` solve, ``torch.linalg.pinv``, and a per-task Python loop over trimmed samples.
"""

import math

import pytest
import torch

from adaptrep import LinearEnvironment
from adaptrep.solvers import (
    DenseGram,
    HeadSolver,
    SampleGram,
    estimate_noise,
    fit_perturbation,
    fit_random_effects,
    fit_source,
    lipschitz,
    moment_inits,
    penalty_prox,
    pseudo_inverse,
    rank_tolerance,
    solve_representation,
    task_statistics,
)

F64 = torch.float64


def _tasks(T=40, n=8, d=12, k=2, seed=0, delta=0.3, noise=0.3):
    env = LinearEnvironment(dim=d, rank=k, delta=delta, noise=noise, seed=seed)
    return env, env.sample_tasks(T, n, torch.Generator().manual_seed(seed + 100))


def _ragged(T=30, n=9, d=12, seed=1):
    """Tasks with 3..n samples each: rows past a task's count are zero."""
    _, tasks = _tasks(T=T, n=n, d=d, seed=seed)
    counts = torch.randint(3, n + 1, (T,), generator=torch.Generator().manual_seed(seed))
    keep = (torch.arange(n)[None, :] < counts[:, None]).to(F64)
    return tasks.X * keep[..., None], tasks.y * keep, counts


def _projector(B):
    return B @ B.T


def test_sample_operator_matches_dense_gram_matrices():
    X, y, counts = _ragged()
    T, n, d = X.shape
    samples = task_statistics(X, y, counts, representation="samples")
    dense = task_statistics(X, y, counts, representation="gram")
    assert isinstance(samples.gram, SampleGram) and isinstance(dense.gram, DenseGram)
    # the dense matrices, task by task from the trimmed samples
    G = torch.stack([X[t, : counts[t]].T @ X[t, : counts[t]] / counts[t] for t in range(T)])
    c = torch.stack([X[t, : counts[t]].T @ y[t, : counts[t]] / counts[t] for t in range(T)])
    q = torch.stack([y[t, : counts[t]].square().mean() for t in range(T)])
    torch.testing.assert_close(dense.gram.G, G, rtol=1e-12, atol=1e-12)
    for stats in (samples, dense):
        torch.testing.assert_close(stats.c, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.q, q, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(3, T, d, generator=g, dtype=F64)  # a leading restart dimension broadcasts
    Gv = torch.einsum("tij,stj->sti", G, v)
    torch.testing.assert_close(samples.gram.matvec(v), Gv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(samples.gram.quad(v), (v * Gv).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(samples.gram.trace(), torch.diagonal(G, dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(samples.gram.lambda_max(), torch.linalg.eigvalsh(G)[:, -1], rtol=1e-10, atol=1e-12)
    ridge = torch.rand(T, generator=g, dtype=F64) + 0.1
    expected = torch.linalg.solve(G + ridge[:, None, None] * torch.eye(d, dtype=F64), c.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(samples.gram.ridge_solve(ridge, c), expected, rtol=1e-10, atol=1e-12)
    # head products through the basis: B^T G B and G B w
    B = torch.randn(3, 1, d, 2, generator=g, dtype=F64)
    w = torch.randn(3, T, 2, generator=g, dtype=F64)
    LB = samples.gram.times(B)
    torch.testing.assert_close(samples.gram.basis_gram(B, LB), B.transpose(-1, -2) @ G @ B, rtol=1e-12, atol=1e-12)
    GBw = torch.einsum("tij,sjk,stk->sti", G, B.squeeze(1), w)
    torch.testing.assert_close(samples.gram.expand(samples.gram.lift(LB, w)), GBw, rtol=1e-12, atol=1e-12)
    # the normal matrix sum_t G_t (x) w_t w_t^T built in chunks equals the dense one
    WW = (w.unsqueeze(-1) * w.unsqueeze(-2)).reshape(3, T, 4)
    torch.testing.assert_close(samples.gram.normal_matrix(WW), dense.gram.normal_matrix(WW), rtol=1e-12, atol=1e-12)


def test_perturbation_coordinates_reproduce_the_dense_fista_iterates():
    X, y, counts = _ragged(seed=3)
    samples = task_statistics(X, y, counts, representation="samples")
    dense = task_statistics(X, y, counts, representation="gram")
    B = torch.linalg.qr(torch.randn(12, 2, generator=torch.Generator().manual_seed(4), dtype=F64))[0]
    lam = torch.linspace(0.01, 3.0, X.shape[0], dtype=F64)
    L = lipschitz(dense.gram)
    torch.testing.assert_close(lipschitz(samples.gram), L, rtol=1e-10, atol=0)
    w_d, v_d = fit_perturbation(HeadSolver.build(B, dense.gram), dense.c, L, torch.zeros_like(dense.c), penalty_prox, lam, 40)
    a0 = torch.zeros(X.shape[:2], dtype=F64)
    w_s, a_s = fit_perturbation(HeadSolver.build(B, samples.gram), samples.c, L, a0, penalty_prox, lam, 40)
    torch.testing.assert_close(w_s, w_d, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(samples.gram.coord_vector(a_s), v_d, rtol=1e-9, atol=1e-10)
    assert (v_d.norm(dim=-1) > 0).any() and (v_d.norm(dim=-1) == 0).any()  # both regimes of the shrinkage


def test_conjugate_gradient_b_step_equals_the_dense_solve():
    X, y, counts = _ragged(seed=5)
    T, _, d = X.shape
    g = torch.Generator().manual_seed(6)
    W = torch.randn(2, T, 3, generator=g, dtype=F64)
    rhs = torch.randn(2, T, d, generator=g, dtype=F64)
    for representation in ("gram", "samples"):
        gram = task_statistics(X, y, counts, representation=representation).gram
        exact = solve_representation(W, gram, rhs, method="dense")
        # the normal equations hold for the dense solution (independent check of the solve)
        Gv = gram.matvec(torch.einsum("sdk,stk->std", exact, W))
        torch.testing.assert_close(torch.einsum("std,stk->sdk", Gv, W), rhs.transpose(-1, -2) @ W, rtol=1e-9, atol=1e-9)
        B0 = torch.randn(2, d, 3, generator=g, dtype=F64)
        cg = solve_representation(W, gram, rhs, B0=B0, method="cg", rtol=1e-14)
        torch.testing.assert_close(cg, exact, rtol=1e-10, atol=1e-10)


def test_pseudo_inverse_matches_pinv_for_regular_and_singular_matrices():
    g = torch.Generator().manual_seed(7)
    Z = torch.randn(6, 5, 4, generator=g, dtype=F64)
    A = Z.transpose(-1, -2) @ Z  # regular 4 x 4
    Zs = torch.randn(6, 2, 4, generator=g, dtype=F64)
    As = Zs.transpose(-1, -2) @ Zs  # rank 2: more head coordinates than samples
    mixed = torch.cat([A, As])
    torch.testing.assert_close(pseudo_inverse(mixed), torch.linalg.pinv(mixed, hermitian=True), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pseudo_inverse_does_not_invert_a_direction_that_only_rounding_makes(dtype):
    """The Gram matrix of two samples centred on their mean, with a large offset: rank 1 in exact
    arithmetic (the centred samples are opposite), plus whatever rounding leaves in the other
    directions. Its pseudo-inverse is that of the exact rank-1 matrix ``2 u u^T``, ``u`` the first
    centred sample (``solvers.rank_tolerance``); torch.linalg.pinv's default tolerance may invert the
    rounding and be off by orders of magnitude."""
    g = torch.Generator().manual_seed(3)
    errors = []
    for _ in range(20):
        X = (torch.randn(2, 3, generator=g, dtype=F64) + 50.0).to(dtype)
        C = X - X.mean(0)
        G = C.T @ C
        u = (X[0].double() - X[1].double()) / 2  # the exact centred sample
        exact = torch.linalg.pinv(2 * torch.outer(u, u), hermitian=True)
        errors.append(float((pseudo_inverse(G).double() - exact).norm() / exact.norm()))
    assert max(errors) < (1e-8 if dtype == F64 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pseudo_inverse_counts_eigenvalues_as_zero_exactly_below_the_rank_tolerance(dtype):
    """``Q diag(lam) Q^T`` with eigenvalues 30x above and 30x below ``rank_tolerance`` times the largest:
    the closed-form pseudo-inverse ``Q diag(1 / lam or 0) Q^T`` (the one above inverted, the one below not)."""
    tol = rank_tolerance(dtype)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=F64))[0]
    lam = torch.tensor([1.0, 0.3, 30 * tol, tol / 30], dtype=F64)
    A = ((Q * lam) @ Q.T).to(dtype)
    expected = (Q * torch.where(lam > tol, 1 / lam, torch.zeros_like(lam))) @ Q.T
    error = (pseudo_inverse(A).double() - expected).norm() / expected.norm()
    assert error < 1e-2
    # a real direction far above rounding (eps ~ 1e-16 in float64, 1e-7 in float32) is inverted: the tolerance is not larger than it needs to be
    small = 1e-11 if dtype == F64 else 1e-3
    lam = torch.tensor([1.0, 0.5, small], dtype=F64)
    Q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=F64))[0]
    A = ((Q * lam) @ Q.T).to(dtype)
    assert float((pseudo_inverse(A).double() @ A.double() - torch.eye(3, dtype=F64)).abs().max()) < 1e-3


@pytest.mark.parametrize("penalty", [math.inf, 0.05])
def test_fit_source_is_the_same_on_samples_statistics_and_both_b_solvers(penalty):
    # the four paths compute the same iterates (the conjugate gradients run to 1e-13 here), so
    # after a fixed number of iterations they agree to rounding, converged or not
    _, tasks = _tasks(T=60, n=8, d=12, k=2, seed=8)
    fits = {}
    options = dict(cg_rtol=1e-13, gtol=0.0, tol=0.0, max_iter=25, select_after=5)
    for representation in ("gram", "samples"):
        stats = task_statistics(tasks.X, tasks.y, representation=representation)
        for solver in ("dense", "cg"):
            fits[representation, solver] = fit_source(*stats, 2, penalty=penalty, b_solver=solver, **options)
    ref = fits["gram", "dense"]
    for key, fit in fits.items():
        assert fit.b_solver == key[1] and fit.iterations == ref.iterations
        torch.testing.assert_close(_projector(fit.B), _projector(ref.B), rtol=0, atol=1e-8, msg=str(key))
        torch.testing.assert_close(fit.B @ fit.W.T + fit.V.T, ref.B @ ref.W.T + ref.V.T, rtol=0, atol=1e-8, msg=str(key))
        torch.testing.assert_close(fit.V, ref.V, rtol=0, atol=1e-8, msg=str(key))
        assert fit.restart_objectives == pytest.approx(ref.restart_objectives, rel=1e-10)
        assert fit.history == pytest.approx(ref.history, rel=1e-10)
    assert fits["samples", "cg"].cg_iterations > 0
    if not math.isinf(penalty):
        assert (ref.V.norm(dim=-1) > 0).any()


def test_default_inexact_conjugate_gradients_reach_the_exact_solution():
    # with its default forcing (cg_rtol) the CG path takes other steps but converges to the same point
    _, tasks = _tasks(T=60, n=8, d=12, k=2, seed=8)
    stats = task_statistics(tasks.X, tasks.y)
    exact = fit_source(*stats, 2, b_solver="dense", gtol=1e-10, tol=0.0, max_iter=300)
    inexact = fit_source(*stats, 2, b_solver="cg", gtol=1e-10, tol=0.0, max_iter=300)
    assert exact.stop_reason == inexact.stop_reason == "gradient"
    torch.testing.assert_close(_projector(inexact.B), _projector(exact.B), rtol=0, atol=1e-8)
    assert inexact.objective == pytest.approx(exact.objective, rel=1e-12)


@pytest.mark.parametrize("kwargs", [dict(penalty=0.05), dict(radius=0.1), dict(penalty=math.inf)])
def test_ragged_fit_matches_a_per_task_reference_objective(kwargs):
    X, y, counts = _ragged(T=40, n=9, d=12, seed=9)
    T = X.shape[0]
    options = dict(gtol=0.0, tol=0.0, max_iter=30, select_after=5, cg_rtol=1e-13)
    fits = [fit_source(*task_statistics(X, y, counts, representation=r), 2, b_solver=s, **options, **kwargs) for r, s in (("samples", "cg"), ("gram", "dense"))]
    mu = kwargs.get("penalty", math.inf)
    for fit in fits:
        # the objective recomputed task by task on the trimmed samples
        terms = []
        for t in range(T):
            Xt, yt = X[t, : counts[t]], y[t, : counts[t]]
            beta = fit.B @ fit.W[t] + fit.V[t]
            terms.append((yt - Xt @ beta).square().mean() + (0.0 if math.isinf(mu) else mu * fit.V[t].norm()))
        assert fit.objective == pytest.approx(float(torch.stack(terms).mean()), rel=1e-12)
        assert fit.history[-1] < 0.9 * fit.history[0]
        if "radius" in kwargs:
            assert fit.V.norm(dim=-1).max() <= 0.1 + 1e-12
        # the perturbations lie in the row spaces of the tasks' samples (the minimum-norm choice)
        for t in range(0, T, 7):
            Xt = X[t, : counts[t]]
            P = Xt.T @ torch.linalg.pinv(Xt.T)
            torch.testing.assert_close(P @ fit.V[t], fit.V[t], rtol=0, atol=1e-10)
    torch.testing.assert_close(_projector(fits[0].B), _projector(fits[1].B), rtol=0, atol=1e-8)
    torch.testing.assert_close(fits[0].V, fits[1].V, rtol=0, atol=1e-8)
    assert fits[0].history == pytest.approx(fits[1].history, rel=1e-8)


def test_ragged_noise_estimate_pools_by_degrees_of_freedom():
    env = LinearEnvironment(dim=6, rank=2, delta=0.5, noise=0.7, seed=10)
    tasks = env.sample_tasks(300, 40, torch.Generator().manual_seed(10))
    counts = torch.randint(9, 41, (300,), generator=torch.Generator().manual_seed(11))
    keep = (torch.arange(40)[None, :] < counts[:, None]).to(F64)
    X, y = tasks.X * keep[..., None], tasks.y * keep
    sigma, dof = estimate_noise(*task_statistics(X, y, counts), None, 2)
    assert dof == int((counts - 6).sum())
    rss = 0.0
    for t in range(300):  # per-task least squares on the trimmed samples
        Xt, yt = X[t, : counts[t]], y[t, : counts[t]]
        rss += float((yt - Xt @ torch.linalg.lstsq(Xt, yt).solution).square().sum())
    assert sigma == pytest.approx(math.sqrt(rss / dof), rel=1e-10)
    assert sigma**2 == pytest.approx(0.49, rel=3 * math.sqrt(2 / dof))


def test_float32_inputs_give_float32_results_close_to_float64():
    # the same iterations in both precisions (samples, CG B step) stay within float32 rounding
    _, tasks = _tasks(T=80, n=20, d=40, k=4, seed=12)
    options = dict(b_solver="cg", max_iter=30, tol=0.0, gtol=0.0, select_after=5)
    f64 = fit_source(*task_statistics(tasks.X, tasks.y), 4, penalty=0.05, **options)
    f32 = fit_source(*task_statistics(tasks.X.float(), tasks.y.float()), 4, penalty=0.05, **options)
    assert f32.B.dtype == torch.float32 and f32.V.dtype == torch.float32
    assert torch.linalg.matrix_norm(_projector(f32.B).double() - _projector(f64.B), ord=2) < 1e-3
    assert f32.objective == pytest.approx(f64.objective, rel=1e-4)


def test_moment_inits_and_statistics_choice_by_shape():
    _, tasks = _tasks(T=20, n=5, d=12, seed=13)
    assert isinstance(task_statistics(tasks.X, tasks.y).gram, SampleGram)  # n < d
    _, wide = _tasks(T=20, n=15, d=12, seed=13)
    assert isinstance(task_statistics(wide.X, wide.y).gram, DenseGram)  # n >= d
    s, g = task_statistics(tasks.X, tasks.y), task_statistics(tasks.X, tasks.y, representation="gram")
    torch.testing.assert_close(moment_inits(*s[:2], 2).abs(), moment_inits(*g[:2], 2).abs(), rtol=0, atol=1e-9)


def test_task_statistics_rejects_bad_counts():
    _, tasks = _tasks(T=5, n=6, d=4, seed=14)
    with pytest.raises(ValueError, match="counts"):
        task_statistics(tasks.X, tasks.y, torch.tensor([6, 6, 0, 6, 6]))
    with pytest.raises(ValueError, match="counts"):
        task_statistics(tasks.X, tasks.y, torch.tensor([6, 6, 7, 6, 6]))
    with pytest.raises(ValueError, match="X of shape"):
        task_statistics(tasks.X[0], tasks.y)


@pytest.mark.parametrize("penalty", [math.inf, 0.3])
def test_no_task_with_more_samples_than_the_rank_is_degenerate(penalty):
    """n_t <= k: every head fits its task exactly on any representation, so least squares cannot
    choose B; the fit is the random-effects fit from the first moment start, for any penalty."""
    _, tasks = _tasks(T=50, n=4, d=12, k=5, seed=3)
    G, c, q = task_statistics(tasks.X, tasks.y)
    fit = fit_source(G, c, q, 5, penalty=penalty)
    assert fit.stop_reason == "degenerate" and fit.noise is not None and float(fit.V.norm()) == 0
    reference = fit_random_effects(G, c, q, 5, B0=torch.linalg.qr(moment_inits(G, c, 5))[0][0])
    torch.testing.assert_close(_projector(fit.B), _projector(reference.B), rtol=0, atol=1e-12)
    # one more sample per task than the rank: least squares identifies B again
    _, more = _tasks(T=50, n=6, d=12, k=5, seed=3)
    assert fit_source(*task_statistics(more.X, more.y), 5, penalty=penalty, max_iter=5).stop_reason != "degenerate"
