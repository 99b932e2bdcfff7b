"""Batched solvers for the linear setting, written on the sufficient statistics of the squared loss.

Notation (as in the paper): a task's predictor is ``beta_t = (B + Delta_t) w_t``. We fold the
perturbation into one d-vector ``v_t = Delta_t w_t`` (the part of the task's predictor that the
shared representation does not explain), so ``beta_t = B w_t + v_t``. With the mean squared
error written on ``G_t = X_t^T X_t / n``, ``c_t = X_t^T y_t / n``, ``q_t = y_t^T y_t / n``::

    loss_t(beta) = beta^T G_t beta - 2 c_t^T beta + q_t

the ADAPTREP source objective is::

    F(B, W, V) = mean_t [ loss_t(B w_t + v_t) + mu ||v_t||_2 ]          (regularised form)
    or           mean_t   loss_t(B w_t + v_t)  s.t. ||v_t||_2 <= r        (constrained form)

and ``mu = inf`` (or ``r = 0``) is FROZENREP, a representation shared exactly by all tasks.
The paper states that its ``lambda/2 ||Delta_t||_F^2 + gamma/2 ||w_t||^2`` regulariser (with the
loss ``1/(2n) ||r||^2``) is equivalent to a penalty ``sqrt(lambda gamma) ||Delta_t w_t||`` (by AM-GM
after rescaling ``Delta_t`` against ``w_t``; exact only if that rescaling could be done per task),
which is ``mu ||v_t||`` above with ``mu = 2 sqrt(lambda gamma)`` for our mean squared error; the smallest perturbation that realises
``v_t`` is ``Delta_t = v_t w_t^T / ||w_t||^2``.

The objective depends on ``B`` only through its span, because the heads ``w_t`` are free, so
``B`` is kept orthonormal. Leading batch dimensions (restarts, folds, strengths) broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: ``prox(z, strength, step)``: proximal map of ``strength``-weighted penalty for a gradient step ``step``.
Prox = Callable[[Tensor, Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# batched linear algebra


def matvec(A: Tensor, x: Tensor) -> Tensor:
    """``A x`` over broadcast leading dimensions.

    Written with ``einsum`` rather than ``@``: ``matmul`` materialises a broadcast copy of ``A``
    (e.g. one copy of every task's Gram matrix per restart), ``einsum`` folds the extra
    dimension into one batched product (about 17x faster for 4 restarts of 1000 tasks here).
    """
    return torch.einsum("...ij,...j->...i", A, x)


def matmul(A: Tensor, B: Tensor) -> Tensor:
    """``A B`` over broadcast leading dimensions, without broadcast copies (see :func:`matvec`)."""
    return torch.einsum("...ij,...jk->...ik", A, B)


def spd_solve(A: Tensor, b: Tensor) -> Tensor:
    """Solve ``A x = b`` for symmetric positive definite ``A`` by Cholesky.

    Also avoids a hang of batched LU solves with several threads in some torch/MKL builds.
    A matrix that is numerically singular falls back to the pseudo-inverse (minimum-norm solution).
    """
    factor, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        return matvec(torch.linalg.pinv(A, hermitian=True), b)
    return torch.cholesky_solve(b.unsqueeze(-1), factor).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# proximal operators


def group_shrink(v: Tensor, threshold: Tensor) -> Tensor:
    """Proximal map of ``threshold * ||v||_2`` (group soft-thresholding); ``inf`` gives 0."""
    norm = v.norm(dim=-1, keepdim=True)
    factor = torch.clamp(1.0 - threshold.unsqueeze(-1) / norm.clamp_min(torch.finfo(v.dtype).tiny), min=0.0)
    return v * factor


def ball_project(v: Tensor, radius: Tensor) -> Tensor:
    """Projection onto ``{||v||_2 <= radius}``."""
    norm = v.norm(dim=-1, keepdim=True)
    return v * torch.clamp(radius.unsqueeze(-1) / norm.clamp_min(torch.finfo(v.dtype).tiny), max=1.0)


def penalty_prox(v: Tensor, strength: Tensor, step: Tensor) -> Tensor:
    """Proximal step for the penalty ``strength * ||v||_2`` (regularised form)."""
    return group_shrink(v, strength * step)


def ball_prox(v: Tensor, strength: Tensor, step: Tensor) -> Tensor:
    """Proximal step for the constraint ``||v||_2 <= strength`` (constrained form): a projection."""
    return ball_project(v, strength)


# ---------------------------------------------------------------------------------------------
# the squared loss and the per-task problem for a fixed representation


def sufficient_statistics(X: Tensor, y: Tensor, counts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``G = X^T X / n``, ``c = X^T y / n``, ``q = y^T y / n`` for ``X (..., n, d)``, ``y (..., n)``.

    ``counts`` (``(...,)``): each problem's own number of samples ``n_t`` for zero-padded (ragged)
    data, whose padded rows add nothing to the sums.
    """
    if counts is None:
        n = X.shape[-2]
        return X.transpose(-1, -2) @ X / n, matvec(X.transpose(-1, -2), y) / n, (y * y).sum(-1) / n
    return X.transpose(-1, -2) @ X / counts[..., None, None], matvec(X.transpose(-1, -2), y) / counts[..., None], (y * y).sum(-1) / counts


def mse(G: Tensor, c: Tensor, q: Tensor, beta: Tensor) -> Tensor:
    """Mean squared error ``beta^T G beta - 2 c^T beta + q`` (batched)."""
    Gb = matvec(G, beta)
    return (beta * Gb).sum(-1) - 2 * (c * beta).sum(-1) + q


def lipschitz(G: Tensor) -> Tensor:
    """``2 lambda_max(G)``, the Lipschitz constant of the gradient of the squared loss."""
    return 2 * torch.linalg.eigvalsh(G)[..., -1].clamp_min(torch.finfo(G.dtype).tiny)


@dataclass
class HeadSolver:
    """Exact minimiser over the head for a fixed representation: ``w = (B^T G B)^+ B^T (c - G v)``."""

    B: Tensor
    G: Tensor
    pinv: Tensor

    @classmethod
    def build(cls, B: Tensor, G: Tensor) -> HeadSolver:
        return cls(B, G, torch.linalg.pinv(matmul(B.transpose(-1, -2), matmul(G, B)), hermitian=True))

    def __call__(self, c: Tensor, v: Tensor | None = None) -> Tensor:
        r = c if v is None else c - matvec(self.G, v)
        return matvec(self.pinv, matvec(self.B.transpose(-1, -2), r))


def predictor(B: Tensor, w: Tensor, v: Tensor | None = None) -> Tensor:
    """``beta = B w + v``."""
    beta = matvec(B, w)
    return beta if v is None else beta + v


def fit_perturbation(heads: HeadSolver, c: Tensor, L: Tensor, v0: Tensor, prox: Prox, strength: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Minimise ``loss(B w + v) + penalty(v)`` over ``(w, v)`` for a fixed ``B`` by FISTA.

    The head is minimised exactly at every step (it enters the loss unpenalised), so this is
    accelerated proximal gradient descent on the convex function ``v -> min_w loss(B w + v)``.
    ``prox`` is :func:`penalty_prox` or :func:`ball_prox`; the step is ``1/L``.
    """
    G = heads.G
    v, z, t = v0, v0, 1.0
    step = 1 / L
    for _ in range(steps):
        w = heads(c, z)
        grad = 2 * (matvec(G, predictor(heads.B, w, z)) - c)
        v_next = prox(z - grad * step.unsqueeze(-1), strength, step)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = v_next + ((t - 1) / t_next) * (v_next - v)
        v, t = v_next, t_next
    return heads(c, v), v


def penalty_value(v: Tensor, strength: Tensor, constrained: bool) -> Tensor:
    """``mu ||v||`` for the regularised form, 0 for the constrained form."""
    if constrained:
        return torch.zeros_like(v[..., 0])
    norm = v.norm(dim=-1)
    return torch.where(norm > 0, strength * norm, torch.zeros_like(norm))


# ---------------------------------------------------------------------------------------------
# source training


@dataclass
class SourceFit:
    """Result of source training: representation, per-task heads and perturbations, diagnostics.

    ``objective`` is the final value of F, ``grad_norm`` the norm of its (minimum-norm sub-)gradient
    at the solution (0 at a stationary point), ``iterations`` the alternating-minimisation steps,
    ``history`` the value of F after each of them (the best restart's; never increasing).
    ``stop_reason`` is ``"gradient"`` (the gradient norm fell below ``gtol``: ``converged``),
    ``"objective"`` (F stopped decreasing to the relative tolerance ``tol`` before that) or
    ``"max_iter"``.
    """

    B: Tensor
    W: Tensor
    V: Tensor
    objective: float
    grad_norm: float
    iterations: int
    converged: bool
    stop_reason: str
    restart_objectives: list[float]
    history: list[float]


def task_objective(B: Tensor, W: Tensor, V: Tensor, G: Tensor, c: Tensor, q: Tensor, penalty: float) -> Tensor:
    """Per-task terms ``loss_t(B w_t + v_t) + mu ||v_t||`` (``B`` broadcast against the task dimension)."""
    reg = penalty_value(V, torch.as_tensor(penalty, dtype=V.dtype, device=V.device), constrained=math.isinf(penalty))
    return mse(G, c, q, predictor(B, W, V)) + reg


def source_objective(B: Tensor, W: Tensor, V: Tensor, G: Tensor, c: Tensor, q: Tensor, penalty: float) -> Tensor:
    """The ADAPTREP source objective ``mean_t [loss_t(B w_t + v_t) + mu ||v_t||]`` (``mu = inf``: FROZENREP, V = 0)."""
    return task_objective(B.unsqueeze(-3), W, V, G, c, q, penalty).mean(-1)


def source_gradient(B: Tensor, W: Tensor, V: Tensor, G: Tensor, c: Tensor, penalty: float) -> tuple[Tensor, Tensor, Tensor]:
    """Analytic gradient of :func:`source_objective` in ``(B, W, V)`` (V's where ``v_t != 0``)."""
    T = W.shape[-2]
    beta = predictor(B.unsqueeze(-3), W, V)
    resid = 2 * (matvec(G, beta) - c) / T  # d F / d beta_t
    gB = resid.transpose(-1, -2) @ W
    gW = matvec(B.transpose(-1, -2).unsqueeze(-3), resid)
    gV = resid.clone()
    if not math.isinf(penalty):
        norm = V.norm(dim=-1, keepdim=True)
        gV = gV + torch.where(norm > 0, penalty / T * V / norm.clamp_min(torch.finfo(V.dtype).tiny), torch.zeros_like(V))
    return gB, gW, gV


def stationarity(B: Tensor, W: Tensor, V: Tensor, G: Tensor, c: Tensor, penalty: float, radius: float | None) -> Tensor:
    """Norm of the minimum-norm element of the (Riemannian in B) subdifferential of F."""
    T = W.shape[-2]
    gB, gW, gv = source_gradient(B, W, V, G, c, math.inf)  # gv: the loss part only
    gB = gB - B @ (B.transpose(-1, -2) @ gB)  # tangent to the span (F depends on span(B) only)
    norm = V.norm(dim=-1, keepdim=True)
    if radius is not None:
        # normal cone of the ball: remove the outward radial component on the boundary
        on_boundary = norm >= radius * (1 - 100 * torch.finfo(V.dtype).eps)
        u = V / norm.clamp_min(torch.finfo(V.dtype).tiny)
        radial = (gv * u).sum(-1, keepdim=True)
        gv = torch.where(on_boundary & (radial < 0), gv - radial * u, gv)
    elif math.isinf(penalty):
        gv = torch.zeros_like(gv)
    else:
        mu = penalty / T
        inside = (gv.norm(dim=-1, keepdim=True) - mu).clamp_min(0) * gv / gv.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)
        gv = torch.where(norm > 0, gv + mu * V / norm.clamp_min(torch.finfo(V.dtype).tiny), inside)
    return (gB.square().sum((-1, -2)) + gW.square().sum((-1, -2)) + gv.square().sum((-1, -2))).sqrt()


def moment_inits(G: Tensor, c: Tensor, rank: int) -> Tensor:
    """Deterministic, rotation-equivariant starting representations ``(4, d, k)``.

    Top-``k`` eigenvectors of ``sum_t a_t a_t^T`` for ``a_t`` = the moment ``c_t`` (an estimate
    of ``Sigma beta_t``) and a ridge estimate of ``beta_t``, each with and without normalising
    ``a_t`` to unit length (the normalised forms keep a few loud tasks from dominating).
    """
    d = G.shape[-1]
    ridge = 1e-2 * torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(d, dtype=G.dtype, device=G.device)
    beta = spd_solve(G + ridge * eye, c)
    inits = []
    for a in (c, beta):
        for normalise in (False, True):
            a_ = a / a.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny) if normalise else a
            _, vecs = torch.linalg.eigh(a_.transpose(-1, -2) @ a_)
            inits.append(vecs[:, -rank:].flip(-1))
    return torch.stack(inits)


def solve_representation(W: Tensor, G: Tensor, rhs: Tensor) -> Tensor:
    """Least squares in ``B`` for fixed heads: solve ``sum_t G_t B w_t w_t^T = sum_t rhs_t w_t^T``.

    ``W`` holds the heads (``(..., T, k)``); ``rhs`` is ``c_t - G_t v_t`` (``(..., T, d)``).
    The ``dk x dk`` normal matrix is built with one matrix product over tasks.
    """
    T, d = G.shape[-3], G.shape[-1]
    k = W.shape[-1]
    WW = (W.unsqueeze(-1) * W.unsqueeze(-2)).reshape(*W.shape[:-2], T, k * k)
    M = torch.einsum("tp,...tq->...pq", G.reshape(T, d * d), WW).reshape(*W.shape[:-2], d, d, k, k)
    M = M.permute(*range(M.ndim - 4), -4, -2, -3, -1).reshape(*W.shape[:-2], d * k, d * k)
    R = rhs.transpose(-1, -2) @ W  # (..., d, k)
    jitter = (
        max(1e-12, 100 * torch.finfo(M.dtype).eps)
        * torch.diagonal(M, dim1=-2, dim2=-1).mean(-1)[..., None, None]
        * torch.eye(d * k, dtype=M.dtype, device=M.device)
    )
    return spd_solve(M + jitter, R.reshape(*W.shape[:-2], d * k)).reshape(*W.shape[:-2], d, k)


def fit_source(
    G: Tensor,
    c: Tensor,
    q: Tensor,
    rank: int,
    penalty: float = math.inf,
    radius: float | None = None,
    inits: Tensor | None = None,
    max_iter: int = 2000,
    inner_steps: int = 10,
    tol: float = 1e-14,
    gtol: float = 1e-6,
    select_after: int = 25,
) -> SourceFit:
    """Fit ADAPTREP (finite ``penalty`` or a ``radius``) or FROZENREP (``penalty = inf``) on source statistics.

    Alternating minimisation, batched over tasks and over restarts:

    1. heads and perturbations for the current ``B``: exact heads, ``inner_steps`` FISTA steps on
       the perturbations (warm-started) — every task at once;
    2. ``B`` by exact least squares given heads and perturbations (one ``dk x dk`` solve), then
       re-orthonormalised by QR with the heads transformed so that the objective is unchanged.

    No step increases F (a task's FISTA update is kept only if it lowers its objective). It stops
    when the norm of the (sub)gradient falls below ``gtol`` (checked every 5 iterations) or the
    relative decrease of F below ``tol``. Restarts start from :func:`moment_inits` (plus any
    ``inits``) and run together for ``select_after`` iterations; then only the one with the lowest
    objective goes on (``restart_objectives`` records their values at that point).
    """
    T, d = c.shape
    starts = moment_inits(G, c, rank)
    if inits is not None:
        starts = torch.cat([starts, inits.to(starts)])
    B = torch.linalg.qr(starts)[0]
    S = B.shape[0]
    frozen = radius is None and math.isinf(penalty)
    V = torch.zeros(S, T, d, dtype=G.dtype, device=G.device)
    L = lipschitz(G)
    if radius is not None:
        prox: Prox = ball_prox
        strength = torch.full((T,), float(radius), dtype=G.dtype, device=G.device)
        weight = math.inf
    else:
        prox = penalty_prox
        strength = torch.full((T,), float(penalty), dtype=G.dtype, device=G.device)
        weight = penalty
    objective = torch.full((S,), math.inf, dtype=G.dtype, device=G.device)
    restart_objectives: list[float] = []
    history: list[float] = []

    def heads_and_perturbations(B: Tensor, V: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Step 1 for every task: exact heads, then warm-started FISTA on the perturbations.

        FISTA is not monotone, so per task the new perturbation is kept only if it is no worse.
        """
        heads = HeadSolver.build(B.unsqueeze(-3), G)
        if frozen:
            return heads(c), V
        W_old = heads(c, V)
        W_new, V_new = fit_perturbation(heads, c, L, V, prox, strength, steps)
        better = task_objective(B.unsqueeze(-3), W_new, V_new, G, c, q, weight) <= task_objective(B.unsqueeze(-3), W_old, V, G, c, q, weight)
        return torch.where(better.unsqueeze(-1), W_new, W_old), torch.where(better.unsqueeze(-1), V_new, V)

    stop_reason, iterations = "max_iter", 0
    gtol = max(gtol, math.sqrt(torch.finfo(G.dtype).eps))  # float32 cannot resolve smaller gradients
    for iterations in range(1, max_iter + 1):  # noqa: B007 - used after the loop
        W, V = heads_and_perturbations(B, V, inner_steps)
        # heads and perturbations are (nearly) optimal for B here, so this measures B's residual
        if iterations % 5 == 0 and stationarity(B, W, V, G, c, weight, radius).max() < gtol:
            stop_reason = "gradient"
            break
        B_new, Rr = torch.linalg.qr(solve_representation(W, G, c - matvec(G, V)))
        W = matvec(Rr.unsqueeze(-3), W)
        B = B_new
        new_objective = source_objective(B, W, V, G, c, q, weight)
        change = (objective - new_objective).abs().max() / new_objective.abs().max().clamp_min(1e-30)
        objective = new_objective
        history.append(float(objective.min()))
        if iterations == select_after and B.shape[0] > 1:
            restart_objectives = [float(o) for o in objective]
            keep = torch.argmin(objective).reshape(1)
            B, W, V, objective = B[keep], W[keep], V[keep], objective[keep]
        if change < tol:
            stop_reason = "objective"
            break
    # final exact heads (and more perturbation steps) for the returned representation
    W, V = heads_and_perturbations(B, V, 10 * inner_steps)
    objective = source_objective(B, W, V, G, c, q, weight)
    best = int(torch.argmin(objective))
    grad = stationarity(B[best], W[best], V[best], G, c, weight, radius)
    return SourceFit(
        B=B[best],
        W=W[best],
        V=V[best],
        objective=float(objective[best]),
        grad_norm=float(grad),
        iterations=len(history),
        converged=float(grad) < gtol,
        stop_reason=stop_reason,
        restart_objectives=restart_objectives or [float(o) for o in objective],
        history=history,
    )


def ols_noise_variance(G: Tensor, c: Tensor, q: Tensor, num_samples: int | Tensor) -> Tensor | None:
    """Per-task unbiased noise variance from least-squares residuals (``n - d`` degrees of freedom;
    ``num_samples`` one ``n`` or per-task counts).

    ``None`` when some task has ``n <= d + 2`` (too few residual degrees of freedom).
    """
    d = c.shape[-1]
    n = torch.as_tensor(num_samples, dtype=c.dtype, device=c.device)
    if bool((n <= d + 2).any()):
        return None
    rss = (mse(G, c, q, spd_solve(G, c)) * n).clamp_min(0)
    return rss / (n - d)


def estimate_noise(G: Tensor, c: Tensor, q: Tensor, num_samples: int | Tensor, rank: int, lost: int = 0) -> tuple[float, int]:
    """Estimate the noise level ``sigma`` from source statistics; returns ``(sigma_hat, dof)``.

    ``num_samples`` is every task's ``n`` or per-task counts ``n_t`` (``(T,)``, ragged tasks);
    ``lost`` degrees of freedom per task were spent before (1 for a profiled-out intercept).
    With ``n_t > d + 2 + lost`` samples in some tasks, the pooled residual variance of those tasks'
    least-squares fits (``sum_t (n_t - d - lost)`` degrees of freedom, unbiased). Otherwise the residual
    of the top-``k`` moment representation with ``n_t - k - lost`` degrees of freedom each, which also
    counts the unexplained task signal and so errs on the large side; it is returned with ``dof = 0``
    so that users of the estimate (target fine-tuning) prefer any unbiased estimate they have.
    """
    T, d = c.shape
    n = torch.as_tensor(num_samples, dtype=c.dtype, device=c.device).expand(T)
    usable = n > d + 2 + lost
    if bool(usable.any()):
        rss = (mse(G[usable], c[usable], q[usable], spd_solve(G[usable], c[usable])) * n[usable]).clamp_min(0)
        dof = (n[usable] - d - lost).sum()
        return float((rss.sum() / dof).sqrt()), int(dof)
    B = moment_inits(G, c, rank)[0]
    rss = (mse(G, c, q, predictor(B, HeadSolver.build(B, G)(c))) * n).clamp_min(0)
    return float(math.sqrt(rss.sum() / (n - rank - lost).clamp_min(1).sum())), 0
