"""Priors learned from the source tasks (empirical Bayes) for the exact linear path.

On inputs ``x' = [x, 1]`` (the intercept a constant feature when there is one) a task's predictor
is ``beta'_t = B' h_t + (v_t, 0)`` with ``B' = [B, 0; 0, 1]``: a head ``h_t`` on the learned
representation plus a perturbation ``v_t``. Treating the tasks as draws from a population,

    h_t ~ N(mu, S),    v_t ~ N(0, tau^2 I_d),    y_t = X'_t beta'_t + noise of variance sigma^2,

is a linear mixed model whose random effects live in the span of ``B'`` plus an isotropic spread:
with ``B = I`` it is the random-intercept-and-slopes model of statisticians. The source tasks give
the population: :func:`head_prior` estimates ``(mu, S)`` by maximum marginal likelihood (EM, as
mixed-model software does), :func:`perturbation_variance` estimates ``tau^2`` by the method of moments.
A target task's adapted predictor is then the posterior mean (``AdaptRep``/``FrozenRep`` with ``prior``).
Every computation is batched over tasks through ``Z_t = X'_t B'`` (``(n_t, k')``): no ``d x d`` statistics.

The generic path (other losses and models, :mod:`adaptrep.models`) has no marginal likelihood in closed
form: :func:`heads_population` takes the moments of the source heads that its fit returns, and the
target's strength of shrinkage toward them is cross-validated (:func:`adaptrep.models.cv_heads`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import Tasks
from .solvers import pseudo_inverse

__all__ = ["heads_population", "head_design", "head_prior", "perturbation_variance", "log_likelihood", "rank_candidates"]


def head_design(tasks: Tasks, B: Tensor, intercept: bool) -> Tensor:
    """``Z_t = X'_t B'`` ``(T, n, k')``: the heads' design (zero rows on padding)."""
    Z = tasks.flat() @ B
    if intercept:
        Z = torch.cat([Z, tasks.weight.unsqueeze(-1).to(Z.dtype)], -1)
    return Z


def head_prior(source: Tasks, B: Tensor, intercept: bool, noise: float, max_iter: int = 300, tol: float = 1e-10, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The source heads' population ``(mu, S)`` (``(k',)``, ``(k', k')``): the maximiser over ``(mu, S)``
    of the marginal likelihood of the source labels under ``y_t = Z_t h_t + noise``, ``h_t ~ N(mu, S)``,
    for the given noise level ``sigma``, by EM on the heads (information form, so tasks with fewer
    samples than ``k'`` count too): with ``J_t = Z_t^T Z_t / sigma^2`` and ``b_t = Z_t^T y_t / sigma^2``,

        V_t = (S^{-1} + J_t)^{-1},   m_t = V_t (S^{-1} mu + b_t),
        mu <- mean_t m_t,            S <- mean_t (V_t + (m_t - mu)(m_t - mu)^T),

    accelerated by SQUAREM (Varadhan & Roland, 2008: a step along the extrapolated path of two EM
    steps, kept only if the likelihood rises). It starts from the heads' ridge fits and stops when the
    log-likelihood gains less than ``tol`` relative in an iteration, or after ``max_iter`` iterations.
    Eigenvalues of ``S`` are floored at ``floor`` times the largest, so that it stays invertible where
    the data show no spread (the likelihood's boundary)."""
    Z = head_design(source, B, intercept)
    T, _, k = Z.shape
    Zt = Z.transpose(-1, -2)
    J = Zt @ Z / noise**2
    b = (Zt @ source.y.unsqueeze(-1)).squeeze(-1) / noise**2
    q = (source.y**2).sum(-1) / noise**2
    eye = torch.eye(k, dtype=Z.dtype, device=Z.device)
    scale = J.diagonal(dim1=-2, dim2=-1).mean().clamp_min(torch.finfo(Z.dtype).tiny)
    start = torch.linalg.solve(J + 1e-3 * scale * eye, b.unsqueeze(-1)).squeeze(-1)

    def em(mu: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        precision = torch.linalg.inv(S)
        V = pseudo_inverse(precision + J)  # Cholesky, or an eigendecomposition where a tiny noise level leaves it ill-conditioned
        m = (V @ (precision @ mu + b).unsqueeze(-1)).squeeze(-1)
        centre = m.mean(0)
        return centre, _floored((V.sum(0) + (m - centre).T @ (m - centre)) / T, floor)

    def likelihood(mu: Tensor, S: Tensor) -> float:  # up to a constant; Woodbury in k' dimensions
        inner = torch.linalg.inv(S) + J
        score = b - (J @ mu.unsqueeze(-1)).squeeze(-1)
        fit = q - 2 * b @ mu + ((J @ mu.unsqueeze(-1)).squeeze(-1) * mu).sum(-1) - (score * torch.linalg.solve(inner, score)).sum(-1)
        return float(-0.5 * (fit.sum() + T * torch.logdet(S) + torch.logdet(inner).sum()))

    mu, S = start.mean(0), _floored(torch.cov(start.T).reshape(k, k) if T > 1 else eye.clone(), floor)
    mu, S = em(mu, S)
    value = likelihood(mu, S)
    for _ in range(max_iter):
        mu1, S1 = em(mu, S)
        mu2, S2 = em(mu1, S1)
        r = torch.cat([mu1 - mu, (S1 - S).flatten()])
        v = torch.cat([mu2 - mu1, (S2 - S1).flatten()]) - r
        alpha = min(-1.0, -float(r.norm() / v.norm().clamp_min(torch.finfo(Z.dtype).tiny)))
        step = (mu - 2 * alpha * r[:k] + alpha**2 * v[:k], S - 2 * alpha * (S1 - S) + alpha**2 * v[k:].reshape(k, k))
        candidate = em(*step) if bool(torch.linalg.eigvalsh((step[1] + step[1].T) / 2).min() > 0) else (mu2, S2)
        gained = likelihood(*candidate)
        if not gained >= likelihood(mu2, S2):
            candidate, gained = (mu2, S2), likelihood(mu2, S2)
        mu, S = candidate
        done = abs(gained - value) <= tol * abs(value)
        value = gained
        if done:
            break
    return mu, S


def heads_population(w: Tensor, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The source heads' population ``(mu, S)`` for the generic path, from the fitted heads ``w``:

    * ``(T, k)`` (squared or logistic loss): ``mu`` the mean head ``(k,)`` and ``S`` the heads'
      covariance (divisor ``T``) -- a shared effect (e.g. a common intercept and slopes across
      districts) is the mean;
    * ``(T, k, N)`` (``"multiclass"``): each task's labels are its own (classes relabelled per task),
      so the ``N`` columns are exchangeable, and the cross-entropy does not change when one vector is
      added to every column. Each task's columns are centred on their mean (that shift is not
      identified) and pooled over tasks and classes: ``mu = 0`` ``(k, N)`` and ``S`` the pooled
      second moment of the centred columns (``T N`` of them).

    ``S`` contains the estimation noise of each source head as well as the spread of the true heads;
    the target's scale ``s`` of the penalty ``s (w - mu)^T S^{-1} (w - mu)`` is cross-validated, which
    corrects its overall size. Eigenvalues of ``S`` are floored at ``floor`` times the largest (at
    least ``floor`` when every head is the same), so that it is positive definite."""
    if w.ndim == 3:
        columns = (w - w.mean(-1, keepdim=True)).transpose(1, 2).reshape(-1, w.shape[1])
        mu = torch.zeros_like(w[0])
        S = columns.T @ columns / columns.shape[0]
    elif w.ndim == 2:
        mu = w.mean(0)
        centred = w - mu
        S = centred.T @ centred / w.shape[0]
    else:
        raise ValueError(f"heads must be (T, k) or (T, k, N); got shape {tuple(w.shape)}")
    if float(S.abs().max()) == 0.0:
        S = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    return mu, _floored(S, floor)


def _floored(S: Tensor, floor: float) -> Tensor:
    values, vectors = torch.linalg.eigh((S + S.T) / 2)
    values = values.clamp_min(floor * values.max().clamp_min(torch.finfo(S.dtype).tiny))
    return (vectors * values) @ vectors.T


def perturbation_variance(source: Tasks, B: Tensor, intercept: bool, noise: float) -> float | None:
    """``tau^2``, the variance per input coordinate of the perturbations ``v_t ~ (0, tau^2 I_d)``, by
    the method of moments on the residuals of each source task's own head fit on ``B``: with ``M_t``
    the residual projector of ``Z_t`` (:func:`head_design`), ``E ||M_t y_t||^2 = (n_t - k') sigma^2 +
    tau^2 tr(X_t^T M_t X_t)`` whatever the heads, so

        tau^2 = max(0, sum_t (||M_t y_t||^2 - (n_t - k') sigma^2) / sum_t tr(X_t^T M_t X_t))

    over the tasks with ``n_t > k'``; 0 when ``B`` spans every input direction (nothing left to perturb);
    ``None`` when no task has ``n_t > k'`` (every head fits its task exactly: the source tasks say nothing of ``tau^2``)."""
    X = source.flat()
    Z = head_design(source, B, intercept)
    k = Z.shape[-1]
    Zt = Z.transpose(-1, -2)
    inverse = pseudo_inverse(Zt @ Z)
    Zy, ZX = (Zt @ source.y.unsqueeze(-1)).squeeze(-1), Zt @ X
    rss = (source.y**2).sum(-1) - torch.einsum("ta,tab,tb->t", Zy, inverse, Zy)
    trace = (X**2).sum((1, 2)) - torch.einsum("tab,tad,tbd->t", inverse, ZX, ZX)
    used = source.counts > k
    if not bool(used.any()):
        return None
    total = trace[used].sum()
    if float(total) <= 1e-9 * float((X[used] ** 2).sum()):
        return 0.0
    excess = (rss - (source.counts - k) * noise**2)[used].sum()
    return max(0.0, float(excess / total))


def log_likelihood(tasks: Tasks, B: Tensor, intercept: bool, noise: float, mu: Tensor, S: Tensor, tau2: float) -> Tensor:
    """Each task's marginal log-likelihood ``(T,)`` under the population: ``y_t ~ N(Z_t mu, K_t)`` with
    ``K_t = Z_t S Z_t^T + tau^2 X_t X_t^T + sigma^2 I`` (Woodbury through the factor
    ``F_t = [Z_t S^{1/2}, tau X_t]``: ``(n_t, k' + d)`` products, no ``n_t x n_t`` matrices)."""
    X = tasks.flat()
    Z = head_design(tasks, B, intercept)
    values, vectors = torch.linalg.eigh(S)
    F = Z @ (vectors * values.clamp_min(0).sqrt())
    if tau2 > 0:
        F = torch.cat([F, math.sqrt(tau2) * X], -1)
    residual = tasks.y - (Z @ mu.unsqueeze(-1)).squeeze(-1)  # zero on padding
    noise2 = noise**2
    Ft = F.transpose(-1, -2)
    A = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device) + Ft @ F / noise2
    u = (Ft @ residual.unsqueeze(-1)).squeeze(-1) / noise2
    quadratic = (residual**2).sum(-1) / noise2 - (u * torch.linalg.solve(A, u.unsqueeze(-1)).squeeze(-1)).sum(-1)
    counts = tasks.counts
    return -0.5 * (counts * math.log(2 * math.pi * noise2) + torch.logdet(A) + quadratic)


def rank_candidates(dim: int, most: int = 64) -> list[int]:
    """The ranks that rank selection tries: every ``k`` up to 8, then doubling, up to ``min(dim, most)``."""
    top = min(dim, most)
    ranks = list(range(1, min(top, 8) + 1))
    while ranks[-1] * 2 <= top:
        ranks.append(ranks[-1] * 2)
    if ranks[-1] != top:
        ranks.append(top)
    return ranks
