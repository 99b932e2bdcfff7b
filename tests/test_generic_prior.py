"""The heads' prior learned from the source tasks on the generic path (logistic, multiclass, squared
loss with other models): the prior-shrunk heads against an independent minimiser (L-BFGS on the
penalised objective), the limit of a flat prior, the population's estimate, its gain on a task family
with a shared effect, simulated settings unchanged, and saving."""

import math

import pytest
import torch
from helpers import random_labels

from adaptrep import Tasks
from adaptrep.bayes import heads_population
from adaptrep.environments import make_environment
from adaptrep.methods import AdaptRep, FrozenRep, Oracle, TargetOnly
from adaptrep.models import _descend, _subspace_ridge, cv_heads, fit_heads, linear_model, pointwise_loss, predict, relu_model
from adaptrep.saving import load_method, save_method

F64 = torch.float64
R, n, d, k, N = 4, 12, 5, 3, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread


def _prior(loss, g):
    A = torch.randn(k, k, generator=g, dtype=F64)
    S = A @ A.T / k + 0.1 * torch.eye(k, dtype=F64)
    mu = torch.randn(k, N, generator=g, dtype=F64) if loss == "multiclass" else torch.randn(k, generator=g, dtype=F64)
    return mu, S


def _lbfgs(objective, start):
    """An independent minimiser: torch's L-BFGS with a strong-Wolfe line search, to gradient 1e-12."""
    x = start.clone().requires_grad_()
    optimiser = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = objective(x)
        value.backward()
        return value

    for _ in range(5):
        optimiser.step(closure)
    return x.detach()


@pytest.mark.parametrize("loss", ["squared", "logistic", "multiclass"])
@pytest.mark.parametrize("weighted", [False, True])
def test_prior_shrunk_heads_minimise_the_penalised_objective(loss, weighted):
    """fit_heads(prior=(mu, S), ridge=s) minimises mean loss + s (w - mu)^T S^{-1} (w - mu) per task
    (for multiclass summed over the class columns), equal to L-BFGS on that objective to 1e-6."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(R, n, d, generator=g, dtype=F64)
    y = random_labels(loss, (R, n), g)
    weight = (torch.rand(R, n, generator=g, dtype=F64) < 0.7).to(F64) if weighted else None
    if weight is not None:
        weight[:, :2] = 1.0
    mu, S = _prior(loss, g)
    s = torch.tensor([0.01, 0.1, 0.5, 2.0], dtype=F64)
    model = relu_model(loss, N if loss == "multiclass" else None)
    theta = {"W": torch.randn(d, k, generator=g, dtype=F64)}
    w = fit_heads(model, theta, X, y, weight=weight, ridge=s, classes=N if loss == "multiclass" else None, prior=(mu, S))
    Phi = model.features(theta, X)
    a = torch.ones(R, n, dtype=F64) if weight is None else weight
    P = torch.linalg.inv(S)

    def objective(v):
        values = pointwise_loss(loss, predict(loss, Phi, v), y)
        dev = v - mu
        quad = torch.einsum("tj...,jl,tl...->t", dev, P, dev)
        return ((values * a).sum(-1) / a.sum(-1) + s * quad).sum()

    reference = _lbfgs(objective, torch.zeros_like(w))
    torch.testing.assert_close(w, reference, rtol=0, atol=1e-6)
    # the minimiser is not the zero-mean ridge fit: the prior moved it
    assert float((w - fit_heads(model, theta, X, y, weight=weight, ridge=s, classes=N if loss == "multiclass" else None)).abs().max()) > 1e-2


def test_one_dimensional_squared_prior_head_is_the_closed_form():
    """k = 1, squared loss: w = (c + s mu / S) / (G + s / S) with G = mean phi^2, c = mean phi y."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 7, 1, generator=g, dtype=F64)
    y = torch.randn(3, 7, generator=g, dtype=F64)
    mu, S, s = torch.tensor([0.7], dtype=F64), torch.tensor([[0.3]], dtype=F64), torch.tensor([0.05, 0.2, 1.0], dtype=F64)
    w = fit_heads(linear_model(), {"B": torch.ones(1, 1, dtype=F64)}, X, y, ridge=s, prior=(mu, S))
    G, c = (X[..., 0] ** 2).mean(-1), (X[..., 0] * y).mean(-1)
    torch.testing.assert_close(w[:, 0], (c + s * 0.7 / 0.3) / (G + s / 0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["squared", "logistic", "multiclass"])
def test_a_flat_prior_is_the_zero_mean_fit_with_a_tiny_ridge(loss):
    """S = c I with c huge: the penalty s ||w - mu||^2 / c -> the ridge s/c ||w||^2 (the difference,
    2 s <w, mu> / c, is below 1e-8 here), so the heads equal fit_heads(ridge=s/c) without a prior."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(R, 40, d, generator=g, dtype=F64)
    y = random_labels(loss, (R, 40), g)
    mu, _ = _prior(loss, g)
    if loss == "multiclass":  # the cross-entropy ignores a shift common to the columns, which only the penalty sets: centre mu (as heads_population does)
        mu = mu - mu.mean(-1, keepdim=True)
    c, s = 1e8, torch.full((R,), 0.3, dtype=F64)
    classes = N if loss == "multiclass" else None
    model, theta = linear_model(loss, classes), {"B": torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]}
    flat = fit_heads(model, theta, X, y, ridge=s, classes=classes, prior=(mu, c * torch.eye(k, dtype=F64)))
    plain = fit_heads(model, theta, X, y, ridge=s / c, classes=classes)
    torch.testing.assert_close(flat, plain, rtol=0, atol=1e-6)
    # cross-validated with the prior: the refit is the flat fit at the chosen scale
    w_flat, s_flat = cv_heads(model, theta, X, y, torch.Generator().manual_seed(4), classes=classes, prior=(mu, c * torch.eye(k, dtype=F64)))
    torch.testing.assert_close(w_flat, fit_heads(model, theta, X, y, ridge=s_flat / c, classes=classes), rtol=0, atol=1e-6)


def test_subspace_fine_tuning_with_a_prior_minimises_its_objective():
    """The logistic fine-tuning with a head prior minimises mean log-loss + s (B^T beta - mu)^T S^{-1}
    (B^T beta - mu) + penalty ||(I - B B^T) beta||^2 (L-BFGS on beta)."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(R, n, d, generator=g, dtype=F64)
    y = random_labels("logistic", (R, n), g)
    B = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]
    mu, S = _prior("logistic", g)
    s, penalty = torch.tensor([0.05, 0.1, 0.3, 1.0], dtype=F64), torch.tensor([0.2, 1.0, 3.0, 30.0], dtype=F64)
    beta = _subspace_ridge(B, X, y, s, penalty, prior=(mu, S))
    P, perp = torch.linalg.inv(S), torch.eye(d, dtype=F64) - B @ B.T

    def objective(b):
        margin = (X @ b.unsqueeze(-1)).squeeze(-1)
        dev = b @ B - mu
        outside = b @ perp
        loss = (torch.nn.functional.softplus(margin) - y * margin).mean(-1)
        return (loss + s * torch.einsum("tj,jl,tl->t", dev, P, dev) + penalty * (outside**2).sum(-1)).sum()

    torch.testing.assert_close(beta, _lbfgs(objective, torch.zeros(R, d, dtype=F64)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss", ["squared", "multiclass"])
def test_fine_tuning_with_a_prior_starts_from_the_shrunk_head_and_descends_its_objective(loss):
    """_descend with a prior: the snapshot at 0 steps is the prior-shrunk head, and the penalised
    objective (mean loss + s (w - mu)^T S^{-1} (w - mu), the perturbation free) falls along the path
    (gradient steps below the curvature bound)."""
    g = torch.Generator().manual_seed(6)
    X = torch.randn(R, n, d, generator=g, dtype=F64)
    y = random_labels(loss, (R, n), g)
    classes = N if loss == "multiclass" else None
    model, theta = relu_model(loss, classes), {"W": torch.randn(d, k, generator=g, dtype=F64)}
    mu, S = _prior(loss, g)
    s, ones = torch.full((R,), 0.2, dtype=F64), torch.ones(R, n, dtype=F64)
    deltas, heads, _ = _descend(model, theta, X, y, ones, None, s, [0, 4, 16, 64], 0.5, 0.0, classes, (mu, S))
    torch.testing.assert_close(heads[0], fit_heads(model, theta, X, y, weight=ones, ridge=s, classes=classes, prior=(mu, S)), rtol=0, atol=1e-10)
    P = torch.linalg.inv(S)
    values = []
    for c in range(4):
        Phi = model.features({"W": theta["W"] + deltas["W"][c]}, X)
        dev = heads[c] - mu
        values.append(pointwise_loss(loss, predict(loss, Phi, heads[c]), y).mean(-1) + s * torch.einsum("tj...,jl,tl...->t", dev, P, dev))
    values = torch.stack(values, -1)
    assert bool((values[:, 1:] <= values[:, :-1] + 1e-12).all()) and bool((values[:, -1] < values[:, 0] - 1e-4).all())


def test_heads_population():
    """(T, k): the mean and the covariance (divisor T); (T, k, N): zero mean and the pooled second
    moment of the task-centred columns (invariant to a shift common to a task's columns)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(50, 3, generator=g, dtype=F64) * torch.tensor([1.0, 2.0, 0.5], dtype=F64) + torch.tensor([1.0, -2.0, 0.3], dtype=F64)
    mu, S = heads_population(w)
    torch.testing.assert_close(mu, w.mean(0))
    torch.testing.assert_close(S, torch.cov(w.T, correction=0))
    W = torch.randn(40, 3, 4, generator=g, dtype=F64)
    mu3, S3 = heads_population(W + torch.randn(40, 3, 1, generator=g, dtype=F64))  # task-wise shifts do not matter
    centred = W - W.mean(-1, keepdim=True)
    columns = centred.permute(0, 2, 1).reshape(-1, 3)
    torch.testing.assert_close(mu3, torch.zeros(3, 4, dtype=F64))
    torch.testing.assert_close(S3, columns.T @ columns / 160)
    # all heads equal: a positive definite S all the same
    assert bool(torch.linalg.eigvalsh(heads_population(torch.ones(5, 3, dtype=F64))[1]).min() > 0)


def _logistic_family(T, shots, query, seed, d=4):
    """Logistic tasks with a shared effect: beta_t = beta_0 + 0.3 z_t (z_t standard normal), intercept
    -1 + 0.3 z'_t; no ground truth is recorded (so the prior is on by default)."""
    g = torch.Generator().manual_seed(seed)
    beta0 = torch.tensor([1.5, -1.0, 0.8, 0.0], dtype=F64)[:d]

    def draw(count, m):
        beta = beta0 + 0.3 * torch.randn(count, d, generator=g, dtype=F64)
        bias = -1.0 + 0.3 * torch.randn(count, 1, generator=g, dtype=F64)
        X = torch.randn(count, m, d, generator=g, dtype=F64)
        p = torch.sigmoid((X @ beta.unsqueeze(-1)).squeeze(-1) + bias)
        return X, (torch.rand(count, m, generator=g, dtype=F64) < p).to(F64)

    Xs, ys = draw(T, 40)
    Xt, yt = draw(200, shots + query)
    source = Tasks.from_arrays(list(Xs), list(ys), loss="logistic")
    support = Tasks.from_arrays(list(Xt[:, :shots]), list(yt[:, :shots]), loss="logistic")
    return source, support, Xt[:, shots:], yt[:, shots:]


@pytest.mark.parametrize("method", [FrozenRep, pytest.param(AdaptRep, marks=pytest.mark.slow)])
def test_the_prior_lowers_the_query_log_loss_of_few_shot_logistic_targets(method):
    """A family with a shared mean effect and 6 shots per target: shrinking toward the source heads'
    population beats shrinking toward 0, on average over 200 targets by a clear margin (the paired
    difference more than 5 standard errors, and at least 0.15 nats; measured: 0.81 -> 0.51 nats,
    a gain of 0.30 +- 0.028 for both methods). The prior is on by default for these data (no ground truth)."""
    source, support, Xq, yq = _logistic_family(T=60, shots=6, query=50, seed=8)
    losses = {}
    for prior in (False, None):
        fitted = method(rank=4, prior=prior).fit(source)
        assert (fitted.head_prior is not None) == (prior is None)
        logit = fitted.adapt(support, torch.Generator().manual_seed(9)).decision_function(Xq)
        losses[prior] = (torch.nn.functional.softplus(logit) - yq * logit).mean(-1)
    gain = losses[False] - losses[None]
    assert float(gain.mean()) > 0.15 and float(gain.mean()) > 5 * float(gain.std() / math.sqrt(gain.numel())), (float(gain.mean()), float(gain.std()))


def test_simulated_settings_keep_the_prior_off_and_their_numbers():
    """A simulated environment (ground truth recorded): no prior by default, and the same predictors as prior=False."""
    env = make_environment("logistic", dim=6, rank=2, noise=0.0, delta=0.2, seed=0)
    source = env.sample_tasks(15, 15, torch.Generator().manual_seed(1))
    target = env.sample_tasks(5, 8, torch.Generator().manual_seed(2))
    assert source.beta is not None
    default = FrozenRep(rank=2).fit(source)
    assert default.head_prior is None and not default.spec.prior
    off = FrozenRep(rank=2, prior=False).fit(source)
    a = default.adapt(target, torch.Generator().manual_seed(3))
    b = off.adapt(target, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.decision_function(target.X), b.decision_function(target.X), rtol=0, atol=0)
    target_only = TargetOnly()
    target_only.prior = True
    with pytest.raises(ValueError, match="adaptrep and frozenrep"):
        target_only.fit(source)
    with pytest.raises(ValueError, match="adaptrep and frozenrep"):
        Oracle(prior=True).fit(source)


def test_saved_generic_prior_predicts_as_in_memory(tmp_path):
    source, support, Xq, _ = _logistic_family(T=12, shots=6, query=5, seed=10)
    fitted = FrozenRep(rank=2).fit(source)
    assert fitted.head_prior is not None
    loaded = load_method(save_method(fitted, tmp_path / "model"))
    assert loaded.spec.prior and loaded.head_prior is not None
    for saved, memory in zip(loaded.head_prior, fitted.head_prior, strict=True):
        torch.testing.assert_close(saved, memory, rtol=0, atol=0)
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    torch.testing.assert_close(loaded.adapt(support, gen()).decision_function(Xq), fitted.adapt(support, gen()).decision_function(Xq), rtol=0, atol=0)
