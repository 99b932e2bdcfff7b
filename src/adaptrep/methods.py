"""Methods: fit on source tasks, adapt to target tasks, return predictors.

Every method has the same two-step interface (scikit-learn style)::

    method = AdaptRep().fit(source)          # source: Tasks (T tasks, n samples each)
    beta_hat = method.adapt(target)          # target: Tasks (R tasks, m samples each) -> (R, d)

and exposes ``representation`` (the learned ``B``, orthonormal ``(d, k)``, or ``None``) and
``info`` (source-training diagnostics). Names used by the CLI are in :data:`METHODS`; the
meta-learning baselines (MAML, FOMAML, ANIL, Reptile and pooled training, :class:`MetaLearner`)
are in :data:`META_METHODS`.
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
from .meta import ALGORITHMS, MetaConfig, inner_adapt, meta_train
from .models import (
    CURVATURE,
    MLP_WIDTHS,
    Model,
    Params,
    cv_heads,
    describe,
    finetune,
    fit_heads,
    fit_shared,
    init_mlp,
    linear_model,
    logistic_finetune,
    model_for,
    task_parameters,
)
from .solvers import Gram, SourceFit, estimate_noise, fit_source, moment_inits, spd_solve, sufficient_statistics, task_statistics

__all__ = [
    "synchronize",
    "Method",
    "AdaptRep",
    "FrozenRep",
    "TargetOnly",
    "Oracle",
    "MetaLearner",
    "META_METHODS",
    "MODEL_METHODS",
    "meta_defaults",
    "METHODS",
    "make_method",
    "theory_penalty",
]


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

    def _estimate_noise(self, stats: tuple[Tensor | Gram, Tensor, Tensor], source: Tasks, rank: int) -> float:
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
        _needs_representation(type(self).__name__, source)
        assert source.representation is not None
        rank = self.rank if self.rank is not None else source.representation.shape[1]
        if not 1 <= rank <= source.dim:
            raise ValueError(f"rank must be between 1 and the input dimension {source.dim}; got {rank}")
        if _generic(source):
            return self._fit_generic(source, rank)
        start = time.perf_counter()
        G, c, q = task_statistics(source.X, source.y)  # the samples themselves when n < d
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
        _needs_representation(type(self).__name__, source)
        assert source.representation is not None
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
    cross-validation (:func:`adaptrep.models.cv_heads`) unless ``ridge > 0`` is given. For the
    ``mlp`` tasks of ``sinusoid``: the meta-learners' inner loop (``inner_steps`` gradient steps of
    size ``inner_lr`` on all parameters) from a fresh :func:`~adaptrep.models.init_mlp` network drawn
    from ``seed``.
    """

    ridge: float = 0.0
    inner_steps: int = 5
    inner_lr: float = 0.01
    seed: int = 0

    def adapt(self, target: Tasks, generator: torch.Generator | None = None) -> Tensor:
        if target.model == "mlp":
            # the meta-learners' inner loop, from a fresh network instead of a meta-learned one
            g = torch.Generator().manual_seed(self.seed)
            theta, w = init_mlp(MLP_WIDTHS, g, target.X.dtype, target.X.device)
            theta_t, w_t = inner_adapt(model_for(target.loss, target.model)[0], theta, w, target.X, target.y, steps=self.inner_steps, lr=self.inner_lr)  # type: ignore[arg-type]
            return task_parameters("mlp", theta_t, w_t)
        assert target.representation is not None
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


def _needs_representation(name: str, tasks: Tasks) -> None:
    if tasks.model == "mlp" or tasks.representation is None:
        raise ValueError(f"{name} needs a moment start and a true representation, which {tasks.model!r} tasks do not have; use a meta-learner or target-only")


#: Methods that need a true representation ``B*`` or a moment start (not for ``mlp`` tasks).
MODEL_METHODS = ("adaptrep", "frozenrep", "frozenrep-ft", "oracle-head", "oracle-ft")

#: Step of the inner loop relative to the curvature: ``inner_lr = INNER_STEP / (c v)`` (see :func:`meta_defaults`).
INNER_STEP = 0.1


def meta_defaults(loss: str, kind: str, input_variance: float = 1.0) -> dict[str, Any]:
    """Default :class:`~adaptrep.meta.MetaConfig` values of a kind of task (keys as its fields).

    ``mlp`` (sinusoid): the MAML paper's inner step 0.01, Adam at 0.001 and meta-batch 25, with 5 inner
    steps (the paper trains with 1 and evaluates with up to 10) and :data:`MLP_ITERATIONS` outer steps
    (far fewer than the paper's 70,000, to run in minutes).

    ``linear`` and ``relu``: 5 inner steps of ``inner_lr = INNER_STEP / (c v)`` with ``INNER_STEP = 0.1``,
    ``c`` the loss's curvature bound (2 squared, 1/4 logistic: :data:`adaptrep.models.CURVATURE`) and
    ``v`` the largest input variance ``max_j Sigma_jj``; e.g. 0.05 for the squared loss with
    ``x ~ N(0, I)``, 0.4 for the logistic loss. The rule: in the product ``x^T B w`` the inner loop's
    Hessian has the head block ``c B^T G_t B`` and the representation block ``c ||w||^2 G_t`` for the
    task's sample Gram matrix ``G_t``, whose largest eigenvalue is up to ``(1 + sqrt(d/n))^2 v`` (about
    ``4 v`` for ``n`` close to ``d``), and the adapted heads reach ``||w_t||^2 ~ k`` (3-4 here); a step is
    stable while ``lr c (1 + ||w||^2) lambda_max(G_t) < 2``, which ``0.1 / (c v)`` keeps with a margin
    (measured: 0.2 diverges on ``linear`` with ``d = 20``, ``n = 25``; 0.05 and 0.1 do not). The outer step
    is Adam at 0.01 (the representation's entries are ``O(1/sqrt(d))``; 0.001 needs ten times the
    iterations) for 1000 iterations of meta-batch 25.
    """
    if kind == "mlp":
        return dict(inner_steps=5, inner_lr=0.01, outer_lr=0.001, meta_batch=25, iterations=MLP_ITERATIONS)
    return dict(inner_steps=5, inner_lr=INNER_STEP / (CURVATURE[loss] * input_variance), outer_lr=0.01, meta_batch=25, iterations=1000)


#: Outer iterations of the meta-learners on ``sinusoid`` by default.
MLP_ITERATIONS = 1500


@dataclass
class MetaLearner(Method):
    """Meta-learning baselines through :func:`adaptrep.meta.meta_train`: MAML, first-order MAML,
    ANIL, Reptile, or pooled training (``algorithm``), on the generic model of the tasks
    (:func:`adaptrep.models.model_for`: ``B`` for ``linear``, ``W`` for ``relu``, the 1-40-40-1
    network for ``mlp``).

    Settings left ``None`` take :func:`meta_defaults` for the source tasks' loss and model (``v``
    estimated as the largest per-coordinate mean of ``x^2`` over the source inputs); ``meta_batch`` is
    capped at the number of source tasks ``T``; ``adapt_steps`` (default ``inner_steps``) is the number
    of steps of the target adaptation.

    Initialisation (all draws from ``torch.Generator().manual_seed(seed)`` on the CPU, then moved, so
    the same seed gives the same numbers everywhere): ``linear``: ``B_0`` the Q factor of a standard
    normal ``(d, k)`` matrix (orthonormal columns) and ``w_0 = 0``; ``relu``: ``W_0`` a standard normal
    ``(d, k)`` matrix with unit columns and ``w_0 = 0``; ``mlp``: :func:`~adaptrep.models.init_mlp`.
    With ``w_0 = 0`` the first inner step gives ``B`` no gradient (``grad_B L = X^T r w^T / n``), but the
    head's first step makes ``w_1 = -alpha grad_w L`` depend on ``B``, so the later inner steps and the
    second-order meta-gradient move ``B`` (first-order methods and Reptile through ``w_K != 0``).
    ``k`` is ``rank`` or the true representation's rank.

    Target adaptation: the inner loop (:func:`~adaptrep.meta.inner_adapt`, ``adapt_steps`` steps of
    ``inner_lr`` on the target's ``m`` samples, the head only for ``anil``) from the learned
    ``(theta, w)``; ``pooled``, trained on all source data pooled, adapts with the same loop (all
    parameters). ``representation`` is the learned ``B`` (``W``) with columns orthonormalised (QR)
    for the subspace diagnostics, ``None`` for ``mlp``.
    """

    algorithm: str = "maml"
    inner_steps: int | None = None
    inner_lr: float | None = None
    outer_lr: float | None = None
    optimizer: str = "adam"
    meta_batch: int | None = None
    iterations: int | None = None
    support: float | None = None
    compile: str = "auto"
    chunk: int | None = None
    adapt_steps: int | None = None
    rank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown meta-learning algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.adapt_steps is not None and self.adapt_steps < 0:
            raise ValueError(f"adapt_steps must be >= 0; got {self.adapt_steps}")
        self.info = {}

    def resolve(self, source: Tasks) -> MetaConfig:
        """The :class:`MetaConfig` for these source tasks (``None`` settings from :func:`meta_defaults`)."""
        # the input variance only sets the default inner step of the linear and relu models
        needs_variance = self.inner_lr is None and source.model != "mlp"
        variance = float((source.X * source.X).mean((0, 1)).max()) if needs_variance else 1.0
        defaults = meta_defaults(source.loss, source.model, variance)
        chosen = dict(inner_steps=self.inner_steps, inner_lr=self.inner_lr, outer_lr=self.outer_lr, meta_batch=self.meta_batch, iterations=self.iterations)
        values: dict[str, Any] = {key: defaults[key] if value is None else value for key, value in chosen.items()}
        values["meta_batch"] = min(values["meta_batch"], source.num_tasks)
        return MetaConfig(self.algorithm, optimizer=self.optimizer, support=self.support, compile=self.compile, chunk=self.chunk, **values)

    def _init(self, source: Tasks, model_kind: str) -> tuple[Params, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        dtype, device = source.X.dtype, source.X.device
        if model_kind == "mlp":
            return init_mlp(MLP_WIDTHS, g, dtype, device)
        if model_kind not in ("linear", "relu"):
            raise ValueError(f"unknown model kind {model_kind!r}")
        assert source.representation is not None or self.rank is not None, "rank is needed without a true representation"
        k = self.rank if self.rank is not None else source.representation.shape[1]  # type: ignore[union-attr]
        if not 1 <= k <= source.dim:
            raise ValueError(f"rank must be between 1 and the input dimension {source.dim}; got {k}")
        Z = torch.randn(source.dim, k, generator=g, dtype=torch.float64)
        start = torch.linalg.qr(Z)[0] if model_kind == "linear" else Z / Z.norm(dim=0, keepdim=True)
        key = "B" if model_kind == "linear" else "W"
        return {key: start.to(device, dtype)}, torch.zeros(k, dtype=dtype, device=device)

    def fit(self, source: Tasks) -> Method:
        start = time.perf_counter()
        self.config = self.resolve(source)
        self.model, key = model_for(source.loss, source.model)  # type: ignore[arg-type]
        self.kind, self.key = source.model, key
        theta0, w0 = self._init(source, source.model)
        g = torch.Generator().manual_seed(self.seed + 1)
        fit = meta_train(self.model, theta0, w0, source.X, source.y, self.config, g)
        self.theta, self.w = fit.theta, fit.w
        self.representation = torch.linalg.qr(fit.theta[key])[0] if key else None
        synchronize(fit.w.device)
        tail = max(1, min(50, fit.losses.numel()))
        last = float(fit.losses[-tail:].mean()) if fit.losses.numel() else math.nan
        self.info = {
            "source_time": time.perf_counter() - start,
            "source_objective": last,
            "meta_loss_first": float(fit.losses[:tail].mean()) if fit.losses.numel() else math.nan,
            "meta_loss_last": last,
            "meta_iterations": self.config.iterations,
            "inner_lr": self.config.inner_lr,
            "outer_lr": self.config.outer_lr,
            "compiled": fit.compiled,
            "compile_seconds": fit.compile_seconds,
            "meta_seconds": fit.seconds,
        }
        return self

    def adapt(self, target: Tasks, generator: torch.Generator | None = None) -> Tensor:
        if not hasattr(self, "theta"):
            raise RuntimeError(f"{type(self).__name__}.adapt called before fit")
        steps = self.config.inner_steps if self.adapt_steps is None else self.adapt_steps
        theta = {name: value.to(target.X) for name, value in self.theta.items()}
        theta_t, w_t = inner_adapt(
            self.model, theta, self.w.to(target.X), target.X, target.y, steps=steps, lr=self.config.inner_lr, head_only=self.algorithm == "anil"
        )
        if self.kind == "mlp":
            return task_parameters("mlp", theta_t, w_t)
        return task_parameters(self.kind, theta_t[self.key], w_t)


#: The meta-learners by CLI name.
META_METHODS = ALGORITHMS


METHODS: dict[str, Any] = {
    "adaptrep": AdaptRep,
    "frozenrep": FrozenRep,
    "frozenrep-ft": lambda: FrozenRep(finetune=FineTune()),
    "target-only": TargetOnly,
    "oracle-head": Oracle,
    "oracle-ft": lambda: Oracle(finetune=FineTune()),
    **{name: (lambda name=name: MetaLearner(algorithm=name)) for name in ALGORITHMS},
}

#: The keyword options :func:`make_method` passes on: to the meta-learners, and the inner loop to target-only.
META_OPTIONS = ("inner_steps", "inner_lr", "outer_lr", "optimizer", "meta_batch", "iterations", "support", "compile", "chunk", "adapt_steps", "seed")


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """A method by its CLI name (see :data:`METHODS`), with its default settings or, for the
    meta-learners, the :data:`META_OPTIONS` in ``options`` (``None`` values keep the defaults);
    ``target-only`` takes ``inner_lr``, ``adapt_steps`` (else ``inner_steps``) and ``seed`` for its
    inner loop on ``mlp`` tasks. Other options are ignored."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    given = {key: value for key, value in (options or {}).items() if key in META_OPTIONS and value is not None}
    if name in META_METHODS:
        return MetaLearner(algorithm=name, **given)
    if name == "target-only":
        steps = given.get("adapt_steps", given.get("inner_steps"))
        loop = {"inner_lr": given.get("inner_lr"), "inner_steps": steps, "seed": given.get("seed")}
        return TargetOnly(**{key: value for key, value in loop.items() if value is not None})
    method: Method = METHODS[name]()
    return method
