"""Adapting a learned representation to a target task.

* :func:`fit_head` — FROZENREP's adaptation: retrain the head ``w`` only, ``beta = B w``.
* :class:`FineTune` — ADAPTREP's adaptation: fine-tune *both* the representation and the head,
  starting from the learned ``B`` and the head-only fit, by proximal gradient descent on
  ``beta = (B + Delta) w = B w + v`` with ``v = Delta w`` kept close to zero by a penalty
  ``lambda_t ||v||_2`` (default) or a norm ball ``||v||_2 <= r``. The strength is chosen per
  target task by K-fold cross-validation over a grid (all targets, folds and strengths are
  solved as one batch). The grid runs from the strength that keeps ``v = 0`` (head-only, so
  fine-tuning cannot hurt much when the target sample is tiny) down to a floor
  ``c * sigma_hat * sqrt(d / m)``: the noise level of the gradient in ``v`` (``2 X^T xi / m`` has
  norm about ``2 sigma sqrt(d / m)``) below which the penalty stops controlling the noise and
  only lets ``v`` fit it. ``sigma_hat`` is the noise level estimated on the source tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from . import cv
from .solvers import (
    Gram,
    HeadSolver,
    Prox,
    as_gram,
    ball_prox,
    fit_perturbation,
    lipschitz,
    matvec,
    mse,
    ols_noise_variance,
    penalty_prox,
    predictor,
    sufficient_statistics,
)


def fit_head(B: Tensor, G: Tensor, c: Tensor, prior: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Head-only least squares (minimum-norm when under-determined): ``beta = B (B^T G B)^+ B^T c``;
    with a ``prior`` (see :class:`ShrunkHeads`), the heads shrunk toward the prior mean."""
    return predictor(B, heads_for(B, G, prior)(c))


@dataclass
class ShrunkHeads(HeadSolver):
    """Heads with a Gaussian prior ``N(mu, S)`` learned from the source tasks (empirical Bayes):
    ``w = argmin loss(B w + v) + (w - mu)^T P (w - mu) = (B^T G B + P)^{-1} (B^T (c - G v) + P mu)``
    with ``P = (sigma^2 / m) S^{-1}``, the posterior mean of the head given the task's ``m`` samples
    for noise variance ``sigma^2`` (our loss is the mean squared error). ``P`` ``(..., k, k)`` and
    ``P mu`` ``(..., k)`` broadcast against ``G``'s leading dimensions."""

    Pmu: Tensor | None = None

    def solve(self, Bc: Tensor, h: Tensor | None = None) -> Tensor:
        r = Bc if h is None else Bc - self.G.reduce(self.B, self.LB, h)
        assert self.Pmu is not None
        return matvec(self.pinv, r + self.Pmu)


def heads_for(B: Tensor, G: Tensor | Gram, prior: tuple[Tensor, Tensor] | None) -> HeadSolver:
    """The exact head solver for ``B`` on statistics ``G``, with the prior ``(P, P mu)`` if given."""
    if prior is None:
        return HeadSolver.build(B, G)
    P, Pmu = prior
    gram = as_gram(G)
    LB = gram.times(B)
    return ShrunkHeads(B, gram, LB, torch.linalg.inv(gram.basis_gram(B, LB) + P), Pmu)


def fold_statistics(
    X: Tensor, y: Tensor, folds: int, generator: torch.Generator, mask: Tensor | None = None
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Training and validation sufficient statistics ``(G, c, q)`` for a random K-fold split
    (of the real samples only, with a ``mask`` of zero-padded ragged data).

    Returns tensors with a fold dimension after the task dimension: ``(R, K, d, d)`` etc. The folds
    are those of :func:`adaptrep.cv.fold_masks`.
    """
    held_out = cv.fold_masks(X, folds, generator, weight=mask).held_out  # (R, K, m)

    def stats(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        count = mask.sum(-1).clamp_min(1)
        Xm = X.unsqueeze(1) * mask.unsqueeze(-1)
        G = Xm.transpose(-1, -2) @ X.unsqueeze(1) / count[..., None, None]
        c = (Xm.transpose(-1, -2) @ y.unsqueeze(1).unsqueeze(-1)).squeeze(-1) / count[..., None]
        q = (mask * y.unsqueeze(1) ** 2).sum(-1) / count
        return G, c, q

    training = 1 - held_out
    if mask is not None:
        training = training * mask.unsqueeze(1).to(X.dtype)  # padding is in no fold, training or held out
    return stats(training), stats(held_out)


@dataclass
class FineTune:
    """Fine-tune representation and head on a target task (the ADAPTREP adaptation).

    Args:
        strength: ``"source"`` (the default for ``constraint="penalty"``): set by the source tasks, the posterior mean under the
            perturbations' prior ``v ~ N(0, tau^2 I_d)`` learned from them (a ridge ``(sigma^2 / (m tau^2)) ||v||^2``
            with the head free; see :meth:`adaptrep.methods.AdaptRep` and :mod:`adaptrep.bayes`; the
            methods apply it, :meth:`adapt` does not); the penalty ``lambda_t`` (or the radius ``r``
            for ``constraint="ball"``); or ``"cv"`` to choose it per target by cross-validation (the
            default for ``"ball"`` and ``"early-stop"``).
        constraint: ``"penalty"`` for ``lambda_t ||v||_2`` (regularised), ``"ball"`` for
            ``||v||_2 <= r`` (constrained, a norm-ball projection after each gradient step), or
            ``"early-stop"``: plain gradient descent on ``v`` from ``v = 0`` (heads exact), stopped
            after a number of steps that plays the role of the strength (fewer is stronger).
        folds: number of cross-validation folds (at most the number of target samples).
        grid: number of strengths on the cross-validation grid, geometric from the strength
            that keeps ``v = 0`` (head-only) down to the floor.
        grid_ratio: the lowest grid point relative to the top when no noise level is known.
        steps: proximal gradient (FISTA) steps.
        rule: ``"min"`` (smallest cross-validated error) or ``"paired"`` (see :meth:`_select`).
        floor: ``c`` in the floor ``c * sigma_hat * sqrt(d / m)`` of the penalty grid (0: none).
    """

    strength: float | Literal["source", "cv"] | None = None
    constraint: Literal["penalty", "ball", "early-stop"] = "penalty"
    folds: int = 5
    grid: int = 13
    grid_ratio: float = 1e-3
    steps: int = 400
    rule: Literal["min", "paired"] = "min"
    floor: float = 1.0

    def __post_init__(self) -> None:
        if self.constraint not in ("penalty", "ball", "early-stop"):
            raise ValueError(f"FineTune.constraint must be 'penalty', 'ball' or 'early-stop'; got {self.constraint!r}")
        if self.strength is None:  # the source tasks set a ridge on v; a ball or a step count is cross-validated
            self.strength = "source" if self.constraint == "penalty" else "cv"
        if self.strength not in ("source", "cv") and not (isinstance(self.strength, (int, float)) and self.strength >= 0):
            raise ValueError(f"FineTune.strength must be 'source', 'cv' or a non-negative number; got {self.strength!r}")
        if self.strength == "source" and self.constraint != "penalty":
            raise ValueError(f"FineTune.constraint={self.constraint!r} needs strength='cv' or a number (strength='source' is a ridge on v)")
        if self.rule not in ("min", "paired"):
            raise ValueError(f"FineTune.rule must be 'min' or 'paired'; got {self.rule!r}")
        if not self.floor >= 0:
            raise ValueError(f"FineTune.floor must be non-negative; got {self.floor!r}")
        if self.folds < 2 or self.grid < 2 or not 0 < self.grid_ratio < 1 or self.steps < 1:
            raise ValueError("FineTune needs folds >= 2, grid >= 2, 0 < grid_ratio < 1 and steps >= 1")
        if self.strength == "source":  # a closed form: no folds, grid or iterations to set
            unused = [f.name for f in fields(self) if f.name not in ("strength", "constraint") and getattr(self, f.name) != f.default]
            if unused:
                raise ValueError(f"FineTune.{unused[0]} applies to strength='cv' or a number; strength='source' is a closed form")

    @property
    def _prox(self) -> Prox:
        return ball_prox if self.constraint == "ball" else penalty_prox

    def solve(self, B: Tensor, G: Tensor, c: Tensor, strength: Tensor, prior: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Fine-tuned ``(w, v)`` for a fixed strength per problem (leading dims of ``G`` and ``strength`` broadcast)."""
        heads = heads_for(B, G, prior)
        L = lipschitz(G)
        v = torch.zeros(torch.broadcast_tensors(c, strength.unsqueeze(-1))[0].shape, dtype=G.dtype, device=G.device)  # not broadcast_shapes: it imports sympy
        if self.constraint != "early-stop":
            return fit_perturbation(heads, c, L, v, self._prox, strength, self.steps)
        for step in range(1, int(strength.max().item()) + 1 if strength.numel() else 1):
            grad = 2 * (matvec(G, predictor(B, heads(c, v), v)) - c)
            v = torch.where((strength >= step).unsqueeze(-1), v - grad / L.unsqueeze(-1), v)
        return heads(c, v), v

    def strength_grid(
        self, B: Tensor, G: Tensor, c: Tensor, num_samples: int | Tensor, noise: Tensor | None, prior: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Per-target grid ``(R, S)``: from no fine-tuning (``v = 0``) to weak regularisation."""
        heads = heads_for(B, G, prior)
        w0 = heads(c)
        grad0 = 2 * (matvec(G, predictor(B, w0)) - c)
        top = grad0.norm(dim=-1, keepdim=True)  # smallest lambda with v = 0
        if noise is not None and self.floor > 0:
            low = (self.floor * noise.unsqueeze(-1) * (G.shape[-1] / num_samples) ** 0.5) / top.clamp_min(torch.finfo(G.dtype).tiny)
            low = low.clamp(max=1.0)
        else:
            low = torch.full_like(top, self.grid_ratio)
        if self.constraint == "early-stop":  # step counts 0 (head only), then geometric up to `steps`
            counts = torch.logspace(0, math.log10(self.steps), self.grid - 1, dtype=G.dtype, device=G.device).round()
            return torch.cat([torch.zeros(1, dtype=G.dtype, device=G.device), counts]).expand(c.shape[0], -1)
        ratios = low ** torch.linspace(0, 1, self.grid, dtype=G.dtype, device=G.device)
        if self.constraint == "penalty":
            return top * ratios
        # radii: from the norm of the weakest penalised solution down, plus r = 0 (head only)
        _, v_weak = fit_perturbation(heads, c, lipschitz(G), torch.zeros_like(c), penalty_prox, (top * low).squeeze(-1), self.steps)
        top = v_weak.norm(dim=-1, keepdim=True)
        return torch.cat([torch.zeros_like(top), top * ratios.flip(-1)[..., 1:]], dim=-1)

    @staticmethod
    def noise_level(G: Tensor, c: Tensor, q: Tensor, num_samples: int | Tensor, noise: float | None, noise_dof: int) -> Tensor | None:
        """Per-target ``sigma_hat`` ``(R,)``: the given estimate pooled (by degrees of freedom) with the target's own."""
        own = ols_noise_variance(G, c, q, num_samples)
        given = None if noise is None else torch.full(c.shape[:-1], float(noise) ** 2, dtype=c.dtype, device=c.device)
        if own is None:
            return None if given is None else given.sqrt()
        if given is None or noise_dof == 0:
            return own.sqrt()
        own_dof = num_samples - c.shape[-1]
        return ((noise_dof * given + own_dof * own) / (noise_dof + own_dof)).sqrt()

    def _select(self, errors: Tensor) -> Tensor:
        """Index ``(R, 1)`` of the chosen strength from fold errors ``(R, K, S)`` (grid strongest first).

        ``rule="min"``: the smallest mean validation error. ``rule="paired"``: the
        strongest strength whose fold-paired error difference to that minimum is within one
        standard error — fine-tuning moves away from the learned representation only as far as
        the validation data show a real gain.
        """
        return cv.select(errors, self.rule).unsqueeze(-1)

    def adapt(
        self,
        B: Tensor,
        X: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        noise: float | None = None,
        noise_dof: int = 0,
        mask: Tensor | None = None,
        prior: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Fine-tune on targets ``X (R, m, d)``, ``y (R, m)``; returns ``beta (R, d)`` and the strengths ``(R,)``.

        ``noise`` is an estimate of ``sigma`` with ``noise_dof`` degrees of freedom (0: biased or
        rough); when ``m > d + 2`` it is pooled with each target's own least-squares estimate.
        ``mask`` (``(R, m)``) marks the real samples of zero-padded targets of different sizes;
        ``prior`` ``(P, P mu)`` (``(R, k, k)``, ``(R, k)``) shrinks the heads (:class:`ShrunkHeads`).
        """
        if self.strength == "source":
            raise ValueError("FineTune(strength='source') needs the source tasks' perturbation variance: adapt through a method, or give 'cv' or a number")
        R, m, _ = X.shape
        counts = None if mask is None else mask.sum(-1).to(X.dtype)
        G, c, q = sufficient_statistics(X, y, counts)
        sizes: int | Tensor = m if counts is None else counts
        fewest = m if counts is None else int(counts.min())
        sigma = self.noise_level(G, c, q, sizes, noise, noise_dof)
        if fewest < 2:  # nothing to cross-validate on: keep the head-only fit
            return fit_head(B, G, c, prior), torch.full((R,), float("inf"), dtype=X.dtype, device=X.device)
        if isinstance(self.strength, (int, float)):
            strength = torch.full((R,), float(self.strength), dtype=X.dtype, device=X.device)
        else:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            grid = self.strength_grid(B, G, c, sizes if counts is None else counts.unsqueeze(-1), sigma, prior)  # (R, S)
            (Gt, ct, _), (Gv, cv, qv) = fold_statistics(X, y, min(self.folds, fewest), generator, mask)
            fold_prior = None if prior is None else (prior[0][:, None, None], prior[1][:, None, None])
            w, v = self.solve(B, Gt.unsqueeze(2), ct.unsqueeze(2), grid.unsqueeze(1).expand(-1, Gt.shape[1], -1), fold_prior)
            beta = predictor(B, w, v)  # (R, K, S, d)
            errors = mse(Gv.unsqueeze(2), cv.unsqueeze(2), qv.unsqueeze(2), beta)  # (R, K, S)
            strength = torch.gather(grid, 1, self._select(errors)).squeeze(-1)
        w, v = self.solve(B, G, c, strength, prior)
        return predictor(B, w, v), strength
