"""Methods: fit on source tasks, adapt to target tasks, return predictors.

Every method has the same two-step interface (scikit-learn style)::

    method = AdaptRep().fit(source)          # source: Tasks (T tasks, n samples each)
    beta_hat = method.adapt(target)          # target: Tasks (R tasks, m samples each) -> (R, d)

and exposes ``representation`` (the learned ``B``, orthonormal ``(d, k)``, or ``None``) and
``info`` (source-training diagnostics). Names used by the CLI are in :data:`METHODS`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .environments import Tasks
from .finetune import FineTune, fit_head
from .models import Model, cv_heads, describe, finetune, fit_heads, fit_shared, linear_model, logistic_finetune, model_for, task_parameters
from .solvers import SourceFit, estimate_noise, fit_source, moment_inits, spd_solve, sufficient_statistics

__all__ = ["synchronize", "Method", "AdaptRep", "FrozenRep", "TargetOnly", "Oracle", "METHODS", "make_method", "theory_penalty"]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (CUDA) so that wall times include them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Method(ABC):
    """Common interface: :meth:`fit` on source tasks, then :meth:`adapt` to targets."""

    representation: Tensor | None = None
    noise_estimate: float | None = None
    noise_dof: int = 0
    #: fine-tuning strengths chosen for the last targets (``(R,)``), ``None`` without fine-tuning
    last_strength: Tensor | None = None
    info: dict[str, Any]

    def fit(self, source: Tasks) -> Method:  # noqa: D102 - documented in subclasses
        self.info = {}
        return self

    @abstractmethod
    def adapt(self, target: Tasks, generator: torch.Generator | None = None) -> Tensor:
        """Predictors ``beta_hat`` (``(R, d)``) for the target tasks."""


def theory_penalty(noise: float, dim: int, rank: int, num_tasks: int, num_samples: int) -> float:
    """The theory-shaped source penalty ``mu = sigma (sqrt(k d / (n T)) + sqrt(k / n))``.

    These are the weights the paper's authors used with the mean squared error.
    """
    return noise * (math.sqrt(rank * dim / (num_samples * num_tasks)) + math.sqrt(rank / num_samples))


@dataclass
class _AdaptsRepresentation(Method):
    """Adaptation of a representation ``B`` to targets: head only, or fine-tuning.

    ``finetune=None`` retrains the head only; a :class:`FineTune` fine-tunes representation and
    head, and its chosen strengths for the last targets are kept in ``last_strength`` (``(R,)``).
    """

    finetune: FineTune | None = None

    def adapt(self, target: Tasks, generator: torch.Generator | None = None) -> Tensor:
        if self.representation is None:
            raise RuntimeError(f"{type(self).__name__}.adapt called before fit")
        B = self.representation.to(target.X)
        if _generic(target):
            return self._adapt_generic(B, target, generator)
        if self.finetune is None:
            G, c, _ = target.gram()
            return fit_head(B, G, c)
        beta, self.last_strength = self.finetune.adapt(B, target.X, target.y, generator, noise=self.noise_estimate, noise_dof=self.noise_dof)
        return beta

    def _adapt_generic(self, B: Tensor, target: Tasks, generator: torch.Generator | None) -> Tensor:
        """Other losses and models (:mod:`adaptrep.models`): heads with a cross-validated ridge,
        then fine-tuning: penalised for logistic tasks on a linear representation, else gradient
        descent with a cross-validated number of steps."""
        if self.finetune is None:
            return task_parameters(target.model, B, _heads(B, target, generator)[2])
        beta, self.last_strength = _finetune_generic(B, target, generator)
        return beta

    def _estimate_noise(self, stats: tuple[Tensor, Tensor, Tensor], source: Tasks, rank: int) -> float:
        self.noise_estimate, self.noise_dof = estimate_noise(*stats, source.num_samples, rank)
        return self.noise_estimate


@dataclass
class _RepresentationMethod(_AdaptsRepresentation):
    """Shared machinery of the methods that learn ``B`` on the source tasks (``fit_source``)."""

    rank: int | None = None
    max_iter: int = 2000
    inner_steps: int = 10
    gtol: float = 1e-6

    def _penalty(self, source: Tasks, rank: int, noise: float) -> tuple[float, float | None]:
        raise NotImplementedError

    def _generic_penalty(self, source: Tasks, rank: int) -> tuple[float | None, float]:
        """``(lam, gamma)`` of the generic objective (``lam=None``: no perturbations)."""
        raise NotImplementedError

    def fit(self, source: Tasks) -> Method:
        rank = self.rank if self.rank is not None else source.representation.shape[1]
        if not 1 <= rank <= source.dim:
            raise ValueError(f"rank must be between 1 and the input dimension {source.dim}; got {rank}")
        if _generic(source):
            return self._fit_generic(source, rank)
        start = time.perf_counter()
        G, c, q = source.gram()
        penalty, radius = self._penalty(source, rank, self._estimate_noise((G, c, q), source, rank))
        fit: SourceFit = fit_source(G, c, q, rank, penalty=penalty, radius=radius, max_iter=self.max_iter, inner_steps=self.inner_steps, gtol=self.gtol)
        self.source_fit = fit
        self.representation = fit.B
        synchronize(fit.B.device)
        self.info = {
            "source_time": time.perf_counter() - start,
            "source_objective": fit.objective,
            "source_grad_norm": fit.grad_norm,
            "source_iterations": fit.iterations,
            "source_converged": fit.converged,
            "source_stop_reason": fit.stop_reason,
            "source_penalty": penalty,
            "noise_estimate": self.noise_estimate,
        }
        return self

    def _fit_generic(self, source: Tasks, rank: int) -> Method:
        """Other losses and models: the generic objective of :mod:`adaptrep.models`, from each of
        the four moment starts of the centred labels (``E[(y - 1/2) x]`` is a multiple of
        ``Sigma beta_t`` for logistic tasks, and ``E[y x] = Sigma W_t w_t / (2 sqrt(k))`` for ReLU
        networks; whitened or not, normalised per task or not), keeping the lowest objective."""
        start = time.perf_counter()
        model, key = model_for(source.loss, source.model)  # type: ignore[arg-type]
        G, c, _ = sufficient_statistics(source.X, source.y - (0.5 if source.loss == "logistic" else 0.0))
        lam, gamma = self._generic_penalty(source, rank)
        fits = [fit_shared(model, {key: start}, source.X, source.y, lam=lam, gamma=gamma) for start in moment_inits(G, c, rank)]
        fit = min(fits, key=lambda candidate: candidate.objective)
        self.representation = fit.theta[key]
        synchronize(self.representation.device)
        self.info = {"source_time": time.perf_counter() - start, **describe(fit), "source_penalty": lam if lam is not None else math.inf}
        return self


@dataclass
class AdaptRep(_RepresentationMethod):
    """ADAPTREP: learn ``B`` jointly with per-task perturbations, then fine-tune on the target.

    Source objective (regularised form), with ``v_t = Delta_t w_t``::

        min_B mean_t min_{w_t, v_t} (1/n) ||y_t - X_t (B w_t + v_t)||^2 + mu ||v_t||_2

    ``mu`` is ``penalty``; or ``2 sqrt(lam * gamma)`` when the paper's ``lam``, ``gamma`` are given
    (its objective uses ``1/(2n) ||r||^2``, half our mean squared error, and its stated equivalent
    penalty ``sqrt(lam gamma) ||Delta_t w_t||``);
    or by default the theory-shaped :func:`theory_penalty` with the noise level estimated from
    the source data. ``radius`` switches to the constrained form ``||v_t|| <= radius``.
    Target adaptation: :class:`FineTune` (cross-validated strength) by default.
    """

    finetune: FineTune | None = field(default_factory=FineTune)
    penalty: float | None = None
    lam: float | None = None
    gamma: float | None = None
    radius: float | None = None
    noise: float | None = None

    def _penalty(self, source: Tasks, rank: int, noise: float) -> tuple[float, float | None]:
        if self.radius is not None:
            if not self.radius >= 0:
                raise ValueError(f"radius must be non-negative; got {self.radius}")
            return math.inf, float(self.radius)
        if self.penalty is not None:
            mu = float(self.penalty)
        elif self.lam is not None and self.gamma is not None:
            mu = 2 * math.sqrt(self.lam * self.gamma)
        else:
            sigma = self.noise if self.noise is not None else noise
            mu = theory_penalty(sigma, source.dim, rank, source.num_tasks, source.num_samples)
        if not mu >= 0:
            raise ValueError(f"the ADAPTREP penalty must be non-negative; got {mu}")
        return mu, None

    def _generic_penalty(self, source: Tasks, rank: int) -> tuple[float | None, float]:
        """The paper's ``lam, gamma`` if given; else ``lam = penalty``, by default
        ``2 sigma (sqrt(k d / (n T)) + sqrt(d k / n))``: the theory weights with the ``d k``
        parameters of a perturbation ``Delta_t`` in place of the ``k`` of a head, at the noise level
        ``sigma`` (1/2 for Bernoulli labels, the source estimate otherwise); and a weak
        ``gamma = 1e-4`` on the heads. (With ``theta`` kept in its normal form the heads cannot trade
        scale with ``Delta``, so the folded equivalence ``mu = 2 sqrt(lam gamma)`` does not apply;
        ``lam`` is the perturbations' ridge.)"""
        if self.radius is not None:
            raise ValueError("the constrained form (radius) is implemented for the squared loss only; use penalty, or lam and gamma")
        if self.lam is not None and self.gamma is not None:
            return float(self.lam), float(self.gamma)
        if self.penalty is not None:
            return float(self.penalty), 1e-4
        d, n, T = source.dim, source.num_samples, source.num_tasks
        sigma = 0.5 if source.loss == "logistic" else estimate_noise(*source.gram(), n, rank)[0]
        return 2 * sigma * (math.sqrt(rank * d / (n * T)) + math.sqrt(d * rank / n)), 1e-4


@dataclass
class FrozenRep(_RepresentationMethod):
    """FROZENREP: one representation shared exactly by all source tasks.

    ``min_B mean_t min_{w_t} (1/n) ||y_t - X_t B w_t||^2``; the target retrains the head only
    (``finetune=None``) or, as ``frozenrep-ft``, is fine-tuned like ADAPTREP.
    """

    def _penalty(self, source: Tasks, rank: int, noise: float) -> tuple[float, float | None]:
        return math.inf, None

    def _generic_penalty(self, source: Tasks, rank: int) -> tuple[float | None, float]:
        return None, 1e-4


@dataclass
class Oracle(_AdaptsRepresentation):
    """Reference: the environment's true representation ``B*``, head-only refit or fine-tuned."""

    def fit(self, source: Tasks) -> Method:
        self.representation = source.representation
        if not _generic(source):
            self._estimate_noise(source.gram(), source, self.representation.shape[1])
        self.info = {"noise_estimate": self.noise_estimate}
        return self


@dataclass
class TargetOnly(Method):
    """Least squares on the target alone: minimum-norm when ``m <= d``, or ridge with ``ridge > 0``.

    Ridge minimises ``(1/m) ||y - X beta||^2 + ridge ||beta||^2``. For logistic tasks: logistic
    regression with the penalty ``ridge ||beta||^2``, its strength chosen by 5-fold
    cross-validation (:func:`adaptrep.models.cv_heads`) unless ``ridge > 0`` is given.
    """

    ridge: float = 0.0

    def adapt(self, target: Tasks, generator: torch.Generator | None = None) -> Tensor:
        if target.model == "relu":
            # the same network and fine-tuning, from a random first layer instead of a learned one
            W = torch.randn(target.dim, target.representation.shape[1], generator=generator, dtype=torch.float64).to(target.X)
            beta, self.last_strength = _finetune_generic(W / W.norm(dim=0, keepdim=True), target, generator)
            return beta
        if target.loss != "squared":
            model, identity = linear_model(target.loss), {"B": torch.eye(target.dim, dtype=target.X.dtype, device=target.X.device)}  # type: ignore[arg-type]
            if self.ridge > 0:
                return fit_heads(model, identity, target.X, target.y, ridge=self.ridge)
            return cv_heads(model, identity, target.X, target.y, generator)[0]
        if self.ridge > 0:
            G, c, _ = target.gram()
            eye = torch.eye(target.dim, dtype=G.dtype, device=G.device)
            return spd_solve(G + self.ridge * eye, c)
        return (torch.linalg.pinv(target.X) @ target.y.unsqueeze(-1)).squeeze(-1)


def _generic(tasks: Tasks) -> bool:
    """Whether tasks need the generic path of :mod:`adaptrep.models` (not linear least squares)."""
    return tasks.loss != "squared" or tasks.model != "linear"


def _heads(theta: Tensor, target: Tasks, generator: torch.Generator | None) -> tuple[Model, str, Tensor, Tensor]:
    """The targets' model, its parameter name, and heads on the features of ``theta`` with a
    cross-validated ridge (``(R, k)``), with the chosen ridges (``(R,)``)."""
    model, key = model_for(target.loss, target.model)  # type: ignore[arg-type]
    w, ridge = cv_heads(model, {key: theta}, target.X, target.y, generator)
    return model, key, w, ridge


def _finetune_generic(theta: Tensor, target: Tasks, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Fine-tuned predictors from ``theta`` and the chosen strengths (penalty or steps)."""
    model, key, _, ridge = _heads(theta, target, generator)
    if target.model == "linear":
        return logistic_finetune(theta, target.X, target.y, ridge, generator)
    delta, w, steps = finetune(model, {key: theta}, target.X, target.y, generator, ridge=ridge)
    return task_parameters(target.model, theta + delta[key], w), steps.to(target.X.dtype)


METHODS: dict[str, Any] = {
    "adaptrep": AdaptRep,
    "frozenrep": FrozenRep,
    "frozenrep-ft": lambda: FrozenRep(finetune=FineTune()),
    "target-only": TargetOnly,
    "oracle-head": Oracle,
    "oracle-ft": lambda: Oracle(finetune=FineTune()),
}


def make_method(name: str) -> Method:
    """A method with its default settings, by its CLI name (see :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    method: Method = METHODS[name]()
    return method
