"""A JAX implementation of the benchmark's meta-steps, as a peer of ``adaptrep.meta``'s compiled step.

Same problems as ``benchmarks/peers.py`` (our parameter layout, ``peers.init_params``/``peers.make_batch``
data, the same inner learning rates and step counts), written the way JAX is meant to be used: a per-task
loss, the inner loop as ``jax.grad`` steps, :func:`jax.vmap` over the meta-batch's tasks, the meta-gradient
as ``jax.grad`` of the mean query loss, and the whole iteration (meta-gradient + the outer Adam update,
``torch.optim.Adam``'s formula and defaults) under one :func:`jax.jit`.

JAX is never a dependency of ``adaptrep``: it lives in the peers' environment (``benchmarks/setup_jax_peer.sh``)
and this module is only imported by ``peers.py`` (library ``"jax"``) and ``maml_throughput.py`` (``--peers jax``).

API::

    make_step(problem, algorithm, inner_steps, first_order, params, inner_lr)
        -> step(Xs, ys, Xq, yq) -> (mean query loss, {name: meta-gradient})   torch tensors in, torch tensors out
    make_iteration(problem, algorithm, inner_steps, first_order, params, inner_lr, outer_lr)
        -> iterate(Xs, ys, Xq, yq) -> loss    one jitted meta-step + Adam update, carrying its state; waits for the result

The torch batch is converted to JAX arrays once and reused while the same tensors are passed (the peers'
timing loop passes one fixed batch), so the timings are those of the jitted step alone, as ours are.
Float64 inputs run in float64 (``jax_enable_x64`` is switched on at import; float32 inputs stay float32).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8


def _features(problem: str, theta: dict, X):
    """One task's features ``(n, k)`` in our layout (``peers._features``)."""
    if problem == "sinusoid":
        h = jax.nn.relu(jax.nn.relu(X @ theta["W1"] + theta["b1"]) @ theta["W2"] + theta["b2"])
        return jnp.concatenate([h, jnp.ones_like(h[:, :1])], axis=-1)
    return X @ theta["B"]


def _mse(pred, y):
    return jnp.mean((pred - y) ** 2)


def _meta_loss(problem: str, algorithm: str, inner_steps: int, first_order: bool, inner_lr: float) -> Callable:
    """``loss(params, Xs, ys, Xq, yq)``: the mean over the meta-batch of each task's query loss after its inner loop."""

    def inner_grad(loss_fn, x, *args):
        g = jax.grad(loss_fn)(x, *args)
        return jax.lax.stop_gradient(g) if first_order else g

    def task(params: dict, xs, ys, xq, yq):
        if algorithm == "anil":  # the head alone adapts, on fixed features
            theta = {k: v for k, v in params.items() if k != "w"}
            phi_s, phi_q = _features(problem, theta, xs), _features(problem, theta, xq)
            w = params["w"]
            for _ in range(inner_steps):
                w = w - inner_lr * inner_grad(lambda w_: _mse(phi_s @ w_, ys), w)
            return _mse(phi_q @ w, yq)

        def support_loss(p):
            return _mse(_features(problem, p, xs) @ p["w"], ys)

        fast = params
        for _ in range(inner_steps):
            g = inner_grad(support_loss, fast)
            fast = jax.tree_util.tree_map(lambda p, d: p - inner_lr * d, fast, g)
        return _mse(_features(problem, fast, xq) @ fast["w"], yq)

    def loss(params, Xs, ys, Xq, yq):
        return jnp.mean(jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(params, Xs, ys, Xq, yq))

    return loss


def _to_jax(x: Tensor):
    return jnp.asarray(np.asarray(x.detach().cpu().numpy()))


def _to_torch(x) -> Tensor:
    return torch.from_numpy(np.array(x))


class _BatchCache:
    """The JAX copy of the last torch batch, reused while the very same tensors are passed again."""

    def __init__(self) -> None:
        self.key: tuple[Tensor, ...] | None = None
        self.value: tuple = ()

    def __call__(self, batch: tuple[Tensor, ...]) -> tuple:
        if self.key is None or len(self.key) != len(batch) or any(a is not b for a, b in zip(self.key, batch, strict=True)):
            self.key, self.value = tuple(batch), tuple(_to_jax(x) for x in batch)
        return self.value


def make_step(problem: str, algorithm: str, inner_steps: int, first_order: bool, params: dict[str, Tensor], inner_lr: float) -> Callable:
    """The jitted meta-gradient: ``step(Xs, ys, Xq, yq) -> (loss, {name: gradient})`` (torch tensors, our layout)."""
    names = list(params)
    p0 = {k: _to_jax(v) for k, v in params.items()}
    value_and_grad = jax.jit(jax.value_and_grad(_meta_loss(problem, algorithm, inner_steps, first_order, inner_lr)))
    cache = _BatchCache()

    def step(Xs: Tensor, ys: Tensor, Xq: Tensor, yq: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, grads = value_and_grad(p0, *cache((Xs, ys, Xq, yq)))
        return _to_torch(loss), {k: _to_torch(grads[k]) for k in names}

    return step


def make_iteration(
    problem: str, algorithm: str, inner_steps: int, first_order: bool, params: dict[str, Tensor], inner_lr: float, outer_lr: float
) -> Callable[[Tensor, Tensor, Tensor, Tensor], float]:
    """One outer iteration as one jitted function (meta-gradient + Adam), its state carried between calls."""
    value_and_grad = jax.value_and_grad(_meta_loss(problem, algorithm, inner_steps, first_order, inner_lr))
    beta1, beta2 = ADAM_BETAS

    @jax.jit
    def iteration(state, Xs, ys, Xq, yq):
        p, m, v, t = state
        loss, g = value_and_grad(p, Xs, ys, Xq, yq)
        t = t + 1
        m = jax.tree_util.tree_map(lambda a, b: beta1 * a + (1 - beta1) * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: beta2 * a + (1 - beta2) * b * b, v, g)
        step, root = outer_lr / (1 - beta1**t), jnp.sqrt(1 - beta2**t)
        p = jax.tree_util.tree_map(lambda x, a, b: x - step * a / (jnp.sqrt(b) / root + ADAM_EPS), p, m, v)
        return loss, (p, m, v, t)

    p0 = {k: _to_jax(v) for k, v in params.items()}
    dtype = next(iter(p0.values())).dtype
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p0)
    state = [(p0, zeros, zeros, jnp.zeros((), dtype))]
    cache = _BatchCache()

    def iterate(Xs: Tensor, ys: Tensor, Xq: Tensor, yq: Tensor) -> float:
        loss, state[0] = iteration(state[0], *cache((Xs, ys, Xq, yq)))
        return float(loss)  # waits for the result

    iterate.state = state  # type: ignore[attr-defined]
    return iterate
