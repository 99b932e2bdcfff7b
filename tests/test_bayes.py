"""The priors learned from the source tasks (adaptrep.bayes) and ADAPTREP's/FROZENREP's posterior-mean
adaptation, against statsmodels' mixed model, Monte Carlo truths and the penalised objective solved
in closed form by numpy."""

import math
import warnings

import numpy as np
import pytest
import torch

from adaptrep.bayes import head_prior, perturbation_variance
from adaptrep.data import Tasks
from adaptrep.methods import AdaptRep, FrozenRep


def _random_slopes(T, n, d, seed, tau=0.0, ragged=False):
    """Tasks y = b_t + x^T beta_t + noise with (b_t, beta_t) ~ N(mean, cov) and an extra N(0, tau^2 I) on beta_t."""
    rng = np.random.default_rng(seed)
    mean = np.concatenate([rng.normal(size=d), [1.0]])
    A = rng.normal(size=(d + 1, d + 1)) * 0.5
    cov = A @ A.T
    X, y = [], []
    for _ in range(T):
        size = int(rng.integers(n // 2, n + 1)) if ragged else n
        effect = rng.multivariate_normal(mean, cov)
        beta = effect[:d] + tau * rng.normal(size=d)
        x = rng.normal(size=(size, d))
        X.append(x)
        y.append(effect[d] + x @ beta + rng.normal(size=size))
    return X, y


def _log_likelihood(X, y, mu, S, noise_variance):
    """The marginal log-likelihood of the tasks under y_t = [x, 1] h_t + noise, h_t ~ N(mu, S), by dense n x n algebra."""
    total = 0.0
    for x, v in zip(X, y, strict=True):
        Z = np.column_stack([x, np.ones(len(v))])
        C = Z @ S @ Z.T + noise_variance * np.eye(len(v))
        r = v - Z @ mu
        total -= 0.5 * (np.linalg.slogdet(C)[1] + r @ np.linalg.solve(C, r) + len(v) * math.log(2 * math.pi))
    return total


@pytest.mark.parametrize("ragged", [False, True])
def test_head_prior_is_the_maximum_likelihood_mixed_model(ragged):
    """With B = I, (mu, S) maximise the likelihood that statsmodels' MixedLM (ML, random intercept and
    slopes) maximises, at its noise variance: our optimum's likelihood is at least statsmodels', and
    the fixed effects and random-effects covariance agree."""
    sm = pytest.importorskip("statsmodels.api")
    d = 2
    X, y = _random_slopes(60, 12, d, seed=1, ragged=ragged)
    groups = np.concatenate([np.full(len(v), t) for t, v in enumerate(y)])
    design = np.column_stack([np.concatenate(X), np.ones(len(groups))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.MixedLM(np.concatenate(y), design, groups, exog_re=design).fit(reml=False, method="lbfgs")
    mu, S = head_prior(Tasks.from_arrays(X, y), torch.eye(d, dtype=torch.float64), True, math.sqrt(fit.scale))
    ours = _log_likelihood(X, y, mu.numpy(), S.numpy(), fit.scale)
    assert ours >= fit.llf - 0.01  # on the ragged tasks statsmodels stops lower (-844.62 against our -843.54)
    if not ragged:
        np.testing.assert_allclose(mu.numpy(), fit.fe_params, atol=2e-3)
        np.testing.assert_allclose(S.numpy(), np.asarray(fit.cov_re), atol=0.01 * np.abs(fit.cov_re).max())


def test_perturbation_variance_is_unbiased_and_zero_without_room():
    """Tasks beta_t = B w_t + v_t with v_t ~ N(0, tau^2 I) and an intercept: the estimate recovers
    tau^2 (within 4 Monte Carlo standard errors over 8 replications); with B = I nothing is left (0)."""
    d, k, tau, T, n = 6, 2, 0.3, 400, 15
    rng = np.random.default_rng(2)
    B = np.linalg.qr(rng.normal(size=(d, k)))[0]
    estimates = []
    for _ in range(8):
        X = rng.normal(size=(T, n, d))
        beta = rng.normal(size=(T, k)) @ B.T + tau * rng.normal(size=(T, d))
        y = np.einsum("tnd,td->tn", X, beta) + rng.normal(size=(T, 1)) + rng.normal(size=(T, n))
        estimates.append(perturbation_variance(Tasks.from_arrays(X, y), torch.as_tensor(B), True, 1.0))
    error = np.std(estimates, ddof=1) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - tau**2) < 4 * error
    assert error < 0.1 * tau**2
    assert perturbation_variance(Tasks.from_arrays(X, y), torch.eye(d, dtype=torch.float64), True, 1.0) == 0.0


def test_perturbation_variance_is_zero_not_negative_when_the_residuals_are_below_the_noise():
    """Tasks exactly in span(B) and a noise level above the real one: the moment estimate's numerator is
    negative, and a variance is clipped at 0."""
    rng = np.random.default_rng(4)
    d, k, T, n = 6, 2, 50, 20
    B = np.linalg.qr(rng.normal(size=(d, k)))[0]
    X = rng.normal(size=(T, n, d))
    y = np.einsum("tnd,td->tn", X, rng.normal(size=(T, k)) @ B.T) + 0.5 * rng.normal(size=(T, n))
    tasks = Tasks.from_arrays(X, y)
    assert perturbation_variance(tasks, torch.as_tensor(B), False, 2.0) == 0.0
    assert perturbation_variance(tasks, torch.as_tensor(B), False, 0.1) > 0  # below the real noise: positive


def test_posterior_mean_adaptation_solves_the_penalised_objective():
    """ADAPTREP with the prior returns the minimiser of (1/m)||y - X'(B'h + v)||^2 + (sigma^2/m)((h-mu)^T
    S^-1 (h-mu) + ||v||^2/tau^2), solved here by numpy's normal equations in (h, v); FROZENREP's
    head-only fit the same without v."""
    d, k = 5, 2
    X, y = _random_slopes(40, 30, d, seed=3, tau=0.3)
    source = Tasks.from_arrays(X, y)
    method = AdaptRep(rank=k, prior=True, standardize=False).fit(source)
    assert method.perturbation_variance > 0
    Xt, yt = _random_slopes(6, 7, d, seed=4, tau=0.3)
    target = Tasks.from_arrays(Xt, yt)
    adapted = method.adapt(target)
    frozen = FrozenRep(rank=k, prior=True, standardize=False).fit(source)
    head_only = frozen.adapt(target)
    sigma2, tau2 = method.noise_estimate**2, method.perturbation_variance
    for t in range(6):
        for fitted, adapted_t, perturb in ((method, adapted, True), (frozen, head_only, False)):
            B = fitted.representation.numpy()
            mu, S = (value.numpy() for value in fitted.head_prior)
            Bp = np.block([[B, np.zeros((d, 1))], [np.zeros((1, k)), np.ones((1, 1))]])
            Xp = np.column_stack([Xt[t], np.ones(len(yt[t]))])
            m = len(yt[t])
            # unknowns (h, v): design [Xp Bp, Xp[:, :d]]; penalty sigma^2 diag(S^-1, I/tau^2) around (mu, 0)
            design = np.column_stack([Xp @ Bp, Xt[t]]) if perturb else Xp @ Bp
            precision = np.linalg.inv(S)
            if perturb:
                precision = np.block([[precision, np.zeros((k + 1, d))], [np.zeros((d, k + 1)), np.eye(d) / tau2]])
            centre = np.concatenate([mu, np.zeros(d)]) if perturb else mu
            lhs = design.T @ design / m + sigma2 / m * precision
            rhs = design.T @ yt[t] / m + sigma2 / m * precision @ centre
            solution = np.linalg.solve(lhs, rhs)
            beta = Bp @ solution[: k + 1] + (np.concatenate([solution[k + 1 :], [0.0]]) if perturb else 0.0)
            np.testing.assert_allclose(adapted_t.beta[t].numpy(), beta[:d], atol=1e-9)
            np.testing.assert_allclose(float(adapted_t.bias[t]), beta[d], atol=1e-9)
    np.testing.assert_allclose(adapted.strength.numpy(), sigma2 / (tau2 * target.counts.numpy()))


def test_the_prior_refuses_fine_tuning_options_it_would_ignore():
    from adaptrep.finetune import FineTune

    X, y = _random_slopes(20, 10, 3, seed=5)
    with pytest.raises(ValueError, match="FineTune.folds"):
        AdaptRep(FineTune(strength="cv", folds=3), rank=1, prior=True).fit(Tasks.from_arrays(X, y))


def test_source_strength_fine_tuning_is_the_penalised_least_squares_solution():
    """``FineTune(strength="source")`` (the default) on the exact path without the heads' prior:
    ``min (1/m) ||y - X (B h + v)||^2 + (sigma^2 / (m tau^2)) ||v||^2`` over a free head ``h`` and ``v``,
    checked against numpy's solve of its normal equations on every target of a ragged batch."""
    from adaptrep import LinearEnvironment

    env = LinearEnvironment(8, 2, delta=0.8, noise=0.5, seed=3)
    source = env.sample_tasks(30, 40, torch.Generator().manual_seed(4))
    method = AdaptRep(rank=2).fit(source)
    tau2, sigma2 = method.perturbation_variance, method.noise_estimate**2
    assert method.finetune.strength == "source" and tau2 > 0
    rng = np.random.default_rng(5)
    Xs = [rng.standard_normal((m, 8)) for m in (5, 12, 20)]  # fewer and more samples than features
    ys = [X @ rng.standard_normal(8) + 0.5 * rng.standard_normal(len(X)) for X in Xs]
    adapted = method.adapt(Tasks.from_arrays(Xs, ys))
    B = method.representation.numpy()
    for t, (X, y) in enumerate(zip(Xs, ys, strict=True)):
        A = np.hstack([X @ B, X])  # unknowns (h, v)
        P = np.diag([0.0] * 2 + [sigma2 / tau2] * 8)
        theta = np.linalg.solve(A.T @ A + P, A.T @ y)
        np.testing.assert_allclose(adapted.beta[t].numpy(), B @ theta[:2] + theta[2:], rtol=0, atol=1e-9)
        assert float(adapted.strength[t]) == pytest.approx(sigma2 / (len(y) * tau2))


def test_source_strength_without_perturbations_is_the_head_only_fit():
    from adaptrep import LinearEnvironment
    from adaptrep.finetune import FineTune

    env = LinearEnvironment(8, 2, delta=0.0, noise=0.5, seed=1)
    source = env.sample_tasks(30, 40, torch.Generator().manual_seed(2))
    target = env.sample_tasks(6, 15, torch.Generator().manual_seed(3))
    tuned = FrozenRep(rank=2, finetune=FineTune()).fit(source)
    tuned.perturbation_variance = 0.0  # tasks that share the representation: nothing to fine-tune
    head_only = FrozenRep(rank=2).fit(source)
    torch.testing.assert_close(tuned.adapt(target).beta, head_only.adapt(target).beta, rtol=0, atol=1e-10)
    assert torch.isinf(tuned.last_strength).all()


def test_fine_tune_strength_defaults_and_errors():
    from adaptrep.finetune import FineTune

    assert FineTune().strength == "source" and FineTune(constraint="ball").strength == "cv"
    assert FineTune(constraint="early-stop").strength == "cv"
    with pytest.raises(ValueError, match="constraint='ball' needs strength='cv' or a number"):
        FineTune(constraint="ball", strength="source")
    B = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0]
    with pytest.raises(ValueError, match="needs the source tasks' perturbation variance"):
        FineTune().adapt(B, torch.randn(3, 10, 5, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64))


def test_rank_chosen_from_the_data_with_one_cross_validated_path(monkeypatch):
    """rank=None (prior on): the held-out marginal likelihood of tasks built on a 2-dimensional
    representation rejects rank 1 and the chosen rank is its maximiser; ADAPTREP's trial fits use the
    theory penalty, so the cross-validated path runs once, at the chosen rank."""
    import adaptrep.methods as methods

    rng = np.random.default_rng(11)
    B = np.linalg.qr(rng.standard_normal((4, 2)))[0]
    Xs = [rng.standard_normal((15, 4)) for _ in range(25)]
    ys = [X @ (B @ (2.0 * rng.standard_normal(2))) + 0.5 * rng.standard_normal(15) for X in Xs]
    calls = []
    original = methods.cv_penalty
    monkeypatch.setattr(methods, "cv_penalty", lambda X, y, rank, *args, **kwargs: calls.append(rank) or original(X, y, rank, *args, **kwargs))
    method = AdaptRep(finetune=None).fit(Tasks.from_arrays(Xs, ys))
    scores = method.rank_scores
    assert scores is not None and set(scores) == {1, 2, 3, 4}
    chosen = max(scores, key=scores.get)
    assert chosen == method.representation.shape[1] >= 2 and scores[1] < scores[2] - 10  # rank 1 underfits, clearly
    assert calls == [chosen]
