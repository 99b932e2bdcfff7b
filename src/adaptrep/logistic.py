"""Logistic tasks with Gaussian inputs: exact risks by quadrature and a batched Newton solver.

Model (the logistic counterpart of :mod:`adaptrep.environments`): inputs ``x ~ N(0, Sigma)`` in
R^d with ``Sigma = diag(scale**2)``, labels ``y ~ Bernoulli(sigmoid(z))`` with the true logit
``z = <x, theta>`` (``theta`` includes any signal scale). A predictor ``theta_hat`` has the logit
``zhat = <x, theta_hat>`` and predicts ``P(y = 1 | x) = sigmoid(zhat)``.

``(z, zhat)`` is a centred Gaussian pair with ``Var z = a^2 = theta^T Sigma theta``,
``Var zhat = s^2 = theta_hat^T Sigma theta_hat`` and ``Cov(z, zhat) = theta^T Sigma theta_hat``.
Write ``z = a u`` and ``zhat = b u + c v`` with independent standard normal ``u, v``,
``b = Cov / a`` and ``c^2 = s^2 - b^2`` the variance of the part of ``zhat`` that ``z`` does not
explain (computed as ``||theta_hat - (Cov / a^2) theta||_Sigma^2``, a sum of squares). This
parametrisation needs no Cholesky factor, so ``theta = 0``, ``theta_hat = 0`` and collinear pairs
(a singular 2x2 covariance) need no special treatment.

Every risk here reduces to a one-dimensional expectation over ``u`` of an even function whose
only singularities are on the imaginary axis (the poles of ``sigmoid``, the branch points of
``softplus``), at distance ``pi / a`` or ``pi / s`` from 0. They are integrated over ``u >= 0``
by Gauss-Legendre on panels graded geometrically towards 0 (:func:`half_normal_rule`), which
converges exponentially for every signal strength; a tensor-product Gauss-Hermite rule does not
(its node spacing cannot resolve the kink-like ``softplus`` at large ``a``, ``s``: with 128 x 128
nodes it is off by 2e-5 relative at ``a = 5`` and by 35% at ``a = 20``).

* :func:`logistic_excess_risk` — exact excess logistic loss ``E[KL(Bern(sigmoid z) || Bern(sigmoid zhat))]``;
* :func:`logistic_excess_error01` — exact excess 0-1 error over the Bayes classifier ``sign(z)``;
* :func:`sign_disagreement` — ``P(sign zhat != sign z)``, the Sigma-angle between the vectors over pi;
* :func:`bayes_logistic_risk` — expected log-loss of the Bayes predictor;
* :func:`fit_logistic` — batched L2-regularised logistic regression by damped Newton.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from .solvers import matmul, matvec, spd_solve

__all__ = [
    "bayes_logistic_risk",
    "fit_logistic",
    "half_normal_rule",
    "logistic_excess_error01",
    "logistic_excess_risk",
    "logistic_objective",
    "sign_disagreement",
    "softplus",
]

#: The quadrature in ``u`` stops at ``U_MAX`` standard deviations (``2 phi(12) < 1e-31``).
U_MAX = 12.0
#: Number of geometrically graded panels: the smallest is ``[0, U_MAX 2^-PANELS]`` (about ``4e-11``).
PANELS = 38


# ---------------------------------------------------------------------------------------------
# numerics


def softplus(t: Tensor) -> Tensor:
    """``log(1 + e^t)`` without overflow or the linear cut-off of ``torch.nn.functional.softplus``."""
    return t.clamp_min(0) + torch.log1p(torch.exp(-t.abs()))


@functools.lru_cache(maxsize=16)
def _half_normal_rule_cpu(nodes: int) -> tuple[Tensor, Tensor]:
    """Float64 CPU nodes and weights of :func:`half_normal_rule` (cached)."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    edges = np.concatenate([[0.0], U_MAX * 2.0 ** -np.arange(PANELS, -1, -1, dtype=np.float64)])
    lo, hi = edges[:-1, None], edges[1:, None]
    u = (lo + hi) / 2 + (hi - lo) / 2 * t[None, :]
    weight = (hi - lo) / 2 * w[None, :] * 2 * np.exp(-(u**2) / 2) / math.sqrt(2 * math.pi)
    return torch.from_numpy(u.ravel()), torch.from_numpy(weight.ravel())


def half_normal_rule(nodes: int = 16, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Nodes ``u_k > 0`` and weights ``w_k`` with ``sum_k w_k g(u_k) ~ E[g(|U|)]``, ``U ~ N(0, 1)``.

    ``nodes``-point Gauss-Legendre on each of the panels ``[0, h], [h, 2h], ..., [U_MAX / 2, U_MAX]``
    (``h = U_MAX 2^-PANELS``); the weights include the half-normal density ``2 phi(u)``. Grading the
    panels towards 0 makes the rule converge exponentially for integrands analytic off the
    imaginary axis, whatever the scale of their singularities there (down to about ``h``).
    """
    if nodes < 1:
        raise ValueError(f"nodes must be positive; got {nodes}")
    u, w = _half_normal_rule_cpu(int(nodes))
    return u.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def _pair_statistics(theta_hat: Tensor, theta: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, s, cov, c)`` of the logits: ``a, s`` their standard deviations, ``c`` the std of ``zhat`` given ``z``."""
    if theta_hat.shape[-1] != theta.shape[-1] or scale.shape[-1] != theta.shape[-1]:
        raise ValueError(f"theta_hat, theta and scale need the same last dimension; got {tuple(theta_hat.shape)}, {tuple(theta.shape)}, {tuple(scale.shape)}")
    var = scale * scale
    a2 = (theta * theta * var).sum(-1)
    s2 = (theta_hat * theta_hat * var).sum(-1)
    cov = (theta * theta_hat * var).sum(-1)
    kappa = torch.where(a2 > 0, cov / a2.clamp_min(torch.finfo(a2.dtype).tiny), torch.zeros_like(cov))  # regression of zhat on z
    resid = theta_hat - kappa.unsqueeze(-1) * theta
    c2 = (resid * resid * var).sum(-1)
    a, s, c = a2.sqrt(), s2.sqrt(), c2.sqrt()
    a, s, cov, c = torch.broadcast_tensors(a, s, cov, c)
    return a, s, cov, c


# ---------------------------------------------------------------------------------------------
# exact risks


def bayes_logistic_risk(theta: Tensor, scale: Tensor, *, nodes: int = 16) -> Tensor:
    """Expected log-loss of the Bayes predictor, ``E[H(sigmoid z)]`` with ``H`` the Bernoulli entropy (nats).

    ``H(sigmoid z) = softplus(-|z|) + |z| sigmoid(-|z|)``, both terms positive; ``theta (..., d)``
    gives a result of shape ``(...)``. ``theta = 0`` gives ``log 2``.
    """
    a, _, _, _ = _pair_statistics(theta, theta, scale)
    u, w = half_normal_rule(nodes, theta.dtype, theta.device)
    t = a.unsqueeze(-1) * u
    return (w * (softplus(-t) + t * torch.sigmoid(-t))).sum(-1)


def logistic_excess_risk(theta_hat: Tensor, theta: Tensor, scale: Tensor, *, nodes: int = 16) -> Tensor:
    """Exact excess logistic loss ``E[loss(theta_hat)] - E[loss(theta)] = E_x[KL(Bern(sigmoid z) || Bern(sigmoid zhat))]``.

    The pointwise KL divergence is the Bregman divergence of ``softplus``,
    ``D(zhat, z) = softplus(zhat) - softplus(z) - sigmoid(z) (zhat - z) >= 0``. Regressing ``zhat``
    on ``z`` and Stein's lemma (``E[sigmoid(z) zhat] = Cov E[sigmoid'(z)]``) reduce its expectation
    to one dimension, as a sum of two non-negative terms::

        E[D(zhat, z)] = E[D(s u, a u)] + (a s - Cov) E[sigmoid'(a u)],      u ~ N(0, 1),

    the first the divergence between the logits rescaled to the same direction (zero iff
    ``s = a``), the second the price of the angle between them (``a s - Cov >= 0`` by
    Cauchy-Schwarz, zero iff the vectors are positively collinear in the Sigma geometry; computed
    as ``a^2 c^2 / (a s + Cov)`` when ``Cov > 0`` to avoid cancellation). The result is therefore
    ``>= 0`` and exactly 0 when ``theta_hat == theta``; ``theta_hat = 0`` gives
    ``log 2 - bayes_logistic_risk(theta)``.

    Args:
        theta_hat: estimates ``(..., d)``.
        theta: true parameters ``(..., d)`` (broadcast against ``theta_hat``).
        scale: input standard deviations ``(d,)`` (``Sigma = diag(scale**2)``).
        nodes: Gauss-Legendre nodes per panel of :func:`half_normal_rule`.

    Returns:
        The excess risk in nats, shape ``(...)``.
    """
    a, s, cov, c = _pair_statistics(theta_hat, theta, scale)
    gap = torch.where(cov > 0, a * a * c * c / (a * s + cov).clamp_min(torch.finfo(a.dtype).tiny), a * s - cov).clamp_min(0)
    u, w = half_normal_rule(nodes, a.dtype, a.device)
    t, that = a.unsqueeze(-1) * u, s.unsqueeze(-1) * u
    # D is even under (zhat, z) -> (-zhat, -z); on u >= 0 use the negated logits, where every term is small
    q = torch.sigmoid(-t)
    divergence = (softplus(-that) - softplus(-t) - q * (t - that)).clamp_min(0)
    slope = q * torch.sigmoid(t)  # sigmoid'(a u)
    return (w * divergence).sum(-1) + gap * (w * slope).sum(-1)


def _disagreement(theta_hat: Tensor, theta: Tensor, scale: Tensor, margin: bool, *, nodes: int = 16) -> Tensor:
    """``E[m(z) 1{sign zhat != sign z}]`` with ``m(z) = |2 sigmoid(z) - 1|`` (``margin``) or 1, by quadrature.

    Given ``u``, ``zhat = b u + c v`` disagrees in sign with ``z = a u`` with probability
    ``Phi(-r |u|)``, ``r = b / c = Cov / (a c)``; both factors are even in ``u``. ``c = 0`` (collinear
    vectors) gives ``r = +-inf``; ``theta_hat = 0`` gives ``r = 0``: ties ``zhat = 0`` count as half
    an error (any fixed tie-break gives the same expectation).
    """
    a, _, cov, c = _pair_statistics(theta_hat, theta, scale)
    ac = a * c
    signed_inf = torch.where(cov > 0, torch.full_like(cov, math.inf), torch.where(cov < 0, torch.full_like(cov, -math.inf), torch.zeros_like(cov)))
    r = torch.where(ac > 0, cov / ac.clamp_min(torch.finfo(ac.dtype).tiny), signed_inf)
    u, w = half_normal_rule(nodes, a.dtype, a.device)
    wrong = torch.special.ndtr(-r.unsqueeze(-1) * u)
    if margin:
        wrong = wrong * torch.tanh(a.unsqueeze(-1) * u / 2)  # |2 sigmoid(t) - 1| = tanh(|t| / 2)
    return (w * wrong).sum(-1)


def logistic_excess_error01(theta_hat: Tensor, theta: Tensor, scale: Tensor, *, nodes: int = 16) -> Tensor:
    """Exact excess 0-1 error of the classifier ``sign(zhat)`` over the Bayes classifier ``sign(z)``.

    ``E[|2 sigmoid(z) - 1| 1{sign zhat != sign z}] = 2 int_0^inf phi(u) tanh(a u / 2) Phi(-r u) du``
    with ``r = Cov / (a c)`` (see the module docstring), integrated by :func:`half_normal_rule`.
    Shapes as in :func:`logistic_excess_risk`. ``theta_hat = 0`` (a constant prediction) gives
    ``E|2 sigmoid(z) - 1| / 2``; ``theta = 0`` gives 0.
    """
    return _disagreement(theta_hat, theta, scale, margin=True, nodes=nodes)


def sign_disagreement(theta_hat: Tensor, theta: Tensor, scale: Tensor) -> Tensor:
    """``P(sign zhat != sign z) = angle / pi``, the angle between ``theta_hat`` and ``theta`` in the Sigma inner product.

    Closed form ``atan2(a c, Cov) / pi``; ``theta_hat = 0`` or ``theta = 0`` (a logit that is
    always 0, ties broken by a fair coin) gives 1/2.
    """
    a, s, cov, c = _pair_statistics(theta_hat, theta, scale)
    angle = torch.atan2(a * c, cov) / math.pi
    return torch.where((a > 0) & (s > 0), angle, torch.full_like(angle, 0.5))


# ---------------------------------------------------------------------------------------------
# batched L2-regularised logistic regression

#: Sufficient-decrease constant of the Armijo line search, and the most step halvings per iteration.
ARMIJO = 1e-4
MAX_HALVINGS = 50


def _penalties(penalty: float | Tensor, num_tasks: int, like: Tensor) -> Tensor:
    """The per-task penalties ``(T,)``, validated (finite and ``>= 0``)."""
    lam = torch.as_tensor(penalty, dtype=like.dtype, device=like.device)
    if lam.ndim == 0:
        lam = lam.expand(num_tasks)
    if lam.shape != (num_tasks,):
        raise ValueError(f"penalty must be a number or a tensor of shape ({num_tasks},); got shape {tuple(lam.shape)}")
    if not bool((torch.isfinite(lam) & (lam >= 0)).all()):
        raise ValueError("penalty must be finite and non-negative")
    return lam


def _losses(margin: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean log-loss ``mean_i [softplus(m_i) - y_i m_i]``, written as ``y softplus(-m) + (1 - y) softplus(m)``
    (each term times ``weight_i`` when given, still divided by the number of rows).

    The two forms are equal for every ``y``; the second keeps its accuracy when ``|m|`` is large
    and the loss tiny (nearly separated data).
    """
    values = y * softplus(-margin) + (1 - y) * softplus(margin)
    return (values if weight is None else values * weight).mean(-1)


def logistic_objective(X: Tensor, y: Tensor, theta: Tensor, penalty: float | Tensor) -> Tensor:
    """Per-task objective ``mean_i [softplus(<x_i, theta>) - y_i <x_i, theta>] + (lambda / 2) ||theta||^2``.

    ``X (T, n, d)``, ``y (T, n)``, ``theta (T, d)``, ``penalty`` a number or ``(T,)``; returns ``(T,)``.
    """
    lam = _penalties(penalty, X.shape[0], X)
    return _losses(matvec(X, theta), y) + lam / 2 * (theta * theta).sum(-1)


def fit_logistic(
    X: Tensor,
    y: Tensor,
    penalty: float | Tensor,
    *,
    init: Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
    weight: Tensor | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """L2-regularised logistic regression without intercept, every task at once (damped Newton).

    Minimises, per task ``t``, ``f_t(theta) = mean_i [softplus(<x_i, theta>) - y_i <x_i, theta>] + (lambda_t / 2) ||theta||^2``
    (with ``weight``: each sample's term times ``weight_ti``, still divided by ``n``).
    Each iteration takes the Newton direction ``-(H + eps I)^{-1} g`` (Cholesky, :func:`spd_solve`;
    ``eps`` a ``1e-12`` relative jitter so that a singular Hessian still gives a descent direction)
    and a backtracking (Armijo) line search per task, starting from the full step. A task is
    frozen once ``||g||_2 <= tol`` (converged) or when no step along the direction decreases
    ``f_t`` beyond rounding (stalled, e.g. ``tol`` below what the dtype can resolve); only the
    remaining tasks are computed.

    Separable data with ``lambda = 0`` (always the case when ``n < d``) have no minimiser: the
    infimum 0 is approached as ``||theta|| -> inf``. No error is raised; the iterates stay finite
    (the margins grow by about one per Newton step, the loss is evaluated without overflow) and
    the returned ``theta`` is the first iterate whose gradient norm is below ``tol`` (its norm
    grows like ``log(1 / tol)``) or the last of ``max_iter`` iterations: finite, with a tiny
    training loss, but meaningless as an estimate of direction-and-scale. Use ``lambda > 0`` there.

    Args:
        X: inputs ``(T, n, d)``.
        y: labels ``(T, n)`` in ``{0, 1}`` (values in ``[0, 1]`` act as soft labels).
        penalty: ``lambda >= 0``, a number or a ``(T,)`` tensor.
        init: starting point ``(T, d)`` (default 0).
        max_iter: the most Newton iterations.
        tol: gradient-norm tolerance.
        weight: per-sample weights ``a`` ``(T, n)``, ``>= 0`` (default 1): the loss becomes
            ``(1/n) sum_i a_i [softplus(<x_i, theta>) - y_i <x_i, theta>]`` (rows of weight 0, e.g.
            padding, drop out; the labels of those rows are not checked).
        offset: fixed margins ``(T, n)`` added to ``<x_i, theta>`` (default 0), e.g. a prior mean's
            predictions when ``theta`` is the deviation from it.

    Returns:
        ``theta`` of shape ``(T, d)``.
    """
    if X.ndim != 3 or y.shape != X.shape[:2]:
        raise ValueError(f"fit_logistic needs X of shape (T, n, d) and y of shape (T, n); got {tuple(X.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(X).all() and torch.isfinite(y).all()):
        raise ValueError("X and y must be finite")
    if weight is not None:
        if weight.shape != y.shape or not bool((torch.isfinite(weight) & (weight >= 0)).all()):
            raise ValueError(f"weight must be finite, non-negative and of shape {tuple(y.shape)}")
        weight = weight.to(X.dtype)
        y = torch.where(weight > 0, y, torch.zeros_like(y))
    if bool(((y < 0) | (y > 1)).any()):
        raise ValueError("labels y must lie in [0, 1]")
    if max_iter < 0 or not tol >= 0:
        raise ValueError(f"max_iter and tol must be non-negative; got {max_iter}, {tol}")
    T, n, d = X.shape
    y = y.to(X.dtype)
    if offset is not None and offset.shape != y.shape:
        raise ValueError(f"offset must have shape {tuple(y.shape)}; got {tuple(offset.shape)}")
    base = torch.zeros_like(y) if offset is None else offset.to(X.dtype)
    lam = _penalties(penalty, T, X)
    if init is None:
        theta = torch.zeros(T, d, dtype=X.dtype, device=X.device)
    else:
        if init.shape != (T, d):
            raise ValueError(f"init must have shape ({T}, {d}); got {tuple(init.shape)}")
        theta = init.to(X.dtype).clone()
    eps = torch.finfo(X.dtype).eps
    eye = torch.eye(d, dtype=X.dtype, device=X.device)
    active = torch.arange(T, device=X.device)
    for _ in range(max_iter):
        Xa, ya, la, th = X[active], y[active], lam[active], theta[active]
        wa = None if weight is None else weight[active]
        oa = base[active]
        margin = matvec(Xa, th) + oa
        residual = torch.sigmoid(margin) - ya
        grad = matvec(Xa.transpose(-1, -2), residual if wa is None else residual * wa) / n + la.unsqueeze(-1) * th
        todo = grad.norm(dim=-1) > tol
        if not bool(todo.all()):
            active, Xa, ya, la, th, margin, grad, oa = (v[todo] for v in (active, Xa, ya, la, th, margin, grad, oa))
            wa = None if wa is None else wa[todo]
        if active.numel() == 0:
            break
        curvature = torch.sigmoid(margin) * torch.sigmoid(-margin)
        if wa is not None:
            curvature = curvature * wa
        H = matmul(Xa.transpose(-1, -2) * curvature.unsqueeze(-2), Xa) / n + la[:, None, None] * eye
        jitter = 1e-12 * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
        step = -spd_solve(H + jitter[:, None, None] * eye, grad)
        value = _losses(margin, ya, wa) + la / 2 * (th * th).sum(-1)
        slope = (grad * step).sum(-1)
        slack = 16 * eps * value.abs()  # accept steps whose change is below rounding (near the minimum)
        t = torch.ones_like(value)
        accepted = torch.zeros_like(value, dtype=torch.bool)
        new = th
        for _ in range(MAX_HALVINGS):
            candidate = th + t.unsqueeze(-1) * step
            trial = _losses(matvec(Xa, candidate) + oa, ya, wa) + la / 2 * (candidate * candidate).sum(-1)
            ok = ~accepted & torch.isfinite(trial) & (trial <= value + ARMIJO * t * slope + slack)
            new = torch.where(ok.unsqueeze(-1), candidate, new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, t / 2)
        theta[active] = new
        active = active[accepted]  # stalled tasks are frozen
    return theta
