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
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

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
        return matvec(pseudo_inverse(A), b)
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
# the per-task Gram operators: dense sufficient statistics, or the samples themselves


class Gram(ABC):
    """The per-task Gram matrices ``G_t = X_t^T X_t / n_t`` as an operator.

    Every product with ``G_t`` factors as ``G_t v = expand(half(v))``: :class:`DenseGram` keeps
    the ``d x d`` matrices (``half = G_t v``, ``expand`` the identity), :class:`SampleGram` the
    samples (``half = X_t v`` of length ``n``, ``expand = X_t^T h / n_t``), so that a product costs
    ``O(d^2)`` or ``O(n d)`` per task, whichever representation is smaller. The task dimension is
    the one before the last of vectors (``(..., T, d)``); leading dimensions (restarts) broadcast.
    A basis ``B`` (``(..., d, k)``, or ``(..., 1, d, k)`` / ``(..., T, d, k)`` with the task
    dimension explicit) enters through ``LB = times(B)`` (``G_t B`` or ``X_t B``), from which
    ``B^T G_t B``, ``G_t B w_t`` and ``B^T G_t v`` follow without another pass over the data.
    """

    #: per-task sample counts ``n_t`` (``(T,)``, in the data's dtype), or ``None`` when unknown
    counts: Tensor | None

    @property
    @abstractmethod
    def stored(self) -> Tensor:
        """The stored tensor (Gram matrices or samples): its last dimension is ``d``; it sets the dtype and device."""

    @property
    def dim(self) -> int:
        return int(self.stored.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.stored.dtype

    @property
    def device(self) -> torch.device:
        return self.stored.device

    @abstractmethod
    def half(self, v: Tensor) -> Tensor:
        """The first factor of ``G_t v``."""

    @abstractmethod
    def expand(self, h: Tensor) -> Tensor:
        """The second factor: ``G_t v = expand(half(v))``."""

    def matvec(self, v: Tensor) -> Tensor:
        """``G_t v_t`` for ``v`` of shape ``(..., T, d)``."""
        return self.expand(self.half(v))

    @abstractmethod
    def quad(self, v: Tensor) -> Tensor:
        """``v_t^T G_t v_t`` (``(..., T)``)."""

    @abstractmethod
    def times(self, B: Tensor) -> Tensor:
        """``LB``: the product of the first factor with a basis ``B``."""

    @abstractmethod
    def basis_gram(self, B: Tensor, LB: Tensor) -> Tensor:
        """``B^T G_t B`` (``(..., T, k, k)``)."""

    @abstractmethod
    def lift(self, LB: Tensor, w: Tensor) -> Tensor:
        """``half(B w_t)`` from ``LB``."""

    @abstractmethod
    def reduce(self, B: Tensor, LB: Tensor, h: Tensor) -> Tensor:
        """``B^T G_t v_t`` from ``h = half(v)``."""

    @abstractmethod
    def trace(self) -> Tensor:
        """``tr G_t`` (``(T,)``)."""

    @abstractmethod
    def lambda_max(self) -> Tensor:
        """Largest eigenvalue of each ``G_t``."""

    @abstractmethod
    def ridge_solve(self, ridge: Tensor, c: Tensor) -> Tensor:
        """``(G_t + ridge_t I)^{-1} c_t`` (``ridge`` of shape ``(T,)``, positive)."""

    @abstractmethod
    def mean_gram(self) -> Tensor:
        """An estimate of the average ``mean_t G_t`` (``d x d``), for preconditioning."""

    @abstractmethod
    def pool(self, U: Tensor) -> Tensor:
        """``sum_t n_t expand(U_t)`` for columns ``U`` ``(T, ., k)`` in the space of :meth:`times`: ``(d, k)``.

        With ``U_t = times(P)_t M_t`` this is ``sum_t X_t^T X_t P M_t``, one pass over the data."""

    @abstractmethod
    def normal_matrix(self, WW: Tensor) -> Tensor:
        """``sum_t G_t (x) WW_t`` as ``(..., d, d, k*k)`` for ``WW = w_t w_t^T`` flattened (``(..., T, k*k)``)."""

    # perturbation coordinates: fit_source keeps each v_t as coordinates a_t, v_t = coord_vector(a_t)

    @abstractmethod
    def coord_dim(self) -> int:
        """Length of a perturbation's coordinates."""

    @abstractmethod
    def coord_half(self, a: Tensor) -> Tensor:
        """``half(v)`` for the perturbation with coordinates ``a``."""

    @abstractmethod
    def coord_sqnorm(self, a: Tensor) -> Tensor:
        """``||v||^2`` for the perturbation with coordinates ``a``."""

    @abstractmethod
    def coord_vector(self, a: Tensor) -> Tensor:
        """The perturbation ``v`` (``(..., T, d)``) with coordinates ``a``."""

    @abstractmethod
    def target(self, c: Tensor) -> Tensor:
        """``b`` with ``expand(b) = c``: the gradient of the loss in ``v`` is ``2 expand(half(beta) - b)``."""

    @abstractmethod
    def coord_loss(self, B: Tensor, LB: Tensor, w: Tensor, a: Tensor, c: Tensor, q: Tensor) -> Tensor:
        """``loss_t(B w_t + v_t)`` for the perturbation with coordinates ``a``."""


def _shared_basis(B: Tensor) -> bool:
    return B.ndim >= 3 and B.shape[-3] == 1


@dataclass(eq=False)
class DenseGram(Gram):
    """The Gram matrices themselves, ``G`` of shape ``(..., d, d)`` (any leading dimensions)."""

    G: Tensor
    counts: Tensor | None = None

    @property
    def stored(self) -> Tensor:
        return self.G

    def half(self, v: Tensor) -> Tensor:
        return matvec(self.G, v)

    def expand(self, h: Tensor) -> Tensor:
        return h

    def quad(self, v: Tensor) -> Tensor:
        return (v * matvec(self.G, v)).sum(-1)

    def times(self, B: Tensor) -> Tensor:
        return matmul(self.G, B)

    def basis_gram(self, B: Tensor, LB: Tensor) -> Tensor:
        return matmul(B.transpose(-1, -2), LB)

    def lift(self, LB: Tensor, w: Tensor) -> Tensor:
        return matvec(LB, w)

    def reduce(self, B: Tensor, LB: Tensor, h: Tensor) -> Tensor:
        return matvec(B.transpose(-1, -2), h)

    def trace(self) -> Tensor:
        return torch.diagonal(self.G, dim1=-2, dim2=-1).sum(-1)

    def lambda_max(self) -> Tensor:
        return torch.linalg.eigvalsh(self.G)[..., -1]

    def ridge_solve(self, ridge: Tensor, c: Tensor) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return spd_solve(self.G + ridge[..., None, None] * eye, c)

    def mean_gram(self) -> Tensor:
        return self.G.reshape(-1, self.dim, self.dim).mean(0)

    def pool(self, U: Tensor) -> Tensor:
        if self.counts is None:
            raise ValueError("pool needs the tasks' sample counts")
        return torch.einsum("tdk,t->dk", U, self.counts)

    def normal_matrix(self, WW: Tensor) -> Tensor:
        T, d = self.G.shape[-3], self.dim
        return torch.einsum("tp,...tq->...pq", self.G.reshape(T, d * d), WW).reshape(*WW.shape[:-2], d, d, WW.shape[-1])

    # the coordinates of a perturbation are the perturbation itself

    def coord_dim(self) -> int:
        return self.dim

    def coord_half(self, a: Tensor) -> Tensor:
        return self.half(a)

    def coord_sqnorm(self, a: Tensor) -> Tensor:
        return a.square().sum(-1)

    def coord_vector(self, a: Tensor) -> Tensor:
        return a

    def target(self, c: Tensor) -> Tensor:
        return c

    def coord_loss(self, B: Tensor, LB: Tensor, w: Tensor, a: Tensor, c: Tensor, q: Tensor) -> Tensor:
        beta = predictor(B, w, a)
        return self.quad(beta) - 2 * (c * beta).sum(-1) + q


@dataclass(eq=False)
class SampleGram(Gram):
    """The samples: ``X`` ``(T, n, d)`` and ``y`` ``(T, n)``, zero-padded rows past each task's count ``n_t``.

    ``G_t = X_t^T X_t / n_t``; padded (zero) rows add nothing to ``X_t^T X_t`` or ``X_t v``.
    Costs ``O(n d)`` memory and time per task and product instead of ``O(d^2)``.

    Perturbations are kept as coordinates ``a_t`` in R^n with ``v_t = X_t^T a_t / n_t``: the
    optimal ``v_t`` lies in the row space of ``X_t`` (a component outside it changes no loss and
    only adds to ``||v_t||``), and so does every proximal-gradient iterate from ``v = 0``, so the
    perturbation steps cost ``O(n^2)`` per task through ``K_t = X_t X_t^T`` instead of ``O(n d)``.
    """

    X: Tensor
    counts: Tensor  # type: ignore[assignment]  # never None here
    y: Tensor
    _trace: Tensor | None = field(default=None, init=False, repr=False)
    _mean: Tensor | None = field(default=None, init=False, repr=False)
    _kernel: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def stored(self) -> Tensor:
        return self.X

    def half(self, v: Tensor) -> Tensor:
        return torch.einsum("tnd,...td->...tn", self.X, v)

    def expand(self, h: Tensor) -> Tensor:
        return torch.einsum("tnd,...tn->...td", self.X, h) / self.counts[:, None]

    def quad(self, v: Tensor) -> Tensor:
        return self.half(v).square().sum(-1) / self.counts

    def times(self, B: Tensor) -> Tensor:
        if _shared_basis(B):
            B = B.squeeze(-3)
        elif B.ndim >= 3:  # one basis per task
            return torch.einsum("tnd,...tdk->...tnk", self.X, B)
        return torch.einsum("tnd,...dk->...tnk", self.X, B)

    def basis_gram(self, B: Tensor, LB: Tensor) -> Tensor:
        return torch.einsum("...tnk,...tnl->...tkl", LB, LB) / self.counts[:, None, None]

    def lift(self, LB: Tensor, w: Tensor) -> Tensor:
        return torch.einsum("...tnk,...tk->...tn", LB, w)

    def reduce(self, B: Tensor, LB: Tensor, h: Tensor) -> Tensor:
        return torch.einsum("...tnk,...tn->...tk", LB, h) / self.counts[:, None]

    def trace(self) -> Tensor:
        if self._trace is None:
            self._trace = self.X.square().sum((-1, -2)) / self.counts
        return self._trace

    def lambda_max(self) -> Tensor:
        n, d = self.X.shape[-2:]
        small = self.kernel() if n <= d else self.X.transpose(-1, -2) @ self.X
        return torch.linalg.eigvalsh(small)[..., -1] / self.counts

    def ridge_solve(self, ridge: Tensor, c: Tensor) -> Tensor:
        # Woodbury: (X^T X / n + r I)^{-1} = (I - X^T (n r I + X X^T)^{-1} X) / r, an n x n solve per task
        n = self.X.shape[-2]
        K = self.kernel() + (self.counts * ridge)[:, None, None] * torch.eye(n, dtype=self.dtype, device=self.device)
        return (c - self.expand(spd_solve(K, self.half(c)) * self.counts[:, None])) / ridge[:, None]

    def mean_gram(self) -> Tensor:
        """The average Gram matrix of an evenly spaced subset of tasks with about ``16 d`` samples in all."""
        if self._mean is None:
            T, n, d = self.X.shape
            m = min(T, max(1, math.ceil(16 * d / max(float(self.counts.mean()), 1.0))))
            index = torch.linspace(0, T - 1, m, device=self.device).round().long()
            Xs = (self.X[index] / self.counts[index, None, None].sqrt()).reshape(-1, d)
            self._mean = Xs.transpose(0, 1) @ Xs / m
        return self._mean

    def pool(self, U: Tensor) -> Tensor:
        return torch.tensordot(self.X, U, dims=([0, 1], [0, 1]))  # one (d x Tn) (Tn x k) product; einsum batches over t, 6x slower

    def kernel(self) -> Tensor:
        """``K_t = X_t X_t^T`` (``(T, n, n)``)."""
        if self._kernel is None:
            self._kernel = self.X @ self.X.transpose(-1, -2)
        return self._kernel

    def coord_dim(self) -> int:
        return int(self.X.shape[-2])

    def coord_half(self, a: Tensor) -> Tensor:
        return matvec(self.kernel(), a) / self.counts[:, None]

    def coord_sqnorm(self, a: Tensor) -> Tensor:
        return (a * matvec(self.kernel(), a)).sum(-1) / self.counts.square()

    def coord_vector(self, a: Tensor) -> Tensor:
        return self.expand(a)

    def target(self, c: Tensor) -> Tensor:
        return self.y

    def coord_loss(self, B: Tensor, LB: Tensor, w: Tensor, a: Tensor, c: Tensor, q: Tensor) -> Tensor:
        return (self.lift(LB, w) + self.coord_half(a) - self.y).square().sum(-1) / self.counts

    def normal_matrix(self, WW: Tensor) -> Tensor:
        T, _, d = self.X.shape
        chunk = max(1, 2**23 // (d * d))
        M = torch.zeros(*WW.shape[:-2], d * d, WW.shape[-1], dtype=self.dtype, device=self.device)
        for start in range(0, T, chunk):  # chunks of tasks: G_t for a chunk at a time
            Xc = self.X[start : start + chunk]
            Gc = (Xc.transpose(-1, -2) @ Xc / self.counts[start : start + chunk, None, None]).reshape(-1, d * d)
            M += torch.einsum("tp,...tq->...pq", Gc, WW[..., start : start + chunk, :])
        return M.reshape(*WW.shape[:-2], d, d, WW.shape[-1])


def as_gram(G: Tensor | Gram) -> Gram:
    """``G`` as a :class:`Gram` operator (a tensor of Gram matrices becomes a :class:`DenseGram`)."""
    return G if isinstance(G, Gram) else DenseGram(G)


class TaskStatistics(NamedTuple):
    """What the squared loss needs of the source tasks: ``(gram, c, q)``; unpacks like ``(G, c, q)``."""

    gram: Gram
    c: Tensor
    q: Tensor


def task_statistics(X: Tensor, y: Tensor, counts: Tensor | None = None, representation: Literal["auto", "gram", "samples"] = "auto") -> TaskStatistics:
    """Per-task statistics of the squared loss for ``X (T, n, d)``, ``y (T, n)``, chosen by shape.

    ``counts`` (``(T,)``) are the tasks' sample sizes ``n_t`` when they differ (ragged tasks):
    the rows of ``X`` and ``y`` past ``n_t`` must be zero, and every average is over ``n_t``.
    ``representation="auto"`` keeps the ``d x d`` Gram matrices (:class:`DenseGram`) when
    ``n >= d`` and the samples (:class:`SampleGram`) when ``n < d``, whichever is smaller.
    ``c = X^T y / n_t``, ``q = y^T y / n_t``.
    """
    if X.ndim != 3 or y.shape != X.shape[:2]:
        raise ValueError(f"task_statistics needs X of shape (T, n, d) and y of shape (T, n); got {tuple(X.shape)} and {tuple(y.shape)}")
    T, n, d = X.shape
    if counts is None:
        n_t = torch.full((T,), float(n), dtype=X.dtype, device=X.device)
    else:
        if counts.shape != (T,) or bool((counts < 1).any()) or bool((counts > n).any()) or bool((counts != counts.round()).any()):
            raise ValueError(f"counts must be {T} integers between 1 and {n} (one per task); got shape {tuple(counts.shape)}")
        n_t = counts.to(X.device, X.dtype)
    if representation not in ("auto", "gram", "samples"):
        raise ValueError(f"representation must be 'auto', 'gram' or 'samples'; got {representation!r}")
    c = torch.einsum("tnd,tn->td", X, y) / n_t[:, None]
    q = (y * y).sum(-1) / n_t
    if representation == "samples" or (representation == "auto" and n < d):
        return TaskStatistics(SampleGram(X, n_t, y), c, q)
    return TaskStatistics(DenseGram(X.transpose(-1, -2) @ X / n_t[:, None, None], n_t), c, q)


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


def mse(G: Tensor | Gram, c: Tensor, q: Tensor, beta: Tensor) -> Tensor:
    """Mean squared error ``beta^T G beta - 2 c^T beta + q`` (batched)."""
    return as_gram(G).quad(beta) - 2 * (c * beta).sum(-1) + q


def lipschitz(G: Tensor | Gram) -> Tensor:
    """``2 lambda_max(G)``, the Lipschitz constant of the gradient of the squared loss."""
    gram = as_gram(G)
    return 2 * gram.lambda_max().clamp_min(torch.finfo(gram.dtype).tiny)


@dataclass
class HeadSolver:
    """Exact minimiser over the head for a fixed representation: ``w = (B^T G B)^+ B^T (c - G v)``.

    ``LB`` is ``G``'s product with the basis (:meth:`Gram.times`), kept for the FISTA steps.
    """

    B: Tensor
    G: Gram
    LB: Tensor
    pinv: Tensor

    @classmethod
    def build(cls, B: Tensor, G: Tensor | Gram, LB: Tensor | None = None) -> HeadSolver:
        gram = as_gram(G)
        LB = gram.times(B) if LB is None else LB
        return cls(B, gram, LB, pseudo_inverse(gram.basis_gram(B, LB)))

    def project(self, c: Tensor) -> Tensor:
        """``B^T c``."""
        return matvec(self.B.transpose(-1, -2), c)

    def solve(self, Bc: Tensor, h: Tensor | None = None) -> Tensor:
        """The head from ``B^T c`` and ``h = G.half(v)``."""
        r = Bc if h is None else Bc - self.G.reduce(self.B, self.LB, h)
        return matvec(self.pinv, r)

    def __call__(self, c: Tensor, v: Tensor | None = None) -> Tensor:
        return self.solve(self.project(c), None if v is None else self.G.half(v))


def rank_tolerance(dtype: torch.dtype) -> float:
    """The fraction of a Gram matrix's largest eigenvalue below which :func:`pseudo_inverse` counts an
    eigenvalue as zero: 1000 machine epsilons (2.2e-13 in float64, 1.2e-4 in float32). A Gram matrix
    formed from ``n`` samples carries rounding of about ``sqrt(n)`` epsilons of its norm, so this is
    above that for up to a million samples: a direction that exists only by rounding (a centred part
    of two samples has one direction, not two) is not inverted. ``torch.linalg.pinv``'s own default
    (the matrix size times epsilon) is not."""
    return 1000 * torch.finfo(dtype).eps


def pseudo_inverse(A: Tensor) -> Tensor:
    """Pseudo-inverse of symmetric positive semi-definite matrices (batched), eigenvalues below
    :func:`rank_tolerance` of the largest counted as zero.

    By Cholesky where the matrix is provably well-conditioned: ``1 / (tr(A) tr(A^{-1}))``, a lower
    bound on ``lambda_min / lambda_max``, above ``1e-8`` (or the rank tolerance if larger), so no
    eigenvalue is below the tolerance and the inverse equals the pseudo-inverse to rounding; by
    ``torch.linalg.pinv`` (an eigendecomposition, ten times slower on small batched matrices) for the
    others. (The Cholesky pivots are no such bound: their smallest can be far above the smallest
    eigenvalue, and a float32 matrix with an eigenvalue 30x below the tolerance passed a pivot test.)
    """
    tolerance = rank_tolerance(A.dtype)
    factor, info = torch.linalg.cholesky_ex(A)
    ok = info == 0
    inverse = torch.cholesky_inverse(torch.where(ok[..., None, None], factor, torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)))
    trace = torch.diagonal(A, dim1=-2, dim2=-1).sum(-1) * torch.diagonal(inverse, dim1=-2, dim2=-1).sum(-1)
    good = ok & (trace.reciprocal() > max(1e-8, tolerance))
    if bool(good.all()):
        return inverse
    bad = ~good
    inverse[bad] = torch.linalg.pinv(A.expand_as(inverse)[bad], hermitian=True, rtol=tolerance)
    return inverse


def predictor(B: Tensor, w: Tensor, v: Tensor | None = None) -> Tensor:
    """``beta = B w + v``."""
    beta = matvec(B, w)
    return beta if v is None else beta + v


def fit_perturbation(heads: HeadSolver, c: Tensor, L: Tensor, v0: Tensor, prox: Prox, strength: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Minimise ``loss(B w + v) + penalty(v)`` over ``(w, v)`` for a fixed ``B`` by FISTA.

    The head is minimised exactly at every step (it enters the loss unpenalised), so this is
    accelerated proximal gradient descent on the convex function ``v -> min_w loss(B w + v)``.
    ``prox`` is :func:`penalty_prox` or :func:`ball_prox`; the step is ``1/L``. One product with
    ``G`` per step: ``h = half(z)`` gives both the head and the gradient
    ``2 (G (B w + z) - c) = 2 expand(lift(w) + h - target)``. With a :class:`SampleGram` the
    perturbations ``v0`` and the result are coordinates (:meth:`Gram.coord_vector` gives ``v``).
    """
    G = heads.G
    Bc = heads.project(c)
    b = G.target(c)
    v, z, t = v0, v0, 1.0
    step = 1 / L
    for _ in range(steps):
        h = G.coord_half(z)
        w = heads.solve(Bc, h)
        grad = 2 * (G.lift(heads.LB, w) + h - b)  # the gradient's coordinates
        v_next = _prox_coordinates(G, z - grad * step.unsqueeze(-1), prox, strength, step)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = v_next + ((t - 1) / t_next) * (v_next - v)
        v, t = v_next, t_next
    return heads.solve(Bc, G.coord_half(v)), v


def _prox_coordinates(G: Gram, a: Tensor, prox: Prox, strength: Tensor, step: Tensor) -> Tensor:
    """``prox`` on the perturbation with coordinates ``a``: both proxes scale ``v`` by a factor of ``||v||``."""
    if isinstance(G, DenseGram):
        return prox(a, strength, step)
    norm = G.coord_sqnorm(a).clamp_min(0).sqrt().unsqueeze(-1)
    return a * (prox(norm, strength, step) / norm.clamp_min(torch.finfo(a.dtype).tiny))


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
    ``"max_iter"``, or ``"degenerate"`` (no task has more samples than the rank). ``b_solver`` is how the ``B`` step was solved (``"dense"`` or ``"cg"``) and
    ``cg_iterations`` the conjugate-gradient iterations over all ``B`` steps (0 for dense).
    ``noise`` is the noise level that :func:`fit_random_effects` estimated (``None`` for the least-squares fits).
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
    b_solver: str = "dense"
    cg_iterations: int = 0
    noise: float | None = None


def task_objective(B: Tensor, W: Tensor, V: Tensor, G: Tensor | Gram, c: Tensor, q: Tensor, penalty: float) -> Tensor:
    """Per-task terms ``loss_t(B w_t + v_t) + mu ||v_t||`` (``B`` broadcast against the task dimension)."""
    reg = penalty_value(V, torch.as_tensor(penalty, dtype=V.dtype, device=V.device), constrained=math.isinf(penalty))
    return mse(G, c, q, predictor(B, W, V)) + reg


def source_objective(B: Tensor, W: Tensor, V: Tensor, G: Tensor | Gram, c: Tensor, q: Tensor, penalty: float) -> Tensor:
    """The ADAPTREP source objective ``mean_t [loss_t(B w_t + v_t) + mu ||v_t||]`` (``mu = inf``: FROZENREP, V = 0)."""
    return task_objective(B.unsqueeze(-3), W, V, G, c, q, penalty).mean(-1)


def source_gradient(B: Tensor, W: Tensor, V: Tensor, G: Tensor | Gram, c: Tensor, penalty: float) -> tuple[Tensor, Tensor, Tensor]:
    """Analytic gradient of :func:`source_objective` in ``(B, W, V)`` (V's where ``v_t != 0``)."""
    T = W.shape[-2]
    beta = predictor(B.unsqueeze(-3), W, V)
    resid = 2 * (as_gram(G).matvec(beta) - c) / T  # d F / d beta_t
    gB = resid.transpose(-1, -2) @ W
    gW = matvec(B.transpose(-1, -2).unsqueeze(-3), resid)
    gV = resid.clone()
    if not math.isinf(penalty):
        norm = V.norm(dim=-1, keepdim=True)
        gV = gV + torch.where(norm > 0, penalty / T * V / norm.clamp_min(torch.finfo(V.dtype).tiny), torch.zeros_like(V))
    return gB, gW, gV


def stationarity(B: Tensor, W: Tensor, V: Tensor, G: Tensor | Gram, c: Tensor, penalty: float, radius: float | None) -> Tensor:
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


def moment_inits(G: Tensor | Gram, c: Tensor, rank: int) -> Tensor:
    """Deterministic, rotation-equivariant starting representations ``(4, d, k)``.

    Top-``k`` eigenvectors of ``sum_t a_t a_t^T`` for ``a_t`` = the moment ``c_t`` (an estimate
    of ``Sigma beta_t``) and a ridge estimate of ``beta_t``, each with and without normalising
    ``a_t`` to unit length (the normalised forms keep a few loud tasks from dominating).
    """
    gram = as_gram(G)
    trace = gram.trace()
    # a task with no signal in its inputs (one sample, centred away) gets the average ridge: its own is 0, and 0/0 would poison the sum
    ridge = 1e-2 * torch.where(trace > 0, trace, trace.mean().clamp_min(torch.finfo(c.dtype).tiny)) / gram.dim
    beta = gram.ridge_solve(ridge, c)
    inits = []
    for a in (c, beta):
        for normalise in (False, True):
            a_ = a / a.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny) if normalise else a
            _, vecs = torch.linalg.eigh(a_.transpose(-1, -2) @ a_)
            inits.append(vecs[:, -rank:].flip(-1))
    return torch.stack(inits)


#: the ``B`` step is solved exactly (a dense ``dk x dk`` Cholesky) up to this ``d k``, by conjugate gradients above
DENSE_MAX = 512
#: at most this many conjugate-gradient iterations per ``B`` step of :func:`fit_source`
CG_MAX_ITER = 100


def _auto_b_solver(gram: Gram, d: int, k: int) -> Literal["dense", "cg"]:
    """Dense while ``d k <= DENSE_MAX`` on dense Gram matrices; always CG on samples, where the
    dense normal matrix would first rebuild every ``G_t`` (``O(T n d^2)``, measured 2 to 10 times
    the CG step's cost in ``benchmarks/scaling.py``)."""
    return "dense" if isinstance(gram, DenseGram) and d * k <= DENSE_MAX else "cg"


def _normal_jitter(W: Tensor, gram: Gram) -> Tensor:
    """The ridge added to the normal equations: ``max(1e-12, 100 eps)`` times their mean diagonal entry."""
    d, k = gram.dim, W.shape[-1]
    mean_diag = (gram.trace() * W.square().sum(-1)).sum(-1) / (d * k)
    return max(1e-12, 100 * torch.finfo(W.dtype).eps) * mean_diag


def _normal_operator(W: Tensor, gram: Gram, jitter: Tensor) -> Callable[[Tensor], Tensor]:
    """``P -> sum_t G_t P w_t w_t^T + jitter P``, matrix-free: one product with every ``G_t``."""

    def apply(P: Tensor) -> Tensor:
        u = torch.einsum("...dk,...tk->...td", P, W)
        return torch.einsum("...td,...tk->...dk", gram.matvec(u), W) + jitter[..., None, None] * P

    return apply


def _kronecker_preconditioner(right: Tensor, gram: Gram) -> Callable[[Tensor], Tensor]:
    """``R -> Sigma^{-1} R right^{-1}``: the inverse of ``Sigma (x) right``, which the normal operator
    ``P -> sum_t G_t P M_t`` equals when every ``G_t`` is the average Gram matrix ``Sigma`` and
    ``right = sum_t M_t`` (``W^T W`` for the least-squares heads, ``M_t = w_t w_t^T``)."""
    d, k = gram.dim, right.shape[-1]
    eye_d = torch.eye(d, dtype=right.dtype, device=right.device)
    eye_k = torch.eye(k, dtype=right.dtype, device=right.device)
    S = gram.mean_gram()
    S_factor = torch.linalg.cholesky(S + 1e-8 * S.diagonal().mean().clamp_min(torch.finfo(right.dtype).tiny) * eye_d)
    scale = torch.diagonal(right, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(right.dtype).tiny)
    right_factor = torch.linalg.cholesky(right + 1e-8 * scale[..., None, None] * eye_k)

    def apply(R: Tensor) -> Tensor:
        Y = torch.cholesky_solve(R, S_factor)
        return torch.cholesky_solve(Y.transpose(-1, -2), right_factor).transpose(-1, -2)

    return apply


def _inner(A: Tensor, B: Tensor) -> Tensor:
    return (A * B).sum((-1, -2))


def conjugate_gradients(
    operator: Callable[[Tensor], Tensor], rhs: Tensor, x0: Tensor | None, preconditioner: Callable[[Tensor], Tensor], rtol: float, atol: float, max_iter: int
) -> tuple[Tensor, int]:
    """Preconditioned conjugate gradients for ``operator(x) = rhs`` on matrices ``(..., d, k)`` (SPD operator).

    Batched over leading dimensions; stops each problem when its residual norm is at most
    ``max(atol, rtol * ||rhs - operator(x0)||)`` (a reduction of the warm start's residual).
    Every iterate lowers ``<x, operator(x)> / 2 - <rhs, x>``. ``x0=None`` starts from zero without
    a product with the operator. Returns ``(x, iterations)``.
    """
    x = torch.zeros_like(rhs) if x0 is None else x0
    r = rhs if x0 is None else rhs - operator(x)
    threshold = torch.clamp(rtol * r.square().sum((-1, -2)).sqrt(), min=atol)
    z = preconditioner(r)
    p = z
    rz = _inner(r, z)
    iterations = 0
    for iterations in range(max_iter + 1):  # noqa: B007 - used after the loop
        active = r.square().sum((-1, -2)).sqrt() > threshold
        if iterations == max_iter or not bool(active.any()):
            break
        Ap = operator(p)
        pAp = _inner(p, Ap)
        alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
        x = x + alpha[..., None, None] * p
        r = r - alpha[..., None, None] * Ap
        z = preconditioner(r)
        rz_next = _inner(r, z)
        beta = torch.where(active & (rz > 0), rz_next / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta[..., None, None] * p
        rz = rz_next
    return x, iterations


def solve_representation(
    W: Tensor,
    G: Tensor | Gram,
    rhs: Tensor,
    B0: Tensor | None = None,
    method: Literal["auto", "dense", "cg"] = "auto",
    rtol: float = 1e-12,
    atol: float = 0.0,
    max_iter: int = 500,
) -> Tensor:
    """Least squares in ``B`` for fixed heads: solve ``sum_t G_t B w_t w_t^T = sum_t rhs_t w_t^T``.

    ``W`` holds the heads (``(..., T, k)``); ``rhs`` is ``c_t - G_t v_t`` (``(..., T, d)``). Both
    methods add the same tiny ridge (:func:`_normal_jitter`). ``"dense"``: the ``dk x dk`` normal
    matrix, built with one matrix product over tasks, and a Cholesky solve (exact; ``O(T d^2 k^2)``
    time, ``O(d^2 k^2)`` memory). ``"cg"``: conjugate gradients, matrix-free (each iteration one
    product ``G_t (P w_t)`` for every task, ``O(T d k)`` plus the products' cost), preconditioned by
    ``Sigma (x) W^T W`` and warm-started from ``B0``; stops at ``max(atol, rtol * r0)`` in the
    residual norm (see :func:`conjugate_gradients`). ``"auto"``: dense while ``d k <= DENSE_MAX`` on
    dense Gram matrices, CG on samples.
    """
    gram = as_gram(G)
    d, k = gram.dim, W.shape[-1]
    batch = W.shape[:-2]
    R = rhs.transpose(-1, -2) @ W  # (..., d, k)
    jitter = _normal_jitter(W, gram)
    if method == "dense" or (method == "auto" and _auto_b_solver(gram, d, k) == "dense"):
        WW = (W.unsqueeze(-1) * W.unsqueeze(-2)).reshape(*batch, W.shape[-2], k * k)
        M = gram.normal_matrix(WW).reshape(*batch, d, d, k, k)
        M = M.permute(*range(M.ndim - 4), -4, -2, -3, -1).reshape(*batch, d * k, d * k)
        M = M + jitter[..., None, None] * torch.eye(d * k, dtype=M.dtype, device=M.device)
        return spd_solve(M, R.reshape(*batch, d * k)).reshape(*batch, d, k)
    x0 = torch.zeros_like(R) if B0 is None else B0.expand_as(R)
    B, _ = conjugate_gradients(_normal_operator(W, gram, jitter), R, x0, _kronecker_preconditioner(W.transpose(-1, -2) @ W, gram), rtol, atol, max_iter)
    return B


def fit_source(
    G: Tensor | Gram,
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
    b_solver: Literal["auto", "dense", "cg"] = "auto",
    cg_rtol: float = 0.1,
    lost: int = 0,
) -> SourceFit:
    """Fit ADAPTREP (finite ``penalty`` or a ``radius``) or FROZENREP (``penalty = inf``) on source statistics.

    ``G`` is the tasks' Gram matrices ``(T, d, d)`` or a :class:`Gram` operator from
    :func:`task_statistics` (the samples themselves when ``n < d``, ragged tasks included).
    Alternating minimisation, batched over tasks and over restarts:

    1. heads and perturbations for the current ``B``: exact heads, ``inner_steps`` FISTA steps on
       the perturbations (warm-started) — every task at once;
    2. ``B`` by least squares given heads and perturbations (:func:`solve_representation`): an
       exact ``dk x dk`` solve while ``d k <= DENSE_MAX`` on dense Gram matrices, else (and always
       on samples) conjugate gradients warm-started
       from the current ``B`` until the residual (``T/2`` times the gradient in ``B``) has fallen by
       ``cg_rtol`` or below ``gtol T / 20``; then re-orthonormalised by QR with the heads
       transformed so that the objective is unchanged.

    No step increases F (a task's FISTA update is kept only if it lowers its objective; every
    conjugate-gradient iterate lowers F in ``B``). It stops when the norm of the (sub)gradient
    falls below ``gtol`` (checked every 5 iterations) or the relative decrease of F below
    ``tol``. Restarts start from :func:`moment_inits` (plus any ``inits``) and run together for
    ``select_after`` iterations; then only the one with the lowest objective goes on
    (``restart_objectives`` records their values at that point). Works in the dtype of ``c``.
    When no task has more samples than ``rank`` (known from the operator's counts) every head fits
    its task exactly on any representation, so F is 0 everywhere and cannot choose ``B``: the fit is
    then :func:`fit_random_effects` from the first moment start (``stop_reason="degenerate"``; its
    ``B`` steps solved to ``1e-12`` with ``b_solver="dense"``), for any ``penalty`` (a perturbation cannot lower a loss that the head alone brings to zero).
    ``lost`` goes to it (1 for tasks centred per task).
    """
    gram = as_gram(G)
    T, d = c.shape
    dtype, device = c.dtype, c.device
    starts = moment_inits(gram, c, rank)
    if inits is not None:
        starts = torch.cat([starts, inits.to(starts)])
    B = torch.linalg.qr(starts)[0]
    method = b_solver if b_solver != "auto" else _auto_b_solver(gram, d, rank)
    if gram.counts is not None and bool((gram.counts <= rank).all()):
        # every task is fitted exactly by its own head (n_t <= k): F = 0 on every representation, which
        # least squares cannot tell apart; the heads' random-effects likelihood can
        if method == "dense":  # the B steps solved exactly
            return fit_random_effects(gram, c, q, rank, B0=B[0], cg_rtol=1e-12, cg_max_iter=500, lost=lost)
        return fit_random_effects(gram, c, q, rank, B0=B[0], lost=lost)
    S = B.shape[0]
    frozen = radius is None and math.isinf(penalty)
    A = torch.zeros(S, T, gram.coord_dim(), dtype=dtype, device=device)  # the perturbations' coordinates
    L = lipschitz(gram)
    target = gram.target(c)
    if radius is not None:
        prox: Prox = ball_prox
        strength = torch.full((T,), float(radius), dtype=dtype, device=device)
        weight = math.inf
    else:
        prox = penalty_prox
        strength = torch.full((T,), float(penalty), dtype=dtype, device=device)
        weight = penalty
    objective = torch.full((S,), math.inf, dtype=dtype, device=device)
    restart_objectives: list[float] = []
    history: list[float] = []
    cg_iterations = 0

    def task_terms(B: Tensor, LB: Tensor, W: Tensor, A: Tensor) -> Tensor:
        """``loss_t(B w_t + v_t) + mu ||v_t||`` from coordinates (``B`` with its task dimension)."""
        terms = gram.coord_loss(B, LB, W, A, c, q)
        if not math.isinf(weight):
            terms = terms + weight * gram.coord_sqnorm(A).clamp_min(0).sqrt()
        return terms

    def heads_and_perturbations(B: Tensor, LB: Tensor, A: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Step 1 for every task: exact heads, then warm-started FISTA on the perturbations.

        FISTA is not monotone, so per task the new perturbation is kept only if it is no worse.
        """
        heads = HeadSolver.build(B.unsqueeze(-3), gram, LB)
        if frozen:
            return heads(c), A
        W_old = heads.solve(heads.project(c), gram.coord_half(A))
        W_new, A_new = fit_perturbation(heads, c, L, A, prox, strength, steps)
        better = task_terms(B.unsqueeze(-3), LB, W_new, A_new) <= task_terms(B.unsqueeze(-3), LB, W_old, A)
        return torch.where(better.unsqueeze(-1), W_new, W_old), torch.where(better.unsqueeze(-1), A_new, A)

    def representation_step(B: Tensor, W: Tensor, A: Tensor) -> Tensor:
        nonlocal cg_iterations
        rhs = c if frozen else gram.expand(target - gram.coord_half(A))  # c_t - G_t v_t
        if method == "dense":
            return solve_representation(W, gram, rhs, method="dense")
        R = rhs.transpose(-1, -2) @ W
        jitter = _normal_jitter(W, gram)
        preconditioner = _kronecker_preconditioner(W.transpose(-1, -2) @ W, gram)
        B_new, its = conjugate_gradients(_normal_operator(W, gram, jitter), R, B, preconditioner, cg_rtol, gtol * T / 20, CG_MAX_ITER)
        cg_iterations += its
        return B_new

    stop_reason, iterations = "max_iter", 0
    gtol = max(gtol, math.sqrt(torch.finfo(dtype).eps))  # float32 cannot resolve smaller gradients
    LB = gram.times(B.unsqueeze(-3))
    for iterations in range(1, max_iter + 1):  # noqa: B007 - used after the loop
        W, A = heads_and_perturbations(B, LB, A, inner_steps)
        # heads and perturbations are (nearly) optimal for B here, so this measures B's residual
        if iterations % 5 == 0 and stationarity(B, W, gram.coord_vector(A), gram, c, weight, radius).max() < gtol:
            stop_reason = "gradient"
            break
        B_new, Rr = torch.linalg.qr(representation_step(B, W, A))
        W = matvec(Rr.unsqueeze(-3), W)
        B = B_new
        LB = gram.times(B.unsqueeze(-3))
        new_objective = task_terms(B.unsqueeze(-3), LB, W, A).mean(-1)
        change = (objective - new_objective).abs().max() / new_objective.abs().max().clamp_min(1e-30)
        objective = new_objective
        history.append(float(objective.min()))
        if iterations == select_after and B.shape[0] > 1:
            restart_objectives = [float(o) for o in objective]
            keep = torch.argmin(objective).reshape(1)
            B, W, A, LB, objective = B[keep], W[keep], A[keep], LB[keep], objective[keep]
        if change < tol:
            stop_reason = "objective"
            break
    # final exact heads (and more perturbation steps) for the returned representation
    W, A = heads_and_perturbations(B, LB, A, 10 * inner_steps)
    objective = task_terms(B.unsqueeze(-3), LB, W, A).mean(-1)
    best = int(torch.argmin(objective))
    V = gram.coord_vector(A[best])
    grad = stationarity(B[best], W[best], V, gram, c, weight, radius)
    return SourceFit(
        B=B[best],
        W=W[best],
        V=V,
        objective=float(objective[best]),
        grad_norm=float(grad),
        iterations=len(history),
        converged=float(grad) < gtol,
        stop_reason=stop_reason,
        restart_objectives=restart_objectives or [float(o) for o in objective],
        history=history,
        b_solver=method,
        cg_iterations=cg_iterations,
    )


def fit_random_effects(
    G: Tensor | Gram,
    c: Tensor,
    q: Tensor,
    rank: int,
    B0: Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
    cg_rtol: float = 1e-2,
    cg_max_iter: int = 3,
    lost: int = 0,
) -> SourceFit:
    """FROZENREP for tasks with too few samples to fit their own heads: the maximum-likelihood ``B`` of

        y_t = X_t B h_t + e_t,    h_t ~ N(mu, S),    e_t ~ N(0, sigma^2 I_{n_t}),

    the heads integrated out. With ``n_t <= k`` least squares fits every task exactly on any ``B``
    (:func:`fit_source`'s ``"degenerate"`` case); the likelihood still tells representations apart,
    because one ``(mu, S)`` must explain every task. Expectation conditional maximisation, batched over
    tasks through ``Z_t = X_t B`` and ``A_t = B^T G_t B`` (``O(T n k)`` memory on samples): with
    ``Lambda_t = n_t A_t / sigma^2 + S^{-1}``, the heads' posterior is ``N(m_t, C_t)``,
    ``C_t = Lambda_t^{-1}``, ``m_t = C_t (n_t B^T c_t / sigma^2 + S^{-1} mu)``; then

        sigma^2 <- sum_t n_t E[loss_t(B h_t)] / sum_t (n_t - lost),   mu <- mean_t m_t,   S <- mean_t M_t - mu mu^T,
        B <- argmin_B sum_t n_t E[loss_t(B h_t)]:  sum_t n_t G_t B M_t = sum_t n_t c_t m_t^T,

    with ``M_t = m_t m_t^T + C_t``; the ``B`` step is preconditioned conjugate gradients warm-started
    from the current ``B``, until the residual has fallen by ``cg_rtol`` or after ``cg_max_iter``
    iterations (each iterate lowers the expected loss, so no step lowers the likelihood), then ``B`` is re-orthonormalised by QR and ``(mu, S)`` carried along.
    Starts from ``B0`` (else the first :func:`moment_inits`) with ``mu = 0``, ``sigma^2`` and ``S``
    sharing the labels' mean square half and half; stops when the log-likelihood gains less than
    ``tol`` relative in an iteration, or after ``max_iter`` iterations. Needs the tasks' counts
    (:func:`task_statistics` records them). Returns the heads' posterior means as ``W``, ``V = 0``,
    ``objective`` = F at them, ``grad_norm`` NaN (F has no minimiser to measure against),
    ``history`` the negative log-likelihood per sample, ``noise`` the estimated ``sigma``. ``lost``
    degrees of freedom per task were spent before (1 for labels and inputs centred per task: the noise
    then lives in ``n_t - 1`` dimensions, and the likelihood is that of the centred samples).
    """
    gram = as_gram(G)
    if gram.counts is None:
        raise ValueError("fit_random_effects needs the tasks' sample counts (task_statistics records them)")
    T, d = c.shape
    dtype, device = c.dtype, c.device
    n = gram.counts.to(dtype)
    dof = (n - lost).clamp_min(0)  # a centred task's noise lives in n_t - 1 dimensions (lost=1)
    N = dof.sum().clamp_min(1)
    tiny = torch.finfo(dtype).tiny
    log_2pi = math.log(2 * math.pi)
    State = tuple[Tensor, Tensor, Tensor, Tensor]  # (B, mu, S, sigma^2)

    def posterior(state: State) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
        """E-step, one pass over the data: ``(LB, A, b, m, C)`` and the negative log-likelihood per sample."""
        B, mu, S, sigma2 = state
        LB = gram.times(B)
        A, b = gram.basis_gram(B, LB), c @ B
        S_inv = torch.cholesky_inverse(torch.linalg.cholesky(S))
        factor = torch.linalg.cholesky(n[:, None, None] * A / sigma2 + S_inv)
        C = torch.cholesky_inverse(factor)
        m = matvec(C, n[:, None] * b / sigma2 + S_inv @ mu)
        score = n[:, None] * (b - matvec(A, mu))
        fit = n * (q - 2 * (b * mu).sum(-1) + (mu * matvec(A, mu)).sum(-1)) - (score * matvec(C, score)).sum(-1) / sigma2
        logdet = dof * torch.log(sigma2) + torch.logdet(S) + 2 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)
        return LB, A, b, m, C, float(0.5 * (fit / sigma2 + logdet).sum() / N + 0.5 * log_2pi)

    def maximise(state: State, post: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]) -> tuple[State, int]:
        """CM-steps: sigma^2, (mu, S), then a correction to B by conjugate gradients."""
        B = state[0]
        LB, A, b, m, C, _ = post
        M = m.unsqueeze(-1) * m.unsqueeze(-2) + C
        sigma2 = ((n * (q - 2 * (b * m).sum(-1) + (A * M).sum((-1, -2)))).sum() / N).clamp_min(torch.finfo(dtype).eps * signal)
        mu = m.mean(0)
        S = M.mean(0) - mu.unsqueeze(-1) * mu.unsqueeze(-2)
        # the residual of B's normal equations from the products with B already made (LB): one pass
        residual = (n[:, None] * c).transpose(-1, -2) @ m - gram.pool(LB @ M)
        operator = lambda P: gram.pool(gram.times(P) @ M)  # noqa: E731  sum_t n_t G_t P M_t
        step, its = conjugate_gradients(operator, residual, None, _kronecker_preconditioner((n[:, None, None] * M).sum(0), gram), cg_rtol, 0.0, cg_max_iter)
        return (B + step, mu, (S + S.transpose(-1, -2)) / 2, sigma2), its

    def orthonormal(state: State) -> State:
        """The same model with an orthonormal ``B`` (``B = QR``: heads ``R h``)."""
        B, mu, S, sigma2 = state
        Q, R = torch.linalg.qr(B)
        return Q, R @ mu, R @ S @ R.transpose(-1, -2), sigma2

    def admissible(state: State) -> bool:
        B, mu, S, sigma2 = state
        finite = all(bool(torch.isfinite(x).all()) for x in state)
        return finite and float(sigma2) > 0 and int(torch.linalg.cholesky_ex(S)[1]) == 0

    B = torch.linalg.qr(moment_inits(gram, c, rank)[0] if B0 is None else B0)[0]
    LB = gram.times(B)
    signal = float((n * q).sum() / N)
    scale = float(torch.diagonal(gram.basis_gram(B, LB), dim1=-2, dim2=-1).sum(-1).mean().clamp_min(tiny))
    half = torch.as_tensor(signal / 2, dtype=dtype, device=device)
    state: State = (B, torch.zeros(rank, dtype=dtype, device=device), torch.eye(rank, dtype=dtype, device=device) * (signal / 2) / scale, half)
    post = posterior(state)
    history = [post[-1]]
    stop_reason, cg_iterations, iterations = "max_iter", 0, 0
    while iterations < max_iter:
        # SQUAREM (Varadhan & Roland 2008): two EM steps, a step along their extrapolated path and
        # one more EM step from there, kept if it is no worse than the first EM step (so the
        # likelihood never falls); otherwise the two plain EM steps
        one, its1 = maximise(state, post)
        post_one = posterior(one)
        two, its2 = maximise(one, post_one)
        iterations, cg_iterations = iterations + 2, cg_iterations + its1 + its2
        r = [a - b for a, b in zip(one, state, strict=True)]
        v = [a - 2 * b + c_ for a, b, c_ in zip(two, one, state, strict=True)]
        r_norm = math.sqrt(sum(float(x.square().sum()) for x in r))
        v_norm = math.sqrt(sum(float(x.square().sum()) for x in v))
        alpha = min(-1.0, -r_norm / max(v_norm, tiny))
        accepted = None
        jump = tuple(x - 2 * alpha * dr + alpha**2 * dv for x, dr, dv in zip(state, r, v, strict=True))
        if alpha < -1.0 and admissible(jump):  # type: ignore[arg-type]
            three, its3 = maximise(jump, posterior(jump))  # type: ignore[arg-type]
            iterations, cg_iterations = iterations + 1, cg_iterations + its3
            if admissible(three):
                candidate = orthonormal(three)
                candidate_post = posterior(candidate)
                if candidate_post[-1] <= post_one[-1]:
                    accepted = candidate, candidate_post
        if accepted is None:
            state = orthonormal(two)
            post = posterior(state)
        else:
            state, post = accepted
        history.append(post[-1])
        if abs(history[-2] - history[-1]) <= tol * abs(history[-1]):
            stop_reason = "objective"
            break
    B, _, _, sigma2 = state
    m = post[3]
    V = torch.zeros_like(c)
    return SourceFit(
        B=B,
        W=m,
        V=V,
        objective=float(source_objective(B, m, V, gram, c, q, math.inf)),
        grad_norm=math.nan,
        iterations=iterations,
        converged=stop_reason == "objective",
        stop_reason="degenerate",
        restart_objectives=[],
        history=history,
        b_solver="cg",
        cg_iterations=cg_iterations,
        noise=float(sigma2.sqrt()),
    )


def _sample_counts(G: Gram, num_samples: int | Tensor | None, T: int, like: Tensor) -> Tensor:
    """Per-task sample counts: the operator's own, else ``num_samples`` (one number or ``(T,)``)."""
    if G.counts is not None:
        return G.counts.to(like)
    if num_samples is None:
        raise ValueError("the number of samples per task is needed (num_samples) when the Gram matrices carry no counts")
    return torch.as_tensor(num_samples, dtype=like.dtype, device=like.device).expand(T)


def ols_noise_variance(G: Tensor | Gram, c: Tensor, q: Tensor, num_samples: int | Tensor | None) -> Tensor | None:
    """Per-task unbiased noise variance from least-squares residuals (``n_t - d`` degrees of freedom).

    ``None`` when ``n_t <= d + 2`` for every task (too few residual degrees of freedom); tasks
    with too few samples get NaN. ``None`` too for a :class:`SampleGram` (chosen when ``n < d``).
    """
    d = c.shape[-1]
    gram = as_gram(G)
    if not isinstance(gram, DenseGram):
        return None
    if isinstance(num_samples, int) and gram.counts is None:
        if num_samples <= d + 2:
            return None
        n: Tensor = torch.as_tensor(float(num_samples), dtype=c.dtype, device=c.device)
    else:
        n = _sample_counts(gram, num_samples, c.shape[-2], c)
        if not bool((n > d + 2).any()):
            return None
    Gd = gram.G
    rss = (mse(Gd, c, q, spd_solve(Gd, c)) * n).clamp_min(0)
    return torch.where(n > d + 2, rss / (n - d), torch.full_like(rss, math.nan))


def estimate_noise(G: Tensor | Gram, c: Tensor, q: Tensor, num_samples: int | Tensor | None, rank: int, lost: int = 0) -> tuple[float, int]:
    """Estimate the noise level ``sigma`` from source statistics; returns ``(sigma_hat, dof)``.

    With ``n_t > d + 2`` samples per task, the pooled residual variance of per-task least squares
    (``sum_t (n_t - d)`` degrees of freedom over those tasks, unbiased). Otherwise the residual of
    the top-``k`` moment representation with ``n_t - k`` degrees of freedom each, which also counts
    the unexplained task signal and so errs on the large side; it is returned with ``dof = 0`` so
    that users of the estimate (target fine-tuning) prefer any unbiased estimate they have.
    ``num_samples`` (one number or per-task counts) is ignored when ``G`` carries its counts;
    ``lost`` degrees of freedom per task were spent before (1 for a profiled-out intercept).
    """
    gram = as_gram(G)
    T, d = c.shape
    n = _sample_counts(gram, num_samples, T, c)
    variance = ols_noise_variance(gram, c, q, n)
    ok = n > d + 2 + lost
    if variance is not None and bool(ok.any()):
        rss, dof = variance[ok] * (n - d)[ok], (n - d - lost)[ok]
        return float((rss.sum() / dof.sum()).sqrt()), int(dof.sum())
    B = moment_inits(gram, c, rank)[0]
    rss = (mse(gram, c, q, predictor(B, HeadSolver.build(B, gram)(c))) * n).clamp_min(0)
    return float(math.sqrt(rss.sum() / (n - rank - lost).clamp_min(1).sum())), 0
