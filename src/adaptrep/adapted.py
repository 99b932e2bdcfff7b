"""Adapted predictors: what a method returns for its target tasks.

Target task ``t`` gets ``f_t(x) = <phi_{theta_t}(x), w_t> + b_t``: the representation the method
adapted to it (``theta_t``; the learned one, shared, when only the head was retrained), its head
``w_t`` (``(k,)``, or ``(k, N)`` for an N-way classification head) and an intercept ``b_t``. For the
linear path ``phi`` is the identity and ``w_t = beta_t``, the task's parameter vector in input space.
Inputs are standardised with the source tasks' statistics first when the method was fitted so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import vmap

from .data import Standardizer, Tasks
from .models import Model, Params, task_parameters

__all__ = ["Adapted"]


@dataclass
class Adapted:
    """Per-target-task predictors (see the module docstring), one batch of ``R`` tasks.

    Attributes:
        w: heads ``(R, k)`` or ``(R, k, N)``; for the linear path (``model is None``) the vectors
            ``beta_t`` ``(R, d)``.
        model: the representation's model, ``None`` for predictors linear in the inputs.
        theta: the representation's parameters, per task (every value ``(R, ...)``) when ``stacked``,
            else shared by the tasks.
        bias: intercepts ``(R,)`` (linear path; generic models carry theirs as a constant feature).
        loss: ``"squared"``, ``"logistic"`` or ``"multiclass"``.
        kind: what :attr:`beta` flattens to (``linear``, ``relu``, ``mlp``; ``module`` has none).
        key: the name of the representation's parameter for ``linear``/``relu`` models.
        standardizer: the source tasks' feature scaling, applied to inputs first.
        strength: the fine-tuning strengths chosen per task (``(R,)``), if any.
        classes: ``multiclass``: the original label of each class index per task (``(R, N)``).
    """

    w: Tensor
    model: Model | None = None
    theta: Params = field(default_factory=dict)
    stacked: bool = False
    bias: Tensor | None = None
    loss: str = "squared"
    kind: str = "linear"
    key: str = ""
    standardizer: Standardizer | None = None
    strength: Tensor | None = None
    classes: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return int(self.w.shape[0])

    @property
    def beta(self) -> Tensor:
        """Per-task parameter vectors as the simulated environments score them (``(R, p)``):
        ``beta_t`` for linear predictors, ``[vec(W_t), w_t]`` for the ReLU network, the flattened
        network for ``mlp``."""
        if self.model is None:
            return self.w
        if self.kind == "mlp":
            return task_parameters("mlp", self.theta, self.w)
        if self.kind not in ("linear", "relu") or not self.key:
            raise ValueError(f"predictors of a {self.kind!r} model have no parameter vector beta; use predict()")
        return task_parameters(self.kind, self.theta[self.key], self.w)

    def decision_function(self, X: Tensor) -> Tensor:
        """Raw outputs on inputs ``X (R, m, *input_shape)`` (task ``t``'s rows for predictor ``t``):
        ``(R, m)``, or ``(R, m, N)`` logits for ``multiclass``."""
        if X.shape[0] != self.num_tasks:
            raise ValueError(f"inputs for {X.shape[0]} tasks given to {self.num_tasks} adapted predictors")
        X = X.to(self.w)
        if self.standardizer is not None:
            X = self.standardizer.transform(X)
        out = self._raw(X)
        if self.standardizer is not None and self.loss == "squared":
            out = self.standardizer.restore(out)
        return out

    def _raw(self, X: Tensor) -> Tensor:
        if self.model is None:
            out = torch.einsum("rnd,rd->rn", X.reshape(X.shape[0], X.shape[1], -1), self.w)
            return out if self.bias is None else out + self.bias.unsqueeze(-1)
        theta = {name: value.to(self.w) for name, value in self.theta.items()}
        if self.model.batched:
            Phi = self.model.features(theta, X)
        else:
            Phi = vmap(self.model.features, in_dims=(0 if self.stacked else None, 0))(theta, X)
        if self.w.ndim == 3:
            return torch.einsum("rnk,rkc->rnc", Phi, self.w)
        return torch.einsum("rnk,rk->rn", Phi, self.w)

    def predict(self, X: Tensor) -> Tensor:
        """Predictions ``(R, m)``: values (``squared``), labels 0/1 (``logistic``) or class indices
        (``multiclass``; :meth:`labels` maps them to the original labels)."""
        out = self.decision_function(X)
        if self.loss == "squared":
            return out
        if self.loss == "logistic":
            return (out > 0).to(out.dtype)
        return out.argmax(-1).to(out.dtype)

    def predict_proba(self, X: Tensor) -> Tensor:
        """Class probabilities: ``P(y = 1)`` ``(R, m)`` (``logistic``) or ``(R, m, N)`` (``multiclass``)."""
        out = self.decision_function(X)
        if self.loss == "logistic":
            return torch.sigmoid(out)
        if self.loss == "multiclass":
            return torch.softmax(out, -1)
        raise ValueError("predict_proba needs a classification loss (logistic or multiclass)")

    def labels(self, index: Tensor) -> Tensor:
        """Original class labels of per-task class indices ``(R, m)`` (``multiclass``)."""
        if self.classes is None:
            return index
        return torch.take_along_dim(self.classes.to(index.device, torch.float64), index.long(), 1)

    def score(self, tasks: Tasks) -> dict[str, Tensor]:
        """Per-task mean loss on ``tasks``' samples (task ``t`` for predictor ``t``): ``loss``
        (squared error, log-loss or cross-entropy, in nats) and, for classification, ``accuracy``."""
        out = self.decision_function(tasks.X)
        weight, count = tasks.weight.to(out), tasks.counts.to(out)
        y = tasks.y.to(out)
        if self.loss == "squared":
            return {"loss": ((out - y) ** 2 * weight).sum(-1) / count}
        if self.loss == "logistic":
            losses = torch.nn.functional.softplus(out) - y * out
            correct = ((out > 0).to(out.dtype) == y).to(out.dtype)
        else:
            logp = torch.log_softmax(out, -1)
            losses = -torch.take_along_dim(logp, y.long().unsqueeze(-1), -1).squeeze(-1)
            correct = (out.argmax(-1) == y.long()).to(out.dtype)
        return {"loss": (losses * weight).sum(-1) / count, "accuracy": (correct * weight).sum(-1) / count}
