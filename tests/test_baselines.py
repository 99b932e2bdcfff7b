"""The classical baselines: ridge-per-task against an explicit per-task numpy cross-validation, and
the mixed model's batched BLUP against statsmodels' own random effects and the closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptrep.baselines import RIDGE_GRID, MixedEffects, RidgePerTask, blup
from adaptrep.data import Tasks
from adaptrep.methods import METHODS, make_method


def _grouped(rng: np.random.Generator, T: int, sizes: list[int], d: int = 2, noise: float = 1.0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Tasks of a mixed model: y = 1 + x^T (beta + b_t) + b_t0 + e."""
    beta = np.array([2.0, -1.0, 0.5][:d])
    xs, ys = [], []
    for t in range(T):
        n = sizes[t % len(sizes)]
        x = rng.normal(size=(n, d))
        b = rng.normal(size=d + 1) * np.r_[1.0, 0.7 * np.ones(d)]
        ys.append(1.0 + b[0] + x @ (beta + b[1:]) + noise * rng.normal(size=n))
        xs.append(x)
    return xs, ys


def _numpy_ridge_loo(x: np.ndarray, y: np.ndarray, grid: tuple[float, ...]) -> tuple[float, np.ndarray, float]:
    """Leave-one-out ridge with an unpenalised intercept, the plain way: (strength, weights, intercept)."""

    def fit(xa: np.ndarray, ya: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
        A = np.c_[np.ones(len(xa)), xa]
        P = np.eye(A.shape[1])
        P[0, 0] = 0.0
        coef = np.linalg.solve(A.T @ A / len(xa) + lam * P, A.T @ ya / len(xa))
        return coef[1:], coef[0]

    errors = []
    for lam in grid:
        err = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            w, b = fit(x[keep], y[keep], lam)
            err.append((y[i] - x[i] @ w - b) ** 2)
        errors.append(np.mean(err))
    lam = grid[int(np.argmin(errors))]
    w, b = fit(x, y, lam)
    return lam, w, b


def test_ridge_per_task_matches_numpy_leave_one_out() -> None:
    rng = np.random.default_rng(0)
    source = Tasks.from_arrays(*_grouped(rng, 4, [10]))
    method = RidgePerTask(folds=50, standardize=False).fit(source)
    # folds = the fewest samples of a target: leave-one-out for the targets of that size, whatever the
    # random fold assignment; the ragged (masked) batch must agree with each task done alone
    for sizes in ([7], [6, 8, 6, 7]):
        xs, ys = _grouped(rng, 8, sizes)
        target = Tasks.from_arrays(xs, ys)
        assert target.ragged == (len(sizes) > 1)
        adapted = method.adapt(target, torch.Generator().manual_seed(3))
        checked = [t for t in range(8) if len(ys[t]) == min(sizes)]
        assert len(checked) >= 4
        for t in checked:
            lam, w, b = _numpy_ridge_loo(xs[t], ys[t], RIDGE_GRID)
            assert adapted.strength is not None and adapted.strength[t].item() == pytest.approx(lam)
            np.testing.assert_allclose(adapted.beta[t].numpy(), w, rtol=1e-8, atol=1e-10)
            assert adapted.bias is not None and adapted.bias[t].item() == pytest.approx(b, rel=1e-8, abs=1e-10)
    # the grid matters: a task of pure noise picks strong shrinkage, a noiseless one almost none
    x = rng.normal(size=(2, 12, 2))
    y = np.stack([rng.normal(size=12), x[1] @ np.array([3.0, -2.0])])
    strengths = RidgePerTask(folds=12, standardize=False).fit(source).adapt(Tasks.from_arrays(list(x), list(y))).strength
    assert strengths is not None and strengths[0] > 1.0 and strengths[1] == min(RIDGE_GRID)


def test_ridge_per_task_folds_and_scaling_reproducible() -> None:
    rng = np.random.default_rng(1)
    source = Tasks.from_arrays(*_grouped(rng, 5, [20]))
    target = Tasks.from_arrays(*_grouped(rng, 6, [15]))
    method = make_method("ridge-per-task").fit(source)  # standardised, 5 random folds
    one = method.adapt(target, torch.Generator().manual_seed(0))
    two = method.adapt(target, torch.Generator().manual_seed(0))
    assert torch.equal(one.beta, two.beta) and torch.equal(one.strength, two.strength)  # type: ignore[arg-type]
    # predictions on raw inputs equal the ridge fitted on the standardised inputs
    X = target.X
    scaled = method.spec.standardizer(target)  # type: ignore[misc]
    G = torch.cat([torch.ones(6, 15, 1, dtype=X.dtype), scaled.X], -1)
    P = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=X.dtype))
    assert one.strength is not None
    coef = torch.linalg.solve(G.transpose(1, 2) @ G / 15 + one.strength[:, None, None] * P, G.transpose(1, 2) @ target.y.unsqueeze(-1) / 15).squeeze(-1)
    torch.testing.assert_close(one.predict(X), (G @ coef.unsqueeze(-1)).squeeze(-1))


def test_ridge_per_task_rejects_classification() -> None:
    tasks = Tasks.from_arrays([np.eye(4)] * 3, [np.array([0, 1, 0, 1])] * 3, loss="logistic")
    with pytest.raises(ValueError, match="needs the squared loss"):
        RidgePerTask().fit(tasks)


def test_blup_closed_form_and_padding() -> None:
    rng = np.random.default_rng(2)
    R, m, p = 4, 6, 3
    X = torch.as_tensor(rng.normal(size=(R, m, p)))
    y = torch.as_tensor(rng.normal(size=(R, m)))
    fixed = torch.as_tensor(rng.normal(size=p))
    L = torch.as_tensor(rng.normal(size=(p, p)))
    psi = L @ L.T
    psi_singular = psi.clone()
    psi_singular[:, 0] = psi_singular[0, :] = 0.0  # a variance component on the boundary
    for cov in (psi, psi_singular):
        b = blup(fixed, cov, 0.7, X, X, y)
        for t in range(R):
            Xt, yt = X[t].numpy(), y[t].numpy()
            V = Xt @ cov.numpy() @ Xt.T + 0.7 * np.eye(m)
            expected = cov.numpy() @ Xt.T @ np.linalg.solve(V, yt - Xt @ fixed.numpy())
            np.testing.assert_allclose(b[t].numpy(), expected, rtol=1e-9, atol=1e-12)
    # zero-padded rows change nothing
    Xp = torch.cat([X, torch.zeros(R, 3, p, dtype=X.dtype)], 1)
    yp = torch.cat([y, torch.zeros(R, 3, dtype=y.dtype)], 1)
    torch.testing.assert_close(blup(fixed, psi, 0.7, Xp, Xp, yp), blup(fixed, psi, 0.7, X, X, y))


@pytest.mark.parametrize("slopes", [True, False])
def test_mixed_effects_blup_matches_statsmodels(slopes: bool) -> None:
    pytest.importorskip("statsmodels")
    rng = np.random.default_rng(3)
    xs, ys = _grouped(rng, 25, [12, 15, 9])
    source = Tasks.from_arrays(xs, ys)
    method = MixedEffects(slopes=slopes, standardize=False).fit(source)
    # the BLUP of a source task given its own data is statsmodels' random effect of that group
    ours = method.random_effects(source).numpy()
    theirs = np.stack([np.asarray(method.result.random_effects[t]) for t in range(source.num_tasks)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-8)
    # and the adapted predictor is the fixed effects plus it
    adapted = method.adapt(source)
    fe = np.asarray(method.result.fe_params)
    q = theirs.shape[1]
    coef = np.tile(fe, (source.num_tasks, 1))
    coef[:, :q] += theirs
    np.testing.assert_allclose(adapted.beta.numpy(), coef[:, 1:], rtol=1e-6, atol=1e-8)
    assert adapted.bias is not None
    np.testing.assert_allclose(adapted.bias.numpy(), coef[:, 0], rtol=1e-6, atol=1e-8)
    assert method.info["mixed_converged"]


def test_mixed_effects_shrinks_between_population_and_own_fit() -> None:
    pytest.importorskip("statsmodels")
    rng = np.random.default_rng(4)
    source = Tasks.from_arrays(*_grouped(rng, 40, [15]))
    method = make_method("mixed-effects").fit(source)
    xs, ys = _grouped(rng, 3, [200])
    big = method.adapt(Tasks.from_arrays(xs, ys))
    few = method.adapt(Tasks.from_arrays([x[:2] for x in xs], [v[:2] for v in ys]))
    own = [np.linalg.lstsq(np.c_[np.ones(200), x], v, rcond=None)[0] for x, v in zip(xs, ys, strict=True)]
    population = np.asarray(method.result.fe_params)
    scaler = method.spec.standardizer
    assert scaler is not None
    for t in range(3):
        # many samples: close to the task's own least squares (coefficients mapped back to the raw
        # scale of inputs and, for the squared loss, labels)
        raw = big.beta[t].numpy() * getattr(scaler, "label_scale", 1.0) / scaler.scale.numpy()
        np.testing.assert_allclose(raw, own[t][1:], atol=0.15)
        # two samples: much nearer the population's coefficients than the big-sample fit is
        gap_few = np.abs(few.beta[t].numpy() - population[1:]).sum()
        gap_big = np.abs(big.beta[t].numpy() - population[1:]).sum()
        assert gap_few < gap_big


def test_baselines_registered() -> None:
    assert METHODS["ridge-per-task"] is RidgePerTask and METHODS["mixed-effects"] is MixedEffects
    assert isinstance(make_method("mixed-effects", {"rank": 2, "model": "linear", "seed": 0}), MixedEffects)
