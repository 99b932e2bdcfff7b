"""The random-effects fit of B for tasks with fewer samples than the rank (``solvers.fit_random_effects``).

Checked against a dense Gaussian log-likelihood built here task by task, across the two task
representations (Gram matrices and samples, ragged tasks), and on simulated tasks with a known B.
"""

import math

import pytest
import torch

from adaptrep import AdaptRep, FineTune, LinearEnvironment, Tasks
from adaptrep.solvers import fit_random_effects, moment_inits, task_statistics

F64 = torch.float64


def _projector(B):
    return B @ B.T


def _ragged(T=40, n=5, d=10, k=5, seed=0):
    """Tasks with 2..n <= k samples each (rows past a task's count are zero)."""
    env = LinearEnvironment(dim=d, rank=k, delta=0.3, noise=0.5, seed=seed)
    tasks = env.sample_tasks(T, n, torch.Generator().manual_seed(seed + 1))
    counts = torch.randint(2, n + 1, (T,), generator=torch.Generator().manual_seed(seed + 2))
    keep = (torch.arange(n)[None, :] < counts[:, None]).to(F64)
    return tasks.X * keep[..., None], tasks.y * keep, counts


def test_log_likelihood_is_the_gaussian_marginal_likelihood():
    """history[0] is the mean negative log-likelihood per sample at the documented start:
    y_t ~ N(X_t B mu, X_t B S B^T X_t^T + sigma^2 I), mu = 0, sigma^2 = half the labels' mean square,
    S = sigma^2 I / mean_t tr(B^T G_t B), computed here with a dense n_t x n_t covariance per task."""
    X, y, counts = _ragged()
    k = 5
    B = torch.linalg.qr(torch.randn(X.shape[-1], k, generator=torch.Generator().manual_seed(9), dtype=F64))[0]
    fit = fit_random_effects(*task_statistics(X, y, counts, representation="samples"), k, B0=B, max_iter=0)
    N = int(counts.sum())
    signal = float((y**2).sum()) / N
    sigma2 = signal / 2
    trace = sum(float(torch.trace(B.T @ X[t, : counts[t]].T @ X[t, : counts[t]] @ B)) / int(counts[t]) for t in range(len(counts)))
    S = torch.eye(k, dtype=F64) * sigma2 / (trace / len(counts))
    total = 0.0
    for t in range(len(counts)):
        Z = X[t, : counts[t]] @ B
        cov = Z @ S @ Z.T + sigma2 * torch.eye(int(counts[t]), dtype=F64)
        total += float(torch.distributions.MultivariateNormal(torch.zeros(int(counts[t]), dtype=F64), cov).log_prob(y[t, : counts[t]]))
    assert fit.iterations == 0
    assert math.isclose(fit.history[0], -total / N, rel_tol=1e-12)


def test_gram_matrices_and_samples_give_the_same_fit():
    """The same iterations on either representation (ragged tasks), with B steps solved exactly."""
    X, y, counts = _ragged(T=60, n=5, d=8, k=5)
    fits = [
        fit_random_effects(*task_statistics(X, y, counts, representation=rep), 5, max_iter=30, cg_rtol=1e-14, cg_max_iter=500)  # type: ignore[arg-type]
        for rep in ("gram", "samples")
    ]
    a, b = fits
    torch.testing.assert_close(_projector(a.B), _projector(b.B), rtol=0, atol=1e-8)
    torch.testing.assert_close(a.W @ a.B.T, b.W @ b.B.T, rtol=0, atol=1e-8)
    assert math.isclose(a.noise, b.noise, rel_tol=1e-8) and a.history == pytest.approx(b.history, rel=1e-10)


def test_likelihood_rises_and_the_representation_beats_the_moment_start():
    """On tasks with n = 6 < k = 8 samples the likelihood never falls, and the fitted span is
    much closer to B* (largest principal angle) than the moment start it came from."""
    d, k, n, T = 20, 8, 6, 300
    env = LinearEnvironment(dim=d, rank=k, delta=0.3, noise=0.5, seed=0)
    tasks = env.sample_tasks(T, n, torch.Generator().manual_seed(1))
    G, c, q = task_statistics(tasks.X, tasks.y)
    fit = fit_random_effects(G, c, q, k)
    assert all(later <= earlier + 1e-12 * abs(earlier) for earlier, later in zip(fit.history, fit.history[1:], strict=False))
    start = torch.linalg.qr(moment_inits(G, c, k)[0])[0]
    star = _projector(env.representation)
    distance = float(torch.linalg.matrix_norm(_projector(fit.B) - star, ord=2))
    assert distance < 0.5 * float(torch.linalg.matrix_norm(_projector(start) - star, ord=2))
    assert distance < 0.45 and 0.3 < fit.noise < 0.7  # the noise is 0.5 (plus the perturbations' share)


def test_adaptrep_on_tasks_with_fewer_samples_than_the_rank():
    """The default AdaptRep: no cross-validated path (no penalty can lower a loss the heads bring to
    zero), FROZENREP, and the noise level from the random-effects fit."""
    env = LinearEnvironment(dim=20, rank=8, delta=0.3, noise=0.5, seed=0)
    method = AdaptRep().fit(env.sample_tasks(200, 6, torch.Generator().manual_seed(1)))
    assert method.penalty_path.strengths == [math.inf] and method.source_fit.stop_reason == "degenerate"
    assert method.noise_estimate == method.source_fit.noise


def test_target_step_cross_validates_when_the_source_says_nothing_of_tau2():
    """With every n_t <= k the residuals beyond B are zero whatever tau^2 is: tau^2 is unknown (None,
    not 0), and the default target step is FineTune(strength="cv") on the target's own samples, not
    the head-only fit that tau^2 = 0 would give."""
    env = LinearEnvironment(dim=20, rank=8, delta=0.3, noise=0.5, seed=0)
    method = AdaptRep().fit(env.sample_tasks(200, 6, torch.Generator().manual_seed(1)))
    assert method.perturbation_variance is None
    target = env.sample_tasks(4, 60, torch.Generator().manual_seed(2))
    adapted = method.adapt(target, torch.Generator().manual_seed(3))
    expected, strength = FineTune(strength="cv").adapt(
        method.representation, target.X, target.y, torch.Generator().manual_seed(3), noise=method.noise_estimate, noise_dof=method.noise_dof
    )
    torch.testing.assert_close(adapted.beta, expected, rtol=0, atol=1e-12)
    head_only = method.representation @ torch.linalg.lstsq(target.X @ method.representation, target.y.unsqueeze(-1)).solution.squeeze(-1).T
    assert float((adapted.beta - head_only.T).norm()) > 1e-3  # it did fine-tune


def _tiny_real_tasks():
    """Data without ground truth (intercept and scaling on): ragged tasks of 1..5 samples in d = 10."""
    env = LinearEnvironment(dim=10, rank=6, delta=0.3, noise=0.5, seed=0)
    tasks = env.sample_tasks(80, 5, torch.Generator().manual_seed(1))
    mask = torch.arange(5)[None, :] < torch.randint(1, 6, (80,), generator=torch.Generator().manual_seed(3))[:, None]
    assert bool((mask.sum(1) == 1).any())
    target = env.sample_tasks(3, 30, torch.Generator().manual_seed(2))
    return Tasks(tasks.X * mask[..., None], (tasks.y + 3.0) * mask, mask=mask), Tasks(target.X, target.y + 3.0)


def test_real_data_with_fewer_samples_than_the_rank_and_single_sample_tasks_fit():
    """Rank 6 on such tasks (every n_t <= k): a task centred to nothing must not poison the moment
    starts (0/0), and the fit and predictions are finite (this raised LinAlgError before)."""
    source, target = _tiny_real_tasks()
    method = AdaptRep(rank=6).fit(source)
    adapted = method.adapt(target, torch.Generator().manual_seed(0))
    assert method.source_fit.stop_reason == "degenerate"
    assert torch.isfinite(method.representation).all() and torch.isfinite(adapted.beta).all() and math.isfinite(method.noise_estimate)


@pytest.mark.slow
def test_rank_from_the_data_on_tiny_real_tasks_never_picks_a_broken_trial():
    """The rank chosen from the data on the same tasks: some trials' likelihoods are NaN there (this
    raised LinAlgError, then picked the NaN rank); the choice is the best finite score (about 35 s)."""
    source, target = _tiny_real_tasks()
    method = AdaptRep(max_iter=50).fit(source)  # max_iter: the rank trials' least-squares fits crawl on such tiny tasks
    adapted = method.adapt(target, torch.Generator().manual_seed(0))
    assert torch.isfinite(method.representation).all() and torch.isfinite(adapted.beta).all() and math.isfinite(method.noise_estimate)
    assert method.rank_scores is not None
    finite = {rank: score for rank, score in method.rank_scores.items() if math.isfinite(score)}
    assert method.representation.shape[1] == max(finite, key=finite.__getitem__)


def _centred(X, y, counts):
    """Each task's inputs and labels centred over its own samples (padding stays zero)."""
    keep = (torch.arange(X.shape[1])[None, :] < counts[:, None]).to(F64)
    mean_X = X.sum(1, keepdim=True) / counts[:, None, None]
    mean_y = y.sum(1, keepdim=True) / counts[:, None]
    return (X - mean_X) * keep[..., None], (y - mean_y) * keep


def _dense_negloglik(X, y, counts, B, mu, S, sigma2, lost):
    """Mean negative log-likelihood per degree of freedom, task by task with a dense covariance; with
    lost=1 the centred labels' density on the complement of the ones vector (an orthonormal basis U)."""
    total, dof = 0.0, 0
    for t in range(len(counts)):
        nt = int(counts[t])
        Z, yt = X[t, :nt] @ B, y[t, :nt]
        U = torch.eye(nt, dtype=F64)
        if lost:
            U = torch.linalg.qr(torch.cat([torch.ones(nt, 1, dtype=F64), torch.eye(nt, dtype=F64)], 1))[0][:, 1:nt]
        cov = U.T @ (Z @ S @ Z.T) @ U + sigma2 * torch.eye(U.shape[1], dtype=F64)
        total += float(torch.distributions.MultivariateNormal(U.T @ Z @ mu, cov).log_prob(U.T @ yt))
        dof += U.shape[1]
    return -total / dof


def test_centred_tasks_likelihood_counts_the_lost_degree_of_freedom():
    """lost=1 (tasks centred per task): history[0] is the centred labels' Gaussian likelihood per
    degree of freedom, sum_t (n_t - 1), at the documented start (the labels' mean square per degree of
    freedom shared half and half) -- a dense reference on the (n_t - 1)-dimensional complement of 1."""
    X, y, counts = _ragged(T=30, n=5, d=10, k=5, seed=3)
    X, y = _centred(X, y, counts)
    k = 4
    B = torch.linalg.qr(torch.randn(X.shape[-1], k, generator=torch.Generator().manual_seed(5), dtype=F64))[0]
    fit = fit_random_effects(*task_statistics(X, y, counts, representation="samples"), k, B0=B, max_iter=0, lost=1)
    N = int(counts.sum()) - len(counts)
    sigma2 = float((y**2).sum()) / N / 2
    trace = sum(float(torch.trace(B.T @ X[t, : counts[t]].T @ X[t, : counts[t]] @ B)) / int(counts[t]) for t in range(len(counts)))
    S = torch.eye(k, dtype=F64) * sigma2 / (trace / len(counts))
    expected = _dense_negloglik(X, y, counts, B, torch.zeros(k, dtype=F64), S, sigma2, lost=1)
    assert math.isclose(fit.history[0], expected, rel_tol=1e-12)


def test_centred_tasks_noise_is_recovered_with_the_lost_degree_of_freedom():
    """Tasks of n = 4 = k samples centred per task (delta = 0: the labels are X B* h + noise, noise
    0.5): with lost=1 the noise lives in n - 1 = 3 dimensions per task, and the fit recovers sigma
    (counting n dimensions in the sigma^2 step instead drives it to zero)."""
    d, k, n, T = 10, 4, 4, 1000
    env = LinearEnvironment(dim=d, rank=k, delta=0.0, noise=0.5, seed=0)
    tasks = env.sample_tasks(T, n, torch.Generator().manual_seed(1))
    counts = torch.full((T,), n)
    X, y = _centred(tasks.X, tasks.y, counts)
    fit = fit_random_effects(*task_statistics(X, y, counts), k, lost=1)
    assert fit.converged and abs(fit.noise - 0.5) < 0.03
    assert all(later <= earlier + 1e-12 * abs(earlier) for earlier, later in zip(fit.history, fit.history[1:], strict=False))


def test_the_fit_is_a_maximum_of_the_dense_likelihood():
    """Heads with a nonzero mean (n = 3 = k samples per task): no generic optimiser (L-BFGS on B, mu,
    a Cholesky factor of S and log sigma^2, from the fitted B and the posterior means' moments) finds
    a dense Gaussian likelihood above the one the EM fit reports at its end (history[-1])."""
    d, k, n, T = 6, 3, 3, 80
    g = torch.Generator().manual_seed(4)
    B_star = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]
    heads = torch.tensor([2.0, -1.0, 0.5], dtype=F64) + 0.7 * torch.randn(T, k, generator=g, dtype=F64)
    X = torch.randn(T, n, d, generator=g, dtype=F64)
    y = (X @ B_star @ heads.unsqueeze(-1)).squeeze(-1) + 0.3 * torch.randn(T, n, generator=g, dtype=F64)
    fit = fit_random_effects(*task_statistics(X, y), k, max_iter=400, tol=1e-12)

    def negloglik(B, mu, L, log_s2):
        Z = X @ B
        S = L.tril() @ L.tril().T
        cov = Z @ S @ Z.transpose(-1, -2) + log_s2.exp() * torch.eye(n, dtype=F64)
        factor = torch.linalg.cholesky(cov)
        white = torch.linalg.solve_triangular(factor, (y - Z @ mu).unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum()
        return 0.5 * (white.square().sum() + logdet) / (T * n) + 0.5 * math.log(2 * math.pi)

    W = fit.W
    params = [
        fit.B.clone(memory_format=torch.contiguous_format).requires_grad_(),
        W.mean(0).clone().requires_grad_(),
        torch.linalg.cholesky(torch.cov(W.T) + 1e-3 * torch.eye(k, dtype=F64)).clone(memory_format=torch.contiguous_format).requires_grad_(),
        torch.tensor(2 * math.log(fit.noise), dtype=F64).requires_grad_(),
    ]
    optimiser = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = negloglik(*params)
        value.backward()
        return value

    optimiser.step(closure)
    with torch.no_grad():
        best = float(negloglik(*params))
    assert best >= fit.history[-1] - 1e-7 * abs(fit.history[-1])
