"""Meta-learning of an initialisation ``(theta, w)`` over tasks, vectorised over tasks.

A predictor is ``f(x) = <phi_theta(x), w>`` (:class:`adaptrep.models.Model`); task ``t`` has a
support set ``S_t`` and a query set ``Q_t`` (the same data by default, as in the paper) and the
loss ``L_t(theta, w; D)`` (the mean of the model's pointwise loss on ``D``). The inner loop is ``K``
gradient steps of size ``alpha`` on the support loss,

    (theta_t^0, w_t^0) = (theta, w),   (theta_t^{j+1}, w_t^{j+1}) = (theta_t^j, w_t^j) - alpha grad L_t(theta_t^j, w_t^j; S_t),

and the algorithms (``MetaConfig.algorithm``: a name in :data:`ALGORITHMS` or an :class:`Algorithm`
object) take, for a meta-batch of ``B`` tasks,

- ``maml``: outer loss ``(1/B) sum_t L_t(theta_t^K, w_t^K; Q_t)`` and its exact gradient in
  ``(theta, w)`` through the inner loop (second order);
- ``fomaml``: the same outer loss, with the inner gradients held constant: the meta-gradient is
  ``(1/B) sum_t grad L_t(theta_t^K, w_t^K; Q_t)``;
- ``anil``: the inner loop adapts the head only (``theta_t^j = theta``), second order through the
  head steps unless ``first_order``;
- ``reptile``: the inner loop on the support, meta-"gradient" ``(theta, w) - (1/B) sum_t (theta_t^K, w_t^K)``
  (the step an outer optimiser takes as its gradient); the reported loss is the mean support
  loss at ``(theta, w)``;
- ``pooled``: no inner loop; the gradient of the mean loss of ``(theta, w)`` over the query sets.

:func:`meta_train` gives reptile and pooled all of each task's data (as their support, resp.
query); ``MetaConfig.support`` splits the samples of maml, fomaml and anil only.

An algorithm is a small immutable object (:class:`Algorithm`) that says what sets it apart: what the
inner loop adapts (``head_only``), whether the meta-gradient is second order, whether it splits
support and query, and how the outer gradient is formed (its class: :class:`MetaGradient`,
:class:`Reptile`, :class:`Pooled`). The five above are instances in the registry :data:`ALGORITHMS`;
a variant is one more instance, a new outer rule one more subclass. The outer optimiser is a pure
gradient transform (:class:`Transform`: ``init``/``update`` on trees of tensors; :func:`adam`,
:func:`sgd`), by name through ``MetaConfig.optimizer`` or passed as an object.

Vectorisation: every parameter is stacked over the meta-batch (a leading task dimension ``B``),
the features of all tasks come from one call (a :class:`~adaptrep.models.Model` with
``batched=True`` broadcasts; others go through :func:`torch.func.vmap`), and all the per-task
inner gradients come from ONE gradient of the SUM of the task losses in the stacked parameters
(tasks are independent, so the gradient's slice ``t`` is task ``t``'s own gradient). The head-only
steps of ANIL use the features, which do not change, and the closed-form head gradient
``Phi^T l'(Phi w) / n``. There is no Python loop over tasks.

Ragged tasks: the data are zero-padded to a common size with a per-sample weight (1 for real
samples, 0 for padding, possibly fractional): every task's loss is then its weighted mean
``sum_i a_i l_i / sum_i a_i`` (:func:`inner_adapt`, :func:`meta_gradient`, :func:`meta_train`
with ``weight=...``), and a support/query split draws the support among each task's real samples
(:func:`split_support`). The weights are one more tensor input of the (compiled) step.

Multiclass tasks (``Model.loss == "multiclass"``): the head is ``(k, N)`` (stacked: ``(B, k, N)``),
the predictions are logits ``(B, n, N)`` and ANIL's head gradient is ``Phi^T l'(Phi W) / n`` with the
slope ``softmax - one_hot`` ``(n, N)``.

Two backends compute the same numbers: eager :func:`torch.autograd.grad` (``create_graph`` for second
order) and :mod:`torch.func` (``grad_and_value``), which :func:`torch.compile` traces into one graph;
:func:`meta_train` compiles the whole meta-step (meta-gradient and the outer optimiser's update)
when ``MetaConfig.compile`` says so (see :func:`should_compile`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Protocol, cast, overload, runtime_checkable

import torch
from torch import Tensor
from torch.func import vmap

from .compiling import COMPILED_THREADS, compile_function
from .models import Model, Params, pointwise_loss, pointwise_loss_slope
from .options import MetaOptions

__all__ = [
    "ALGORITHMS",
    "COMPILE_MIN_ITERATIONS",
    "OPTIMIZERS",
    "Adam",
    "Algorithm",
    "Batch",
    "MetaConfig",
    "MetaFit",
    "MetaGradient",
    "Pooled",
    "Reptile",
    "SGD",
    "Transform",
    "adam",
    "apply_updates",
    "get_algorithm",
    "get_optimizer",
    "inner_adapt",
    "meta_gradient",
    "meta_train",
    "sgd",
    "should_compile",
    "split_support",
    "support_size",
    "support_sizes",
]

#: ``compile="auto"`` compiles runs of at least this many iterations: a compilation costs tens of
#: seconds (less from the on-disk cache in a later process) and the compiled step is a few times
#: faster than the eager one, so shorter runs do not repay it.
COMPILE_MIN_ITERATIONS = 2000

#: The Python keywords of the options defined in :class:`~adaptrep.options.MetaOptions`.
_OPTION_KEYWORDS = frozenset(MetaOptions.keywords().values())


@dataclass(frozen=True)
class MetaConfig:
    """Settings of :func:`meta_train` (see the module docstring for the algorithms). The options
    shared with the command line and :class:`~adaptrep.methods.MetaLearner` (all but ``algorithm``
    and ``first_order``) are defined, with their bounds, in :class:`adaptrep.options.MetaOptions`
    (under their keywords: ``iterations`` is ``meta_iterations`` there); this class validates them
    there and gives the engine's defaults.

    ``algorithm``: a name in :data:`ALGORITHMS` or an :class:`Algorithm` object (your own variant;
    :attr:`algo` is the object either way). ``first_order=True`` holds the inner gradients constant
    (:meth:`Algorithm.as_first_order`: ``maml`` becomes ``fomaml``'s rule, ``anil`` first-order ANIL;
    reptile and pooled are first order already). ``optimizer``: ``"adam"`` or ``"sgd"`` with the step
    ``outer_lr``, or a :class:`Transform` object (e.g. ``sgd(0.01, momentum=0.9)``), which carries its
    own step (``outer_lr`` is then unused); :attr:`transform` is the object either way.

    ``support``: ``None`` uses each task's samples both as support and query; ``0 < s < 1`` the
    fraction ``floor(s n)`` of the samples (a fresh random split per task and iteration) as the
    support and the rest as query; an integer ``s >= 1`` that many samples (for the algorithms that
    split, :attr:`Algorithm.splits`). ``chunk``: ``None`` computes the meta-batch as one batch
    (fastest); an integer processes it in chunks of that many tasks and adds up their gradients (same
    numbers up to rounding), so the peak memory is that of ``chunk`` tasks' graphs (``chunk=1``: one
    task's, like a per-task loop). Eager, that costs the batching's speed; compiled, the chunks run as
    one loop in generated C++ (:func:`compile_step`), which keeps most of it.
    """

    algorithm: str | Algorithm
    inner_steps: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 0.001
    optimizer: str | Transform = "adam"
    meta_batch: int = 25
    iterations: int = 1000
    support: float | None = None
    first_order: bool = False
    compile: str = "auto"
    chunk: int | None = None

    def __post_init__(self) -> None:
        get_algorithm(self.algorithm)  # a one-line error for an unknown name or a wrong type
        # the options' bounds are defined once, in MetaOptions: validate (and coerce) through it
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _OPTION_KEYWORDS}
        if not isinstance(self.optimizer, str):
            del named["optimizer"]  # a Transform object, checked below
        missing = [keyword for keyword, value in named.items() if value is None and keyword not in ("support", "chunk")]
        if missing:
            raise ValueError(f"{missing[0]} needs a value; got None")
        for keyword, value in MetaOptions.from_keywords(**named).learner_options().items():
            if keyword in named:
                object.__setattr__(self, keyword, value)
        get_optimizer(self.optimizer, self.outer_lr)

    @property
    def algo(self) -> Algorithm:
        """The :class:`Algorithm` this configuration runs (``first_order`` applied)."""
        algorithm = get_algorithm(self.algorithm)
        return algorithm.as_first_order() if self.first_order else algorithm

    @property
    def transform(self) -> Transform:
        """The outer optimiser as a :class:`Transform` (``optimizer`` by name with ``outer_lr``, or as given)."""
        return get_optimizer(self.optimizer, self.outer_lr)

    @property
    def second_order(self) -> bool:
        """Whether the meta-gradient differentiates through the inner gradients."""
        return self.algo.second_order


# ----------------------------------------------------------------------------- batched model pieces


def _features(model: Model, theta: Params, X: Tensor, stacked: bool) -> Tensor:
    """Features ``(B, n, k)`` of inputs ``X (B, n, d)``: with ``stacked`` parameters (every value
    ``(B, ...)``, task ``t`` uses slice ``t``) or shared ones."""
    if model.batched:
        return model.features(theta, X)
    return vmap(model.features, in_dims=(0 if stacked else None, 0))(theta, X)


def _predict(Phi: Tensor, w: Tensor, multiclass: bool = False) -> Tensor:
    """``Phi (B, n, k)`` with heads ``w (B, k)`` (or a shared ``(k,)``) -> predictions ``(B, n)``; with
    ``multiclass`` heads ``(B, k, N)`` (or a shared ``(k, N)``) -> logits ``(B, n, N)``."""
    if multiclass or w.ndim == 1:
        return Phi @ w
    return (Phi * w.unsqueeze(-2)).sum(-1)  # cheaper than a batched matrix-vector product for small k


def _task_losses(model: Model, theta: Params, w: Tensor, X: Tensor, y: Tensor, stacked: bool, weight: Tensor | None = None) -> Tensor:
    """Per-task mean losses ``(B,)`` (weighted means with ``weight (B, n)``)."""
    values = pointwise_loss(model.loss, _predict(_features(model, theta, X, stacked), w, model.loss == "multiclass"), y)
    if weight is None:
        return values.mean(-1)
    return (values * weight).sum(-1) / weight.sum(-1)


def _stack(theta: Params, B: int) -> Params:
    return {name: value.expand(B, *value.shape) for name, value in theta.items()}


# ----------------------------------------------------------------------------- gradient backends

Grad = Callable[..., tuple[Tensor, Any]]


def _grad_eager(fn: Callable[..., Tensor], args: tuple[Any, ...], create_graph: bool) -> tuple[Tensor, Any]:
    """``(fn(*args), d fn / d args)`` by :func:`torch.autograd.grad` (inputs that are not yet in a
    graph become leaves; ``create_graph`` keeps the gradient differentiable)."""
    leaves, spec = torch.utils._pytree.tree_flatten(args)
    leaves = [x if x.requires_grad else x.detach().requires_grad_() for x in leaves]
    value = fn(*torch.utils._pytree.tree_unflatten(leaves, spec))
    grads = torch.autograd.grad(value, leaves, create_graph=create_graph)
    if not create_graph:
        value = value.detach()
    return value, torch.utils._pytree.tree_unflatten(list(grads), spec)


def _grad_func(fn: Callable[..., Tensor], args: tuple[Any, ...], create_graph: bool) -> tuple[Tensor, Any]:
    """The same by :func:`torch.func.grad_and_value` (differentiable by outer transforms; traceable
    by :func:`torch.compile`)."""
    grads, value = torch.func.grad_and_value(fn, argnums=tuple(range(len(args))))(*args)
    return value, grads


# ----------------------------------------------------------------------------- inner loop


def _adapt(
    model: Model,
    theta: Params,
    w: Tensor,
    X: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    head_only: bool,
    create_graph: bool,
    grad: Grad,
    weight: Tensor | None = None,
) -> tuple[Params, Tensor, Tensor | None]:
    """The inner loop for all tasks at once. ``theta``, ``w`` are shared (unstacked). Returns the
    adapted parameters (``theta`` stacked unless ``head_only``, where it stays shared), the heads
    ``(B, k)`` (``(B, k, N)`` for multiclass) and the mean support loss at the start (``None`` when
    ``steps == 0`` or head-only). With ``weight (B, n)`` the task losses are weighted means."""
    B, n = y.shape
    multiclass = model.loss == "multiclass"
    if head_only:
        Phi = _features(model, theta, X, stacked=False)
        heads = w.expand(B, *w.shape)
        if not create_graph:
            Phi = Phi.detach()
            step_heads = heads.detach()
        share = None if weight is None else weight / weight.sum(-1, keepdim=True)  # a_i / sum a
        for _ in range(steps):
            current = heads if create_graph else step_heads
            slope = pointwise_loss_slope(model.loss, _predict(Phi, current, multiclass), y)  # (B, n) or (B, n, N)
            if multiclass:
                g = Phi.transpose(-1, -2) @ (slope / n if share is None else slope * share.unsqueeze(-1))
            elif share is None:
                g = (Phi * slope.unsqueeze(-1)).sum(-2) / n
            else:
                g = (Phi * (slope * share).unsqueeze(-1)).sum(-2)
            heads = heads - lr * g
            if not create_graph:
                step_heads = step_heads - lr * g
        return theta, heads, None
    stacked, heads = _stack(theta, B), w.expand(B, *w.shape)
    start = None

    def total(theta_s: Params, w_s: Tensor) -> Tensor:
        return _task_losses(model, theta_s, w_s, X, y, stacked=True, weight=weight).sum()

    for step in range(steps):
        value, (g_theta, g_w) = grad(total, (stacked, heads), create_graph)
        if step == 0:
            start = value.detach() / B
        stacked = {name: value - lr * g_theta[name] for name, value in stacked.items()}
        heads = heads - lr * g_w
    return stacked, heads, start


def inner_adapt(
    model: Model,
    theta: Params,
    w: Tensor,
    X: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    head_only: bool = False,
    create_graph: bool = False,
    weight: Tensor | None = None,
) -> tuple[Params, Tensor]:
    """Batched inner loop: ``steps`` gradient steps of size ``lr`` on each task's mean loss from
    the shared ``(theta, w)``, on all parameters or (``head_only``) the head only.

    ``X (B, n, d)``, ``y (B, n)`` -> per-task adapted ``theta`` (each value ``(B, ...)``; with
    ``head_only`` the shared values expanded) and ``w (B, k)`` (``(B, k, N)`` for multiclass heads
    ``(k, N)``). With ``weight (B, n)`` each task's loss is its weighted mean (ragged tasks: 0 on
    padding). With ``create_graph`` the result is
    differentiable through the inner gradients (second order); without, the gradients are constants
    and the result depends on ``(theta, w)`` (if they require grad) through the identity only.
    """
    B = X.shape[0]
    theta_k, w_k, _ = _adapt(model, theta, w, X, y, steps, lr, head_only, create_graph, _grad_eager, weight)
    return (_stack(theta_k, B) if head_only else theta_k), w_k


# ----------------------------------------------------------------------------- algorithms


class Batch(NamedTuple):
    """One meta-batch: support ``Xs (B, ns, ...)``, ``ys (B, ns)``, query ``Xq``, ``yq`` and the
    support and query sample weights ``sw (B, ns)``, ``qw (B, nq)`` of ragged tasks (``None``: all 1)."""

    Xs: Tensor
    ys: Tensor
    Xq: Tensor
    yq: Tensor
    sw: Tensor | None = None
    qw: Tensor | None = None


@dataclass(frozen=True)
class Algorithm:
    """A meta-learning algorithm: what sets it apart from the others, and its outer gradient.

    ``name``: how it is registered and reported. ``head_only``: the inner loop (in meta-training and
    on the target) adapts the head ``w`` only, the representation ``theta`` stays shared.
    ``second_order``: the meta-gradient differentiates through the inner gradients. ``splits``:
    :func:`meta_train` splits each task's samples into support and query as ``MetaConfig.support``
    says (otherwise the algorithm gets all of each task's data, as its support and as its query).

    A subclass says how the outer gradient is formed (:meth:`gradient`): :class:`MetaGradient` (MAML,
    first-order MAML, ANIL), :class:`Reptile` and :class:`Pooled`. The built-in instances are in
    :data:`ALGORITHMS`; a variant is one more instance (``MetaGradient("anil-fo", head_only=True)``),
    a new outer rule one more subclass. Instances are immutable and hold no tensors, so that a compiled
    meta-step can close over them.
    """

    name: str
    head_only: bool = False
    second_order: bool = False
    splits: bool = True

    def gradient(self, model: Model, theta: Params, w: Tensor, batch: Batch, steps: int, lr: float, grad: Grad) -> tuple[Tensor, Params, Tensor]:
        """``(outer loss, grad wrt theta, grad wrt w)`` of the meta-batch ``batch`` at the shared
        ``(theta, w)``, with ``steps`` inner steps of size ``lr``, every gradient taken by the backend
        ``grad(fn, args, create_graph) -> (fn(*args), d fn / d args)`` (eager or :mod:`torch.func`)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its outer gradient")

    def as_first_order(self) -> Algorithm:
        """This algorithm with the inner gradients held constant (itself if it is first order already)."""
        return replace(self, name=f"{self.name}-first-order", second_order=False) if self.second_order else self


@dataclass(frozen=True)
class MetaGradient(Algorithm):
    """The gradient of the mean query loss after the inner loop on the support: through the inner
    gradients (``second_order``: MAML, ANIL) or with them held constant (first-order MAML)."""

    def gradient(self, model: Model, theta: Params, w: Tensor, batch: Batch, steps: int, lr: float, grad: Grad) -> tuple[Tensor, Params, Tensor]:
        Xs, ys, Xq, yq, sw, qw = batch
        head_only = self.head_only
        if self.second_order:

            def outer(theta: Params, w: Tensor) -> Tensor:
                theta_k, w_k, _ = _adapt(model, theta, w, Xs, ys, steps, lr, head_only, True, grad, sw)
                return _task_losses(model, theta_k, w_k, Xq, yq, stacked=not head_only, weight=qw).mean()

            loss, (g_theta, g_w) = grad(outer, (theta, w), False)
            return loss.detach(), g_theta, g_w
        # first order: the query gradient at the adapted parameters (inner gradients constant)
        theta_k, w_k, _ = _adapt(model, _detached(theta), w.detach(), Xs, ys, steps, lr, head_only, False, grad, sw)
        theta_k, w_k = _detached(theta_k), w_k.detach()

        def query(theta: Params, w: Tensor) -> Tensor:
            return _task_losses(model, theta, w, Xq, yq, stacked=not head_only, weight=qw).mean()

        loss, (g_theta, g_w) = grad(query, (theta_k, w_k), False)
        if not head_only:
            g_theta = {name: value.sum(0) for name, value in g_theta.items()}
        return loss.detach(), g_theta, g_w.sum(0)


@dataclass(frozen=True)
class Reptile(Algorithm):
    """The displacement ``(theta, w) - (1/B) sum_t (theta_t^K, w_t^K)`` of the inner loop on the support
    as the outer "gradient"; the loss reported is the mean support loss at ``(theta, w)``."""

    splits: bool = False

    def gradient(self, model: Model, theta: Params, w: Tensor, batch: Batch, steps: int, lr: float, grad: Grad) -> tuple[Tensor, Params, Tensor]:
        Xs, ys, _, _, sw, _ = batch
        theta_k, w_k, start = _adapt(model, _detached(theta), w.detach(), Xs, ys, steps, lr, self.head_only, False, grad, sw)
        if start is None:
            start = _task_losses(model, theta, w, Xs, ys, stacked=False, weight=sw).mean()
        moves = steps and not self.head_only  # a head-only inner loop leaves theta where it is
        g_theta = {name: (value - theta_k[name].mean(0)).detach() if moves else torch.zeros_like(value) for name, value in theta.items()}
        g_w = (w - w_k.mean(0)).detach() if steps else torch.zeros_like(w)
        return start.detach(), g_theta, g_w


@dataclass(frozen=True)
class Pooled(Algorithm):
    """No inner loop: the gradient of the mean query loss of the shared ``(theta, w)`` (training on
    all tasks' data pooled)."""

    splits: bool = False

    def gradient(self, model: Model, theta: Params, w: Tensor, batch: Batch, steps: int, lr: float, grad: Grad) -> tuple[Tensor, Params, Tensor]:
        Xq, yq, qw = batch.Xq, batch.yq, batch.qw

        def pooled(theta: Params, w: Tensor) -> Tensor:
            return _task_losses(model, theta, w, Xq, yq, stacked=False, weight=qw).mean()

        loss, (g_theta, g_w) = grad(pooled, (theta, w), False)
        return loss.detach(), g_theta, g_w


#: The registered algorithms by name (``MetaConfig(algorithm=name)``, the meta-learning methods of
#: :data:`adaptrep.methods.METHODS`). Add an entry to register your own.
ALGORITHMS: dict[str, Algorithm] = {
    "maml": MetaGradient("maml", second_order=True),
    "fomaml": MetaGradient("fomaml"),
    "anil": MetaGradient("anil", head_only=True, second_order=True),
    "reptile": Reptile("reptile"),
    "pooled": Pooled("pooled"),
}


def get_algorithm(algorithm: str | Algorithm) -> Algorithm:
    """The :class:`Algorithm` named ``algorithm`` in :data:`ALGORITHMS` (or ``algorithm`` itself); a
    one-line ``ValueError`` for an unknown name or anything else."""
    if isinstance(algorithm, Algorithm):
        return algorithm
    if isinstance(algorithm, str) and algorithm in ALGORITHMS:
        return ALGORITHMS[algorithm]
    raise ValueError(f"unknown meta-learning algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)} or pass an adaptrep.meta.Algorithm")


# ----------------------------------------------------------------------------- meta-gradient


def _meta_gradient(
    model: Model, theta: Params, w: Tensor, batch: Batch, config: MetaConfig, grad: Grad, algorithm: Algorithm | None = None
) -> tuple[Tensor, Params, Tensor]:
    """The meta-gradient of ``config``'s algorithm (``algorithm``: the same, resolved beforehand, as a
    compiled step passes it), in chunks of ``config.chunk`` tasks if given."""
    algorithm = config.algo if algorithm is None else algorithm
    B = batch.ys.shape[0]
    if config.chunk is None or config.chunk >= B:
        return algorithm.gradient(model, theta, w, batch, config.inner_steps, config.inner_lr, grad)
    # every quantity is a mean over tasks: chunks weighted by their share of the tasks
    chunk = config.chunk
    loss, g_theta, g_w = torch.zeros((), dtype=w.dtype, device=w.device), {name: torch.zeros_like(v) for name, v in theta.items()}, torch.zeros_like(w)
    first = 0
    if torch.compiler.is_compiling() and grad is _grad_func:  # the full chunks as one compiled loop body, run B // chunk times
        first = B - B % chunk
        loss, g_theta, g_w = _chunk_loop(model, theta, w, batch, config, grad, (loss, g_theta, g_w), algorithm)
    for start in range(first, B, chunk):  # eager: every chunk; compiled: the remainder
        part = slice(start, start + chunk)
        sliced = Batch(*(None if x is None else x[part] for x in batch))  # type: ignore[arg-type]
        value, gt, gw = algorithm.gradient(model, theta, w, sliced, config.inner_steps, config.inner_lr, grad)
        loss, g_theta, g_w = _add_share((loss, g_theta, g_w), (value.detach(), _detached(gt), gw.detach()), sliced.ys.shape[0] / B)
    return loss, g_theta, g_w


def _add_share(totals: tuple[Tensor, Params, Tensor], part: tuple[Tensor, Params, Tensor], share: float) -> tuple[Tensor, Params, Tensor]:
    """``totals + share * part`` for ``(loss, grad wrt theta, grad wrt w)``: a chunk's means weighted by
    its share of the meta-batch's tasks."""
    (loss, g_theta, g_w), (value, gt, gw) = totals, part
    return loss + share * value, {name: g_theta[name] + share * gt[name] for name in g_theta}, g_w + share * gw


def _chunk_loop(
    model: Model,
    theta: Params,
    w: Tensor,
    batch: Batch,
    config: MetaConfig,
    grad: Grad,
    totals: tuple[Tensor, Params, Tensor],
    algorithm: Algorithm | None = None,
) -> tuple[Tensor, Params, Tensor]:
    """Adds the meta-gradients of the ``B // chunk`` full chunks to ``totals`` by
    :func:`torch._higher_order_ops.while_loop`, so that a compiled step holds one chunk's graph at a
    time and its code once (a Python loop would be unrolled: one copy of the graph per chunk).

    The loop's inputs must not share memory (``while_loop`` refuses aliases): the data are four
    separate tensors, as :func:`split_support` makes them, or the same support tensors passed twice
    (no split). Copying them here instead would cost the whole meta-batch's data in memory. The
    sample weights ``sw``, ``qw`` (ragged tasks; ``None`` without) follow the same rule."""
    from torch._higher_order_ops.while_loop import while_loop

    algorithm = config.algo if algorithm is None else algorithm
    chunk = cast(int, config.chunk)
    Xs, ys, Xq, yq, sw, qw = batch
    same = Xq is Xs and yq is ys and qw is sw  # no support/query split
    B, names = ys.shape[0], list(theta)
    count, share = B // chunk, chunk / B
    offsets = torch.arange(chunk, device=w.device)

    def cond(i: Tensor, *carried: Tensor) -> Tensor:
        return i < count

    def flat(sums: tuple[Tensor, Params, Tensor]) -> tuple[Tensor, ...]:
        return (sums[0], *(sums[1][name] for name in names), sums[2])

    def nested(values: tuple[Tensor, ...]) -> tuple[Tensor, Params, Tensor]:
        return values[0], dict(zip(names, values[1:-1], strict=True)), values[-1]

    def body(i: Tensor, *carried: Tensor) -> tuple[Tensor, ...]:
        index = i * chunk + offsets
        Xs_i, ys_i = Xs.index_select(0, index), ys.index_select(0, index)
        Xq_i, yq_i = (Xs_i, ys_i) if same else (Xq.index_select(0, index), yq.index_select(0, index))
        sw_i = None if sw is None else sw.index_select(0, index)
        qw_i = sw_i if same else (None if qw is None else qw.index_select(0, index))
        part = algorithm.gradient(model, theta, w, Batch(Xs_i, ys_i, Xq_i, yq_i, sw_i, qw_i), config.inner_steps, config.inner_lr, grad)
        return (i + 1, *flat(_add_share(nested(carried), part, share)))

    start = torch.zeros((), dtype=torch.int64, device=w.device)
    _, *sums = while_loop(cond, body, (start, *flat(totals)))
    return nested(tuple(sums))


def _detached(theta: Params) -> Params:
    return {name: value.detach() for name, value in theta.items()}


def meta_gradient(
    model: Model,
    theta: Params,
    w: Tensor,
    Xs: Tensor,
    ys: Tensor,
    Xq: Tensor,
    yq: Tensor,
    config: MetaConfig,
    *,
    support_weight: Tensor | None = None,
    query_weight: Tensor | None = None,
) -> tuple[Tensor, Params, Tensor]:
    """``(outer loss, grad wrt theta, grad wrt w)`` for one meta-batch: support ``Xs (B, ns, d)``,
    ``ys (B, ns)`` and query ``Xq (B, nq, d)``, ``yq (B, nq)`` (eager backend; nothing is kept of the
    graph afterwards and the results are detached). ``support_weight (B, ns)`` and ``query_weight
    (B, nq)`` make each task's support, resp. query, loss a weighted mean (ragged tasks)."""
    theta = {name: value.detach().requires_grad_() for name, value in theta.items()}
    w = w.detach().requires_grad_()
    loss, g_theta, g_w = _meta_gradient(model, theta, w, Batch(Xs, ys, Xq, yq, support_weight, query_weight), config, _grad_eager)
    return loss.detach(), _detached(g_theta), g_w.detach()


# ----------------------------------------------------------------------------- outer optimiser and step

#: Adam's defaults (as ``torch.optim.Adam``): ``betas`` and ``eps``.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

_tree_map = torch.utils._pytree.tree_map


@runtime_checkable
class Transform(Protocol):
    """An outer optimiser as a pure gradient transform: ``state = init(params)``, then every step
    ``updates, state = update(grads, state, params)`` and ``params = apply_updates(params, updates)``.

    ``params``, ``grads`` and ``updates`` are the same tree (a dict, list or tuple) of tensors; the state
    is a tree of tensors too. Neither method may change anything in place or keep anything on the
    object: :func:`meta_train` runs them inside its (possibly compiled) meta-step."""

    def init(self, params: Any) -> Any: ...

    def update(self, grads: Any, state: Any, params: Any) -> tuple[Any, Any]: ...


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates``, leaf by leaf."""
    return _tree_map(lambda p, u: p + u, params, updates)


def _step_count(params: Any) -> Tensor:
    """A zero step counter in the parameters' (promoted) floating type, on their device."""
    leaves = torch.utils._pytree.tree_leaves(params)
    dtype = leaves[0].dtype
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    return torch.zeros((), dtype=dtype, device=leaves[0].device)


@dataclass(frozen=True)
class Adam:
    """Adam as ``torch.optim.Adam`` (no weight decay, no amsgrad). State ``(t, m, v)``: the step count
    and the first and second moments."""

    lr: float
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS

    def init(self, params: Any) -> tuple[Tensor, Any, Any]:
        return _step_count(params), _tree_map(torch.zeros_like, params), _tree_map(torch.zeros_like, params)

    def update(self, grads: Any, state: tuple[Tensor, Any, Any], params: Any = None) -> tuple[Any, tuple[Tensor, Any, Any]]:
        (beta1, beta2), (count, m, v) = self.betas, state
        t = count + 1
        m = _tree_map(lambda a, g: beta1 * a + (1 - beta1) * g, m, grads)
        v = _tree_map(lambda b, g: beta2 * b + (1 - beta2) * g * g, v, grads)
        step = self.lr / (1 - beta1**t)
        root = torch.sqrt(1 - beta2**t)
        updates = _tree_map(lambda a, b: -(step * a / (torch.sqrt(b) / root + self.eps)), m, v)
        return updates, (t, m, v)


@dataclass(frozen=True)
class SGD:
    """Gradient descent with heavy-ball momentum as ``torch.optim.SGD`` (no dampening): the velocity
    ``u = momentum u + g`` (from ``u = 0``), the step ``-lr u``. State: ``(u,)``, or ``()`` without momentum."""

    lr: float
    momentum: float = 0.0

    def init(self, params: Any) -> tuple[Any, ...]:
        return (_tree_map(torch.zeros_like, params),) if self.momentum else ()

    def update(self, grads: Any, state: tuple[Any, ...], params: Any = None) -> tuple[Any, tuple[Any, ...]]:
        if not self.momentum:
            return _tree_map(lambda g: -(self.lr * g), grads), state
        velocity = _tree_map(lambda u, g: self.momentum * u + g, state[0], grads)
        return _tree_map(lambda u: -(self.lr * u), velocity), (velocity,)


def adam(lr: float, betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS) -> Adam:
    """Adam with step ``lr`` (:class:`Adam`)."""
    return Adam(lr, betas, eps)


def sgd(lr: float, momentum: float = 0.0) -> SGD:
    """Gradient descent with step ``lr`` and optional momentum (:class:`SGD`)."""
    return SGD(lr, momentum)


#: The outer optimisers by name: a function of the step ``outer_lr`` giving the :class:`Transform`.
OPTIMIZERS: dict[str, Callable[[float], Transform]] = {"adam": adam, "sgd": sgd}


def get_optimizer(optimizer: str | Transform, lr: float) -> Transform:
    """The outer optimiser named ``optimizer`` in :data:`OPTIMIZERS` with step ``lr`` (or ``optimizer``
    itself if it is a :class:`Transform`); a one-line ``ValueError`` otherwise."""
    if isinstance(optimizer, str) and optimizer in OPTIMIZERS:
        return OPTIMIZERS[optimizer](lr)
    if not isinstance(optimizer, str) and isinstance(optimizer, Transform):
        return optimizer
    raise ValueError(
        f"unknown outer optimizer {optimizer!r}; choose {' or '.join(OPTIMIZERS)} or pass an object with init and update (adaptrep.meta.Transform)"
    )


def _make_step(model: Model, names: list[str], config: MetaConfig, grad: Grad) -> Callable[..., tuple[Tensor, list[Tensor], Any]]:
    """The whole meta-step as a function of tensors: ``(params, state, Xs, ys, Xq, yq[, sw, qw]) ->
    (loss, params, state)`` with ``params = [*theta values in names order, w]`` and ``state`` the outer
    optimiser's (``config.transform.init(params)``; ``sw``, ``qw``: the support and query sample
    weights of ragged tasks). The algorithm and the transform are resolved here, outside the step."""
    algorithm, transform = config.algo, config.transform

    def step(params: list[Tensor], state: Any, Xs: Tensor, ys: Tensor, Xq: Tensor, yq: Tensor, sw: Tensor | None = None, qw: Tensor | None = None):
        theta = dict(zip(names, params[:-1], strict=True))
        loss, g_theta, g_w = _meta_gradient(model, theta, params[-1], Batch(Xs, ys, Xq, yq, sw, qw), config, grad, algorithm)
        grads = [*(g_theta[name].detach() for name in names), g_w.detach()]
        params = [p.detach() for p in params]
        updates, state = transform.update(grads, state, params)
        return loss.detach(), apply_updates(params, updates), state

    return step


# ----------------------------------------------------------------------------- training


def support_size(support: float | None, n: int) -> int | None:
    """The number of support samples out of ``n`` (``None``: no split); a ``ValueError`` unless both
    the support and the query get at least one sample."""
    if support is None:
        return None
    size = int(support * n) if support < 1 else int(support)
    if not 1 <= size <= n - 1:
        raise ValueError(f"support={support!r} gives {size} of the {n} samples per task to the support; both the support and the query need at least one")
    return size


def support_sizes(support: float | None, counts: Tensor) -> Tensor | None:
    """Per-task support sizes ``(T,)`` for tasks with ``counts`` real samples (ragged tasks): a
    fraction ``0 < s < 1`` gives ``floor(s count_t)``, an integer ``s`` gives ``s`` to every task
    (``None``: no split). A ``ValueError`` naming the first task whose support or query would be
    empty (an integer support must be at most the smallest task's count - 1)."""
    if support is None:
        return None
    sizes = (support * counts.double()).floor().long() if support < 1 else torch.full_like(counts, int(support), dtype=torch.long)
    bad = ((sizes < 1) | (sizes > counts - 1)).nonzero()
    if bad.numel():
        t = int(bad[0, 0])
        raise ValueError(
            f"support={support!r} gives {int(sizes[t])} of the {int(counts[t])} samples of task {t} to the support; "
            f"both the support and the query need at least one (the smallest task has {int(counts.min())} samples)"
        )
    return sizes


def _gather(X: Tensor, y: Tensor, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(Xs, ys, Xq, yq)``: the samples at the per-task indices ``support (B, ns)`` and ``query (B, nq)``."""
    Xs, Xq = (torch.take_along_dim(X, part.view(*part.shape, *[1] * (X.ndim - 2)), dim=1) for part in (support, query))
    ys, yq = (torch.take_along_dim(y, part, dim=1) for part in (support, query))
    return Xs, ys, Xq, yq


@overload
def split_support(X: Tensor, y: Tensor, size: int | Tensor | None, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


@overload
def split_support(
    X: Tensor, y: Tensor, size: int | Tensor | None, generator: torch.Generator, *, weight: Tensor, widths: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]: ...


def split_support(
    X: Tensor, y: Tensor, size: int | Tensor | None, generator: torch.Generator, *, weight: Tensor | None = None, widths: tuple[int, int] | None = None
) -> tuple[Tensor, ...]:
    """``(Xs, ys, Xq, yq)``: a random split of each task's samples (a fresh permutation per task),
    ``size`` to the support; ``size=None`` returns the data as both. The four are separate tensors
    (no shared memory), which a compiled chunked step needs (:func:`_chunk_loop`).

    Ragged tasks (``weight (B, n)``, 0 on padding): the support is drawn among each task's real
    samples (``weight > 0``), ``size`` of them (an integer, or per-task sizes ``(B,)`` from
    :func:`support_sizes`), and the query is the rest; returns ``(Xs, ys, Xq, yq, sw, qw)`` with the
    support and query weights (0 on the slots a task does not fill). The support has ``widths[0]``
    slots and the query ``n - widths[1]`` (default: the largest and the smallest size of the batch;
    :func:`meta_train` passes those of all its tasks, so that every meta-batch has the same shapes).
    An integer ``size`` must leave every task at least one query sample."""
    if size is None:
        return (X, y, X, y) if weight is None else (X, y, X, y, weight, weight)
    B, n = y.shape
    scores = torch.rand(B, n, generator=generator, device=generator.device)
    if weight is None:
        if not isinstance(size, int):
            raise ValueError("per-task support sizes need the sample weights of ragged tasks (weight=...)")
        order = scores.argsort(-1).to(X.device)
        return _gather(X, y, order[:, :size], order[:, size:])
    valid = weight > 0
    if isinstance(size, int):
        counts = valid.sum(-1)
        if widths is None:
            support_sizes(size, counts.cpu())  # a clear error if a task would have an empty support or query
        sizes = torch.full((B,), size, dtype=torch.long, device=X.device)
    else:
        sizes = size.to(X.device)
    high, low = widths if widths is not None else (int(sizes.max()), int(sizes.min()))
    order = (scores + 2 * (~valid).to(scores.device, scores.dtype)).argsort(-1).to(X.device)  # real samples first, in random order
    support, query = order[:, :high], order[:, low:]
    Xs, ys, Xq, yq = _gather(X, y, support, query)
    slots = torch.arange(n, device=X.device)
    sw = torch.take_along_dim(weight, support, dim=1) * (slots[:high] < sizes.unsqueeze(-1))
    qw = torch.take_along_dim(weight, query, dim=1) * (slots[low:] >= sizes.unsqueeze(-1))
    return Xs, ys, Xq, yq, sw, qw


@dataclass
class MetaFit:
    """Result of :func:`meta_train`: the learned initialisation, the outer loss of every iteration
    (``(iterations,)``), whether the step was compiled, the seconds of the first (compiling) step and
    the total seconds."""

    theta: Params
    w: Tensor
    losses: Tensor
    compiled: bool
    compile_seconds: float
    seconds: float


def should_compile(config: MetaConfig) -> bool:
    """``compile="always"``/``"never"``, or for ``"auto"`` whether ``iterations >= COMPILE_MIN_ITERATIONS``."""
    if config.compile == "auto":
        return config.iterations >= COMPILE_MIN_ITERATIONS
    return config.compile == "always"


def compile_step(model: Model, names: list[str], config: MetaConfig, threads: int | None = COMPILED_THREADS) -> Callable[..., Any]:
    """The meta-step (:func:`_make_step` on the :mod:`torch.func` backend) compiled by
    :func:`torch.compile` with static shapes and one graph. Inductor writes the step's driver in C++
    (``cpp_wrapper``): a step calls tens to a hundred small kernels and library matmuls, and a Python
    driver costs about as much as they do (sinusoid MAML, 5 steps: about 290 it/s with the Python driver,
    450-540 with the C++ one). With ``config.chunk``, the full chunks run as a ``while_loop`` (one copy of
    the chunk's code; a Python loop would be unrolled into one copy a chunk) with single-threaded kernels.

    ``threads``: the CPU threads the step runs with (its generated kernels and the library calls in it;
    torch's thread count is set for the call and restored after it); ``None`` keeps torch's setting
    (:data:`COMPILED_THREADS` says why the default is 1)."""
    # a chunk's kernels are small: their threads would cost more to start than they save (whatever ``threads``)
    chunked = config.chunk is not None and config.chunk < config.meta_batch
    return compile_function(_make_step(model, names, config, _grad_func), threads, {"cpp.threads": 1} if chunked else None)


def _sample(
    X: Tensor,
    y: Tensor,
    B: int,
    size: int | None,
    generator: torch.Generator,
    weight: Tensor | None = None,
    sizes: Tensor | None = None,
    widths: tuple[int, int] | None = None,
) -> tuple[Tensor, ...]:
    index = torch.randperm(X.shape[0], generator=generator, device=generator.device)[:B].to(X.device)
    if weight is None:
        return split_support(X[index], y[index], size, generator)
    return split_support(X[index], y[index], None if sizes is None else sizes[index], generator, weight=weight[index], widths=widths)


def meta_train(
    model: Model,
    theta0: Params,
    w0: Tensor,
    X: Tensor,
    y: Tensor,
    config: MetaConfig,
    generator: torch.Generator,
    on_step: Callable[[int], None] | None = None,
    *,
    weight: Tensor | None = None,
) -> MetaFit:
    """Meta-train on ``T`` source tasks ``X (T, n, d)``, ``y (T, n)``: each iteration samples
    ``meta_batch`` tasks (with ``generator``; without replacement within a batch), splits each
    task's samples into support and query (``config.support``; maml, fomaml and anil only) and
    takes one outer-optimiser step with the meta-gradient. Deterministic for a given generator.
    ``on_step(i)`` is called after iteration ``i``.

    Ragged tasks: ``weight (T, n)`` (0 on padding) makes every task loss a weighted mean and the
    support is drawn among each task's real samples (:func:`support_sizes`: a fraction of each
    task's count, or a count that every task can spare).

    The step is compiled when :func:`should_compile` says so; a failed compilation falls back to the
    eager step with a warning (``MetaFit.compiled`` says which ran).
    """
    T, n = y.shape
    if X.ndim < 3 or X.shape[:2] != (T, n):
        raise ValueError(f"X must be (T, n, d) and y (T, n); got X {tuple(X.shape)} and y {tuple(y.shape)}")
    if weight is not None and weight.shape != (T, n):
        raise ValueError(f"weight must be (T, n) = {(T, n)} like y; got {tuple(weight.shape)}")
    if config.meta_batch > T:
        raise ValueError(f"meta_batch={config.meta_batch} exceeds the number of tasks T={T} (tasks are sampled without replacement within a batch)")
    splits = config.algo.splits
    size, sizes, widths = None, None, None
    if weight is None:
        size = support_size(config.support, n) if splits else None
    elif splits and config.support is not None:
        sizes = support_sizes(config.support, (weight > 0).sum(-1).cpu())
        assert sizes is not None
        widths = (int(sizes.max()), int(sizes.min()))
        sizes = sizes.to(X.device)
    names = list(theta0)
    params = [*(theta0[name].detach().clone() for name in names), w0.detach().clone()]
    state = config.transform.init(params)
    losses = torch.empty(config.iterations, dtype=w0.dtype, device=w0.device)
    eager = _make_step(model, names, config, _grad_eager)
    step = eager
    compiled, compile_seconds = should_compile(config), 0.0
    if compiled:
        step = compile_step(model, names, config)
    start = time.perf_counter()
    for i in range(config.iterations):
        batch = _sample(X, y, config.meta_batch, size, generator, weight, sizes, widths)
        if compiled and i == 0:
            try:
                loss, params, state = step(params, state, *batch)
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                warnings.warn(f"torch.compile of the meta-step failed ({type(error).__name__}: {error}); running eager", RuntimeWarning, stacklevel=2)
                compiled, step = False, eager
                loss, params, state = step(params, state, *batch)
            compile_seconds = time.perf_counter() - start
        else:
            loss, params, state = step(params, state, *batch)
        losses[i] = loss
        if on_step is not None:
            on_step(i)
    seconds = time.perf_counter() - start
    theta = {name: value.detach() for name, value in zip(names, params[:-1], strict=True)}
    return MetaFit(theta, params[-1].detach(), losses, compiled, compile_seconds, seconds)
