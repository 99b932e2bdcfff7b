"""Source objective, its gradient and solvers: finite differences, closed forms, optimality conditions."""

import math

import pytest
import torch

from adaptrep import FineTune, LinearEnvironment
from adaptrep.solvers import (
    HeadSolver,
    fit_perturbation,
    fit_source,
    lipschitz,
    penalty_prox,
    predictor,
    source_gradient,
    source_objective,
)


def _stats(T=6, n=15, d=5, seed=0):
    env = LinearEnvironment(dim=d, rank=2, delta=0.5, noise=0.3, seed=seed)
    tasks = env.sample_tasks(T, n, torch.Generator().manual_seed(seed))
    return tasks.gram()


@pytest.mark.parametrize("penalty", [0.3, math.inf])
def test_source_gradient_matches_finite_differences(penalty):
    G, c, q = _stats()
    g = torch.Generator().manual_seed(3)
    T, d, k = c.shape[0], c.shape[1], 2
    B = torch.randn(d, k, generator=g, dtype=torch.float64)
    W = torch.randn(T, k, generator=g, dtype=torch.float64)
    V = torch.randn(T, d, generator=g, dtype=torch.float64) * (0.0 if math.isinf(penalty) else 1.0)
    grads = source_gradient(B, W, V, G, c, penalty)
    h = 1e-6
    for which, (param, grad) in enumerate(zip((B, W, V), grads, strict=True)):
        if which == 2 and math.isinf(penalty):
            continue
        fd = torch.zeros_like(param)
        for index in range(param.numel()):
            plus, minus = param.clone().view(-1), param.clone().view(-1)
            plus[index] += h
            minus[index] -= h
            args = [B, W, V]
            args[which] = plus.view_as(param)
            f_plus = source_objective(*args, G, c, q, penalty)
            args[which] = minus.view_as(param)
            f_minus = source_objective(*args, G, c, q, penalty)
            fd.view(-1)[index] = (f_plus - f_minus) / (2 * h)
        torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_frozen_fit_on_orthogonal_design_is_pca_of_moments():
    # With X_t^T X_t / n = I exactly, the frozen objective is sum_t ||c_t||^2 - ||P c_t||^2:
    # the optimal span is the top-k eigenspace of sum_t c_t c_t^T.
    g = torch.Generator().manual_seed(5)
    T, n, d, k = 30, 12, 8, 3
    X = torch.linalg.qr(torch.randn(T, n, d, generator=g, dtype=torch.float64))[0] * math.sqrt(n)
    y = torch.randn(T, n, generator=g, dtype=torch.float64)
    G = X.transpose(-1, -2) @ X / n
    c = (X.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1) / n
    q = (y * y).sum(-1) / n
    fit = fit_source(G, c, q, k, penalty=math.inf)
    top = torch.linalg.eigh(c.T @ c)[1][:, -k:]
    P_fit, P_pca = fit.B @ fit.B.T, top @ top.T
    torch.testing.assert_close(P_fit, P_pca, atol=1e-8, rtol=0)
    assert fit.grad_norm < 1e-8


def test_adaptrep_with_huge_penalty_equals_frozenrep():
    G, c, q = _stats(T=20, n=12, d=6, seed=2)
    frozen = fit_source(G, c, q, 2, penalty=math.inf)
    huge = fit_source(G, c, q, 2, penalty=1e6)
    assert huge.V.abs().max() == 0
    torch.testing.assert_close(huge.B @ huge.B.T, frozen.B @ frozen.B.T, atol=1e-8, rtol=0)
    assert huge.objective == pytest.approx(frozen.objective, rel=1e-10)


@pytest.mark.parametrize("penalty", [0.05, 0.3])
def test_adaptrep_source_fit_is_stationary_and_beats_frozen(penalty):
    G, c, q = _stats(T=40, n=20, d=8, seed=4)
    fit = fit_source(G, c, q, 2, penalty=penalty)
    assert fit.grad_norm < 1e-5
    assert fit.objective <= min(fit.restart_objectives) + 1e-12
    # the frozen solution (V = 0) is feasible for the ADAPTREP objective, so F cannot be larger
    frozen = fit_source(G, c, q, 2, penalty=math.inf)
    assert fit.objective <= frozen.objective + 1e-10
    assert (fit.V.norm(dim=-1) > 0).any()


def test_constrained_form_respects_the_radius():
    G, c, q = _stats(T=20, n=20, d=6, seed=6)
    fit = fit_source(G, c, q, 2, radius=0.2)
    assert fit.V.norm(dim=-1).max() <= 0.2 + 1e-12
    assert fit.grad_norm < 1e-4


def _kkt(B, G, c, w, v, lam):
    beta = predictor(B, w, v)
    grad = 2 * ((G @ beta.unsqueeze(-1)).squeeze(-1) - c)
    head = (B.T @ grad.unsqueeze(-1)).squeeze(-1)
    norm = v.norm(dim=-1, keepdim=True)
    active = norm.squeeze(-1) > 0
    v_res = torch.where(active.unsqueeze(-1), grad + lam.unsqueeze(-1) * v / norm.clamp_min(1e-300), torch.zeros_like(grad))
    inactive_ok = torch.where(active, torch.ones_like(lam, dtype=torch.bool), grad.norm(dim=-1) <= lam * (1 + 1e-6))
    return head.abs().max(), v_res.norm(dim=-1).max(), bool(inactive_ok.all()), active


def test_finetune_solution_satisfies_group_lasso_optimality():
    env = LinearEnvironment(dim=10, rank=2, delta=0.6, noise=0.3, seed=7)
    target = env.sample_tasks(8, 30, torch.Generator().manual_seed(8))
    G, c, _ = target.gram()
    B = env.representation
    lam = torch.linspace(0.01, 1.5, 8, dtype=torch.float64)
    w, v = FineTune(strength="cv", steps=3000).solve(B, G, c, lam)
    head, v_res, inactive_ok, active = _kkt(B, G, c, w, v, lam)
    assert head < 1e-8 and v_res < 1e-6 and inactive_ok
    assert active.any() and (~active).any()  # both regimes are exercised


def test_batched_perturbation_fit_equals_per_task_loop():
    G, c, _ = _stats(T=7, n=9, d=6, seed=9)
    B = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    lam = torch.full((7,), 0.2, dtype=torch.float64)
    heads = HeadSolver.build(B, G)
    w, v = fit_perturbation(heads, c, lipschitz(G), torch.zeros_like(c), penalty_prox, lam, 50)
    for t in range(7):
        ht = HeadSolver.build(B, G[t])
        wt, vt = fit_perturbation(ht, c[t], lipschitz(G[t]), torch.zeros_like(c[t]), penalty_prox, lam[t], 50)
        torch.testing.assert_close(vt, v[t], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(wt, w[t], rtol=1e-10, atol=1e-12)


def test_ball_constrained_finetune_stays_in_the_ball_and_is_optimal():
    env = LinearEnvironment(dim=10, rank=2, delta=0.8, noise=0.2, seed=11)
    target = env.sample_tasks(6, 40, torch.Generator().manual_seed(12))
    G, c, _ = target.gram()
    B = env.representation
    radius = torch.full((6,), 0.05, dtype=torch.float64)
    w, v = FineTune(constraint="ball", steps=3000).solve(B, G, c, radius)
    assert (v.norm(dim=-1) <= 0.05 + 1e-12).all()
    # optimality on the boundary: the gradient in v points inward along v (normal cone of the ball)
    grad = 2 * ((G @ predictor(B, w, v).unsqueeze(-1)).squeeze(-1) - c)
    u = v / v.norm(dim=-1, keepdim=True)
    tangential = grad - (grad * u).sum(-1, keepdim=True) * u
    assert (v.norm(dim=-1) > 0.05 - 1e-9).all() and tangential.norm(dim=-1).max() < 1e-6
    assert ((grad * u).sum(-1) < 0).all()
    # the radius grid reaches the norm of the weakest penalised solution (and starts at 0: head only)
    tuner = FineTune(constraint="ball")
    noise = torch.full((6,), 0.2, dtype=torch.float64)
    grid = tuner.strength_grid(B, G, c, 40, noise)
    penalised = FineTune().strength_grid(B, G, c, 40, noise)
    _, v_weak = FineTune().solve(B, G, c, penalised[:, -1])
    torch.testing.assert_close(grid[:, -1], v_weak.norm(dim=-1))
    assert (grid[:, 0] == 0).all() and (grid.diff(dim=-1) > 0).all()
    beta_cv, radii = tuner.adapt(B, target.X, target.y)
    # each target's radius is a point of its own grid, and beta the ball-constrained fit at that radius
    G, c, q = target.gram()
    own_grid = tuner.strength_grid(B, G, c, 40, FineTune.noise_level(G, c, q, 40, None, 0))
    assert torch.isclose(own_grid, radii.unsqueeze(-1), rtol=1e-12, atol=0).any(-1).all()
    torch.testing.assert_close(beta_cv, predictor(B, *tuner.solve(B, G, c, radii)))


@pytest.mark.parametrize("kwargs", [dict(penalty=0.1), dict(radius=0.3), dict(penalty=math.inf)])
def test_source_objective_never_increases(kwargs):
    G, c, q = _stats(T=30, n=12, d=8, seed=13)
    fit = fit_source(G, c, q, 3, select_after=1, **kwargs)
    history = torch.tensor(fit.history, dtype=torch.float64)
    assert len(history) == fit.iterations
    assert (history[1:] <= history[:-1] * (1 + 1e-12) + 1e-15).all()
    assert fit.objective <= history[-1] * (1 + 1e-12)


def test_noise_estimates_are_unbiased_and_pooled():
    from adaptrep.solvers import estimate_noise

    env = LinearEnvironment(dim=10, rank=2, delta=0.5, noise=0.7, seed=14)
    G, c, q = env.sample_tasks(400, 30, torch.Generator().manual_seed(14)).gram()
    sigma, dof = estimate_noise(G, c, q, 30, 2)
    assert dof == 400 * 20
    assert sigma**2 == pytest.approx(0.49, rel=3 * math.sqrt(2 / dof))
    # too few samples per task: a rough estimate flagged with dof = 0
    G, c, q = env.sample_tasks(400, 8, torch.Generator().manual_seed(15)).gram()
    assert estimate_noise(G, c, q, 8, 2)[1] == 0
    # the target's own estimate is pooled with the given one by degrees of freedom
    target = env.sample_tasks(3, 1000, torch.Generator().manual_seed(16))
    G, c, q = target.gram()
    own = FineTune.noise_level(G, c, q, 1000, None, 0)
    pooled = FineTune.noise_level(G, c, q, 1000, 0.0, 990)
    assert own is not None and pooled is not None
    torch.testing.assert_close(own, torch.full((3,), 0.7, dtype=torch.float64), rtol=0.08, atol=0)
    torch.testing.assert_close(pooled, own / math.sqrt(2))
    fallback = FineTune.noise_level(G[:, :5, :5], c[:, :5], q, 6, 0.3, 10)  # m <= d + 2: the given estimate
    torch.testing.assert_close(fallback, torch.full((3,), 0.3, dtype=torch.float64))


def test_early_stopped_finetune_follows_gradient_descent_and_cross_validates():
    env = LinearEnvironment(dim=8, rank=2, delta=0.6, noise=0.3, seed=17)
    target = env.sample_tasks(4, 30, torch.Generator().manual_seed(18))
    G, c, _ = target.gram()
    B = env.representation
    tuner = FineTune(constraint="early-stop", steps=64)
    w0, v0 = tuner.solve(B, G, c, torch.zeros(4, dtype=torch.float64))
    assert v0.abs().max() == 0  # zero steps: head only
    # many steps of gradient descent reach the unpenalised least-squares fit of B w + v
    w, v = tuner.solve(B, G, c, torch.full((4,), 20000.0, dtype=torch.float64))
    torch.testing.assert_close(predictor(B, w, v), torch.linalg.solve(G, c.unsqueeze(-1)).squeeze(-1), rtol=1e-6, atol=1e-8)
    beta, counts = tuner.adapt(B, target.X, target.y)
    # each count is a point of the grid (0, then geometric up to 64 steps), beta the fit after that many steps
    assert torch.isin(counts, tuner.strength_grid(B, G, c, 30, None)[0]).all()
    torch.testing.assert_close(beta, predictor(B, *tuner.solve(B, G, c, counts)))
