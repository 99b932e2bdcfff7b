"""Meta-learning algorithms as objects and the outer optimiser as an (init, update) transform:
user-defined ones give the built-ins' numbers, and bad ones are one-line errors."""

import contextlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import adaptrep as ar
from adaptrep.meta import (
    ALGORITHMS,
    Algorithm,
    MetaConfig,
    MetaGradient,
    Reptile,
    adam,
    inner_adapt,
    meta_gradient,
    meta_train,
    sgd,
)
from adaptrep.methods import MetaLearner
from adaptrep.models import init_mlp, linear_model, mlp_model, task_loss

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread


def _linear_tasks(T=12, n=10, d=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    B_star = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]
    X = torch.randn(T, n, d, generator=g, dtype=F64)
    heads = torch.randn(T, k, generator=g, dtype=F64)
    y = (X @ (B_star @ heads.unsqueeze(-1))).squeeze(-1) + 0.1 * torch.randn(T, n, generator=g, dtype=F64)
    theta = {"B": torch.randn(d, k, generator=g, dtype=F64) / 2}
    return X, y, theta, 0.3 * torch.randn(k, generator=g, dtype=F64)


def _mlp_batch(B=4, ns=5, nq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    theta, w = init_mlp((1, 6, 5), g, dtype=F64)
    X = torch.rand(B, ns + nq, 1, generator=g, dtype=F64) * 10 - 5
    y = torch.sin(X[..., 0] - torch.rand(B, 1, generator=g, dtype=F64))
    return mlp_model((1, 6, 5)), theta, w, (X[:, :ns], y[:, :ns], X[:, ns:], y[:, ns:])


def _same_fit(a, b, tol=0.0):
    if tol == 0.0:
        assert torch.equal(a.losses, b.losses) and torch.equal(a.w, b.w) and all(torch.equal(a.theta[n], b.theta[n]) for n in a.theta)
    else:
        torch.testing.assert_close(a.losses, b.losses, rtol=tol, atol=tol)
        torch.testing.assert_close(a.w, b.w, rtol=tol, atol=tol)
        for name in a.theta:
            torch.testing.assert_close(a.theta[name], b.theta[name], rtol=tol, atol=tol)


# ---------------------------------------------------------------- algorithms


@pytest.mark.parametrize(
    "mine,builtin,first_order",
    [
        (MetaGradient("my-anil", head_only=True, second_order=True), "anil", False),
        (MetaGradient("my-anil-fo", head_only=True), "anil", True),
        (MetaGradient("my-fomaml"), "maml", True),
        (MetaGradient("my-maml", second_order=True), "maml", False),
        (Reptile("my-reptile"), "reptile", False),
    ],
)
def test_a_user_defined_variant_gives_the_builtins_meta_gradient_and_training(mine, builtin, first_order):
    """Including the old spelling ``first_order=True`` (ANIL, and MAML, which it makes first-order MAML)."""
    model, theta, w, (Xs, ys, Xq, yq) = _mlp_batch()
    ours = meta_gradient(model, theta, w, Xs, ys, Xq, yq, MetaConfig(mine, inner_steps=2, inner_lr=0.1))
    theirs = meta_gradient(model, theta, w, Xs, ys, Xq, yq, MetaConfig(builtin, inner_steps=2, inner_lr=0.1, first_order=first_order))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2]) and all(torch.equal(ours[1][n], theirs[1][n]) for n in theta)
    X, y, theta, w = _linear_tasks()
    settings = dict(inner_steps=2, inner_lr=0.1, outer_lr=0.01, meta_batch=5, iterations=8, support=0.6, compile="never")
    fits = [
        meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(2))
        for config in (MetaConfig(mine, **settings), MetaConfig(builtin, first_order=first_order, **settings))
    ]
    _same_fit(*fits)
    assert float(fits[0].losses[-1]) != float(fits[0].losses[0])  # it did train


def test_first_order_maml_is_fomaml():
    """``first_order=True`` makes MAML's meta-gradient first order: fomaml's numbers, not maml's."""
    model, theta, w, batch = _mlp_batch()
    fo = meta_gradient(model, theta, w, *batch, MetaConfig("maml", inner_steps=2, inner_lr=0.1, first_order=True))
    fomaml = meta_gradient(model, theta, w, *batch, MetaConfig("fomaml", inner_steps=2, inner_lr=0.1))
    maml = meta_gradient(model, theta, w, *batch, MetaConfig("maml", inner_steps=2, inner_lr=0.1))
    assert torch.equal(fo[2], fomaml[2]) and not torch.allclose(fo[2], maml[2], rtol=1e-3)
    assert MetaConfig("anil", first_order=True).algo == MetaConfig(ALGORITHMS["anil"].as_first_order()).algo
    assert not MetaConfig("anil", first_order=True).second_order and MetaConfig("anil").second_order
    assert ALGORITHMS["reptile"].as_first_order() is ALGORITHMS["reptile"]


@dataclass(frozen=True)
class LoopPooled(Algorithm):
    """Pooled training written independently: a Python loop over tasks with ``task_loss``."""

    splits: bool = False

    def gradient(self, model, theta, w, batch, steps, lr, grad):
        def mean_loss(theta, w):
            return torch.stack([task_loss(model, theta, None, w, batch.Xq[t], batch.yq[t]) for t in range(batch.yq.shape[0])]).mean()

        loss, (g_theta, g_w) = grad(mean_loss, (theta, w), False)
        return loss.detach(), g_theta, g_w


def test_a_new_outer_rule_as_a_subclass_trains_as_the_builtin(monkeypatch):
    """A subclass with its own ``gradient``, registered by name, equals the built-in pooled training;
    ``splits=False`` makes meta_train give it all of each task's data although ``support`` is set."""
    monkeypatch.setitem(ALGORITHMS, "loop-pooled", LoopPooled("loop-pooled"))
    X, y, theta, w = _linear_tasks()
    settings = dict(inner_steps=2, inner_lr=0.1, outer_lr=0.02, meta_batch=5, iterations=10, support=0.5, compile="never")
    ours, theirs = (
        meta_train(linear_model(), theta, w, X, y, MetaConfig(name, **settings), torch.Generator().manual_seed(4)) for name in ("loop-pooled", "pooled")
    )
    _same_fit(ours, theirs, tol=1e-12)
    assert float(ours.losses[-1]) < float(ours.losses[0])


def test_a_head_only_reptile_moves_the_head_only():
    """A variant the registry does not have: Reptile with a head-only inner loop; its displacement is
    ``w - mean_t w_t^K`` of the head-only inner loop and zero for theta."""
    model, theta, w, (Xs, ys, Xq, yq) = _mlp_batch()
    loss, g_theta, g_w = meta_gradient(model, theta, w, Xs, ys, Xq, yq, MetaConfig(Reptile("head-reptile", head_only=True), inner_steps=3, inner_lr=0.1))
    _, heads = inner_adapt(model, theta, w, Xs, ys, steps=3, lr=0.1, head_only=True)
    torch.testing.assert_close(g_w, w - heads.mean(0), rtol=1e-12, atol=1e-14)
    assert float(g_w.abs().max()) > 1e-3 and all(torch.equal(g, torch.zeros_like(g)) for g in g_theta.values())
    start = torch.stack([task_loss(model, theta, None, w, Xs[t], ys[t]) for t in range(4)]).mean()
    torch.testing.assert_close(loss, start, rtol=1e-12, atol=0.0)


def test_the_meta_learner_takes_an_algorithm_object_and_a_transform():
    """``MetaLearner(algorithm=<object>, optimizer=<transform>)``: the same predictions as the names."""
    env = ar.LinearEnvironment(dim=6, rank=2, delta=0.2, noise=0.3, seed=0)
    g = torch.Generator().manual_seed(0)
    source, target = env.sample_tasks(20, 12, g), env.sample_tasks(5, 12, g)
    settings = dict(iterations=20, meta_batch=5, outer_lr=0.02)
    named = MetaLearner(algorithm="anil", optimizer="sgd", **settings).fit(source).adapt(target).beta
    mine = MetaLearner(algorithm=MetaGradient("mine", head_only=True, second_order=True), optimizer=sgd(0.02), **settings)
    assert torch.equal(mine.fit(source).adapt(target).beta, named)
    maml = MetaLearner(algorithm="maml", optimizer="sgd", **settings).fit(source).adapt(target).beta
    assert not torch.allclose(maml, named)  # the head-only target adaptation is the object's, not a default


# ---------------------------------------------------------------- transforms


class PlainSGD:
    """Gradient descent written here: no state, ``p <- p - lr g``."""

    def __init__(self, lr):
        self.lr = lr

    def init(self, params):
        return ()

    def update(self, grads, state, params):
        return [-self.lr * g for g in grads], state


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_a_user_written_transform_equals_the_named_sgd(algorithm):
    X, y, theta, w = _linear_tasks()
    settings = dict(inner_steps=2, inner_lr=0.1, meta_batch=4, iterations=12, support=6, compile="never")
    ours = meta_train(linear_model(), theta, w, X, y, MetaConfig(algorithm, optimizer=PlainSGD(0.03), **settings), torch.Generator().manual_seed(5))
    named = meta_train(linear_model(), theta, w, X, y, MetaConfig(algorithm, optimizer="sgd", outer_lr=0.03, **settings), torch.Generator().manual_seed(5))
    _same_fit(ours, named, tol=1e-12)
    assert not torch.equal(ours.w, w)


@pytest.mark.parametrize(
    "transform,reference",
    [
        (sgd(0.02, momentum=0.9), lambda leaves: torch.optim.SGD(leaves, lr=0.02, momentum=0.9)),
        (adam(0.01, betas=(0.8, 0.99), eps=1e-6), lambda leaves: torch.optim.Adam(leaves, lr=0.01, betas=(0.8, 0.99), eps=1e-6)),
    ],
)
def test_the_transforms_equal_torch_optim(transform, reference):
    """meta_train with sgd(momentum) / adam(betas, eps) against torch.optim driven by hand with meta_gradient."""
    X, y, theta, w = _linear_tasks()
    config = MetaConfig("fomaml", inner_steps=2, inner_lr=0.1, optimizer=transform, meta_batch=4, iterations=6)
    fit = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(3))
    leaves = [theta["B"].clone().requires_grad_(), w.clone().requires_grad_()]
    optimiser = reference(leaves)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        index = torch.randperm(12, generator=g)[:4]
        _, g_theta, g_w = meta_gradient(linear_model(), {"B": leaves[0]}, leaves[1], X[index], y[index], X[index], y[index], config)
        leaves[0].grad, leaves[1].grad = g_theta["B"], g_w
        optimiser.step()
    torch.testing.assert_close(fit.theta["B"], leaves[0].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fit.w, leaves[1].detach(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fit.w, w)


def test_a_transform_works_on_dicts():
    params = {"a": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor(3.0, dtype=F64)}
    grads = {"a": torch.tensor([0.5, -1.0], dtype=F64), "b": torch.tensor(2.0, dtype=F64)}
    transform = sgd(0.1, momentum=0.5)
    state = transform.init(params)
    for _ in range(2):
        updates, state = transform.update(grads, state, params)
        params = ar.meta.apply_updates(params, updates)
    # velocities g, then 1.5 g: two steps move by -0.1 * 2.5 g
    torch.testing.assert_close(params["a"], torch.tensor([1.0, 2.0], dtype=F64) - 0.25 * grads["a"], rtol=0, atol=1e-15)
    torch.testing.assert_close(params["b"], torch.tensor(3.0 - 0.5, dtype=F64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "build,culprit",
    [
        (lambda: MetaConfig("protonet"), "protonet"),
        (lambda: MetaConfig(3), "algorithm"),
        (lambda: MetaConfig("maml", optimizer="rmsprop"), "rmsprop"),
        (lambda: MetaConfig("maml", optimizer=object()), "optimizer"),
        (lambda: MetaLearner(algorithm="protonet"), "protonet"),
        (lambda: MetaLearner(optimizer="rmsprop"), "rmsprop"),
        (lambda: ar.methods.make_method("maml", {"optimizer": "rmsprop"}), "rmsprop"),
    ],
)
def test_unknown_algorithms_and_optimizers_are_one_line_errors(build, culprit):
    with pytest.raises(ValueError) as error:
        build()
    message = str(error.value)
    assert culprit in message and "\n" not in message, message


def test_an_algorithm_without_an_outer_rule_says_so():
    X, y, theta, w = _linear_tasks()
    with pytest.raises(NotImplementedError, match="Algorithm does not define its outer gradient"):
        meta_train(linear_model(), theta, w, X, y, MetaConfig(Algorithm("bare"), meta_batch=4, iterations=1), torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- compiled


@pytest.mark.skipif(os.environ.get("ADAPTREP_TEST_COMPILE") != "1", reason="torch.compile takes about a minute on two CPU cores; set ADAPTREP_TEST_COMPILE=1")
def test_compiled_with_a_variant_and_a_momentum_transform_equals_eager():
    X, y, theta, w = _linear_tasks()
    variant = MetaGradient("my-anil", head_only=True, second_order=True)
    fits = [
        meta_train(
            linear_model(),
            theta,
            w,
            X,
            y,
            MetaConfig(variant, inner_steps=2, inner_lr=0.1, optimizer=sgd(0.02, momentum=0.9), meta_batch=4, iterations=6, support=6, compile=c),
            torch.Generator().manual_seed(1),
        )
        for c in ("never", "always")
    ]
    assert not fits[0].compiled and fits[1].compiled
    _same_fit(fits[1], fits[0], tol=1e-10)


# ---------------------------------------------------------------- the documentation's example


def test_the_docs_example_of_your_own_algorithm_and_optimiser_runs_as_shown():
    """docs/methods.md: a registered first-order ANIL and two outer optimisers; the printed risks as shown."""
    page = Path(__file__).parents[1] / "docs" / "methods.md"
    text = page.read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "SignDescent" in block]
    shown = re.search(r"```text\n(.*?)```", text[text.index(code) + len(code) :], re.S).group(1)
    printed = io.StringIO()
    saved = dict(ALGORITHMS)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "methods.md", "exec"), {})
    finally:  # the example registers "anil-fo": leave the registry as it was
        ALGORITHMS.clear()
        ALGORITHMS.update(saved)
    rows, shown_rows = ([line.split() for line in out.strip().splitlines()] for out in (printed.getvalue(), shown))
    assert [row[:2] for row in rows] == [row[:2] for row in shown_rows] == [["anil", "Adam"], ["anil-fo", "SGD"], ["anil-fo", "SignDescent"]]
    for row, shown_row in zip(rows, shown_rows, strict=True):
        assert abs(float(row[2]) - float(shown_row[2])) <= 2e-4, (row, shown_row)


# ---------------------------------------------------------------- saved models


@pytest.mark.parametrize(
    "algorithm,optimizer",
    [
        (MetaGradient("mine", head_only=True, second_order=True), sgd(0.02, momentum=0.9)),
        (MetaGradient("anil", head_only=True, second_order=True), adam(0.02, betas=(0.8, 0.9))),
        ("anil", PlainSGD(0.02)),
    ],
)
def test_a_meta_learner_with_objects_is_saved_and_loaded(tmp_path, algorithm, optimizer):
    """The loaded model adapts as the fitted one (head only here: the algorithm's fields are kept);
    a registered algorithm and the named transforms come back as they were, a user's transform as a
    stand-in that refuses to fit."""
    from adaptrep.saving import load_method, save_method

    env = ar.LinearEnvironment(dim=6, rank=2, delta=0.2, noise=0.3, seed=0)
    g = torch.Generator().manual_seed(0)
    source, target = env.sample_tasks(20, 12, g), env.sample_tasks(5, 12, g)
    fitted = MetaLearner(algorithm=algorithm, optimizer=optimizer, iterations=10, meta_batch=5).fit(source)
    save_method(fitted, tmp_path / "m.adaptrep")
    loaded = load_method(tmp_path / "m.adaptrep")
    assert torch.equal(loaded.adapt(target).beta, fitted.adapt(target).beta)
    assert loaded.config.algo.head_only and loaded.config.algo.name == fitted.config.algo.name
    if isinstance(algorithm, str) or algorithm.name == "anil":
        assert loaded.config.algo is ALGORITHMS["anil"]
    if isinstance(optimizer, PlainSGD):
        assert repr(loaded.optimizer) == repr(optimizer)
        with pytest.raises(ValueError, match="without its outer optimiser"):
            loaded.fit(source)
    else:
        assert loaded.optimizer == optimizer and loaded.config.transform == optimizer
