"""The generic model interface: any representation ``phi_theta`` with a linear head and a loss.

A :class:`Model` is ``f(x) = <phi_theta(x), w>`` with ``theta`` a dict of tensors (``features``
is a pure function of ``theta`` and the inputs; a user's ``torch.nn.Module`` is used the same way
through :func:`torch.func.functional_call`, see :meth:`Model.from_module`) and a loss
(``"squared"``: mean squared error; ``"logistic"``: mean log-loss with labels in {0, 1};
``"multiclass"``: mean cross-entropy with labels in {0, ..., N-1} and an N-way head, ``w`` of shape
``(k, N)`` per task, :mod:`adaptrep.multiclass`).

Ragged tasks are zero-padded to a common size ``n`` with a per-sample ``weight`` ``(T, n)`` (1 for
real samples, 0 for padding; fractional weights are allowed): every function that takes one
uses each task's weighted mean loss ``sum_i a_i l_i / sum_i a_i``, which for 0/1 weights is the
mean over the task's real samples, and draws cross-validation folds among real samples only
(:mod:`adaptrep.cv`).

ADAPTREP's task ``t`` uses the perturbed representation ``theta + Delta_t`` and its own head:

    min_theta mean_t min_{Delta_t, w_t} L_t(theta + Delta_t, w_t) + lam ||Delta_t||^2 + gamma ||w_t||^2

(the paper's regularised form, with our loss twice its ``1/(2n)`` one); FROZENREP fixes
``Delta_t = 0``. For the linear model ``phi_B(x) = B^T x`` the task's predictor is
``(B + Delta_t) w_t = B w_t + v_t`` with ``v_t = Delta_t w_t``, and minimising the penalty over
the ``(Delta_t, w_t)`` that give the same ``v_t`` (and ``B w_t``) yields ``2 sqrt(lam gamma) ||v_t||``:
the folded objective that :func:`adaptrep.solvers.fit_source` solves exactly for the squared
loss. Other models and losses are trained here by full-batch Adam on all tasks at once: the
per-task objective is :func:`torch.func.vmap`-ed over tasks, with no Python loop over tasks.

Target adaptation (:func:`finetune`): gradient descent with Nesterov momentum on ``(Delta, w)``
(per-block step sizes) from the learned ``theta`` and the refitted head, stopped early after a number of steps chosen per
target by K-fold cross-validation of the held-out loss with the one-standard-error rule (0 steps is
head-only adaptation); for logistic tasks on a linear representation, the penalised form
(:func:`logistic_finetune`).

Both loops can run compiled (``compile=`` of :func:`fit_shared` and :func:`finetune`): each step is then
one pure function of tensors (gradient by :func:`torch.func.grad`, the same update) compiled by
:func:`adaptrep.compiling.compile_function`, the same numbers as the eager loop up to rounding;
``"auto"`` compiles runs of at least :data:`COMPILE_MIN_STEPS` steps only, so the defaults run eager.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from . import cv
from .compiling import check_compile_mode, compile_function
from .cv import one_standard_error
from .logistic import fit_logistic
from .multiclass import cross_entropy, cross_entropy_slope, fit_multinomial
from .solvers import matmul, spd_solve

__all__ = [
    "Model",
    "Params",
    "Loss",
    "linear_model",
    "relu_model",
    "mlp_model",
    "init_mlp",
    "model_for",
    "MLP_WIDTHS",
    "unflatten_mlp",
    "task_parameters",
    "task_loss",
    "fit_shared",
    "should_compile_steps",
    "COMPILE_MIN_STEPS",
    "SharedFit",
    "fit_heads",
    "cv_heads",
    "HeadPrior",
    "finetune",
    "logistic_finetune",
    "one_standard_error",
    "num_classes",
    "pointwise_loss",
    "pointwise_loss_slope",
    "predict",
]

Params = dict[str, Tensor]
Loss = Literal["squared", "logistic", "multiclass"]
LOSSES: tuple[str, ...] = ("squared", "logistic", "multiclass")


def _identity(theta: Params) -> Params:
    return theta


@dataclass(frozen=True)
class Model:
    """``f(x) = <phi_theta(x), w>``: ``features(theta, X)`` maps ``(n, d)`` inputs to ``(n, k)``
    features; ``retract`` maps ``theta`` back to a normal form after each optimisation step
    (e.g. orthonormal columns: a projected optimisation, which fixes the scale and basis that the
    heads could otherwise trade with ``theta``)."""

    features: Callable[[Params, Tensor], Tensor]
    loss: Loss = "squared"
    retract: Callable[[Params], Params] = _identity
    #: a bound on ``||d f / d theta|| / (||w|| ||x||)`` at ``theta`` (for step sizes)
    lipschitz: Callable[[Params], float] = lambda theta: 1.0
    #: whether ``features`` also accepts stacked parameters (every value with a leading task
    #: dimension ``B``) with inputs ``(B, n, d)``, and shared parameters with ``(B, n, d)`` inputs,
    #: by broadcasting (then :mod:`adaptrep.meta` calls it directly instead of through ``vmap``)
    batched: bool = False
    #: the number of classes ``N`` of the ``"multiclass"`` loss (``None``: inferred from the labels
    #: as their largest value + 1 where heads are fitted; ignored by the other losses)
    classes: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.classes is not None and (not isinstance(self.classes, int) or self.classes < 2):
            raise ValueError(f"classes must be an integer >= 2; got {self.classes!r}")

    @staticmethod
    def from_module(module: torch.nn.Module, loss: Loss = "squared", classes: int | None = None) -> tuple[Model, Params]:
        """A model from a ``torch.nn.Module`` mapping ``(n, ...)`` inputs to ``(n, k)`` features, and its
        current parameters as ``theta`` (the module itself is not modified)."""
        theta = {name: p.detach().clone() for name, p in module.named_parameters()}
        return Model(lambda params, X: functional_call(module, params, (X,)), loss, classes=classes), theta


def linear_model(loss: Loss = "squared", classes: int | None = None) -> Model:
    """``phi_B(x) = B^T x`` with ``theta = {"B": (d, k)}``, kept orthonormal (QR)."""

    def retract(theta: Params) -> Params:
        Q, R = torch.linalg.qr(theta["B"])
        return {"B": Q * torch.sign(torch.diagonal(R)).unsqueeze(0)}

    return Model(lambda theta, X: X @ theta["B"], loss, retract, batched=True, classes=classes)


def relu_model(loss: Loss = "squared", classes: int | None = None) -> Model:
    """The first layer of a two-layer ReLU network, ``phi_W(x) = ReLU(W^T x) / sqrt(k)`` with
    ``theta = {"W": (d, k)}``, kept with unit-norm columns (ReLU is positively homogeneous, so
    the head absorbs the scale)."""

    def features(theta: Params, X: Tensor) -> Tensor:
        W = theta["W"]
        return torch.relu(X @ W) / math.sqrt(W.shape[-1])

    def retract(theta: Params) -> Params:
        W = theta["W"]
        return {"W": W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)}

    return Model(features, loss, retract, lambda theta: 1 / math.sqrt(theta["W"].shape[-1]), batched=True, classes=classes)


def mlp_model(widths: tuple[int, ...] = (1, 40, 40), loss: Loss = "squared", classes: int | None = None) -> Model:
    """A ReLU MLP with widths ``(d, h_1, ..., h_L)`` and a constant feature 1:
    ``phi_theta(x) = [h_L(x), 1]`` with ``h_0 = x``, ``h_l = ReLU(h_{l-1} W_l + b_l)`` and
    ``theta = {"W1": (d, h_1), "b1": (h_1,), ...}``; the linear head ``w`` (``k = h_L + 1``) is then the
    network's last layer with its bias (``(1, 40, 40)``: the 1-40-40-1 sinusoid network). Batched
    (stacked parameters broadcast over the inputs' leading dimensions)."""
    layers = len(widths) - 1

    def features(theta: Params, X: Tensor) -> Tensor:
        h = X
        for layer in range(1, layers + 1):
            W, b = theta[f"W{layer}"], theta[f"b{layer}"].unsqueeze(-2)
            if h.shape[-1] == 1:  # one input: an outer product, cheaper than a matmul
                z = h * W + b
            elif h.ndim == 3 and W.ndim == 3 and not torch.compiler.is_compiling():
                # stacked parameters, eager: one fused batched matmul. Compiled, the plain product below is
                # better: inductor fuses its bias add into the next kernel, whereas ATen's baddbmm first
                # copies the bias into its output (one more call per layer and inner step)
                z = torch.baddbmm(b, h, W)
            else:
                z = h @ W + b
            h = torch.relu(z)
        return torch.nn.functional.pad(h, (0, 1), value=1.0)

    return Model(features, loss, batched=True, classes=classes)


def init_mlp(
    widths: tuple[int, ...] = (1, 40, 40),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Params, Tensor]:
    """Parameters of :func:`mlp_model` and its head, initialised like ``torch.nn.Linear``: every
    weight and bias of a layer with ``fan_in`` inputs uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``
    (the head, ``(h_L + 1,)``, is the last layer's weights then its bias, with ``fan_in = h_L``)."""

    def uniform(fan_in: int, *shape: int) -> Tensor:
        bound = 1 / math.sqrt(fan_in)
        source = generator.device if generator is not None else None  # draw where the generator lives: same numbers on every device
        return ((2 * torch.rand(*shape, generator=generator, dtype=dtype, device=source) - 1) * bound).to(device).contiguous()

    theta: Params = {}
    for layer in range(1, len(widths)):
        theta[f"W{layer}"] = uniform(widths[layer - 1], widths[layer - 1], widths[layer])
        theta[f"b{layer}"] = uniform(widths[layer - 1], widths[layer])
    return theta, uniform(widths[-1], widths[-1] + 1)


#: Widths of the ``mlp`` kind of task (the sinusoid environment): the 1-40-40-1 ReLU network.
MLP_WIDTHS = (1, 40, 40)


def model_for(loss: Loss, kind: str, classes: int | None = None) -> tuple[Model, str]:
    """The built-in model of a kind of task (``Tasks.model``) and the name of its parameter
    (``""`` for ``mlp``, whose ``theta`` holds the weights and biases of every hidden layer)."""
    if kind == "linear":
        return linear_model(loss, classes), "B"
    if kind == "relu":
        return relu_model(loss, classes), "W"
    if kind == "mlp":
        return mlp_model(MLP_WIDTHS, loss, classes), ""
    raise ValueError(f"unknown model kind {kind!r}; choose linear, relu or mlp")


def _mlp_shapes(widths: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(1, len(widths)):
        shapes += [(f"W{layer}", (widths[layer - 1], widths[layer])), (f"b{layer}", (widths[layer],))]
    return shapes


def task_parameters(kind: str, theta: Tensor | Params, w: Tensor) -> Tensor:
    """Per-task predictors as the vectors environments score (``(R, p)``): ``theta w`` for the
    linear model, ``[vec(W), w]`` for the ReLU network (``theta`` is ``(d, k)`` or ``(R, d, k)``),
    and for ``mlp`` the flattened ``[vec(W1), b1, vec(W2), b2, w]`` (row-major; ``theta`` a dict of
    shared or stacked ``(R, ...)`` values, of the widths :data:`MLP_WIDTHS`; :func:`unflatten_mlp`
    with its default widths inverts it)."""
    if kind == "mlp":
        assert isinstance(theta, dict)
        R = w.shape[0]
        parts = [theta[name].expand(R, *shape).reshape(R, -1) for name, shape in _mlp_shapes(MLP_WIDTHS)]
        return torch.cat([*parts, w], dim=1)
    assert isinstance(theta, Tensor)
    if kind == "linear":
        return (theta @ w.unsqueeze(-1)).squeeze(-1)
    return torch.cat([theta.expand(w.shape[0], *theta.shape[-2:]).flatten(1), w], dim=1)


def unflatten_mlp(params: Tensor, widths: tuple[int, ...] = MLP_WIDTHS) -> tuple[Params, Tensor]:
    """Stacked MLP parameters ``theta`` (every value ``(R, ...)``) and heads ``w`` (``(R, h_L + 1)``)
    from the flat vectors ``(R, p)`` of :func:`task_parameters`."""
    R, theta, start = params.shape[0], {}, 0
    for name, shape in _mlp_shapes(widths):
        size = math.prod(shape)
        theta[name] = params[:, start : start + size].reshape(R, *shape)
        start += size
    if params.shape[1] != start + widths[-1] + 1:
        raise ValueError(f"expected {start + widths[-1] + 1} MLP parameters per task for widths {widths}; got {params.shape[1]}")
    return theta, params[:, start:]


def pointwise_loss(loss: Loss, prediction: Tensor, y: Tensor) -> Tensor:
    """Per-sample loss: squared error, log-loss ``softplus(f) - y f`` for labels in {0, 1}, or for
    ``"multiclass"`` the cross-entropy ``logsumexp(f) - f_y`` of logits ``(..., N)`` and class indices ``y``."""
    if loss == "squared":
        return (prediction - y) ** 2
    if loss == "multiclass":
        return cross_entropy(prediction, y)
    return torch.nn.functional.softplus(prediction) - y * prediction


def pointwise_loss_slope(loss: Loss, prediction: Tensor, y: Tensor) -> Tensor:
    """Derivative of :func:`pointwise_loss` in the prediction: ``2 (f - y)``, ``sigmoid(f) - y``, or
    ``softmax(f) - one_hot(y)`` (``(..., N)``)."""
    if loss == "squared":
        return 2 * (prediction - y)
    if loss == "multiclass":
        return cross_entropy_slope(prediction, y)
    return torch.sigmoid(prediction) - y


def predict(loss: Loss, Phi: Tensor, w: Tensor) -> Tensor:
    """Predictions of features ``Phi`` ``(..., n, k)`` with heads ``w`` (``(..., k)``; for
    ``"multiclass"`` ``(..., k, N)``, giving logits ``(..., n, N)``)."""
    if loss == "multiclass":
        return Phi @ w
    return (Phi @ w.unsqueeze(-1)).squeeze(-1)


def task_loss(model: Model, theta: Params, delta: Params | None, w: Tensor, X: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """One task's mean loss ``L_t(theta + Delta, w)`` (weighted by ``weight`` when given)."""
    params = theta if delta is None else {name: value + delta[name] for name, value in theta.items()}
    values = pointwise_loss(model.loss, model.features(params, X) @ w, y)
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum()


def num_classes(model: Model, y: Tensor, weight: Tensor | None = None, classes: int | None = None) -> int:
    """The number of classes of a ``"multiclass"`` model: ``classes`` if given, else ``model.classes``,
    else the largest label of a real sample (``weight > 0``) + 1 (at least 2)."""
    if classes is not None:
        return int(classes)
    if model.classes is not None:
        return model.classes
    labels = y if weight is None else torch.where(weight > 0, y, torch.zeros_like(y))
    return max(2, int(labels.max()) + 1)


#: A Gaussian prior on the heads, ``(mu, S)``: mean ``(k,)`` (``(k, N)`` for ``"multiclass"``, one
#: column per class) and covariance ``(k, k)`` (shared by the classes' columns), ``S`` positive definite.
HeadPrior = tuple[Tensor, Tensor]


def _prior_factor(prior: HeadPrior, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu, L)`` with ``L`` the Cholesky factor of ``S`` (``S = L L^T``), in ``like``'s dtype and device."""
    mu, S = prior
    return mu.to(like), torch.linalg.cholesky(S.to(like))


def _from_deviation(mu: Tensor, L: Tensor, u: Tensor) -> Tensor:
    """Heads ``w = mu + L u`` from whitened deviations ``u`` (``(T, k)`` or ``(T, k, N)``)."""
    if u.ndim == 2:
        return mu + (L @ u.unsqueeze(-1)).squeeze(-1)
    return mu + L @ u


def _to_deviation(mu: Tensor, L: Tensor, w: Tensor) -> Tensor:
    """The inverse of :func:`_from_deviation`: ``u = L^{-1} (w - mu)``."""
    if w.ndim == 2:
        return torch.linalg.solve_triangular(L, (w - mu).unsqueeze(-1), upper=False).squeeze(-1)
    return torch.linalg.solve_triangular(L, w - mu, upper=False)


def _fit_heads(loss: Loss, Phi: Tensor, y: Tensor, weight: Tensor | None, ridge: Tensor, classes: int | None, prior: HeadPrior | None = None) -> Tensor:
    """:func:`fit_heads` on given features ``Phi`` ``(T, n, k)`` (``ridge`` ``(T,)``; ``classes`` resolved).

    With a ``prior`` ``(mu, S)`` the penalty ``ridge ||w||^2`` becomes ``ridge (w - mu)^T S^{-1} (w - mu)``
    (summed over the classes' columns for ``"multiclass"``): in the whitened deviation ``w = mu + L u``
    (``S = L L^T``) it is the ridge ``ridge ||u||^2`` on the features ``Phi L`` with the fixed predictions
    ``Phi mu`` as an offset, so the same solvers apply."""
    if prior is not None:
        mu, L = _prior_factor(prior, Phi)
        offset = predict(loss, Phi, mu.expand(Phi.shape[0], *mu.shape))
        return _from_deviation(mu, L, _fit_heads_offset(loss, Phi @ L, y, weight, ridge, classes, offset))
    return _fit_heads_offset(loss, Phi, y, weight, ridge, classes)


def _fit_heads_offset(loss: Loss, Phi: Tensor, y: Tensor, weight: Tensor | None, ridge: Tensor, classes: int | None, offset: Tensor | None = None) -> Tensor:
    """Penalised heads with fixed predictions ``offset`` (``(T, n)``, ``(T, n, N)``) added to ``Phi w``."""
    if loss == "multiclass":
        assert classes is not None
        return fit_multinomial(Phi, y, ridge, classes, weight=weight, offset=offset)
    n = Phi.shape[1]
    if offset is not None and loss == "squared":
        y = y - offset
    if loss == "squared":
        weighted = Phi if weight is None else Phi * weight.unsqueeze(-1)
        count = torch.full(Phi.shape[:1], float(n), dtype=Phi.dtype, device=Phi.device) if weight is None else weight.sum(-1)
        G = matmul(weighted.transpose(-1, -2), Phi) / count[:, None, None]
        c = (weighted.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1) / count[:, None]
        eye = torch.eye(Phi.shape[-1], dtype=Phi.dtype, device=Phi.device)
        return spd_solve(G + ridge[:, None, None] * eye, c)
    if weight is None:
        return fit_logistic(Phi, y, 2 * ridge, offset=offset)
    # fit_logistic's loss is (1/n) sum_i a_i l_i: its penalty (lambda / 2) ||w||^2 is rescaled to match ours
    return fit_logistic(Phi, y, 2 * ridge * weight.sum(-1) / n, weight=weight, offset=offset)


def fit_heads(
    model: Model,
    theta: Params,
    X: Tensor,
    y: Tensor,
    weight: Tensor | None = None,
    ridge: float | Tensor = 1e-6,
    *,
    classes: int | None = None,
    prior: HeadPrior | None = None,
) -> Tensor:
    """Per-task heads on fixed features, minimising the weighted mean loss ``sum_i a_i l_i / sum_i a_i``
    (``a`` = ``weight``, 1 when ``None``) plus ``ridge ||w||^2`` (a number or ``(T,)``): ridge least
    squares, L2-regularised logistic regression (Newton), or for ``"multiclass"`` multinomial
    logistic regression (Newton, :func:`adaptrep.multiclass.fit_multinomial`; ``classes`` as in
    :func:`num_classes`). With a ``prior`` ``(mu, S)`` (:data:`HeadPrior`) the penalty is
    ``ridge (w - mu)^T S^{-1} (w - mu)`` instead: the heads are shrunk toward ``mu`` in the geometry of ``S``.
    Returns ``(T, k)``, or ``(T, k, N)`` for ``"multiclass"``."""
    Phi = vmap(model.features, in_dims=(None, 0))(theta, X)
    ridge = torch.as_tensor(ridge, dtype=Phi.dtype, device=Phi.device).expand(Phi.shape[0])
    N = num_classes(model, y, weight, classes) if model.loss == "multiclass" else None
    return _fit_heads(model.loss, Phi, y, weight, ridge, N, prior)


#: Ridge strengths that :func:`cv_heads` chooses from.
RIDGES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: Scales of a head prior's penalty that :func:`cv_heads` chooses from, in units of ``1 / (2 m)`` (``m``
#: the samples fitted): 1 is the posterior mode for the logistic and multiclass log-likelihoods under
#: ``N(mu, S)``. The source heads' covariance ``S`` includes their estimation noise, so it overstates
#: the population's spread and the classification scales start at 1 (never a weaker prior than the
#: source tasks show; on a few shots a cross-validated choice below it overfits: contraception, 1
#: shot). The squared loss's posterior mode is at ``2 sigma^2``, unknown here: its grid reaches lower.
PRIOR_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
PRIOR_SCALES_SQUARED = (1 / 64, 1 / 16, 1 / 4, 1.0, 4.0, 16.0, 64.0, 256.0)


def _fold_masks(R: int, m: int, folds: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """Held-out masks ``(R, F, m)`` of equal-size tasks (:func:`adaptrep.cv.fold_masks`)."""
    return cv.fold_masks(like[:R, :m], folds, generator).held_out


def _repeat(tensor: Tensor, times: int) -> Tensor:
    """``(R, ...)`` -> ``(R * times, ...)``, each row repeated ``times`` times in a row."""
    return tensor.unsqueeze(1).expand(tensor.shape[0], times, *tensor.shape[1:]).reshape(tensor.shape[0] * times, *tensor.shape[1:])


def _weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Per-row weighted mean ``sum_i a_i v_i / sum_i a_i`` (NaN for a row of zero weight)."""
    return (values * weight).sum(-1) / weight.sum(-1)


def _multinomial_path(Phi: Tensor, y: Tensor, weight: Tensor, grid: Tensor, classes: int | None) -> Tensor:
    """Multiclass heads for rows ordered (task, fold, strength), strength fastest: one strength at a
    time from the strongest, each solve started from the previous strength's heads (Newton from a
    nearby optimum needs a few steps instead of a dozen from zero); the same optima as one batch."""
    assert classes is not None
    L = grid.numel()
    rows = Phi.shape[0] // L
    by = lambda value: value.reshape(rows, L, *value.shape[1:])  # noqa: E731
    Phi_, y_, weight_ = by(Phi), by(y), by(weight)
    heads: list[Tensor | None] = [None] * L
    last = None
    for index in grid.argsort(descending=True).tolist():  # the grid's strengths, not the tasks
        last = fit_multinomial(Phi_[:, index], y_[:, index], grid[index], classes, weight=weight_[:, index], init=last)
        heads[index] = last
    return torch.stack(heads, 1).flatten(0, 1)  # type: ignore[arg-type]


def cv_heads(
    model: Model,
    theta: Params,
    X: Tensor,
    y: Tensor,
    generator: torch.Generator | None = None,
    folds: int = 5,
    ridges: tuple[float, ...] | None = None,
    *,
    weight: Tensor | None = None,
    classes: int | None = None,
    prior: HeadPrior | None = None,
) -> tuple[Tensor, Tensor]:
    """Heads on fixed features with the ridge strength chosen per target by ``folds``-fold
    cross-validation of the held-out loss (all targets x folds x strengths in one batch; folds
    among each target's real samples, :func:`adaptrep.cv.fold_masks`). With a ``prior`` ``(mu, S)``
    the strength is the scale ``s`` of the penalty ``s (w - mu)^T S^{-1} (w - mu)`` (:func:`fit_heads`),
    ``s = c / (2 m)`` for ``m`` the samples (total weight) fitted, the factor ``c`` chosen by the same
    cross-validation from ``ridges`` (default :data:`PRIOR_SCALES`, :data:`PRIOR_SCALES_SQUARED` for the
    squared loss; without a prior :data:`RIDGES`, absolute strengths). Returns the heads ``(R, k)``
    (``(R, k, N)`` for ``"multiclass"``) refitted on all the data and the chosen strengths ``(R,)``
    (with a prior, ``s`` for all the data)."""
    R = X.shape[0]
    if ridges is None:
        ridges = RIDGES if prior is None else PRIOR_SCALES_SQUARED if model.loss == "squared" else PRIOR_SCALES
    split = cv.fold_masks(X, folds, generator, weight)
    F, L = split.held_out.shape[1], len(ridges)
    Phi = vmap(model.features, in_dims=(None, 0))(theta, X)
    N = num_classes(model, y, weight, classes) if model.loss == "multiclass" else None
    grid = torch.tensor(ridges, dtype=Phi.dtype, device=Phi.device)
    train, held = cv.grid_weights(split, weight, L)  # rows (target, fold, strength)
    PhiF, yF = _repeat(Phi, F * L), _repeat(y, F * L)
    strengths = grid.repeat(R * F)
    if prior is not None:
        strengths = strengths / (2 * train.sum(-1).clamp_min(torch.finfo(Phi.dtype).tiny))
        w = _fit_heads(model.loss, PhiF, yF, train, strengths, N, prior)
    elif model.loss == "multiclass":
        w = _multinomial_path(PhiF, yF, train, grid, N)
    else:
        w = _fit_heads(model.loss, PhiF, yF, train, strengths, N)
    held_out = _weighted_mean(pointwise_loss(model.loss, predict(model.loss, PhiF, w), yF), held)
    chosen = grid[cv.select(held_out.reshape(R, F, L), "min", split.partial())]
    if prior is not None:
        counts = torch.full((R,), float(X.shape[1]), dtype=Phi.dtype, device=Phi.device) if weight is None else weight.sum(-1).to(Phi.dtype)
        chosen = chosen / (2 * counts)
    return _fit_heads(model.loss, Phi, y, weight, chosen, N, prior), chosen


@dataclass
class SharedFit:
    """Result of :func:`fit_shared`: the shared ``theta``, per-task ``delta`` and heads ``w``."""

    theta: Params
    delta: Params | None
    w: Tensor
    objective: float
    grad_norm: float
    history: list[float] = field(default_factory=list)


def _objective(model: Model, lam: float | Tensor | None, gamma: float | Tensor) -> Callable[..., Tensor]:
    """Per-task source objectives ``(T,)`` as a function of ``(theta, delta, w, X, y[, weight])`` (``lam``, ``gamma``: numbers or 0-dim tensors)."""

    def one(theta: Params, delta: Params | None, w: Tensor, X: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        value = task_loss(model, theta, delta, w, X, y, weight) + gamma * (w * w).sum()
        if delta is not None and lam is not None:
            value = value + lam * sum((d * d).sum() for d in delta.values())
        return value

    delta_dim = None if lam is None else 0
    unweighted = vmap(lambda theta, delta, w, X, y: one(theta, delta, w, X, y, None), in_dims=(None, delta_dim, 0, 0, 0))
    weighted = vmap(one, in_dims=(None, delta_dim, 0, 0, 0, 0))

    def objective(theta: Params, delta: Params | None, w: Tensor, X: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
        return unweighted(theta, delta, w, X, y) if weight is None else weighted(theta, delta, w, X, y, weight)

    return objective


def fit_shared(
    model: Model,
    theta0: Params,
    X: Tensor,
    y: Tensor,
    *,
    lam: float | None,
    gamma: float = 0.0,
    steps: int = 600,
    lr: float = 0.03,
    weight: Tensor | None = None,
    classes: int | None = None,
    compile: str = "auto",
) -> SharedFit:
    """Source training of the generic objective (module docstring) by full-batch Adam.

    ``lam=None`` is FROZENREP (no perturbations). Heads start from their fit on ``theta0``'s
    features, perturbations from 0; the learning rate decays on a cosine from ``lr`` to
    ``lr / 100``; ``theta`` is retracted to its normal form after every step. With ``weight``
    ``(T, n)`` each task's loss is its weighted mean (ragged tasks: 0 on padding); ``classes`` as in
    :func:`num_classes` (``"multiclass"``: heads ``(T, k, N)``).

    ``compile``: ``"never"`` runs the steps eagerly with ``torch.optim.Adam`` (the reference);
    ``"always"`` runs one compiled function per step (objective, gradient, the same Adam update and
    learning rate, retraction: :func:`_shared_step`), the same numbers up to rounding; ``"auto"`` compiles
    when :func:`should_compile_steps` says the run is long enough. A failed compilation falls back to
    the eager steps with a warning.
    """
    check_compile_mode(compile)
    theta = {name: value.detach().clone().requires_grad_() for name, value in model.retract(theta0).items()}
    T = X.shape[0]
    delta = (
        None
        if lam is None
        else {name: torch.zeros(T, *value.shape, dtype=value.dtype, device=value.device, requires_grad=True) for name, value in theta.items()}
    )
    w = fit_heads(model, {n: v.detach() for n, v in theta.items()}, X, y, weight=weight, ridge=max(gamma, 1e-6), classes=classes).requires_grad_()
    objective = _objective(model, lam, gamma)
    leaves = [*theta.values(), *(delta.values() if delta else []), w]
    history: list[Tensor] | None = None
    if compile == "always" or (compile == "auto" and should_compile_steps(steps)):
        history = _fit_compiled(model, theta, delta, w, X, y, weight, lam, gamma, steps, lr)
    if history is None:
        history = _fit_eager(model, objective, theta, delta, w, X, y, weight, steps, lr)
    for leaf in leaves:
        leaf.grad = None
    value = objective(theta, delta, w, X, y, weight).mean()
    value.backward()
    grad_norm = math.sqrt(sum(float((leaf.grad**2).sum()) for leaf in leaves if leaf.grad is not None))
    detach = lambda params: {n: v.detach() for n, v in params.items()}  # noqa: E731
    values = torch.stack(history).tolist() if history else []
    return SharedFit(detach(theta), None if delta is None else detach(delta), w.detach(), float(value.detach()), grad_norm, values)


def _fit_compiled(
    model: Model,
    theta: Params,
    delta: Params | None,
    w: Tensor,
    X: Tensor,
    y: Tensor,
    weight: Tensor | None,
    lam: float | None,
    gamma: float,
    steps: int,
    lr: float,
) -> list[Tensor] | None:
    """:func:`fit_shared`'s steps by the compiled :func:`_shared_step`: the leaves are overwritten with
    the result and the objectives before each step returned; ``None`` (leaves untouched) if the
    compilation failed (with a warning)."""
    from .meta import Adam  # the functional Adam of the meta-learning engine (meta imports this module)

    names = list(theta)
    step = compile_function(_shared_step(model, tuple(names), delta is not None))
    params = [*(v.detach() for v in theta.values()), *(delta.values() if delta is not None else []), w]
    params = [p.detach().clone() for p in params]
    state = Adam(1.0).init(params)
    like = params[-1]
    rates = torch.tensor(_cosine_rates(lr, steps), dtype=like.dtype, device=like.device)
    penalty = torch.tensor(0.0 if lam is None else lam, dtype=like.dtype, device=like.device)
    ridge = torch.tensor(gamma, dtype=like.dtype, device=like.device)
    history: list[Tensor] = []
    for i in range(steps):
        if i == 0:
            try:
                value, params, state = step(params, state, rates[i], penalty, ridge, X, y, weight)
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                warnings.warn(f"torch.compile of the source step failed ({type(error).__name__}: {error}); running eager", RuntimeWarning, stacklevel=3)
                return None
        else:
            value, params, state = step(params, state, rates[i], penalty, ridge, X, y, weight)
        history.append(value)
    with torch.no_grad():
        for leaf, new in zip([*theta.values(), *(delta.values() if delta is not None else []), w], params, strict=True):
            leaf.copy_(new)
    return history


def _cosine_rates(lr: float, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` steps: ``torch.optim.lr_scheduler.CosineAnnealingLR`` from ``lr`` to
    ``lr / 100`` (the eager path's schedule, by the same recursion, so the same floats)."""
    optimiser = torch.optim.SGD([torch.zeros(())], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=lr / 100)
    rates = []
    for _ in range(steps):
        rates.append(float(optimiser.param_groups[0]["lr"]))
        optimiser.step()  # no gradient: nothing moves (and the scheduler sees the optimiser step first)
        schedule.step()
    return rates


def _shared_step(model: Model, names: tuple[str, ...], perturbed: bool) -> Callable[..., tuple[Tensor, list[Tensor], Any]]:
    """One step of :func:`fit_shared` as a pure function of tensors, which
    :func:`adaptrep.compiling.compile_function` compiles: ``(params, state, lr, lam, gamma, X, y, weight)
    -> (objective, params, state)`` with ``params = [*theta, *delta, w]`` (``theta``'s values in
    ``names`` order; ``delta`` if ``perturbed``), ``state`` :class:`adaptrep.meta.Adam`'s, and the
    learning rate and penalties 0-dim tensors (new values do not recompile). The gradient is
    :func:`torch.func.grad_and_value`'s, the update ``torch.optim.Adam``'s (:class:`adaptrep.meta.Adam`
    with step 1, scaled by ``lr``), then ``theta`` is retracted. Every call returns a function with the
    same code, so fits of the same model and shapes share one compiled graph."""
    from .meta import Adam

    adam, k = Adam(1.0), len(names)

    def step(params: list[Tensor], state: Any, lr: Tensor, lam: Tensor, gamma: Tensor, X: Tensor, y: Tensor, weight: Tensor | None):
        objective = _objective(model, lam if perturbed else None, gamma)

        def total(params: list[Tensor]) -> Tensor:
            theta = dict(zip(names, params[:k], strict=True))
            delta = dict(zip(names, params[k:-1], strict=True)) if perturbed else None
            return objective(theta, delta, params[-1], X, y, weight).mean()

        grads, value = torch.func.grad_and_value(total)(params)
        updates, state = adam.update(grads, state, params)
        params = [p + lr * u for p, u in zip(params, updates, strict=True)]
        theta = model.retract(dict(zip(names, params[:k], strict=True)))
        return value, [*(theta[name] for name in names), *params[k:]], state

    return step


#: ``compile="auto"`` compiles :func:`fit_shared` runs of at least this many steps (and :func:`finetune`
#: runs of at least this many ``max_steps``). The first compiled call costs 5-40 s (Dynamo's trace and
#: inductor's build, on a shared 2-core machine; 0.4-5 s from the on-disk cache in a later process), and a
#: compiled step saves about 1 ms on the ``relu-net`` preset's source tasks (2 ms eager, 1 compiled) and
#: 5-15 ms on a small CNN over 10,000 digit images (``benchmarks/compiled_source_training.py``, docs/benchmarks.md):
#: the default 600 steps do not repay a compilation, so runs of the default length stay eager.
COMPILE_MIN_STEPS = 5000


def should_compile_steps(steps: int) -> bool:
    """Whether ``compile="auto"`` compiles a run of ``steps`` steps of :func:`fit_shared` or :func:`finetune` (:data:`COMPILE_MIN_STEPS`)."""
    return steps >= COMPILE_MIN_STEPS


def _fit_eager(
    model: Model,
    objective: Callable[..., Tensor],
    theta: Params,
    delta: Params | None,
    w: Tensor,
    X: Tensor,
    y: Tensor,
    weight: Tensor | None,
    steps: int,
    lr: float,
) -> list[Tensor]:
    """:func:`fit_shared`'s steps, eager, with ``torch.optim.Adam`` on the leaves (the reference)."""
    leaves = [*theta.values(), *(delta.values() if delta else []), w]
    optimiser = torch.optim.Adam(leaves, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=lr / 100)
    history: list[Tensor] = []
    for _ in range(steps):
        optimiser.zero_grad()
        value = objective(theta, delta, w, X, y, weight).mean()
        value.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            for name, new in model.retract({n: v.detach() for n, v in theta.items()}).items():
                theta[name].copy_(new)
        history.append(value.detach())  # read back once at the end: no device sync per step
    return history


def finetune(
    model: Model,
    theta: Params,
    X: Tensor,
    y: Tensor,
    generator: torch.Generator | None = None,
    *,
    folds: int = 5,
    max_steps: int = 256,
    lr: float = 0.5,
    momentum: float = 0.5,
    ridge: float | Tensor = 1e-6,
    weight: Tensor | None = None,
    classes: int | None = None,
    prior: HeadPrior | None = None,
    compile: str = "auto",
) -> tuple[Params, Tensor, Tensor]:
    """Fine-tune ``(Delta, w)`` on each target from ``(0, fitted head)`` by gradient descent with
    Nesterov momentum ``momentum`` (step ``lr`` over a curvature bound; plain gradient descent,
    ``momentum=0``, needs several times more steps on the ill-conditioned ReLU targets), stopped after the number of steps (0, 1, 2, 4, ... up to
    ``max_steps``) that the one-standard-error rule picks from the ``folds``-fold cross-validated
    held-out loss (:func:`adaptrep.cv.one_standard_error`; held-out losses of a few samples are
    noisy). All targets and folds are one batch.

    The heads carry the penalty ``ridge ||w||^2`` (a number or ``(R,)``, e.g. from :func:`cv_heads`),
    or with a ``prior`` ``(mu, S)`` the penalty ``ridge (w - mu)^T S^{-1} (w - mu)``: they start from the
    prior-shrunk fit and descend in the whitened deviation ``u = L^{-1} (w - mu)`` (``S = L L^T``).
    With ``weight`` ``(R, m)`` the losses are weighted means and the folds are drawn among the real
    samples (``weight > 0``). Returns the perturbations (per target), heads ``(R, k)`` (``(R, k, N)``
    for ``"multiclass"``) and chosen step counts ``(R,)``.

    ``compile``: the descent's steps eager (``"never"``, the reference), compiled (``"always"``: one
    compiled function per step, :func:`_descent_step`; the same numbers up to rounding; the cross-validation
    paths and the final one have different shapes, so two compilations), or ``"auto"``: compiled when
    :func:`should_compile_steps` says ``max_steps`` is long enough. A failed compilation runs eager with a warning.
    """
    check_compile_mode(compile)
    compiled = compile == "always" or (compile == "auto" and should_compile_steps(max_steps))
    R, m = X.shape[:2]
    split = cv.fold_masks(X, folds, generator, weight)
    F = split.held_out.shape[1]
    train, valid = cv.grid_weights(split, weight, 1)  # (R * F, m)
    N = num_classes(model, y, weight, classes) if model.loss == "multiclass" else None
    ridge = torch.as_tensor(ridge, dtype=X.dtype, device=X.device).expand(R)
    checkpoints = [0, *(2**i for i in range(max(0, max_steps).bit_length()) if 2**i <= max_steps)]
    curves = _descend(model, theta, _repeat(X, F), _repeat(y, F), train, valid, _repeat(ridge, F), checkpoints, lr, momentum, N, prior, compiled)[2]
    best = one_standard_error(curves.reshape(R, F, -1), present=split.partial())
    full = torch.ones(R, m, dtype=X.dtype, device=X.device) if weight is None else weight.to(X.dtype)
    deltas, heads, fitted = _descend(model, theta, X, y, full, None if prior is None else full, ridge, checkpoints, lr, momentum, N, prior, compiled)
    if prior is not None:
        # a safety net: the path on all the samples can diverge where the folds' did not (a head growing
        # past its start); stop before its training loss explodes (more than 2 x its start + 1)
        bad = ~(fitted <= 2 * fitted[:, :1] + 1)  # (R, C), NaN and infinity count as bad
        first_bad = torch.where(bad.any(-1), bad.to(torch.int64).argmax(-1), torch.full_like(best, len(checkpoints)))
        best = torch.minimum(best, first_bad - 1).clamp_min(0)
    pick = torch.arange(R, device=X.device)
    return {n: v[best, pick] for n, v in deltas.items()}, heads[best, pick], torch.tensor(checkpoints, device=X.device)[best]


#: Penalties on the part of a logistic predictor outside the learned span, in units of ``d / m``,
#: strongest first (``1e6`` is head-only adaptation).
SUBSPACE_PENALTIES = (1e6, 100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1)


def _subspace_ridge(B: Tensor, X: Tensor, y: Tensor, ridge: Tensor, penalty: Tensor, weight: Tensor | None = None, prior: HeadPrior | None = None) -> Tensor:
    """``argmin_beta mean log-loss + ridge ||beta||^2 + penalty ||(I - B B^T) beta||^2`` per task
    (``B`` orthonormal), by rescaling the complement of ``span(B)`` so that the penalty becomes
    an isotropic ridge for :func:`fit_logistic` (``weight``: its per-sample weights, the loss then
    ``(1/n) sum_i a_i l_i``). With a head ``prior`` ``(mu, S)`` the penalty is
    ``ridge (w - mu)^T S^{-1} (w - mu) + penalty ||(I - B B^T) beta||^2`` with ``w = B^T beta``: ``beta =
    B (mu + L u) + B_perp sqrt(ridge / penalty) u'`` (``S = L L^T``) and the ridge ``ridge ||(u, u')||^2``,
    with the offset ``X B mu``."""
    d, k = B.shape
    Q = torch.linalg.qr(B, mode="complete")[0]  # [B, B_perp]
    if prior is not None:
        mu, L = _prior_factor(prior, X)
        basis = torch.cat([(B @ L).expand(X.shape[0], d, k), Q[:, k:] * torch.sqrt(ridge / penalty)[:, None, None]], -1)
        centre = B @ mu
        offset = (X @ centre.unsqueeze(-1)).squeeze(-1)
        u = fit_logistic(matmul(X, basis), y, 2 * ridge, weight=weight, offset=offset)
        return centre + (basis @ u.unsqueeze(-1)).squeeze(-1)
    stretch = torch.ones(X.shape[0], d, dtype=X.dtype, device=X.device)
    stretch[:, k:] = torch.sqrt(ridge / (ridge + penalty)).unsqueeze(-1)
    basis = Q.unsqueeze(0) * stretch.unsqueeze(1)  # beta = basis @ u with ridge ||u||^2
    u = fit_logistic(matmul(X, basis), y, 2 * ridge, weight=weight)
    return (basis @ u.unsqueeze(-1)).squeeze(-1)


def logistic_finetune(
    B: Tensor,
    X: Tensor,
    y: Tensor,
    ridge: Tensor,
    generator: torch.Generator | None = None,
    folds: int = 5,
    penalties: tuple[float, ...] = SUBSPACE_PENALTIES,
    *,
    weight: Tensor | None = None,
    prior: HeadPrior | None = None,
) -> tuple[Tensor, Tensor]:
    """Fine-tuning of a linear representation for logistic targets, in its penalised form: the
    predictor ``beta = (B + Delta) w`` may leave ``span(B)`` at the price ``penalty ||beta_perp||^2``
    (``beta_perp = Delta w`` projected off the span; the heads keep their ``ridge``), with the
    penalty chosen per target from ``penalties x d / m`` by ``folds``-fold cross-validation of the
    held-out log-loss (all targets x folds x penalties in one batched Newton solve). The grid's
    floor ``0.1 d / m`` keeps a noisy choice at small ``m`` from reaching the full-dimensional fit.
    With ``weight`` ``(R, n)`` the losses are weighted means, ``m`` is each target's number of real
    samples and the folds are drawn among them. With a head ``prior`` ``(mu, S)`` the heads' ridge is
    ``ridge (w - mu)^T S^{-1} (w - mu)`` instead (:func:`_subspace_ridge`). Returns ``beta`` ``(R, d)``
    and the chosen penalties ``(R,)``."""
    R, n, d = X.shape
    split = cv.fold_masks(X, folds, generator, weight)
    F, L = split.held_out.shape[1], len(penalties)
    counts = torch.full((R,), n, dtype=X.dtype, device=X.device) if weight is None else (weight > 0).sum(-1).to(X.dtype)
    grid = torch.tensor(penalties, dtype=X.dtype, device=X.device) * d / counts.unsqueeze(-1)  # (R, L)
    XF, yF, ridgeF = _repeat(X, F * L), _repeat(y, F * L), _repeat(ridge, F * L)
    train, held = cv.grid_weights(split, weight, L)  # rows (target, fold, strength)
    share = train.sum(-1) / n  # fit_logistic's loss is a sum over the rows / n: penalties rescaled to match
    penaltyF = _repeat(grid, F).reshape(-1)
    if weight is None:  # 0/1 masks: held-out rows zeroed add a constant to the mean loss and nothing to its gradient
        beta = _subspace_ridge(B, XF * train.unsqueeze(-1), yF * train, ridgeF * share, penaltyF * share, prior=prior)
    else:
        beta = _subspace_ridge(B, XF, yF, ridgeF * share, penaltyF * share, weight=train, prior=prior)
    margin = (XF @ beta.unsqueeze(-1)).squeeze(-1)
    held_out = _weighted_mean(torch.nn.functional.softplus(margin) - yF * margin, held)
    best = cv.select(held_out.reshape(R, F, L), "min", split.partial())  # ties: the stronger penalty
    chosen = grid.gather(1, best.unsqueeze(-1)).squeeze(-1)
    if weight is None:
        return _subspace_ridge(B, X, y, ridge, chosen, prior=prior), chosen
    share = weight.sum(-1) / n
    return _subspace_ridge(B, X, y, ridge * share, chosen * share, weight=weight, prior=prior), chosen


def _descend(
    model: Model,
    theta: Params,
    X: Tensor,
    y: Tensor,
    train: Tensor,
    valid: Tensor | None,
    ridge: Tensor,
    checkpoints: list[int],
    lr: float,
    momentum: float,
    classes: int | None = None,
    prior: HeadPrior | None = None,
    compiled: bool = False,
) -> tuple[Params, Tensor, Tensor]:
    """Gradient descent with Nesterov momentum on ``(Delta, w)`` per task (losses weighted by ``train``)
    from ``(0, head)``, with the step ``lr / L_t`` for a curvature bound ``L_t``; snapshots after each number of steps in
    ``checkpoints`` (``(C, T, ...)``) and, with ``valid``, the held-out loss there weighted by
    ``valid`` (``(T, C)``; NaN or infinite where ``valid`` is all zero or the path diverged). With a
    ``prior`` the head is ``w = mu + L u`` and the descent is on ``u`` with the penalty ``ridge ||u||^2``,
    and the perturbations' step bound uses ``||w||^2`` at least the prior's ``E ||w||^2 = ||mu||^2 + N tr S``
    (a head shrunk toward a small mean would otherwise give steps too long once it grows). ``compiled``:
    the steps by the compiled :func:`_descent_step` (eager if its compilation fails, with a warning)."""
    T = X.shape[0]
    w = fit_heads(model, theta, X, y, weight=train, ridge=ridge, classes=classes, prior=prior)
    factor = None if prior is None else _prior_factor(prior, w)
    scale = w
    if prior is not None:  # the perturbations' bound takes heads at least as large as the prior's typical ||w||^2
        typical = (prior[0].to(w) ** 2).sum() + (1 if w.ndim == 2 else w.shape[-1]) * torch.diagonal(prior[1].to(w)).sum()
        norm2 = (w * w).flatten(1).sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
        scale = w * (typical / norm2).clamp_min(1.0).sqrt().view(-1, *[1] * (w.ndim - 1))
    delta_step, head_step = (lr / bound for bound in _curvature(model, theta, X, train, scale, None if factor is None else (factor[1], ridge)))
    if factor is not None:
        w = _to_deviation(*factor, w)  # the leaf is the whitened deviation u; head(u) the head
    w.requires_grad_()
    head: Callable[[Tensor], Tensor] = (lambda u: u) if factor is None else (lambda u: _from_deviation(*factor, u))
    delta = {name: torch.zeros(T, *value.shape, dtype=value.dtype, device=value.device, requires_grad=True) for name, value in theta.items()}
    task = vmap(lambda d, w, X, y, weight: task_loss(model, theta, d, w, X, y, weight), in_dims=(0, 0, 0, 0, 0))
    loss = task if factor is None else (lambda d, u, X, y, weight: task(d, head(u), X, y, weight))
    snapshots_delta: dict[str, list[Tensor]] = {name: [] for name in delta}
    snapshots_w: list[Tensor] = []
    held_out: list[Tensor] = []
    velocities = [torch.zeros_like(leaf) for leaf in [*delta.values(), w]]
    names = list(delta)
    compiled_step = compile_function(_descent_step(model, tuple(names), momentum)) if compiled else None
    for step in range(checkpoints[-1] + 1):
        if step in checkpoints:
            with torch.no_grad():
                for name, value in delta.items():
                    snapshots_delta[name].append(value.detach().clone())
                snapshots_w.append(head(w.detach()).clone())
                if valid is not None:
                    held_out.append(torch.nan_to_num(loss(delta, w, X, y, valid), nan=math.inf))
        if step == checkpoints[-1]:
            break
        if compiled_step is not None:
            inputs = (theta, [*(value.detach() for value in delta.values()), w.detach()], velocities, X, y, train, ridge, delta_step, head_step, factor)
            try:
                params, velocities = compiled_step(*inputs)
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                if step > 0:
                    raise
                warnings.warn(f"torch.compile of the fine-tuning step failed ({type(error).__name__}: {error}); running eager", RuntimeWarning, stacklevel=3)
                compiled_step = None
            else:
                delta, w = dict(zip(names, params[:-1], strict=True)), params[-1]
                continue
        leaves = [*delta.values(), w]
        grads = torch.autograd.grad((loss(delta, w, X, y, train) + ridge * (w * w).flatten(1).sum(-1)).sum(), leaves)
        steps = [delta_step] * len(delta) + [head_step]
        with torch.no_grad():
            for leaf, grad, size, velocity in zip(leaves, grads, steps, velocities, strict=True):
                update = size.view(-1, *[1] * (leaf.ndim - 1)) * grad
                velocity.mul_(momentum).add_(update)
                leaf -= momentum * velocity + update
    curves = torch.stack(held_out, -1) if held_out else torch.empty(0)
    return {n: torch.stack(v) for n, v in snapshots_delta.items()}, torch.stack(snapshots_w), curves


def _descent_step(model: Model, names: tuple[str, ...], momentum: float) -> Callable[..., tuple[list[Tensor], list[Tensor]]]:
    """One step of :func:`_descend` as a pure function of tensors, which :func:`adaptrep.compiling.compile_function`
    compiles: ``(theta, params, velocities, X, y, train, ridge, delta_step, head_step, factor) -> (params, velocities)``
    with ``params = [*Delta (in names order), w]`` (``w`` the whitened deviation ``u`` with a prior's
    ``factor = (mu, L)``, else ``None``), the gradient :func:`torch.func.grad`'s and the same Nesterov update."""

    def step(
        theta: Params,
        params: list[Tensor],
        velocities: list[Tensor],
        X: Tensor,
        y: Tensor,
        train: Tensor,
        ridge: Tensor,
        delta_step: Tensor,
        head_step: Tensor,
        factor: tuple[Tensor, Tensor] | None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        task = vmap(lambda d, w, X, y, weight: task_loss(model, theta, d, w, X, y, weight), in_dims=(0, 0, 0, 0, 0))

        def total(params: list[Tensor]) -> Tensor:
            delta, u = dict(zip(names, params[:-1], strict=True)), params[-1]
            head = u if factor is None else _from_deviation(*factor, u)
            return (task(delta, head, X, y, train) + ridge * (u * u).flatten(1).sum(-1)).sum()

        grads = torch.func.grad(total)(params)
        sizes = [delta_step] * len(names) + [head_step]
        new_params, new_velocities = [], []
        for leaf, grad, size, velocity in zip(params, grads, sizes, velocities, strict=True):
            update = size.view(-1, *[1] * (leaf.ndim - 1)) * grad
            velocity = velocity * momentum + update
            new_velocities.append(velocity)
            new_params.append(leaf - (momentum * velocity + update))
        return new_params, new_velocities

    return step


#: Upper bounds on the second derivative of each loss in the prediction (for ``"multiclass"``: the
#: largest eigenvalue of the cross-entropy's Hessian in the logits, ``diag(p) - p p^T``).
CURVATURE = {"squared": 2.0, "logistic": 0.25, "multiclass": 0.5}


def _curvature(model: Model, theta: Params, X: Tensor, weight: Tensor, w: Tensor, prior: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-task bounds on the curvature of the loss at the start, for the perturbations and the
    head separately (``(T,)`` each; one step size for both would be ill-conditioned):
    ``c lambda_max(X^T A X / sum A) ||w||^2 l^2`` for ``Delta`` (``A = diag(weight)``, ``l`` the
    features' Lipschitz constant in ``theta``: exact for the linear model; ``||w||`` the Frobenius
    norm of an N-way head) and ``c lambda_max(Phi^T A Phi / sum A)`` for ``w``, with ``c`` the loss's
    largest second derivative. They are fixed at the start; a path that diverges later gets an
    infinite held-out loss and is not chosen. Inputs of any shape are flattened per sample. With
    ``prior`` ``(L, ridge)`` the head is the whitened deviation ``u`` (``w = mu + L u``): its bound is
    ``c lambda_max(L^T Phi^T A Phi L / sum A) + 2 ridge`` (the penalty ``ridge ||u||^2`` included)."""
    count = weight.sum(-1)[:, None, None]
    Xf = X.flatten(2)
    if Xf.shape[-1] <= Xf.shape[-2]:
        inputs = torch.linalg.eigvalsh(matmul((Xf * weight.unsqueeze(-1)).transpose(-1, -2), Xf) / count)[..., -1]
    else:  # wide inputs (e.g. images): the same largest eigenvalue from the n x n Gram matrix
        root = Xf * weight.sqrt().unsqueeze(-1)
        inputs = torch.linalg.eigvalsh(matmul(root, root.transpose(-1, -2)) / count)[..., -1]
    Phi = vmap(model.features, in_dims=(None, 0))(theta, X)
    if prior is not None:
        Phi = Phi @ prior[0]
    features = torch.linalg.eigvalsh(matmul((Phi * weight.unsqueeze(-1)).transpose(-1, -2), Phi) / count)[..., -1]
    c = CURVATURE[model.loss]
    head = c * features + 1e-12 if prior is None else c * features + 2 * prior[1] + 1e-12
    return c * inputs * (w * w).flatten(1).sum(-1) * model.lipschitz(theta) ** 2 + 1e-12, head


def describe(fit: SharedFit) -> dict[str, Any]:
    """Diagnostics of a source fit for ``Method.info``."""
    return {"source_objective": fit.objective, "source_grad_norm": fit.grad_norm, "source_iterations": len(fit.history)}
