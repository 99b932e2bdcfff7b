"""Methods: fit on source tasks, adapt to target tasks, return predictors.

Every method has the same two-step interface (scikit-learn style), hyperparameters in ``__init__``::

    method = AdaptRep(rank=3).fit(source)    # source: Tasks (T tasks, ragged or not)
    adapted = method.adapt(target)           # target: Tasks (R tasks) -> Adapted
    adapted.predict(X_new)                   # (R, m') predictions; adapted.beta: (R, d) for linear predictors

and exposes ``representation`` (the learned ``B``, orthonormal ``(d, k)``, or ``None``) and ``info``
(source-training diagnostics). Options every method shares (keyword-only): ``model`` (``"linear"``,
``"relu"``, ``"mlp"`` or your own ``torch.nn.Module`` as the representation ``phi_theta``; default: the
tasks' own kind), ``intercept`` (a free per-task intercept) and ``standardize`` (features scaled by
the source tasks' statistics) -- both default to on for data without ground truth and off for the
simulated environments, whose tasks have neither offsets nor scales.

Two computational paths sit behind the one interface: the exact linear solver
(:mod:`adaptrep.solvers`, :mod:`adaptrep.finetune`) for the squared loss with the linear model, and
the generic path (:mod:`adaptrep.models`, :mod:`adaptrep.meta`) for every other model and loss. The
path is chosen by the model and loss; an option that the chosen path does not support is an error
naming it. Names used by the CLI are in :data:`METHODS`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from .adapted import Adapted
from .adaptive import cv_penalty
from .bayes import head_prior, heads_population, log_likelihood, perturbation_variance, rank_candidates
from .compiling import check_compile_mode
from .data import DataError, Standardizer, Tasks
from .finetune import FineTune, fit_head
from .meta import ALGORITHMS, Algorithm, MetaConfig, Transform, get_algorithm, get_optimizer, inner_adapt, meta_train
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
)
from .options import MetaOptions
from .solvers import SourceFit, estimate_noise, fit_source, moment_inits, predictor, pseudo_inverse, spd_solve, sufficient_statistics, task_statistics

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


def with_intercept(model: Model) -> Model:
    """``model`` with a constant feature 1 appended: its head then carries a per-task intercept."""
    features = model.features
    return Model(lambda theta, X: torch.nn.functional.pad(features(theta, X), (0, 1), value=1.0), model.loss, model.retract, model.lipschitz, model.batched)


@dataclass
class Spec:
    """What a method resolved at ``fit`` from its options and the source tasks: the model and its
    parameter name, the kind of predictor, the module's own starting parameters (user modules), the
    intercept and the feature scaling."""

    model: Model
    key: str
    kind: str
    theta0: Params | None
    intercept: bool
    standardizer: Standardizer | None
    input_shape: tuple[int, ...]
    feature_names: tuple[str, ...] | None
    classes: int
    prior: bool = False

    @property
    def exact(self) -> bool:
        """Whether the exact linear least-squares path applies (squared loss, linear model)."""
        return self.model.loss == "squared" and self.kind == "linear"


class Method(ABC):
    """Common interface: :meth:`fit` on source tasks, then :meth:`adapt` to targets (module docstring)."""

    representation: Tensor | None = None
    noise_estimate: float | None = None
    noise_dof: int = 0
    #: fine-tuning strengths chosen for the last targets (``(R,)``), ``None`` without fine-tuning
    last_strength: Tensor | None = None
    #: each source task's own predictor after :meth:`fit` (``(T, d)``; ``B w_t + v_t`` for ADAPTREP), ``None`` if the method has none
    source_predictors: Tensor | None = None
    info: dict[str, Any]
    spec: Spec
    #: options shared by every method (keyword-only dataclass fields of the subclasses)
    model: Any = None
    intercept: bool | None = None
    standardize: bool | None = None
    prior: bool | None = None
    #: the heads' prior learned from the source tasks: mean ``(k',)`` and covariance ``(k', k')``
    head_prior: tuple[Tensor, Tensor] | None = None
    #: the perturbations' variance ``tau^2`` per coordinate learned from the source tasks (with the head prior or
    #: ``FineTune(strength="source")``); ``None`` when not learned or when no source task has more samples than the head's size
    perturbation_variance: float | None = None
    #: held-out marginal log-likelihood of the source tasks per rank, when the rank was chosen from the data
    rank_scores: dict[int, float] | None = None
    #: whether the method uses the exact linear path where it applies (squared loss, linear model)
    exact_path: bool = True

    def fit(self, source: Tasks) -> Method:
        """Fit on the source tasks (their inputs and labels; ground truth only where a method says)."""
        start = time.perf_counter()
        self.spec = self._resolve(source)
        self.info = {}
        self._fit(self._prepare(source))
        self.info.setdefault("source_time", time.perf_counter() - start)
        return self

    def adapt(self, target: Tasks, generator: torch.Generator | None = None) -> Adapted:
        """Adapted predictors for the target tasks, from each target's own samples."""
        if not hasattr(self, "spec"):
            raise RuntimeError(f"{type(self).__name__}.adapt called before fit")
        if target.input_shape != self.spec.input_shape:
            raise DataError(f"target inputs of shape {target.input_shape} per sample; the method was fitted on {self.spec.input_shape}")
        if target.loss != self.spec.model.loss:
            raise DataError(f"target tasks have the {target.loss} loss; the method was fitted with {self.spec.model.loss}")
        adapted = self._adapt(self._prepare(target), generator)
        adapted.standardizer, adapted.classes = self.spec.standardizer, target.classes
        self.last_strength = adapted.strength
        return adapted

    def source_adapted(self, source: Tasks) -> Adapted | None:
        """The source tasks' own predictors (:attr:`source_predictors`) as :class:`Adapted` predictors,
        to predict and score new samples of those tasks; ``source`` is what the method was fitted on
        (its tasks' means give the intercepts). ``None`` for methods without per-source-task predictors
        (they have them for the squared loss with the linear model)."""
        if self.source_predictors is None:
            return None
        prepared = self._prepare(source)
        beta = self.source_predictors.to(prepared.X)
        _, _, mx, my = _centered(prepared, self.spec.intercept)
        adapted = _uncentered(beta, mx, my)
        adapted.standardizer = self.spec.standardizer
        return adapted

    @abstractmethod
    def _fit(self, source: Tasks) -> None: ...

    @abstractmethod
    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted: ...

    # -- shared machinery ---------------------------------------------------------------------
    def _resolve(self, source: Tasks) -> Spec:
        simulated = source.beta is not None
        check_compile_mode(getattr(self, "compile", "auto"))
        intercept = (not simulated) if self.intercept is None else bool(self.intercept)
        standardize = (not simulated) if self.standardize is None else bool(self.standardize)
        theta0: Params | None = None
        classes = source.num_classes if source.loss == "multiclass" else 1
        count = classes if source.loss == "multiclass" else None
        if isinstance(self.model, torch.nn.Module):
            model, theta0 = Model.from_module(self.model, source.loss, count)  # type: ignore[arg-type]
            kind, key = "module", ""
        else:
            kind = self.model if self.model is not None else source.model
            if not isinstance(kind, str):
                raise ValueError(f"model must be 'linear', 'relu', 'mlp' or a torch.nn.Module; got {type(self.model).__name__}")
            model, key = model_for(source.loss, kind, count)  # type: ignore[arg-type]
        exact = kind == "linear" and source.loss == "squared" and self.exact_path
        if intercept and kind != "mlp" and not exact:
            model = with_intercept(model)  # the exact linear path profiles the intercept out instead
        scaler = Standardizer.fit(source) if standardize else None
        spec = Spec(model, key, kind, theta0, intercept, scaler, source.input_shape, source.feature_names, classes)
        wants = getattr(self, "prior", None)
        if wants and not isinstance(self, _RepresentationMethod):
            raise ValueError("prior (the source heads' distribution as the target heads' prior) applies to adaptrep and frozenrep (and frozenrep-ft)")
        # on by default for data without ground truth, except multiclass tasks: their classes are
        # relabelled per task, so the heads' population says nothing of a novel class (on digits the
        # prior of the base classes' heads cost 3-8 points of accuracy; docs/data.md)
        default = not simulated and source.loss != "multiclass"
        spec.prior = bool(default if wants is None else wants) and isinstance(self, _RepresentationMethod)
        return spec

    def _prepare(self, tasks: Tasks) -> Tasks:
        return tasks if self.spec.standardizer is None else self.spec.standardizer(tasks)

    def _rank(self, source: Tasks) -> int:
        rank = getattr(self, "rank", None)
        if rank is None:
            if source.representation is None and self.spec.prior and self.spec.exact and isinstance(self, _RepresentationMethod):
                return self._select_rank(source)
            if source.representation is None and self.spec.kind == "linear" and isinstance(self, MetaLearner):
                return source.dim  # meta-learners' linear model without a bottleneck
            if source.representation is None:
                raise ValueError(
                    f"{type(self).__name__} needs rank= (the representation's dimension k) for data without a true representation "
                    "(it is chosen from the data only with the prior: squared loss, linear model)"
                )
            rank = int(source.representation.shape[1])
        if not 1 <= rank <= source.dim:
            raise ValueError(f"rank must be between 1 and the input dimension {source.dim}; got {rank}")
        return int(rank)

    def _estimate_noise(self, stats: tuple[Any, Tensor, Tensor], source: Tasks, rank: int) -> float:
        counts = source.counts if source.ragged else source.num_samples
        self.noise_estimate, self.noise_dof = estimate_noise(*stats, counts, rank, lost=int(self.spec.intercept))
        return self.noise_estimate

    def _adapted(self, theta: Params, w: Tensor, stacked: bool, strength: Tensor | None = None) -> Adapted:
        spec = self.spec
        return Adapted(w, spec.model, theta, stacked, None, spec.model.loss, spec.kind, spec.key, strength=strength)


def _weight(tasks: Tasks) -> Tensor | None:
    """``weight=`` for the generic path's functions: the mask of ragged tasks (``None`` otherwise)."""
    return tasks.weight if tasks.ragged else None


def _centered(tasks: Tasks, intercept: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Inputs ``(T, n, d)`` and labels, centred by each task's means when ``intercept`` (padding
    stays zero), with the means (``None`` without intercept)."""
    X, y = tasks.flat(), tasks.y
    if not intercept:
        return X, y, None, None
    mx, my = tasks.means()
    weight = tasks.weight
    return (X - mx.unsqueeze(1)) * weight.unsqueeze(-1), (y - my.unsqueeze(1)) * weight, mx, my


def _uncentered(beta: Tensor, mx: Tensor | None, my: Tensor | None, strength: Tensor | None = None) -> Adapted:
    """Linear predictors fitted on data centred by :func:`_centered` (slopes ``beta``), with the
    intercepts ``my - <mx, beta>`` that centring profiled out (none without means)."""
    bias = None if mx is None or my is None else my - (mx * beta).sum(-1)
    return Adapted(beta, bias=bias, loss="squared", strength=strength)


#: How :class:`AdaptRep` chooses its source penalty when none is given: ``"cv"`` (from the data,
#: :func:`adaptrep.adaptive.cv_penalty`) or ``"theory"``. On ``linear`` (d = 30, k = 5, T = 50, n = 100,
#: sigma = 1, 10 seeds; benchmarks/delta_sweep.py) ``"cv"`` matches FROZENREP at delta = 0, where the
#: theory formula's source-task max error is 1.31x FROZENREP's, and is level with the formula at
#: delta = 1 (paired over 40 seeds, +0.001 +- 0.0013) and ahead of it at every other delta from 0.3 on.
DEFAULT_PENALTY = "cv"


def theory_penalty(noise: float, dim: int, rank: int, num_tasks: int, num_samples: float) -> float:
    """The theory-shaped source penalty ``mu = sigma (sqrt(k d / (n T)) + sqrt(k / n))``.

    These are the weights the paper's authors used with the mean squared error.
    """
    return noise * (math.sqrt(rank * dim / (num_samples * num_tasks)) + math.sqrt(rank / num_samples))


def _mean_count(tasks: Tasks) -> float:
    return float(tasks.counts.mean()) if tasks.ragged else float(tasks.num_samples)


@dataclass
class _AdaptsRepresentation(Method):
    """Adaptation of a representation ``B`` to targets: head only, or fine-tuning.

    ``finetune=None`` retrains the head only; a :class:`FineTune` fine-tunes representation and
    head, and its chosen strengths for the last targets are kept in ``last_strength`` (``(R,)``).
    """

    finetune: FineTune | None = None
    model: Any = field(default=None, kw_only=True)
    intercept: bool | None = field(default=None, kw_only=True)
    standardize: bool | None = field(default=None, kw_only=True)
    prior: bool | None = field(default=None, kw_only=True)
    #: ``torch.compile`` the generic path's source-training and fine-tuning steps (:mod:`adaptrep.compiling`;
    #: ``"auto"``: runs of at least ``adaptrep.models.COMPILE_MIN_STEPS`` steps, so the defaults stay eager)
    compile: str = field(default="auto", kw_only=True)

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        if self.representation is None and not getattr(self, "theta", None):
            raise RuntimeError(f"{type(self).__name__}.adapt called before fit")
        if not self.spec.exact:
            return self._adapt_generic(target, generator)
        assert self.representation is not None
        B = self.representation.to(target.X)
        finetune = self.finetune
        if finetune is not None and finetune.strength == "source" and self.head_prior is None and self.perturbation_variance is None:
            # no source task has more samples than the head's size, so they say nothing of tau^2: the target's own samples choose
            finetune = replace(finetune, strength="cv")
        if self.head_prior is not None or (finetune is not None and finetune.strength == "source"):
            return self._adapt_with_prior(B, target, generator)
        X, y, mx, my = _centered(target, self.spec.intercept)
        if finetune is None:
            G, c, _ = sufficient_statistics(X, y, target.counts if target.ragged else None)
            beta, strength = fit_head(B, G, c), None
        else:
            beta, strength = finetune.adapt(
                B, X, y, generator, noise=self.noise_estimate, noise_dof=self.noise_dof, mask=target.mask if target.ragged else None
            )
        return _uncentered(beta, mx, my, strength)

    def _adapt_with_prior(self, B: Tensor, target: Tasks, generator: torch.Generator | None) -> Adapted:
        """The exact path with the priors learned from the source tasks (empirical Bayes): the
        target's predictor ``beta' = B' h + (v, 0)`` on inputs ``[x, 1]`` (``B' = [B, 0; 0, 1]``, the
        intercept a constant feature shrunk like the rest of the head ``h``), with the heads' prior
        ``h ~ N(mu, S)`` (:func:`adaptrep.bayes.head_prior`) and, when fine-tuning, the perturbations' prior
        ``v ~ N(0, tau^2 I_d)`` (:func:`adaptrep.bayes.perturbation_variance`). The adapted predictor is the
        posterior mean for noise variance ``sigma^2``: head-only, ``ShrunkHeads`` (the heads' precision
        ``(sigma^2 / m) S^{-1}``); fine-tuned,

            beta' = m0 + C X'^T (X' C X'^T + sigma^2 I_m)^{-1} (y - X' m0),   m0 = B' mu,
            C = B' S B'^T + tau^2 diag(I_d, 0),

        which minimises ``(1/m) ||y - X' (B' h + v)||^2 + (sigma^2 / m) ((h - mu)^T S^{-1} (h - mu) + ||v||^2 / tau^2)``:
        fine-tuning representation and head with a ridge penalty whose strength the source tasks
        set, no cross-validation on the ``m`` target samples. ``last_strength`` is ``sigma^2 / (m tau^2)``.

        Without the heads' prior (``prior=False``, the simulated environments' default) the head is
        free (a flat prior, ``S^{-1} = 0``): ``h`` is the generalised least-squares head for the
        covariance ``K = tau^2 X X^T + sigma^2 I_m`` and ``v = tau^2 X^T K^{-1} (y - X B' h)``, which
        minimise ``(1/m) ||y - X' (B' h + v)||^2 + (sigma^2 / (m tau^2)) ||v||^2``: the paper's fine-tuning
        of representation and head, with the strength that the source tasks' perturbations set. With
        ``tau^2 = 0`` (tasks that share the representation) it is the head-only fit."""
        assert self.noise_estimate is not None
        X = target.flat()
        if self.spec.intercept:
            X = torch.nn.functional.pad(X, (0, 1), value=1.0) * target.weight.unsqueeze(-1)
            B = torch.block_diag(B, torch.ones(1, 1, dtype=B.dtype, device=B.device))
        counts, noise = target.counts, self._noise_level() ** 2
        if self.head_prior is None:
            return self._adapt_flat_head(B, X, target, noise)
        mu, S = (value.to(target.X) for value in self.head_prior)
        if self.finetune is None:
            P = (noise / counts)[:, None, None] * torch.linalg.inv(S)
            prior = (P, (P @ mu.unsqueeze(-1)).squeeze(-1).expand(target.num_tasks, -1))
            G, c, _ = sufficient_statistics(X, target.y, counts if target.ragged else None)
            beta, strength = fit_head(B, G, c, prior), None
        else:
            tau2 = float(self.perturbation_variance or 0.0)
            features = torch.ones(B.shape[0], dtype=B.dtype, device=B.device)
            if self.spec.intercept:
                features[-1] = 0.0
            C = B @ S @ B.T + tau2 * torch.diag(features)
            m0 = B @ mu
            K = X @ C @ X.transpose(-1, -2) + noise * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
            residual = target.y - X @ m0  # zero on padding (its rows of X and y are zero)
            beta = m0 + ((C @ X.transpose(-1, -2)) @ torch.linalg.solve(K, residual.unsqueeze(-1))).squeeze(-1)
            strength = noise / (counts * tau2) if tau2 > 0 else torch.full_like(counts, math.inf)
        bias = beta[:, -1] if self.spec.intercept else None
        return Adapted(beta[:, : target.dim], bias=bias, loss="squared", strength=strength)

    def _adapt_flat_head(self, B: Tensor, X: Tensor, target: Tasks, noise: float) -> Adapted:
        """:meth:`_adapt_with_prior` with a free head: ``X`` ``(R, m, d')`` and ``B`` ``(d', k')`` with
        the intercept's column already appended (its perturbation is not penalised: it has none)."""
        tau2 = float(self.perturbation_variance or 0.0)
        d = target.dim
        eye = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
        Xd = X[..., :d]
        K = tau2 * Xd @ Xd.transpose(-1, -2)
        # sigma^2 on the diagonal (padded rows: only that), floored at the dtype's resolution of K: with (near-)noiseless
        # data and more samples than features K is otherwise singular to working precision (float32) and Cholesky fails
        floor = torch.finfo(X.dtype).eps * X.shape[1] * K.diagonal(dim1=-2, dim2=-1).amax(-1)
        L = torch.linalg.cholesky(K + floor.clamp_min(noise)[:, None, None] * eye)
        Z = torch.linalg.solve_triangular(L, X @ B, upper=False)  # whitened head design
        yw = torch.linalg.solve_triangular(L, target.y.unsqueeze(-1), upper=False)
        Zt = Z.transpose(-1, -2)
        h = pseudo_inverse(Zt @ Z) @ (Zt @ yw)  # minimum-norm when m < k'
        beta = (B @ h).squeeze(-1)
        if tau2 > 0:
            r = torch.cholesky_solve(target.y.unsqueeze(-1) - X @ B @ h, L)
            beta[..., :d] += tau2 * (Xd.transpose(-1, -2) @ r).squeeze(-1)
        strength = noise / (target.counts * tau2) if tau2 > 0 else torch.full_like(target.counts, math.inf)
        bias = beta[:, -1] if self.spec.intercept else None
        return Adapted(beta[:, :d], bias=bias, loss="squared", strength=strength)

    def _adapt_generic(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        """Other losses and models (:mod:`adaptrep.models`): heads with a cross-validated ridge,
        then fine-tuning: penalised for logistic tasks on a linear representation, else gradient
        descent with a cross-validated number of steps. With the heads' prior ``(mu, S)`` learned from
        the source heads (:func:`adaptrep.bayes.heads_population`) the ridge ``s ||w||^2`` is the penalty
        ``s (w - mu)^T S^{-1} (w - mu)`` (scale ``s`` cross-validated per target), in the head-only fit and
        in fine-tuning, which starts from that head."""
        self._check_generic_finetune()
        theta = self._theta()
        spec = self.spec
        prior = None if self.head_prior is None else (self.head_prior[0].to(target.X), self.head_prior[1].to(target.X))
        w, ridge = cv_heads(spec.model, theta, target.X, target.y, generator, weight=_weight(target), prior=prior)
        if self.finetune is None:
            return self._adapted(theta, w, stacked=False)
        return _finetune_generic(self, theta, target, generator, ridge, prior)

    def _noise_level(self) -> float:
        """``sigma`` of the priors and the target step: ``AdaptRep(noise=...)`` when given, else the source estimate."""
        given = getattr(self, "noise", None)
        if given is not None:
            return float(given)
        assert self.noise_estimate is not None
        return self.noise_estimate

    def _learn_perturbation_variance(self, source: Tasks, B: Tensor) -> None:
        """``tau^2`` (:func:`adaptrep.bayes.perturbation_variance`) on the exact path, where the target
        step uses it: with the heads' prior, or fine-tuning with ``FineTune(strength="source")``."""
        if self.spec.prior or (self.finetune is not None and self.finetune.strength == "source"):
            self.perturbation_variance = perturbation_variance(source, B, self.spec.intercept, self._noise_level())

    def _theta(self) -> Params:
        """The learned representation's parameters (``theta``)."""
        if self.spec.key and self.representation is not None:
            return {self.spec.key: self.representation}
        return dict(getattr(self, "theta", {}))

    def _check_prior_finetune(self) -> None:
        changed = self._changed_finetune_options()
        if changed:
            raise ValueError(
                f"FineTune.{changed[0]} applies without the prior; with prior=True the target is fine-tuned with the perturbations' "
                "prior learned from the source tasks (prior=False applies the option)"
            )

    def _changed_finetune_options(self) -> list[str]:
        if self.finetune is None:
            return []
        default = FineTune()
        changed = [f.name for f in fields(FineTune) if getattr(self.finetune, f.name) != getattr(default, f.name)]
        # strength last: a ball or early stopping changes its default too, and the error should name what the user set
        return sorted(changed, key=lambda name: name == "strength")

    def _check_generic_finetune(self) -> None:
        # strength="cv" is what the generic path does (cross-validated early stopping)
        changed = [name for name in self._changed_finetune_options() if not (name == "strength" and self.finetune and self.finetune.strength == "cv")]
        if changed:
            raise ValueError(
                f"FineTune.{changed[0]} applies to the exact linear path only (squared loss, linear model); "
                f"the {self.spec.kind} model with the {self.spec.model.loss} loss fine-tunes with cross-validated early stopping"
            )


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

    def _fit(self, source: Tasks) -> None:
        if self.spec.kind == "mlp":
            raise ValueError(f"{type(self).__name__} has no moment start for the mlp model; use a meta-learner, or model=<your torch.nn.Module>")
        rank = self._rank(source) if self.spec.kind != "module" else 0
        if not self.spec.exact:
            self._fit_generic(source, rank)
            return
        X, y, _, _ = _centered(source, self.spec.intercept)
        G, c, q = task_statistics(X, y, source.counts if source.ragged else None)  # the samples themselves when n < d
        self._chosen: SourceFit | None = None  # a fit that _penalty already made (penalty="cv")
        penalty, radius = self._penalty(source, rank, self._estimate_noise((G, c, q), source, rank))
        fit: SourceFit = self._chosen or fit_source(
            G, c, q, rank, penalty=penalty, radius=radius, max_iter=self.max_iter, inner_steps=self.inner_steps, gtol=self.gtol, lost=int(self.spec.intercept)
        )
        self.source_fit = fit
        self.representation = fit.B
        if fit.noise is not None and not self.noise_dof:  # the random-effects fit (n_t <= k) estimated the noise; the moment residual cannot
            self.noise_estimate = fit.noise
        if self.spec.prior:
            assert self.noise_estimate is not None
            self._check_prior_finetune()
            self.head_prior = head_prior(source, fit.B, self.spec.intercept, self.noise_estimate)
        self._learn_perturbation_variance(source, fit.B)
        self.source_predictors = predictor(fit.B, fit.W, fit.V)
        synchronize(fit.B.device)
        self.info = {
            "source_objective": fit.objective,
            "source_grad_norm": fit.grad_norm,
            "source_iterations": fit.iterations,
            "source_converged": fit.converged,
            "source_stop_reason": fit.stop_reason,
            "source_penalty": penalty,
            "noise_estimate": self.noise_estimate,
            "rank": rank,
        }

    def _fit_generic(self, source: Tasks, rank: int) -> None:
        """Other losses and models: the generic objective of :mod:`adaptrep.models`. Built-in
        linear and ReLU models start from each of the four moment starts of the centred labels
        (``E[(y - 1/2) x]`` is a multiple of ``Sigma beta_t`` for logistic tasks, and
        ``E[y x] = Sigma W_t w_t / (2 sqrt(k))`` for ReLU networks; whitened or not, normalised per
        task or not), keeping the lowest objective; a user's module starts from its own parameters."""
        changed = [name for name, default in (("max_iter", 2000), ("inner_steps", 10), ("gtol", 1e-6)) if getattr(self, name) != default]
        if changed:
            raise ValueError(f"{changed[0]} applies to the exact linear path only; the {self.spec.kind} model with the {source.loss} loss trains by Adam")
        spec = self.spec
        lam, gamma = self._generic_penalty(source, rank)
        if spec.theta0 is not None:
            starts: list[Params] = [spec.theta0]
        else:
            starts = [{spec.key: start} for start in moment_inits(*_moments(source), rank)]
        fits = [fit_shared(spec.model, start, source.X, source.y, lam=lam, gamma=gamma, weight=_weight(source), compile=self.compile) for start in starts]
        fit = min(fits, key=lambda candidate: candidate.objective)
        self.theta = fit.theta
        self.representation = fit.theta[spec.key] if spec.key else None
        self.head_prior = heads_population(fit.w) if spec.prior else None
        synchronize(fit.w.device)
        self.info = {**describe(fit), "source_penalty": lam if lam is not None else math.inf}

    def _select_rank(self, source: Tasks, folds: int = 5) -> int:
        """The rank with the highest held-out marginal likelihood (:func:`adaptrep.bayes.log_likelihood`)
        of the source tasks, over ``folds`` folds of whole tasks (each fold's priors fitted on the
        other tasks) and the ranks of :func:`adaptrep.bayes.rank_candidates`; kept in ``info``.
        ADAPTREP's trial fits use the theory-shaped source penalty (one fit each, not a
        cross-validated path); the fit at the chosen rank uses the method's own."""
        T = source.num_tasks
        if T < 2:
            raise ValueError(f"{type(self).__name__}: choosing the rank needs at least 2 source tasks; give rank=")
        order = torch.randperm(T, generator=torch.Generator().manual_seed(0)).to(source.X.device)
        candidates = rank_candidates(source.dim)
        scores = torch.zeros(len(candidates), dtype=torch.float64)
        for fold in range(min(folds, T)):
            held = torch.zeros(T, dtype=torch.bool, device=source.X.device)
            held[order[fold :: min(folds, T)]] = True
            train, test = source.subset(held.logical_not().nonzero().squeeze(1)), source.subset(held.nonzero().squeeze(1))
            for i, rank in enumerate(candidates):
                trial = self._rank_trial(rank)
                trial.spec, trial.info = self.spec, {}
                trial._fit(train)
                assert trial.head_prior is not None and trial.noise_estimate is not None and trial.representation is not None
                mu, S = trial.head_prior
                scores[i] += float(
                    log_likelihood(test, trial.representation, self.spec.intercept, trial.noise_estimate, mu, S, trial.perturbation_variance or 0.0).sum()
                )
        # a rank whose trial broke down (a NaN likelihood) is never chosen
        chosen = candidates[int(torch.nan_to_num(scores, nan=-math.inf).argmax())]
        self.rank_scores = dict(zip(candidates, scores.tolist(), strict=True))
        return chosen

    def _rank_trial(self, rank: int) -> _RepresentationMethod:
        """The method fitted at each candidate rank by :meth:`_select_rank`."""
        return replace(self, rank=rank)

    def _generic_scale(self, source: Tasks, rank: int) -> tuple[float, float]:
        """``(sigma, p)``: the noise level (1/2 for class labels, else the source estimate) and the
        number of parameters of a perturbation (``d k``, or the module's parameter count)."""
        if self.spec.theta0 is not None:
            p = float(sum(value.numel() for value in self.spec.theta0.values()))
        else:
            p = float(source.dim * rank)
        if source.loss != "squared":
            return 0.5, p
        X, y, _, _ = _centered(source, self.spec.intercept)
        G, c, q = sufficient_statistics(X, y, source.counts if source.ragged else None)
        return estimate_noise(G, c, q, source.counts if source.ragged else source.num_samples, max(rank, 1))[0], p


def _moments(source: Tasks) -> tuple[Tensor, Tensor]:
    """Statistics ``(G, c)`` for the moment starts: ``c_t`` the moment of the centred labels (for
    multiclass, of each class's centred indicator, one row per task and class)."""
    X = source.flat()
    counts = source.counts if source.ragged else None
    if source.loss == "multiclass":
        onehot = torch.nn.functional.one_hot(source.y.long(), source.num_classes).to(X.dtype) * source.weight.unsqueeze(-1)
        labels = (onehot - onehot.sum(1, keepdim=True) / source.counts[:, None, None]) * source.weight.unsqueeze(-1)
        T, N = labels.shape[0], labels.shape[-1]
        G, _, _ = sufficient_statistics(X, source.y, counts)
        c = torch.einsum("tnd,tnc->tcd", X, labels) / source.counts[:, None, None]
        return G.unsqueeze(1).expand(T, N, *G.shape[1:]).reshape(T * N, *G.shape[1:]), c.reshape(T * N, -1)
    shift = 0.5 if source.loss == "logistic" else 0.0
    G, c, _ = sufficient_statistics(X, (source.y - shift) * source.weight, counts)
    return G, c


@dataclass
class AdaptRep(_RepresentationMethod):
    """ADAPTREP: learn ``B`` jointly with per-task perturbations, then fine-tune on the target.

    Source objective (regularised form), with ``v_t = Delta_t w_t``::

        min_B mean_t min_{w_t, v_t} (1/n_t) ||y_t - X_t (B w_t + v_t)||^2 + mu ||v_t||_2

    ``mu`` is ``penalty`` (a number); or ``2 sqrt(lam * gamma)`` when the paper's ``lam``, ``gamma`` are given
    (its objective uses ``1/(2n) ||r||^2``, half our mean squared error, and its stated equivalent
    penalty ``sqrt(lam gamma) ||Delta_t w_t||``); ``penalty="theory"``: the theory-shaped
    :func:`theory_penalty` with the noise level estimated from the source data; ``penalty="cv"``: chosen by cross-validation on the source tasks'
    held-out samples along a warm-started path from FROZENREP down (:func:`adaptrep.adaptive.cv_penalty`;
    its path is kept in ``penalty_path``; the default, :data:`DEFAULT_PENALTY`). ``radius`` switches to the
    constrained form ``||v_t|| <= radius``. Target adaptation: :class:`FineTune`, by default with the
    strength that the source tasks' perturbation variance sets (the posterior mean; see ``_adapt_with_prior``).
    """

    finetune: FineTune | None = field(default_factory=FineTune)
    penalty: float | str | None = None
    lam: float | None = None
    gamma: float | None = None
    radius: float | None = None
    noise: float | None = None

    def _penalty(self, source: Tasks, rank: int, noise: float) -> tuple[float, float | None]:
        if self.radius is not None:
            if not self.radius >= 0:
                raise ValueError(f"radius must be non-negative; got {self.radius}")
            return math.inf, float(self.radius)
        rule = self.penalty if isinstance(self.penalty, str) else None
        if rule is None and self.penalty is None and (self.lam is None or self.gamma is None):
            rule = DEFAULT_PENALTY
        if rule is not None and rule not in ("cv", "theory"):
            raise ValueError(f"the ADAPTREP penalty must be a number, 'cv' or 'theory'; got {rule!r}")
        if rule == "cv":
            X, y, _, _ = _centered(source, self.spec.intercept)
            path = cv_penalty(X, y, rank, source.mask, max_iter=self.max_iter, inner_steps=self.inner_steps, gtol=self.gtol, intercept=self.spec.intercept)
            self.penalty_path, self._chosen = path, path.fit
            return path.penalty, None
        if rule == "theory":
            sigma = self.noise if self.noise is not None else noise
            mu = theory_penalty(sigma, source.dim, rank, source.num_tasks, _mean_count(source))
        elif self.penalty is not None:
            mu = float(self.penalty)
        else:
            assert self.lam is not None and self.gamma is not None
            mu = 2 * math.sqrt(self.lam * self.gamma)
        if not mu >= 0:
            raise ValueError(f"the ADAPTREP penalty must be non-negative; got {mu}")
        return mu, None

    def _rank_trial(self, rank: int) -> _RepresentationMethod:
        """The theory penalty in place of a cross-validated one: one fit per trial, not a path (the rank is what is compared)."""
        trial = replace(self, rank=rank)
        if self.penalty in (None, "cv") and self.lam is None and self.radius is None:
            trial.penalty = "theory"
        return trial

    def _generic_penalty(self, source: Tasks, rank: int) -> tuple[float | None, float]:
        """The paper's ``lam, gamma`` if given; else ``lam = penalty``, by default
        ``2 sigma (sqrt(p / (n T)) + sqrt(p / n))`` with ``p = d k`` the parameters of a perturbation
        ``Delta_t`` (a user module's parameter count), at the noise level ``sigma`` (1/2 for class
        labels, the source estimate otherwise); and a weak ``gamma = 1e-4`` on the heads. (With
        ``theta`` kept in its normal form the heads cannot trade scale with ``Delta``, so the folded
        equivalence ``mu = 2 sqrt(lam gamma)`` does not apply; ``lam`` is the perturbations' ridge.)"""
        if self.radius is not None:
            raise ValueError("radius (the constrained form) applies to the exact linear path only (squared loss, linear model); use penalty, or lam and gamma")
        if self.noise is not None:
            raise ValueError("noise applies to the exact linear path only (squared loss, linear model)")
        if self.lam is not None and self.gamma is not None:
            return float(self.lam), float(self.gamma)
        if self.penalty == "cv":
            raise ValueError("penalty='cv' is implemented for linear tasks with the squared loss only; use 'theory' or a number")
        if self.penalty is not None and not isinstance(self.penalty, str):
            return float(self.penalty), 1e-4
        sigma, p = self._generic_scale(source, rank)
        n, T = _mean_count(source), source.num_tasks
        return 2 * sigma * (math.sqrt(p / (n * T)) + math.sqrt(p / n)), 1e-4


@dataclass
class FrozenRep(_RepresentationMethod):
    """FROZENREP: one representation shared exactly by all source tasks.

    ``min_B mean_t min_{w_t} (1/n_t) ||y_t - X_t B w_t||^2``; the target retrains the head only
    (``finetune=None``) or, as ``frozenrep-ft``, is fine-tuned like ADAPTREP.
    """

    def _penalty(self, source: Tasks, rank: int, noise: float) -> tuple[float, float | None]:
        return math.inf, None

    def _generic_penalty(self, source: Tasks, rank: int) -> tuple[float | None, float]:
        return None, 1e-4


@dataclass
class Oracle(_AdaptsRepresentation):
    """Reference: the environment's true representation ``B*``, head-only refit or fine-tuned."""

    def _fit(self, source: Tasks) -> None:
        if source.representation is None or self.spec.kind not in ("linear", "relu"):
            raise ValueError(f"{type(self).__name__} needs the true representation of a simulated environment")
        self.representation = source.representation
        if self.spec.exact:
            self._estimate_noise(source.gram(center=self.spec.intercept), source, self.representation.shape[1])
            self._learn_perturbation_variance(source, self.representation)
        self.info = {"noise_estimate": self.noise_estimate}


@dataclass
class TargetOnly(Method):
    """Learning each target alone. Linear model, squared loss: least squares (minimum-norm when
    ``m <= d``), or ridge with ``ridge > 0``, minimising ``(1/m) ||y - X beta||^2 + ridge ||beta||^2``.
    Linear model, classification: (multinomial) logistic regression with the penalty
    ``ridge ||beta||^2``, its strength chosen by 5-fold cross-validation (:func:`adaptrep.models.cv_heads`)
    unless ``ridge > 0`` is given. ReLU network: the same network and fine-tuning as the other
    methods, from a random first layer drawn from ``seed``. A user's module: its own initial
    parameters, fine-tuned like the others. ``mlp`` (``sinusoid``): the meta-learners' inner loop
    (``inner_steps`` gradient steps of size ``inner_lr`` on all parameters) from a fresh
    :func:`~adaptrep.models.init_mlp` network drawn from ``seed``.
    """

    ridge: float = 0.0
    inner_steps: int = 5
    inner_lr: float = 0.01
    seed: int = 0
    rank: int | None = None
    model: Any = field(default=None, kw_only=True)
    intercept: bool | None = field(default=None, kw_only=True)
    standardize: bool | None = field(default=None, kw_only=True)

    def _fit(self, source: Tasks) -> None:
        """Nothing is learned from the source tasks (the model's width is read from them)."""
        if self.spec.kind == "relu":
            self.width = self._rank(source)

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        spec = self.spec
        if spec.kind == "mlp":
            # the meta-learners' inner loop, from a fresh network instead of a meta-learned one
            g = torch.Generator().manual_seed(self.seed)
            theta, w = init_mlp(MLP_WIDTHS, g, target.X.dtype, target.X.device)
            theta_t, w_t = inner_adapt(spec.model, theta, w, target.X, target.y, steps=self.inner_steps, lr=self.inner_lr)
            return self._adapted(theta_t, w_t, stacked=True)
        if spec.kind in ("relu", "module"):
            if spec.kind == "relu":
                # the same network and fine-tuning, from a random first layer instead of a learned one
                generator = generator if generator is not None else torch.Generator().manual_seed(self.seed)  # reproducible without one too
                W = torch.randn(target.dim, self.width, generator=generator, dtype=torch.float64).to(target.X)
                theta = {"W": W / W.norm(dim=0, keepdim=True)}
            else:
                assert spec.theta0 is not None
                theta = {name: value.to(target.X) for name, value in spec.theta0.items()}
            _, ridge = cv_heads(spec.model, theta, target.X, target.y, generator, weight=_weight(target))
            return _finetune_generic(self, theta, target, generator, ridge)
        X, y, mx, my = _centered(target, spec.intercept)
        if target.loss != "squared":
            model = linear_model(target.loss, spec.classes if target.loss == "multiclass" else None)  # type: ignore[arg-type]
            if spec.intercept:
                model = with_intercept(model)
            # The penalised fit depends on the inputs only through their row space (the part of beta
            # orthogonal to every sample changes no prediction and only adds to the penalty), so with
            # fewer samples than features it is solved in the coordinates X_t V_t of each target's
            # row space (V_t from its SVD, r = min(m, d) columns) and mapped back: same optimum, far
            # smaller (r N)^2 Newton systems.
            inputs = target.flat()
            basis = torch.linalg.svd(inputs, full_matrices=False).Vh.transpose(-1, -2) if inputs.shape[1] < target.dim else None
            reduced = inputs if basis is None else inputs @ basis
            identity = {"B": torch.eye(reduced.shape[-1], dtype=X.dtype, device=X.device)}
            if self.ridge > 0:
                w = fit_heads(model, identity, reduced, target.y, ridge=self.ridge, weight=_weight(target))
            else:
                w = cv_heads(model, identity, reduced, target.y, generator, weight=_weight(target))[0]
            if basis is not None:
                r = basis.shape[-1]
                heads = w if w.ndim == 3 else w.unsqueeze(-1)  # (R, r', N) or a logistic (R, r')
                w = torch.cat([basis @ heads[:, :r], heads[:, r:]], dim=1).reshape(w.shape[0], -1, *w.shape[2:])
            full = {"B": torch.eye(target.dim, dtype=X.dtype, device=X.device)}
            return Adapted(w, model, full, False, None, target.loss, "linear", "B")
        if self.ridge > 0:
            G, c, _ = sufficient_statistics(X, y, target.counts if target.ragged else None)
            eye = torch.eye(target.dim, dtype=G.dtype, device=G.device)
            beta = spd_solve(G + self.ridge * eye, c)
        else:
            beta = (torch.linalg.pinv(X) @ y.unsqueeze(-1)).squeeze(-1)
        return _uncentered(beta, mx, my)


def _finetune_generic(
    method: Method, theta: Params, target: Tasks, generator: torch.Generator | None, ridge: Tensor, prior: tuple[Tensor, Tensor] | None = None
) -> Adapted:
    """Fine-tuned predictors from ``theta`` with heads of ridge ``ridge`` (with a head ``prior`` ``(mu, S)``:
    the penalty ``ridge (w - mu)^T S^{-1} (w - mu)``): penalised for logistic tasks on a linear
    representation, else early-stopped gradient descent."""
    spec = method.spec
    if spec.kind == "linear" and spec.model.loss == "logistic":
        B = theta["B"]
        X = target.flat()
        if spec.intercept:  # the intercept's direction is inside the span: unpenalised but for the ridge
            X = torch.nn.functional.pad(X, (0, 1), value=1.0) * target.weight.unsqueeze(-1)
            B = torch.block_diag(B, torch.ones(1, 1, dtype=B.dtype, device=B.device))
        beta, strength = logistic_finetune(B, X, target.y, ridge, generator, weight=_weight(target), prior=prior)
        linear = Adapted(beta[:, : target.dim], loss="logistic", strength=strength)
        linear.bias = beta[:, -1] if spec.intercept else None
        return linear
    mode = getattr(method, "compile", "auto")  # the methods with a generic path (this module's and Pretrain) have it
    delta, w, steps = finetune(spec.model, theta, target.X, target.y, generator, ridge=ridge, weight=_weight(target), prior=prior, compile=mode)
    adapted = {name: value + delta[name] for name, value in theta.items()}
    return method._adapted(adapted, w, stacked=True, strength=steps.to(target.X.dtype))


#: Methods that need a true representation ``B*`` or a moment start (not for ``mlp`` tasks).
MODEL_METHODS = ("adaptrep", "frozenrep", "frozenrep-ft", "oracle-head", "oracle-ft", "perm", "spectral", "mom")

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


@dataclass(init=False)
class MetaLearner(Method):
    """Meta-learning baselines through :func:`adaptrep.meta.meta_train`: MAML, first-order MAML,
    ANIL, Reptile, or pooled training (``algorithm``), on the generic model of the tasks
    (:func:`adaptrep.models.model_for`: ``B`` for ``linear``, ``W`` for ``relu``, the 1-40-40-1
    network for ``mlp``).

    Options: ``options`` (a :class:`~adaptrep.options.MetaOptions`, where every option is defined) or
    the same as keywords (``MetaLearner("anil", iterations=300, inner_lr=0.05)``; the keywords of
    :meth:`MetaOptions.keywords <adaptrep.options.MetaOptions.keywords>`); ``optimizer`` may also be a
    :class:`~adaptrep.meta.Transform` object (kept as ``transform``). Options left ``None`` take
    :func:`meta_defaults` for the source tasks' loss and model (``v`` estimated as the largest
    per-coordinate mean of ``x^2`` over the source inputs: :meth:`resolve`); ``meta_batch`` is capped
    at the number of source tasks ``T``; the target adaptation takes
    :meth:`MetaOptions.target_steps <adaptrep.options.MetaOptions.target_steps>` steps.

    Initialisation (all draws from ``torch.Generator().manual_seed(seed)`` on the CPU, then moved, so
    the same seed gives the same numbers everywhere): ``linear``: ``B_0`` the Q factor of a standard
    normal ``(d, k)`` matrix (orthonormal columns) and ``w_0 = 0``; ``relu``: ``W_0`` a standard normal
    ``(d, k)`` matrix with unit columns and ``w_0 = 0``; ``mlp``: :func:`~adaptrep.models.init_mlp`.
    With ``w_0 = 0`` the first inner step gives ``B`` no gradient (``grad_B L = X^T r w^T / n``), but the
    head's first step makes ``w_1 = -alpha grad_w L`` depend on ``B``, so the later inner steps and the
    second-order meta-gradient move ``B`` (first-order methods and Reptile through ``w_K != 0``).
    ``k`` is ``rank`` or the true representation's rank.

    Target adaptation: the inner loop (:func:`~adaptrep.meta.inner_adapt`, ``adapt_steps`` steps of
    ``inner_lr`` on the target's ``m`` samples, the head only for ``anil``: ``Algorithm.head_only``) from the learned
    ``(theta, w)``; ``pooled``, trained on all source data pooled, adapts with the same loop (all
    parameters). ``representation`` is the learned ``B`` (``W``) with columns orthonormalised (QR)
    for the subspace diagnostics, ``None`` for ``mlp``.
    """

    algorithm: str | Algorithm = "maml"
    options: MetaOptions = field(default_factory=lambda: MetaOptions.model_validate({}))
    transform: Transform | None = None
    rank: int | None = None
    seed: int = 0
    model: Any = field(default=None, kw_only=True)
    intercept: bool | None = field(default=None, kw_only=True)
    standardize: bool | None = field(default=None, kw_only=True)

    exact_path = False  # the meta-learners always train by gradient steps

    def __init__(
        self,
        algorithm: str | Algorithm = "maml",
        options: MetaOptions | None = None,
        *,
        transform: Transform | None = None,
        rank: int | None = None,
        seed: int = 0,
        model: Any = None,
        intercept: bool | None = None,
        standardize: bool | None = None,
        **keywords: Any,
    ) -> None:
        get_algorithm(algorithm)  # one-line errors for an unknown algorithm or optimizer
        optimizer = keywords.get("optimizer")
        if optimizer is not None and not isinstance(optimizer, str):
            transform = get_optimizer(keywords.pop("optimizer"), 1.0)
        if keywords:
            given = options.learner_options() if options is not None else {}
            options = MetaOptions.from_keywords(**{**given, **keywords})
        self.algorithm, self.options, self.transform = algorithm, options or MetaOptions.model_validate({}), transform
        self.rank, self.seed, self.model, self.intercept, self.standardize = rank, seed, model, intercept, standardize
        self.info = {}

    @property
    def optimizer(self) -> str | Transform:
        """The outer optimiser: the :class:`~adaptrep.meta.Transform` object given, else its name."""
        return self.transform if self.transform is not None else self.options.outer_optimizer

    def resolve(self, source: Tasks) -> MetaConfig:
        """The :class:`MetaConfig` for these source tasks: the options given, the others from
        :func:`meta_defaults` (the one rule for the defaults, with the source inputs' largest variance)."""
        kind = self.model if isinstance(self.model, str) else "module" if self.model is not None else source.model
        # the input variance only sets the default inner step of the linear and relu models
        needs_variance = self.options.inner_lr is None and kind != "mlp"
        variance = float(((source.X * source.X).sum((0, 1)) / source.counts.sum()).max()) if needs_variance else 1.0
        given = {key: value for key, value in self.options.learner_options().items() if value is not None and key != "adapt_steps"}
        values: dict[str, Any] = {**meta_defaults(source.loss, kind, variance), **given}
        values["meta_batch"] = min(values["meta_batch"], source.num_tasks)
        if self.transform is not None:
            values["optimizer"] = self.transform
        return MetaConfig(self.algorithm, **values)

    def _init(self, source: Tasks) -> tuple[Params, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        dtype, device = source.X.dtype, source.X.device
        spec = self.spec
        if spec.kind == "mlp":
            return init_mlp(MLP_WIDTHS, g, dtype, device)
        if spec.kind == "module":
            assert spec.theta0 is not None
            theta = {name: value.to(device, dtype) for name, value in spec.theta0.items()}
            k = int(spec.model.features(theta, source.X[0, :1]).shape[-1])
        else:
            k = self._rank(source)
            Z = torch.randn(source.dim, k, generator=g, dtype=torch.float64)
            start = torch.linalg.qr(Z)[0] if spec.kind == "linear" else Z / Z.norm(dim=0, keepdim=True)
            theta = {spec.key: start.to(device, dtype)}
            k += int(spec.intercept)
        shape = (k, spec.classes) if source.loss == "multiclass" else (k,)
        return theta, torch.zeros(shape, dtype=dtype, device=device)

    def _fit(self, source: Tasks) -> None:
        self.config = self.resolve(source)
        theta0, w0 = self._init(source)
        g = torch.Generator().manual_seed(self.seed + 1)
        fit = meta_train(self.spec.model, theta0, w0, source.X, source.y, self.config, g, weight=_weight(source))
        self.theta, self.w = fit.theta, fit.w
        key = self.spec.key
        self.representation = torch.linalg.qr(fit.theta[key])[0] if key else None
        synchronize(fit.w.device)
        tail = max(1, min(50, fit.losses.numel()))
        last = float(fit.losses[-tail:].mean()) if fit.losses.numel() else math.nan
        self.info = {
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

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        steps = self.options.target_steps(self.config.inner_steps)
        assert steps is not None
        theta = {name: value.to(target.X) for name, value in self.theta.items()}
        head_only = get_algorithm(self.algorithm).head_only
        theta_t, w_t = inner_adapt(
            self.spec.model, theta, self.w.to(target.X), target.X, target.y, steps=steps, lr=self.config.inner_lr, head_only=head_only, weight=_weight(target)
        )
        return self._adapted(theta_t, w_t, stacked=True)


#: The meta-learners by CLI name.
META_METHODS = tuple(ALGORITHMS)


def _competitor(name: str) -> Method:
    """The linear-representation competitors of :mod:`adaptrep.competitors` (imported here, not at
    the top, because that module builds on :class:`Method`)."""
    from .competitors import COMPETITORS

    return COMPETITORS[name]()


METHODS: dict[str, Any] = {
    "adaptrep": AdaptRep,
    "frozenrep": FrozenRep,
    "frozenrep-ft": lambda: FrozenRep(finetune=FineTune()),
    "target-only": TargetOnly,
    "oracle-head": Oracle,
    "oracle-ft": lambda: Oracle(finetune=FineTune()),
    **{name: (lambda name=name: MetaLearner(algorithm=name)) for name in ALGORITHMS},
    **{name: (lambda name=name: _competitor(name)) for name in ("perm", "spectral", "mom")},
}

#: The keyword options :func:`make_method` passes on: to the meta-learners (their options are defined in
#: :class:`~adaptrep.options.MetaOptions`), and the inner loop to target-only.
META_OPTIONS = (*MetaOptions.keywords().values(), "seed")
#: Options every method that has them takes: the model, the rank ``k``, the intercept, the feature scaling, the
#: head prior and compilation (the meta-learners take ``compile`` through their own options).
COMMON_OPTIONS = ("model", "rank", "intercept", "standardize", "prior", "compile")


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """A method by its CLI name (see :data:`METHODS`), with its default settings or the options in
    ``options`` (``None`` values keep the defaults): :data:`COMMON_OPTIONS` for every method that has
    them; for the meta-learners the :data:`META_OPTIONS`; ``target-only`` takes ``inner_lr``,
    ``adapt_steps`` (else ``inner_steps``) and ``seed`` for its inner loop on ``mlp`` tasks."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    options = {key: value for key, value in (options or {}).items() if value is not None}
    given = {key: value for key, value in options.items() if key in META_OPTIONS}
    method: Method
    if name in META_METHODS:
        method = MetaLearner(algorithm=name, **given)
    elif name == "target-only":
        meta = MetaOptions.from_keywords(**{key: value for key, value in given.items() if key != "seed"})
        loop: dict[str, Any] = {"inner_lr": meta.inner_lr, "inner_steps": meta.target_steps(), "seed": given.get("seed")}
        method = TargetOnly(**{key: value for key, value in loop.items() if value is not None})
    else:
        method = METHODS[name]()
    for key in COMMON_OPTIONS:
        if key in options and hasattr(method, key):
            setattr(method, key, options[key])
    return method


#: The method classes by name (saved models record the class).
METHOD_CLASSES: dict[str, type[Method]] = {cls.__name__: cls for cls in (AdaptRep, FrozenRep, Oracle, TargetOnly, MetaLearner)}

# the classical baselines (they build on Method, so they are registered after it)
from .baselines import MixedEffects, RidgePerTask  # noqa: E402

METHODS.update({"ridge-per-task": RidgePerTask, "mixed-effects": MixedEffects})

# the pre-training baselines (Chen et al. 2019; Tian et al. 2020), likewise built on Method
from .pretrain import Pretrain  # noqa: E402

METHODS.update({"pretrain-probe": Pretrain, "pretrain-ft": lambda: Pretrain(finetune=True)})
METHOD_CLASSES["Pretrain"] = Pretrain
