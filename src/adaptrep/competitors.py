"""Linear-representation competitors of ADAPTREP: penalised ERM, the spectral method, method of moments.

Written from the papers' descriptions for the squared loss with linear tasks, batched over tasks.
Every method learns an orthonormal ``representation`` (``d x k``) and per-source-task predictors
``source_predictors`` (``(T, d)``), and has its own target step.

* :class:`PenalizedERM` (``perm``): Tian, Gu & Feng, *Learning from Similar Linear Representations:
  Adaptivity, Minimaxity, and Robustness* (JMLR 2025, arXiv 2303.17765), their Algorithm 1.
  Step 1 fits per-task representations ``A_t`` (orthonormal ``d x k``), heads ``theta_t`` and a
  shared ``A_bar``::

      min  sum_t (n_t / N) f_t(A_t theta_t) + (lam sqrt(n_t) / N) ||A_t A_t^T - A_bar A_bar^T||_2

  with ``f_t`` the task's mean squared error and ``N = sum_t n_t``; step 2 refits every task::

      beta_t = argmin_beta f_t(beta) + (gamma / sqrt(n_t)) ||beta - A_t theta_t||_2.

  **How step 1 is solved.** ``A_t theta_t`` can be any vector ``beta_t`` (``theta_t`` is free), and
  the smallest spectral distance ``||A_t A_t^T - P_bar||_2`` over the ``k``-dimensional spans that
  contain ``beta_t`` is ``sin`` of the angle between ``beta_t`` and ``span(A_bar)``,
  ``s(beta_t) = ||(I - P_bar) beta_t|| / ||beta_t||`` (the largest principal angle is at least the
  angle of any of its vectors to the other span, and turning the one direction of ``A_bar`` nearest
  ``beta_t`` onto ``beta_t`` attains it; ``0`` for ``beta_t = 0``). So step 1 is exactly::

      min_{A_bar, beta}  sum_t (n_t / N) [ f_t(beta_t) + (lam / sqrt(n_t)) s(beta_t) ],

  ADAPTREP's source objective with the perturbation penalty ``||(I - P) beta_t||`` divided by
  ``||beta_t||`` (scale-free). We minimise it by alternating (a) for fixed ``A_bar``, proximal
  gradient steps on every ``beta_t`` (the numerator's group penalty by its proximal map, with the
  current ``1 / ||beta_t||`` as its weight, and the derivative of ``1 / ||beta_t||`` in the smooth
  part, so fixed points are stationary points of the exact objective), and (b) for fixed ``beta``,
  one majorise-minimise step in ``A_bar`` (``||r|| <= (||r||^2 / r0 + r0) / 2``: the top-``k``
  eigenvectors of ``sum_t sqrt(n_t) u_t u_t^T / ||(I - P_bar) u_t||`` for ``u_t = beta_t / ||beta_t||``,
  which never increases the objective), from the FROZENREP (ERM) solution. ``lam = inf`` is ERM
  exactly (``A_t = A_bar``), ``lam = 0`` per-task least squares.

  **Constants.** ``lam = C1 sigma_hat sqrt(k (d + log T))`` and ``gamma = C2 sigma_hat sqrt(d + log T)``,
  the paper's rates with the noise level ``sigma_hat`` estimated on the source tasks (the paper's
  constants absorb ``sigma``; with it the method is equivariant to rescaling ``y``). Defaults
  ``C1 = 2``, ``C2 = 1``. Why: the gradient of our mean squared error at the truth is
  ``2 X^T xi / n``, of norm about ``2 sigma sqrt(d / n)`` (``sqrt(d + log T)`` covers the maximum
  over ``T`` tasks). Turning ``beta_t`` by an angle ``a`` changes the loss by about
  ``a ||beta_t|| 2 sigma sqrt(d / n)`` against the penalty's ``a lam / sqrt(n)``, so ``C1 = 2`` puts
  step 1's threshold at that noise level for the typical ``||beta_t|| ~ sqrt(k)``: tasks whose data
  are consistent with the shared span stay in it (pERM equals ERM when the tasks share it exactly).
  Step 2 is the escape for tasks that are far from the span; ``C2 = 1`` puts its threshold at half
  the noise level. Measured on ``linear`` (``d = 30, k = 5, T = 50, n = 100, sigma = 1``, 3 seeds, max
  source-task error; ERM 0.436 at ``delta = 0``): ``(C1, C2) = (2, 1)`` gave 0.476 / 0.560 / 0.678 / 0.791
  at ``delta = 0 / 0.3 / 0.6 / 1``; ``(2, 2)`` 0.436 / 0.553 / 0.755 / 0.961 (the refit rarely leaves step
  1); ``(1, 1)`` 0.547 / 0.599 / 0.689 / 0.767; ``(0.5, 1)`` 0.685 / 0.708 / 0.752 / 0.802. ``(2, 1)`` is the
  pair within 10% of ERM at ``delta = 0`` that is best at large ``delta``: the paper's adaptivity claim.
  (In the halved loss ``1/(2n) ||y - X beta||^2`` of the statistics literature these are ``C1 = 1``,
  ``C2 = 1/2``.)

  **Target step.** As their transfer step: step 1 for the target with ``A_bar`` fixed (the
  ``beta``-update above from the head-only fit), then step 2, both with the target's ``m``.

* :class:`Spectral` (``spectral``): their Algorithm 2 as we implement it: per-task least squares
  ``beta_tilde_t`` (minimum-norm when ``n_t <= d``); ``A_bar`` = the top-``k`` eigenvectors of
  ``sum_t (n_t / N) beta_tilde_t beta_tilde_t^T`` (left singular vectors of the weighted matrix of
  estimates); step 1's estimate is the head-only fit on ``A_bar``, then pERM's step 2. Target:
  head-only least squares on ``A_bar``.

* :class:`MethodOfMoments` (``mom``): Tripuraneni, Jin & Jordan, *Provable Meta-Learning of Linear
  Representations* (ICML 2021): the top-``k`` eigenvectors of
  ``M = (1/T) sum_t (1/n_t) sum_i y_ti^2 x_ti x_ti^T``; for ``x ~ N(0, I)``,
  ``E M = mean_t [(||beta_t||^2 + sigma^2) I + 2 beta_t beta_t^T]``, whose top-``k`` eigenspace is
  the span of the ``beta_t``. Source predictors and target: head-only least squares on it.

FROZENREP (:class:`adaptrep.methods.FrozenRep`) is the ERM of Du et al. and Tripuraneni et al.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .adapted import Adapted
from .adaptive import masked_statistics, sample_mask
from .data import Tasks
from .finetune import fit_head
from .methods import Method, _centered, _uncentered, synchronize
from .solvers import estimate_noise, fit_source, group_shrink, lipschitz, matvec, mse, predictor, pseudo_inverse

__all__ = [
    "PenalizedERM",
    "Spectral",
    "MethodOfMoments",
    "COMPETITORS",
    "least_squares",
    "top_eigenvectors",
    "angle_penalty",
    "perm_tasks",
    "perm_representation",
    "refit_toward",
    "moment_matrix",
]


# ---------------------------------------------------------------------------------------------
# building blocks (batched over tasks)


def _statistics(tasks: Tasks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(G, c, q)`` with every task divided by its own sample count, and the counts ``(T,)``."""
    valid = sample_mask(tasks.X, getattr(tasks, "mask", None))
    G, c, q = masked_statistics(tasks.X, tasks.y, valid)
    return G, c, q, valid.sum(-1)


def _centred(tasks: Tasks, intercept: bool) -> tuple[Tasks, Tensor | None, Tensor | None]:
    """The tasks centred by their own means when there is a per-task intercept (profiled out
    exactly for the squared loss), with the means."""
    if not intercept:
        return tasks, None, None
    X, y, mx, my = _centered(tasks, intercept)
    return replace(tasks, X=X, y=y), mx, my


def _check(name: str, method: Method, tasks: Tasks) -> int:
    """The rank to learn (:meth:`Method._rank`); a one-line error for tasks these linear
    least-squares methods cannot fit."""
    if tasks.loss != "squared" or method.spec.kind != "linear":
        raise ValueError(f"{name} is implemented for the linear model with the squared loss; got the {method.spec.kind} model with the {tasks.loss} loss")
    return method._rank(tasks)


def least_squares(G: Tensor, c: Tensor) -> Tensor:
    """Per-task least squares ``G_t^+ c_t`` (minimum-norm when ``G_t`` is singular), ``(..., d)``."""
    return matvec(pseudo_inverse(G), c)


def top_eigenvectors(M: Tensor, k: int) -> Tensor:
    """Orthonormal eigenvectors of the ``k`` largest eigenvalues of the symmetric ``M`` (``(d, k)``)."""
    return torch.linalg.eigh((M + M.transpose(-1, -2)) / 2)[1][..., -k:].flip(-1)


def angle_penalty(beta: Tensor, A: Tensor) -> Tensor:
    """``sin`` of the angle between every ``beta_t`` and ``span(A)``: ``||(I - A A^T) beta|| / ||beta||`` (0 at 0).

    Equals ``min ||A_t A_t^T - A A^T||_2`` over the ``k``-dimensional spans ``A_t`` that contain ``beta_t``.
    """
    resid = beta - matvec(A, matvec(A.transpose(-1, -2), beta))
    norm = beta.norm(dim=-1)
    return torch.where(norm > 0, resid.norm(dim=-1) / norm.clamp_min(torch.finfo(beta.dtype).tiny), torch.zeros_like(norm))


def perm_objective(beta: Tensor, A: Tensor, G: Tensor, c: Tensor, q: Tensor, tau: Tensor) -> Tensor:
    """Per-task step-1 objective ``f_t(beta_t) + tau_t s(beta_t)`` with ``tau_t = lam / sqrt(n_t)``."""
    return mse(G, c, q, beta) + tau * angle_penalty(beta, A)


def perm_tasks(A: Tensor, G: Tensor, c: Tensor, q: Tensor, tau: Tensor, beta: Tensor, steps: int) -> Tensor:
    """Step 1 in ``beta`` for a fixed ``A_bar``: ``steps`` proximal-gradient steps from ``beta`` on every
    task's ``f_t(beta) + tau_t ||(I - P) beta|| / ||beta||``; each task keeps its best iterate.

    The numerator is handled by its proximal map (group soft-thresholding of the part outside the
    span) with the current ``tau_t / ||beta_t||`` as weight; the derivative of ``1 / ||beta||`` (at the
    current numerator) joins the gradient, so a fixed point is a stationary point of the exact objective.
    """
    tiny = torch.finfo(G.dtype).tiny
    step = 1 / lipschitz(G).unsqueeze(-1)
    best, best_value = beta, perm_objective(beta, A, G, c, q, tau)
    for _ in range(steps):
        norm = beta.norm(dim=-1, keepdim=True).clamp_min(tiny)
        inside = matvec(A, matvec(A.transpose(-1, -2), beta))
        outside = (beta - inside).norm(dim=-1, keepdim=True)
        grad = 2 * (matvec(G, beta) - c) - tau.unsqueeze(-1) * outside * beta / norm**3
        z = beta - step * grad
        z_in = matvec(A, matvec(A.transpose(-1, -2), z))
        beta = z_in + group_shrink(z - z_in, tau * step.squeeze(-1) / norm.squeeze(-1))
        value = perm_objective(beta, A, G, c, q, tau)
        better = value < best_value
        best = torch.where(better.unsqueeze(-1), beta, best)
        best_value = torch.where(better, value, best_value)
    return best


def perm_representation(beta: Tensor, A: Tensor, weights: Tensor, floor: float = 1e-10) -> Tensor:
    """Step 1 in ``A_bar`` for fixed ``beta``: one majorise-minimise step on ``sum_t weights_t s(beta_t)``,
    the top-``k`` eigenvectors of ``sum_t (weights_t / s_t) u_t u_t^T`` (``u_t = beta_t / ||beta_t||``)."""
    norm = beta.norm(dim=-1, keepdim=True)
    u = torch.where(norm > 0, beta / norm.clamp_min(torch.finfo(beta.dtype).tiny), torch.zeros_like(beta))
    s = angle_penalty(u, A).clamp_min(floor)
    M = (u * (weights / s).unsqueeze(-1)).transpose(-1, -2) @ u
    return top_eigenvectors(M, A.shape[-1])


def refit_toward(G: Tensor, c: Tensor, anchor: Tensor, tau: Tensor, steps: int = 300) -> Tensor:
    """Step 2: ``argmin_beta f_t(beta) + tau_t ||beta - anchor_t||`` for every task (FISTA, convex).

    ``tau = inf`` keeps the anchor; ``tau = 0`` gives least squares.
    """
    step = 1 / lipschitz(G).unsqueeze(-1)
    threshold = tau * step.squeeze(-1)
    u = torch.zeros_like(anchor)
    z, t = u, 1.0
    for _ in range(steps):
        grad = 2 * (matvec(G, anchor + z) - c)
        u_next = group_shrink(z - step * grad, threshold)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = u_next + ((t - 1) / t_next) * (u_next - u)
        u, t = u_next, t_next
    return anchor + u


def moment_matrix(X: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """``M = (1/T) sum_t (1/n_t) sum_i y_ti^2 x_ti x_ti^T`` (``(d, d)``) over the real samples."""
    valid = sample_mask(X, mask)
    weight = valid * y * y / valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.einsum("tn,tni,tnj->ij", weight, X, X) / X.shape[0]


def _noise(G: Tensor, c: Tensor, q: Tensor, counts: Tensor, rank: int) -> float:
    return estimate_noise(G, c, q, int(counts.min()), rank)[0]


# ---------------------------------------------------------------------------------------------
# the methods


def _head_only(method: Method, target: Tasks) -> Adapted:
    """Head-only least squares on the learned representation (the target step of the spectral
    method and the method of moments)."""
    if method.representation is None:
        raise RuntimeError(f"{type(method).__name__}.adapt called before fit")
    target, mx, my = _centred(target, method.spec.intercept)
    G, c, _, _ = _statistics(target)
    return _uncentered(fit_head(method.representation.to(target.X), G, c), mx, my)


@dataclass
class PenalizedERM(Method):
    """Tian, Gu & Feng's penalised ERM (pERM, their Algorithm 1); see the module docstring.

    ``lam`` and ``gamma`` override the defaults ``C1 sigma_hat sqrt(k (d + log T))`` and
    ``C2 sigma_hat sqrt(d + log T)`` (``inf`` allowed: ERM for ``lam``, no refit for ``gamma``).
    ``iterations`` alternations of ``steps`` proximal-gradient steps in ``beta`` and one step in
    ``A_bar`` (stopping early when the objective's relative change falls below ``tol``).
    """

    rank: int | None = None
    C1: float = 2.0
    C2: float = 1.0
    lam: float | None = None
    gamma: float | None = None
    iterations: int = 200
    steps: int = 20
    tol: float = 1e-10
    info: dict[str, Any] = field(default_factory=dict)

    def constants(self, sigma: float, dim: int, rank: int, num_tasks: int) -> tuple[float, float]:
        """``(lam, gamma)``: the given values or the defaults."""
        lam = self.lam if self.lam is not None else self.C1 * sigma * math.sqrt(rank * (dim + math.log(num_tasks)))
        gamma = self.gamma if self.gamma is not None else self.C2 * sigma * math.sqrt(dim + math.log(num_tasks))
        if not (lam >= 0 and gamma >= 0):
            raise ValueError(f"perm needs non-negative lam and gamma; got {lam}, {gamma}")
        return lam, gamma

    def _statistics(self, name: str, source: Tasks) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
        """What pERM and the spectral method start from: the rank, the centred source tasks' sufficient
        statistics ``(G, c, q, counts)``; sets the noise estimate and ``(lam_, gamma_)``."""
        rank = _check(name, self, source)
        source = _centred(source, self.spec.intercept)[0]
        G, c, q, counts = _statistics(source)
        self.noise_estimate = _noise(G, c, q, counts, rank)
        self.lam_, self.gamma_ = self.constants(self.noise_estimate, source.dim, rank, source.num_tasks)
        return rank, G, c, q, counts

    def _fit(self, source: Tasks) -> None:
        start = time.perf_counter()
        rank, G, c, q, counts = self._statistics("perm", source)
        erm = fit_source(G, c, q, rank, penalty=math.inf)
        A, beta = erm.B, predictor(erm.B, erm.W)
        tau = self.lam_ / counts.sqrt()
        history: list[float] = []
        if not math.isinf(self.lam_):
            weights = counts / counts.sum()
            previous = math.inf
            for _ in range(self.iterations):
                beta = perm_tasks(A, G, c, q, tau, beta, self.steps)
                A = perm_representation(beta, A, weights * tau)
                value = float((weights * perm_objective(beta, A, G, c, q, tau)).sum())
                history.append(value)
                if abs(previous - value) <= self.tol * max(abs(value), 1e-30):
                    break
                previous = value
        self.representation, self.step1 = A, beta
        self.source_predictors = refit_toward(G, c, beta, self.gamma_ / counts.sqrt())
        synchronize(A.device)
        self.info = {
            "source_time": time.perf_counter() - start,
            "source_objective": history[-1] if history else erm.objective,
            "source_iterations": len(history),
            "source_objective_history": history,
            "lam": self.lam_,
            "gamma": self.gamma_,
            "noise_estimate": self.noise_estimate,
        }

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        if self.representation is None:
            raise RuntimeError("PenalizedERM.adapt called before fit")
        A = self.representation.to(target.X)
        target, mx, my = _centred(target, self.spec.intercept)
        G, c, q, counts = _statistics(target)
        beta = fit_head(A, G, c)
        if not math.isinf(self.lam_):
            beta = perm_tasks(A, G, c, q, self.lam_ / counts.sqrt(), beta, self.steps * self.iterations // 10)
        return _uncentered(refit_toward(G, c, beta, self.gamma_ / counts.sqrt()), mx, my)


@dataclass
class Spectral(PenalizedERM):
    """Tian, Gu & Feng's spectral method (their Algorithm 2, as in the module docstring): the span of
    the per-task least-squares estimates, head-only fits on it refitted by pERM's step 2; head-only
    least squares on the target."""

    def _fit(self, source: Tasks) -> None:
        start = time.perf_counter()
        rank, G, c, _, counts = self._statistics("spectral", source)
        estimates = least_squares(G, c)
        weights = counts / counts.sum()
        A = top_eigenvectors((estimates * weights.unsqueeze(-1)).transpose(-1, -2) @ estimates, rank)
        self.representation, self.step1 = A, fit_head(A, G, c)
        self.source_predictors = refit_toward(G, c, self.step1, self.gamma_ / counts.sqrt())
        synchronize(A.device)
        self.info = {"source_time": time.perf_counter() - start, "gamma": self.gamma_, "noise_estimate": self.noise_estimate}

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        return _head_only(self, target)


@dataclass
class MethodOfMoments(Method):
    """Tripuraneni, Jin & Jordan's method of moments: the top-``k`` eigenvectors of
    ``(1/T) sum_t (1/n_t) sum_i y_ti^2 x_ti x_ti^T``; head-only least squares on source and target tasks."""

    rank: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def _fit(self, source: Tasks) -> None:
        rank = _check("mom", self, source)
        start = time.perf_counter()
        source = _centred(source, self.spec.intercept)[0]
        A = top_eigenvectors(moment_matrix(source.X, source.y, getattr(source, "mask", None)), rank)
        G, c, _, _ = _statistics(source)
        self.representation = A
        self.source_predictors = fit_head(A, G, c)
        synchronize(A.device)
        self.info = {"source_time": time.perf_counter() - start}

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        return _head_only(self, target)


#: The competitors by CLI name.
COMPETITORS: dict[str, type[Method]] = {"perm": PenalizedERM, "spectral": Spectral, "mom": MethodOfMoments}
