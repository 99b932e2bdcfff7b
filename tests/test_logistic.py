"""Logistic tasks: exact risks against Monte Carlo and independent quadratures; the batched Newton solver."""

import math

import numpy as np
import pytest
import torch

from adaptrep.logistic import (
    _disagreement,
    bayes_logistic_risk,
    fit_logistic,
    logistic_excess_error01,
    logistic_excess_risk,
    logistic_objective,
    sign_disagreement,
    softplus,
)

F64 = torch.float64
SCALE = torch.tensor([0.5, 1.0, 1.5, 0.8], dtype=F64)
# (theta_hat, theta) pairs in R^4, from a near-hit to an obtuse angle, with a strong signal among them
PAIRS = [
    ([0.9, -0.4, 0.3, 0.5], [1.0, -0.5, 0.2, 0.6]),
    ([0.2, 1.1, -0.7, 0.0], [-0.3, 0.8, -0.2, 0.9]),
    ([-1.0, 0.5, 0.9, -0.2], [0.6, 0.4, 0.4, 0.8]),
    ([1.5, -2.0, 3.5, 1.0], [2.0, -3.0, 2.5, 2.0]),
]


def _gaussian_logits(theta_hat, theta, samples, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, SCALE.numel(), generator=g, dtype=F64) * SCALE
    return x @ torch.tensor(theta_hat, dtype=F64), x @ torch.tensor(theta, dtype=F64)


def _bregman(zhat, z):
    """Pointwise KL(Bern(sigmoid z) || Bern(sigmoid zhat)), written independently of the module."""
    p = torch.sigmoid(z)
    return p * (torch.nn.functional.logsigmoid(z) - torch.nn.functional.logsigmoid(zhat)) + (1 - p) * (
        torch.nn.functional.logsigmoid(-z) - torch.nn.functional.logsigmoid(-zhat)
    )


def _within_standard_errors(values, exact, k=3.0):
    mean, se = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    assert se < 0.01 * exact  # the check has teeth
    assert abs(mean - exact) < k * se, (mean, exact, se)


# ---------------------------------------------------------------------------------------------
# excess logistic loss


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_excess_risk_matches_monte_carlo(index):
    theta_hat, theta = PAIRS[index]
    zhat, z = _gaussian_logits(theta_hat, theta, 10**6, seed=index)
    exact = float(logistic_excess_risk(torch.tensor(theta_hat, dtype=F64), torch.tensor(theta, dtype=F64), SCALE))
    _within_standard_errors(_bregman(zhat, z), exact)


def _two_dimensional_reference(a, b, c, nodes=96):
    """E[KL] with z = a u, zhat = b u + c v by a tensor Gauss-Hermite rule (accurate for moderate a, b, c)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    u, v = np.meshgrid(x, x, indexing="ij")
    weight = torch.from_numpy(np.outer(w, w) / w.sum() ** 2)
    z, zhat = torch.from_numpy(a * u), torch.from_numpy(b * u + c * v)
    return float((weight * _bregman(zhat, z)).sum())


@pytest.mark.parametrize(
    "a, b, c",
    [(1.0, 0.9, 0.4), (0.8, -0.5, 1.0), (1.2, 2.0, 0.0), (1.0, -1.0, 0.0), (0.0, 0.0, 1.1), (1.3, 0.0, 0.0), (0.5, 0.0, 0.7)],
)
def test_excess_risk_matches_two_dimensional_quadrature(a, b, c):
    # the one-dimensional reduction against the KL form integrated in two dimensions, including
    # collinear (c = 0), anti-collinear, theta = 0 (a = 0) and theta_hat = 0 (b = c = 0)
    scale = torch.tensor([2.0, 0.5], dtype=F64)
    theta = torch.tensor([a, 0.0], dtype=F64) / scale
    theta_hat = torch.tensor([b, c], dtype=F64) / scale
    reference = _two_dimensional_reference(a, b, c)
    assert float(logistic_excess_risk(theta_hat, theta, scale)) == pytest.approx(reference, rel=1e-11, abs=1e-15)


@pytest.mark.parametrize(
    "a, s, cos, reference",
    # computed once with mpmath at 40 digits: E[sp(sU)] - E[sp(aU)] - (a s cos - a^2) E[sigmoid'(aU)]
    [(20.0, 25.0, 0.999, 0.011549146942195912122), (50.0, 40.0, 0.9999, 0.0022488276123070121022), (5.0, 4.0, 0.99, 0.020012575135465297163)],
)
def test_excess_risk_is_accurate_for_strong_signals(a, s, cos, reference):
    # a 128 x 128 Gauss-Hermite rule is off by 35% at a = 20; the graded rule is not
    theta = torch.tensor([a, 0.0], dtype=F64)
    theta_hat = torch.tensor([s * cos, s * math.sqrt(1 - cos * cos)], dtype=F64)
    value = float(logistic_excess_risk(theta_hat, theta, torch.ones(2, dtype=F64)))
    assert value == pytest.approx(reference, rel=1e-12)


def test_excess_risk_zero_at_truth_nonnegative_and_batched():
    g = torch.Generator().manual_seed(11)
    theta = torch.randn(7, 4, generator=g, dtype=F64) * torch.tensor([[0.1], [1.0], [3.0], [10.0], [30.0], [1.0], [0.0]], dtype=F64)
    assert torch.equal(logistic_excess_risk(theta, theta, SCALE), torch.zeros(7, dtype=F64))
    # nearby estimates: tiny but positive, and quadratic in the distance
    direction = torch.randn(7, 4, generator=g, dtype=F64)
    small = logistic_excess_risk(theta + 1e-3 * direction, theta, SCALE)
    smaller = logistic_excess_risk(theta + 5e-4 * direction, theta, SCALE)
    assert bool((small > 0).all())
    torch.testing.assert_close(small / smaller, torch.full_like(small, 4.0), rtol=2e-2, atol=0)
    # broadcasting: (5, 3, d) estimates against one (d,) truth
    theta_hat = torch.randn(5, 3, 4, generator=g, dtype=F64)
    batched = logistic_excess_risk(theta_hat, theta[1], SCALE)
    assert batched.shape == (5, 3) and bool((batched >= 0).all())
    assert float(batched[2, 1]) == float(logistic_excess_risk(theta_hat[2, 1], theta[1], SCALE))


def test_excess_risk_of_zero_estimate_is_log2_minus_bayes_risk():
    theta = torch.tensor([[1.0, -0.5, 0.2, 0.6], [4.0, 1.0, -3.0, 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    excess = logistic_excess_risk(torch.zeros_like(theta), theta, SCALE)
    bayes = bayes_logistic_risk(theta, SCALE)
    torch.testing.assert_close(excess + bayes, torch.full((3,), math.log(2), dtype=F64), rtol=1e-13, atol=0)
    assert float(excess[2]) == 0.0 and float(bayes[2]) == pytest.approx(math.log(2), rel=1e-15)
    # the Bayes risk itself against Monte Carlo of the Bernoulli entropy
    _, z = _gaussian_logits([0.0] * 4, theta[1].tolist(), 10**6, seed=5)
    p = torch.sigmoid(z)
    entropy = -(p * torch.nn.functional.logsigmoid(z) + (1 - p) * torch.nn.functional.logsigmoid(-z))
    _within_standard_errors(entropy, float(bayes[1]))


# ---------------------------------------------------------------------------------------------
# excess 0-1 error


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_excess_error01_matches_monte_carlo(index):
    theta_hat, theta = PAIRS[index]
    zhat, z = _gaussian_logits(theta_hat, theta, 10**6, seed=100 + index)
    margin_if_wrong = (2 * torch.sigmoid(z) - 1).abs() * ((zhat > 0) != (z > 0)).to(F64)
    exact = float(logistic_excess_error01(torch.tensor(theta_hat, dtype=F64), torch.tensor(theta, dtype=F64), SCALE))
    _within_standard_errors(margin_if_wrong, exact)


def test_disagreement_quadrature_is_angle_over_pi():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, 4, generator=g, dtype=F64)
    theta_hat = torch.cat([theta[:2] + 0.01 * torch.randn(2, 4, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)])
    theta_hat[4] = 2.5 * theta[4]  # collinear: never disagrees
    theta_hat[5] = -0.5 * theta[5]  # anti-collinear: always disagrees
    quadrature = _disagreement(theta_hat, theta, SCALE, margin=False)
    closed = sign_disagreement(theta_hat, theta, SCALE)
    torch.testing.assert_close(quadrature, closed, rtol=1e-12, atol=1e-15)
    assert float(closed[4]) == 0.0 and float(closed[5]) == 1.0 and float(closed[0]) < 0.01
    # closed form against the angle from arccos of the Sigma-correlation
    var = SCALE**2
    correlation = (theta_hat * theta * var).sum(-1) / ((theta_hat**2 * var).sum(-1) * (theta**2 * var).sum(-1)).sqrt()
    torch.testing.assert_close(closed[1:4], torch.arccos(correlation[1:4]) / math.pi, rtol=1e-10, atol=0)
    # theta_hat = 0: a constant prediction is wrong half the time
    assert float(_disagreement(torch.zeros(4, dtype=F64), theta[0], SCALE, margin=False)) == pytest.approx(0.5, rel=1e-14)


def test_excess_error01_special_cases():
    theta = torch.tensor([[1.0, -0.5, 0.2, 0.6], [4.0, 1.0, -3.0, 2.0]], dtype=F64)
    assert torch.equal(logistic_excess_error01(theta, theta, SCALE), torch.zeros(2, dtype=F64))
    assert torch.equal(logistic_excess_error01(3 * theta, theta, SCALE), torch.zeros(2, dtype=F64))
    flipped = logistic_excess_error01(-theta, theta, SCALE)  # E|2 sigmoid(z) - 1|
    constant = logistic_excess_error01(torch.zeros_like(theta), theta, SCALE)
    torch.testing.assert_close(flipped, 2 * constant, rtol=1e-13, atol=0)
    assert float(logistic_excess_error01(theta[0], torch.zeros(4, dtype=F64), SCALE)) == 0.0
    # E|2 sigmoid(z) - 1| against Monte Carlo
    _, z = _gaussian_logits([0.0] * 4, theta[1].tolist(), 10**6, seed=9)
    _within_standard_errors((2 * torch.sigmoid(z) - 1).abs(), float(flipped[1]))


# ---------------------------------------------------------------------------------------------
# fit_logistic


def _logistic_tasks(T, n, d, seed, signal=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n, d, generator=g, dtype=F64)
    theta = signal * torch.randn(T, d, generator=g, dtype=F64) / math.sqrt(d)
    y = torch.bernoulli(torch.sigmoid(torch.einsum("tnd,td->tn", X, theta)), generator=g)
    return X, y, theta


PENALTIES = torch.tensor([0.0, 0.003, 0.03, 0.3, 1.0], dtype=F64)


def test_fit_matches_sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y, _ = _logistic_tasks(T=5, n=60, d=4, seed=1, signal=2.0)
    theta = fit_logistic(X, y, PENALTIES)
    for t in range(1, 5):  # sklearn needs C < inf, i.e. lambda > 0
        n = X.shape[1]
        # the default penalty is L2 (passing penalty="l2" is deprecated in scikit-learn >= 1.8)
        model = linear_model.LogisticRegression(C=1 / (n * float(PENALTIES[t])), fit_intercept=False, solver="lbfgs", tol=1e-12, max_iter=10000)
        model.fit(X[t].numpy(), y[t].numpy().astype(int))
        expected = torch.from_numpy(model.coef_[0])
        assert float((theta[t] - expected).norm() / expected.norm()) < 1e-4


def test_batched_fit_equals_per_task_fits_and_is_stationary():
    X, y, _ = _logistic_tasks(T=5, n=50, d=6, seed=2, signal=3.0)
    theta = fit_logistic(X, y, PENALTIES)
    single = torch.cat([fit_logistic(X[t : t + 1], y[t : t + 1], float(PENALTIES[t])) for t in range(5)])
    torch.testing.assert_close(theta, single, rtol=0, atol=1e-8)
    # the gradient of an independently written objective, by autograd
    point = theta.clone().requires_grad_(True)
    margin = torch.einsum("tnd,td->tn", X, point)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, y, reduction="none").mean(-1) + PENALTIES / 2 * (point**2).sum(-1)
    (grad,) = torch.autograd.grad(loss.sum(), point)
    assert float(grad.norm(dim=-1).max()) < 1e-8
    torch.testing.assert_close(logistic_objective(X, y, theta, PENALTIES), loss.detach(), rtol=1e-13, atol=0)


def test_fit_from_init():
    X, y, _ = _logistic_tasks(T=3, n=40, d=3, seed=4)
    theta = fit_logistic(X, y, 0.05)
    assert torch.equal(fit_logistic(X, y, 0.05, init=theta, max_iter=100), theta)  # already converged: no step
    far = fit_logistic(X, y, 0.05, init=10 * torch.ones(3, 3, dtype=F64))
    torch.testing.assert_close(far, theta, rtol=0, atol=1e-8)
    assert torch.equal(fit_logistic(X, y, 0.05, init=far, max_iter=0), far)


def test_fit_on_separable_data_stays_finite():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(3, 10, 20, generator=g, dtype=F64)  # n < d: always separable
    y = (torch.randn(3, 10, generator=g) > 0).to(F64)
    for max_iter in (3, 100):
        theta = fit_logistic(X, y, 0.0, max_iter=max_iter)
        assert bool(torch.isfinite(theta).all())
        margin = torch.einsum("tnd,td->tn", X, theta)
        assert bool(((margin > 0) == (y > 0)).all())  # separates the data
    assert float(logistic_objective(X, y, theta, 0.0).max()) < 1e-9
    assert float(theta.norm(dim=-1).max()) < 1e3


def test_fit_rejects_bad_input():
    X, y, _ = _logistic_tasks(T=2, n=10, d=3, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        fit_logistic(X, y, -0.1)
    with pytest.raises(ValueError, match="shape"):
        fit_logistic(X, y, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="y must lie"):
        fit_logistic(X, 2 * y, 0.1)
    with pytest.raises(ValueError, match="init"):
        fit_logistic(X, y, 0.1, init=torch.zeros(2, 4, dtype=F64))


def test_mle_excess_risk_is_d_over_2m():
    # well-specified MLE: E[excess log-loss] = d / (2 m) + O(1 / m^2)
    T, d = 200, 5
    m = 40 * d
    scale = torch.tensor([0.5, 0.8, 1.0, 1.3, 1.6], dtype=F64)
    g = torch.Generator().manual_seed(7)
    theta = torch.randn(T, d, generator=g, dtype=F64)
    theta = 1.5 * theta / (theta.norm(dim=-1, keepdim=True) * scale)  # logit standard deviation about 1.5
    X = torch.randn(T, m, d, generator=g, dtype=F64) * scale
    y = torch.bernoulli(torch.sigmoid(torch.einsum("tnd,td->tn", X, theta)), generator=g)
    estimate = fit_logistic(X, y, 0.0)
    ratio = float(logistic_excess_risk(estimate, theta, scale).mean()) / (d / (2 * m))
    assert 0.8 <= ratio <= 1.25, ratio


def test_softplus_is_exact_beyond_torch_threshold():
    t = torch.tensor([-800.0, -30.0, 0.0, 25.0, 800.0], dtype=F64)
    expected = torch.tensor([0.0, math.log1p(math.exp(-30.0)), math.log(2), 25.0 + math.log1p(math.exp(-25.0)), 800.0], dtype=F64)
    torch.testing.assert_close(softplus(t), expected, rtol=1e-15, atol=0)
