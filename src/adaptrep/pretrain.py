"""Pre-training baselines of few-shot learning: ``pretrain-probe`` and ``pretrain-ft``.

The field's plain baselines (Chen et al., *A Closer Look at Few-shot Classification*, ICLR 2019;
Tian et al., *Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?*, ECCV
2020): forget the tasks, train **one** network on all source samples pooled, then reuse its
representation on each target.

Source step (:class:`Pretrain`, ``fit``): every real sample of every source task becomes one row of a
single pooled data set with a **global** label space.

* ``multiclass``: the tasks' per-task class indices are mapped back to their original labels
  (``Tasks.classes``, e.g. the digits) and numbered over the union of the source tasks' classes (the
  base classes); one multinomial model with a ``C``-way head over those ``C`` classes is trained on
  the pooled rows (without ``Tasks.classes`` the labels are taken as global already). The model is
  the representation ``phi_theta`` with a linear head (:mod:`adaptrep.models`): the ``linear`` model's
  ``B`` (``d x k``, orthonormal, ``k = rank``), the ``relu`` model's first layer ``W`` (width ``k``),
  the ``mlp`` network's hidden layers, or your ``torch.nn.Module`` as feature extractor; trained by
  :func:`adaptrep.models.fit_shared` on the one pooled task (full-batch Adam, ``train_steps`` steps
  from ``lr``, head ridge ``gamma``). The linear ``B`` starts from the top-``k`` eigenvectors of the
  pooled between-class scatter (plus ``1e-3`` times the total covariance, both normalised by their
  trace, so that directions beyond the ``C - 1`` of the class means are the inputs' principal ones);
  ``relu`` from a unit-column normal ``W`` drawn from ``seed``; ``mlp`` from
  :func:`~adaptrep.models.init_mlp` drawn from ``seed``; a module from its own parameters.
* ``squared`` and ``logistic`` with the ``linear`` model: one pooled regression, exactly --
  least squares (minimum-norm, :func:`torch.linalg.pinv`) or L2-regularised logistic regression
  (ridge ``gamma``, Newton) on the stacked rows with **one** global intercept (with ``intercept``).
  A pooled linear model has one coefficient vector ``beta`` (``d``), so its representation is that
  direction: ``B = beta / ||beta||`` of rank 1, whatever ``rank`` is (a pooled fit has no further
  direction to learn); the target then refits a scale and an intercept on ``x^T B`` (probe) or leaves
  the span (ft). ``relu``, ``mlp`` and modules train by :func:`~adaptrep.models.fit_shared` as above.

The pooled head is discarded (the targets' classes are new): the target step fits a new head.

* ``pretrain-probe`` (``finetune=False``): the representation frozen, a new head (and intercept) per
  target with the ridge chosen by 5-fold cross-validation of the held-out loss
  (:func:`adaptrep.models.cv_heads`) -- Tian et al.'s linear probe.
* ``pretrain-ft`` (``finetune=True``): the whole network fine-tuned from that probe, the generic
  path's fine-tuning (:func:`adaptrep.methods._finetune_generic`): gradient descent on the
  representation and head with the number of steps chosen per target by cross-validation (0 steps is
  the probe), or for logistic targets on a linear representation its penalised form -- Chen et al.'s
  fine-tuned baseline. ``max_steps`` caps the steps and makes every model use early-stopped descent.

All targets are one batch (no loop over tasks); ragged tasks use their masks; tensors stay on the
tasks' device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .adapted import Adapted
from .data import DataError, Tasks
from .logistic import fit_logistic
from .methods import Method, _finetune_generic, _weight, synchronize
from .models import MLP_WIDTHS, Params, cv_heads, describe, finetune, fit_shared, init_mlp

__all__ = ["Pretrain", "global_labels", "pooled", "pooled_linear"]


def global_labels(tasks: Tasks) -> tuple[Tensor, Tensor]:
    """Labels ``(T, n)`` as indices into the union of the tasks' classes, and those classes ``(C,)``
    (sorted original labels). Multiclass tasks relabel their classes per task (``Tasks.classes``);
    this maps every sample back to its original class first. Padding gets index 0."""
    y = tasks.y
    if tasks.classes is None:
        original = y.to(torch.float64)
    else:
        original = torch.take_along_dim(tasks.classes.to(y.device, torch.float64), y.long(), 1)
    mask = tasks.mask if tasks.mask is not None else torch.ones_like(y, dtype=torch.bool)
    classes = torch.unique(original[mask])  # sorted
    if torch.isnan(classes).any():
        raise DataError("a sample's class index points past its task's classes (NaN in Tasks.classes)")
    index = torch.searchsorted(classes, torch.where(mask, original, classes[0]).contiguous())
    return index.clamp_max(classes.numel() - 1), classes


def pooled(tasks: Tasks, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Every real sample of every task stacked: inputs ``(N, *input_shape)`` and labels ``(N,)``
    (``labels`` ``(T, n)`` instead of ``tasks.y`` when given)."""
    y = tasks.y if labels is None else labels
    if tasks.mask is None:
        return tasks.X.reshape(-1, *tasks.input_shape), y.reshape(-1)
    return tasks.X[tasks.mask], y[tasks.mask]


def pooled_linear(X: Tensor, y: Tensor, loss: str, intercept: bool, ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
    """One linear model on pooled rows ``X`` ``(N, d)``: least squares (minimum-norm) for
    ``"squared"``, logistic regression with penalty ``ridge ||beta||^2`` for ``"logistic"``; with one
    global intercept when ``intercept`` (unpenalised for least squares, penalised like the rest for
    the logistic loss). Returns ``beta`` ``(d,)`` and the intercept (0 without)."""
    A = torch.nn.functional.pad(X, (0, 1), value=1.0) if intercept else X
    if loss == "squared":
        coef = torch.linalg.pinv(A) @ y
    elif loss == "logistic":
        coef = fit_logistic(A.unsqueeze(0), y.unsqueeze(0), torch.tensor([2 * ridge], dtype=A.dtype, device=A.device))[0]
    else:
        raise ValueError(f"pooled_linear fits the squared or logistic loss; got {loss!r}")
    if intercept:
        return coef[:-1], coef[-1]
    return coef, torch.zeros((), dtype=coef.dtype, device=coef.device)


def _scatter_start(X: Tensor, labels: Tensor, classes: int, rank: int) -> Tensor:
    """``(d, k)``: top-``k`` eigenvectors of the between-class scatter of pooled rows plus ``1e-3``
    times their covariance (each normalised by its trace)."""
    onehot = torch.nn.functional.one_hot(labels.long(), classes).to(X.dtype)  # (N, C)
    counts = onehot.sum(0).clamp_min(1.0)
    mean = X.mean(0)
    means = (onehot.T @ X) / counts.unsqueeze(-1) - mean  # (C, d)
    between = (means * counts.unsqueeze(-1)).T @ means / X.shape[0]
    centred = X - mean
    total = centred.T @ centred / X.shape[0]
    tiny = torch.finfo(X.dtype).tiny
    scatter = between / between.trace().clamp_min(tiny) + 1e-3 * total / total.trace().clamp_min(tiny)
    return torch.linalg.eigh(scatter)[1][:, -rank:].flip(-1)


@dataclass
class Pretrain(Method):
    """Pre-training on the pooled source data with a global label space, then a linear probe
    (``finetune=False``, ``pretrain-probe``) or fine-tuning (``finetune=True``, ``pretrain-ft``) on
    each target. See the module docstring for what is pooled and what the representation is.

    ``rank``: ``k`` of the ``linear`` (multiclass) and ``relu`` models; ``train_steps``, ``lr``:
    the pooled training by Adam; ``gamma``: ridge on the pooled head; ``max_steps``: cap on the
    fine-tuning steps (``None``: the generic path's default, see the module docstring); ``seed``:
    random starts (``relu``, ``mlp``).
    """

    finetune: bool = False
    rank: int | None = None
    train_steps: int = 600
    lr: float = 0.03
    gamma: float = 1e-4
    max_steps: int | None = None
    seed: int = 0
    model: Any = field(default=None, kw_only=True)
    intercept: bool | None = field(default=None, kw_only=True)
    standardize: bool | None = field(default=None, kw_only=True)
    compile: str = field(default="auto", kw_only=True)

    exact_path = False  # the intercept is a constant feature of the model, as on the generic path

    def __post_init__(self) -> None:
        if self.train_steps < 0 or not self.lr > 0 or not self.gamma >= 0:
            raise ValueError(f"Pretrain needs train_steps >= 0, lr > 0 and gamma >= 0; got {self.train_steps}, {self.lr}, {self.gamma}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0; got {self.max_steps}")
        self.info = {}

    def _fit(self, source: Tasks) -> None:
        spec = self.spec
        loss = spec.model.loss
        if loss == "multiclass":
            labels, classes = global_labels(source)
            X, y = pooled(source, labels.to(source.X.dtype))
            C = int(classes.numel())
            if C < 2:
                raise DataError(f"pre-training needs at least 2 classes over the source tasks; got {C}")
            self.base_classes = classes
        else:
            X, y = pooled(source)
            C = 0
        self.pooled_samples = int(y.numel())
        if spec.kind == "linear" and loss != "multiclass":
            beta, bias = pooled_linear(X.reshape(X.shape[0], -1), y, loss, spec.intercept, self.gamma)
            norm = beta.norm()
            if not norm > 0:
                raise DataError("the pooled source fit is zero: the source labels do not depend on the inputs")
            self.theta = {"B": (beta / norm).unsqueeze(-1)}
            self.pooled_fit = (beta, bias)
            self.info = {"pretrain_rank": 1, "pretrain_samples": self.pooled_samples}
        else:
            model = replace(spec.model, classes=C) if C else spec.model
            options = dict(lam=None, gamma=self.gamma, steps=self.train_steps, lr=self.lr, classes=C or None, compile=self.compile)
            fit = fit_shared(model, self._start(source, X, y, C), X.unsqueeze(0), y.unsqueeze(0), **options)  # type: ignore[arg-type]
            self.theta = fit.theta
            self.head = fit.w[0]
            synchronize(fit.w.device)
            self.info = {**describe(fit), "pretrain_classes": C, "pretrain_samples": self.pooled_samples}
        self.representation = self.theta[spec.key].clone() if spec.key else None  # its own memory (saved apart from theta)

    def _start(self, source: Tasks, X: Tensor, y: Tensor, classes: int) -> Params:
        """The starting parameters of the pooled training (module docstring)."""
        spec = self.spec
        g = torch.Generator().manual_seed(self.seed)
        dtype, device = X.dtype, X.device
        if spec.kind == "module":
            assert spec.theta0 is not None
            return {name: value.to(device, dtype) for name, value in spec.theta0.items()}
        if spec.kind == "mlp":
            return init_mlp(MLP_WIDTHS, g, dtype, device)[0]
        rank = self._rank(source)
        if spec.kind == "linear":  # multiclass: the class means' directions first
            return {"B": _scatter_start(X.reshape(X.shape[0], -1), y, classes, rank)}
        W = torch.randn(source.dim, rank, generator=g, dtype=torch.float64)
        return {spec.key: (W / W.norm(dim=0, keepdim=True)).to(device, dtype)}

    def _adapt(self, target: Tasks, generator: torch.Generator | None) -> Adapted:
        if not getattr(self, "theta", None):
            raise RuntimeError(f"{type(self).__name__}.adapt called before fit")
        spec = self.spec
        theta = {name: value.to(target.X) for name, value in self.theta.items()}
        w, ridge = cv_heads(spec.model, theta, target.X, target.y, generator, weight=_weight(target))
        if not self.finetune:
            return self._adapted(theta, w, stacked=False)
        if self.max_steps is None:
            return _finetune_generic(self, theta, target, generator, ridge)
        delta, w, steps = finetune(
            spec.model, theta, target.X, target.y, generator, ridge=ridge, max_steps=self.max_steps, weight=_weight(target), compile=self.compile
        )
        tuned = {name: value + delta[name] for name, value in theta.items()}
        return self._adapted(tuned, w, stacked=True, strength=steps.to(target.X.dtype))
