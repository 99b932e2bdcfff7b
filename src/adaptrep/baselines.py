"""Classical baselines for regression tasks, as methods (the :class:`~adaptrep.methods.Method` interface).

* :class:`RidgePerTask` (``ridge-per-task``): each target alone, ridge regression with its strength
  chosen per target by K-fold cross-validation -- a stronger "target only" than least squares.
* :class:`MixedEffects` (``mixed-effects``): the statisticians' model for grouped data, a linear mixed
  model with a random intercept and random slopes (statsmodels ``MixedLM``) fitted on the pooled
  source tasks; a new task is predicted from its support samples by the conditional mode of its
  random effects (the BLUP) under the source fit's fixed effects and variance components.

Both need the squared loss and the linear model; both work on ragged (masked) targets and solve all
targets as one batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .adapted import Adapted
from .data import Tasks
from .finetune import fold_statistics
from .methods import Method
from .solvers import matvec, mse, spd_solve

__all__ = ["RidgePerTask", "MixedEffects", "RIDGE_GRID", "blup"]

#: Ridge strengths that :class:`RidgePerTask` chooses from (penalty on the mean squared error; inputs standardised).
RIDGE_GRID = tuple(float(v) for v in np.logspace(-4, 3, 15))


def _linear_only(method: Method) -> None:
    spec = method.spec
    if not spec.exact:
        raise ValueError(f"{type(method).__name__} needs the squared loss and the linear model; got the {spec.model.loss} loss with the {spec.kind} model")


def _with_constant(tasks: Tasks) -> Tensor:
    """Inputs ``(T, n, d + 1)`` with a leading column of ones, zero on padding."""
    X = tasks.flat()
    ones = tasks.weight.unsqueeze(-1).to(X)
    return torch.cat([ones, X * ones], dim=-1)


@dataclass
class RidgePerTask(Method):
    """Each target task alone: ridge regression ``min (1/m) ||y - X beta - b||^2 + ridge ||beta||^2``
    (the intercept ``b`` unpenalised, with ``intercept``), the strength chosen per target from
    ``ridges`` by ``folds``-fold cross-validation of the mean squared error (folds of the target's
    own support, at most one per sample; the intercept is refitted within each fold), then refitted
    on the whole support. A target with a single sample gets the strongest ridge. Squared loss, linear
    model; nothing is learned from the source tasks but the feature scaling.
    """

    folds: int = 5
    ridges: tuple[float, ...] = RIDGE_GRID
    model: Any = field(default=None, kw_only=True)
    intercept: bool | None = field(default=None, kw_only=True)
    standardize: bool | None = field(default=None, kw_only=True)

    def _fit(self, source: Tasks) -> None:
        _linear_only(self)
        if self.folds < 2 or not self.ridges or min(self.ridges) <= 0:
            raise ValueError("RidgePerTask needs folds >= 2 and positive ridges")

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        intercept = self.spec.intercept
        X = _with_constant(target) if intercept else target.flat()
        y, d = target.y, target.dim
        mask = target.mask if target.ragged else None
        counts = target.counts
        penalty = torch.ones(X.shape[-1], dtype=X.dtype, device=X.device)
        if intercept:
            penalty[0] = 0.0
        P = torch.diag(penalty)
        grid = torch.tensor(self.ridges, dtype=X.dtype, device=X.device)
        fewest = int(counts.min())
        if fewest < 2:
            chosen = grid.max().expand(target.num_tasks)
        else:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            (Gt, ct, _), (Gv, cv, qv) = fold_statistics(X, y, min(self.folds, fewest), g, mask)  # (R, K, p, p) ...
            A = Gt.unsqueeze(2) + grid.view(1, 1, -1, 1, 1) * P  # (R, K, S, p, p)
            beta = spd_solve(A, ct.unsqueeze(2).expand(*A.shape[:-1]))
            errors = mse(Gv.unsqueeze(2), cv.unsqueeze(2), qv.unsqueeze(2), beta)  # (R, K, S)
            chosen = grid[errors.mean(1).argmin(-1)]
        G = X.transpose(-1, -2) @ X / counts[:, None, None]
        c = matvec(X.transpose(-1, -2), y) / counts[:, None]
        beta = spd_solve(G + chosen[:, None, None] * P, c)
        if intercept:
            return Adapted(beta[:, 1:], bias=beta[:, 0], loss="squared", strength=chosen)
        return Adapted(beta[:, :d], loss="squared", strength=chosen)


def blup(fixed: Tensor, cov_re: Tensor, scale: float | Tensor, X: Tensor, Z: Tensor, y: Tensor) -> Tensor:
    """Conditional modes (BLUPs) of the random effects of tasks ``(R,)``, batched.

    For task ``t`` with fixed-effects design ``X_t (m, p)``, random-effects design ``Z_t (m, q)``,
    labels ``y_t``, fixed effects ``fixed (p,)``, random-effects covariance ``cov_re (q, q)`` and
    residual variance ``scale``::

        b_t = Psi Z_t^T (Z_t Psi Z_t^T + sigma^2 I)^{-1} (y_t - X_t beta)
            = (Psi Z_t^T Z_t + sigma^2 I)^{-1} Psi Z_t^T (y_t - X_t beta)

    (the second form, a ``q x q`` solve, is used; it holds for a singular ``Psi`` too). Padded rows
    must be zero in ``X``, ``Z`` and ``y``: they then add nothing.
    """
    residual = y - matvec(X, fixed)
    ZtZ = Z.transpose(-1, -2) @ Z
    Ztr = matvec(Z.transpose(-1, -2), residual)
    eye = torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device)
    return torch.linalg.solve(cov_re @ ZtZ + scale * eye, matvec(cov_re, Ztr))


@dataclass
class MixedEffects(Method):
    """Linear mixed model ``y_ti = x_ti^T (beta + b_t) + (beta_0 + b_t0) + e_ti`` with random effects
    ``b_t ~ N(0, Psi)`` (intercept and, with ``slopes``, every feature) and ``e_ti ~ N(0, sigma^2)``,
    fitted by (RE)ML on the pooled source tasks with statsmodels ``MixedLM`` (an optional dependency:
    ``pip install 'adaptrep[data]'``). A target is predicted with ``beta + b_t``, ``b_t`` the
    conditional mode given its support samples (:func:`blup`) -- with no samples it would be ``0``, the
    population model; with many, close to the target's own least squares. The model always has an
    intercept. Squared loss, linear model. ``optimizers`` are tried in turn until one converges to a finite
    likelihood without warnings (L-BFGS first: on ``hsb82`` it converges in a quarter of the time of
    statsmodels' default BFGS, which stops short there; it can fail on a single random intercept, where
    BFGS does not). ``info`` holds the residual variance and whether the optimiser converged.
    """

    slopes: bool = True
    reml: bool = True
    optimizers: tuple[str, ...] = ("lbfgs", "bfgs", "powell")
    model: Any = field(default=None, kw_only=True)
    intercept: bool | None = field(default=None, kw_only=True)
    standardize: bool | None = field(default=None, kw_only=True)

    def _fit(self, source: Tasks) -> None:
        _linear_only(self)
        try:
            from statsmodels.regression.mixed_linear_model import MixedLM
            from statsmodels.tools.sm_exceptions import ConvergenceWarning
        except ImportError:
            raise ValueError("mixed-effects needs statsmodels: pip install 'adaptrep[data]'") from None
        valid = (source.mask if source.mask is not None else torch.ones_like(source.y, dtype=torch.bool)).cpu().numpy()
        exog = _with_constant(source).cpu().numpy()[valid]
        endog = source.y.cpu().numpy()[valid]
        groups = np.broadcast_to(np.arange(source.num_tasks)[:, None], valid.shape)[valid]
        exog_re = exog if self.slopes else exog[:, :1]
        model = MixedLM(endog, exog, groups, exog_re=exog_re)
        result, converged = None, False
        for optimizer in self.optimizers:  # the first whose fit converged to a finite likelihood
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = model.fit(reml=self.reml, method=optimizer)
            converged = bool(result.converged) and math.isfinite(result.llf) and not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            if converged:
                break
        assert result is not None
        dtype, device = source.X.dtype, source.X.device
        self.fixed = torch.as_tensor(np.asarray(result.fe_params), dtype=dtype, device=device)
        self.cov_re = torch.as_tensor(np.asarray(result.cov_re), dtype=dtype, device=device)
        self.scale = float(result.scale)
        self.result = result
        self.info = {
            "mixed_converged": converged,
            "mixed_scale": self.scale,
            "mixed_loglike": float(result.llf),
            "noise_estimate": self.scale**0.5,
        }

    def random_effects(self, tasks: Tasks) -> Tensor:
        """The conditional modes ``b_t`` ``(R, q)`` of tasks (inputs as the method sees them, i.e. scaled)."""
        X = _with_constant(tasks)
        Z = X if self.slopes else X[..., :1]
        y = tasks.y * tasks.weight
        return blup(self.fixed.to(X), self.cov_re.to(X), self.scale, X, Z, y)

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        b = self.random_effects(target)
        coef = self.fixed.to(b).expand(target.num_tasks, -1).clone()
        coef[:, : b.shape[-1]] += b
        return Adapted(coef[:, 1:], bias=coef[:, 0], loss="squared")
