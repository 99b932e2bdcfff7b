"""The vectorised meta-learning engine against an explicit per-task loop, finite differences and its own contract."""

import os

import pytest
import torch

from adaptrep.meta import Batch, MetaConfig, _grad_func, _meta_gradient, inner_adapt, meta_gradient, meta_train, split_support
from adaptrep.models import Model, init_mlp, linear_model, mlp_model, relu_model, task_loss

F64 = torch.float64
D, K = 3, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread


def _module_model():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU()).to(F64)
    return Model.from_module(module)


def _setup(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "module":
        model, theta = _module_model()
        w = torch.randn(8, generator=g, dtype=F64) / 3
    elif name == "mlp":
        model = mlp_model((D, 6, 5))
        theta, w = init_mlp((D, 6, 5), g, dtype=F64)
    else:
        factory, loss = {"linear": (linear_model, "squared"), "relu": (relu_model, "squared"), "logistic": (linear_model, "logistic")}[name]
        model = factory(loss)
        key = "W" if factory is relu_model else "B"
        theta = {key: torch.randn(D, K, generator=g, dtype=F64) / 2}
        w = torch.randn(K, generator=g, dtype=F64)
    return model, theta, w


def _data(model, B=4, ns=5, nq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, ns + nq, D, generator=g, dtype=F64)
    if model.loss == "logistic":
        y = (torch.rand(B, ns + nq, generator=g, dtype=F64) < 0.5).to(F64)
    else:
        y = torch.randn(B, ns + nq, generator=g, dtype=F64)
    return X[:, :ns], y[:, :ns], X[:, ns:], y[:, ns:]


# ---------------------------------------------------------------- an independent per-task reference


def _reference(model, theta, w, Xs, ys, Xq, yq, algorithm, steps, lr, first_order=False):
    """Meta-loss and meta-gradient by a Python loop over tasks with torch.autograd.grad."""
    theta = {n: v.detach().clone().requires_grad_() for n, v in theta.items()}
    w = w.detach().clone().requires_grad_()
    names = list(theta)
    if algorithm == "pooled":
        loss = torch.stack([task_loss(model, theta, None, w, Xq[t], yq[t]) for t in range(Xq.shape[0])]).mean()
        grads = torch.autograd.grad(loss, [*theta.values(), w])
        return loss, dict(zip(names, grads[:-1], strict=True)), grads[-1]
    if algorithm == "reptile":
        adapted_theta, adapted_w, start = [], [], []
        for t in range(Xs.shape[0]):
            th, ww = {n: v.detach() for n, v in theta.items()}, w.detach()
            start.append(task_loss(model, th, None, ww, Xs[t], ys[t]).detach())
            for _ in range(steps):
                th = {n: v.requires_grad_() for n, v in th.items()}
                ww = ww.requires_grad_()
                grads = torch.autograd.grad(task_loss(model, th, None, ww, Xs[t], ys[t]), [*th.values(), ww])
                th = {n: (th[n] - lr * g).detach() for n, g in zip(names, grads[:-1], strict=True)}
                ww = (ww - lr * grads[-1]).detach()
            adapted_theta.append(th)
            adapted_w.append(ww)
        g_theta = {n: theta[n].detach() - torch.stack([a[n] for a in adapted_theta]).mean(0) for n in names}
        return torch.stack(start).mean(), g_theta, w.detach() - torch.stack(adapted_w).mean(0)
    second = algorithm == "maml" or (algorithm == "anil" and not first_order)
    head_only = algorithm == "anil"
    losses = []
    for t in range(Xs.shape[0]):
        th, ww = dict(theta), w
        for _ in range(steps):
            inner = task_loss(model, th, None, ww, Xs[t], ys[t])
            if head_only:
                (g_w,) = torch.autograd.grad(inner, [ww], create_graph=True)
                ww = ww - lr * (g_w if second else g_w.detach())
            else:
                grads = torch.autograd.grad(inner, [*th.values(), ww], create_graph=True)
                if not second:
                    grads = [g.detach() for g in grads]
                th = {n: th[n] - lr * g for n, g in zip(names, grads[:-1], strict=True)}
                ww = ww - lr * grads[-1]
        losses.append(task_loss(model, th, None, ww, Xq[t], yq[t]))
    loss = torch.stack(losses).mean()
    grads = torch.autograd.grad(loss, [*theta.values(), w])
    return loss, dict(zip(names, grads[:-1], strict=True)), grads[-1]


def _flat(g_theta, g_w):
    return torch.cat([*(v.reshape(-1) for _, v in sorted(g_theta.items())), g_w.reshape(-1)])


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


CASES = [("maml", False), ("fomaml", False), ("anil", False), ("anil", True), ("reptile", False), ("pooled", False)]


@pytest.mark.parametrize("name", ["linear", "relu", "logistic", "module", "mlp"])
@pytest.mark.parametrize("algorithm,first_order", CASES)
def test_meta_gradient_equals_a_per_task_loop(name, algorithm, first_order):
    model, theta, w = _setup(name)
    split = _data(model)
    same = (split[0], split[1], split[0], split[1])  # the paper's no-split setting
    runs = [(1, split, None), (1, split, 3), (2, split, None), (2, same, None), (5, split, None)]  # chunk 3: the meta-batch in parts of 3 and 1
    for steps, (Xs, ys, Xq, yq), chunk in runs:
        config = MetaConfig(algorithm, inner_steps=steps, inner_lr=0.1, first_order=first_order, chunk=chunk)
        loss, g_theta, g_w = meta_gradient(model, theta, w, Xs, ys, Xq, yq, config)
        ref_loss, ref_theta, ref_w = _reference(model, theta, w, Xs, ys, Xq, yq, algorithm, steps, 0.1, first_order)
        ref_loss = float(ref_loss.detach())
        assert abs(float(loss) - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss)), (steps, float(loss), ref_loss)
        assert set(g_theta) == set(theta)
        assert _rel(_flat(g_theta, g_w), _flat(ref_theta, ref_w)) <= 1e-6, steps
        assert g_w.shape == w.shape and all(g_theta[n].shape == v.shape for n, v in theta.items())


@pytest.mark.parametrize("algorithm,first_order", CASES)
def test_the_compiled_steps_chunk_loop_equals_the_per_task_loop(algorithm, first_order):
    """``_chunk_loop`` (the ``while_loop`` a compiled step runs its full chunks in; eager here)
    plus the remainder chunk, as ``_meta_gradient`` combines them when compiling."""
    from adaptrep.meta import _chunk_loop

    model, theta, w = _setup("mlp")
    Xs, ys, Xq, yq = (x.contiguous() for x in _data(model, B=5))  # separate tensors: while_loop refuses aliases
    config = MetaConfig(algorithm, inner_steps=2, inner_lr=0.1, first_order=first_order, chunk=2)
    zeros = (torch.zeros((), dtype=F64), {n: torch.zeros_like(v) for n, v in theta.items()}, torch.zeros_like(w))
    loss, g_theta, g_w = _chunk_loop(model, theta, w, Batch(Xs, ys, Xq, yq), config, _grad_func, zeros)  # tasks 0-3
    last = (x[4:] for x in (Xs, ys, Xq, yq))
    rest = _meta_gradient(model, theta, w, Batch(*last), MetaConfig(algorithm, inner_steps=2, inner_lr=0.1, first_order=first_order), _grad_func)
    loss = loss + rest[0] / 5
    ref_loss, ref_theta, ref_w = _reference(model, theta, w, Xs, ys, Xq, yq, algorithm, 2, 0.1, first_order)
    ref_loss = float(ref_loss.detach())
    assert abs(float(loss) - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))
    got = _flat({n: g_theta[n] + rest[1][n] / 5 for n in theta}, g_w + rest[2] / 5)
    assert _rel(got, _flat(ref_theta, ref_w)) <= 1e-6


@pytest.mark.parametrize(
    "name,algorithm,steps", [("linear", "maml", 3), ("logistic", "maml", 2), ("mlp", "maml", 2), ("relu", "anil", 3), ("module", "anil", 2)]
)
def test_second_order_meta_gradient_equals_central_finite_differences(name, algorithm, steps):
    model, theta, w = _setup(name, seed=2)
    Xs, ys, Xq, yq = _data(model, seed=3)
    config = MetaConfig(algorithm, inner_steps=steps, inner_lr=0.2)
    _, g_theta, g_w = meta_gradient(model, theta, w, Xs, ys, Xq, yq, config)
    names = sorted(theta)
    sizes = [theta[n].numel() for n in names]
    x0 = torch.cat([*(theta[n].reshape(-1) for n in names), w])

    def outer(x):
        parts = torch.split(x, [*sizes, w.numel()])
        th = {n: p.reshape(theta[n].shape) for n, p in zip(names, parts[:-1], strict=True)}
        return float(meta_gradient(model, th, parts[-1], Xs, ys, Xq, yq, config)[0])

    eps = 1e-6
    basis = torch.eye(x0.numel(), dtype=F64)
    fd = torch.tensor([(outer(x0 + eps * e) - outer(x0 - eps * e)) / (2 * eps) for e in basis], dtype=F64)
    assert _rel(_flat(g_theta, g_w), fd) <= 1e-6


def test_inner_adapt_shapes_and_head_only_keeps_theta():
    model, theta, w = _setup("mlp")
    Xs, ys, _, _ = _data(model)
    theta_k, w_k = inner_adapt(model, theta, w, Xs, ys, steps=2, lr=0.1)
    assert w_k.shape == (4, w.numel()) and all(theta_k[n].shape == (4, *v.shape) for n, v in theta.items())
    theta_h, w_h = inner_adapt(model, theta, w, Xs, ys, steps=2, lr=0.1, head_only=True)
    assert all(torch.equal(theta_h[n], v.expand(4, *v.shape)) for n, v in theta.items())
    # task 2 adapted alone equals its slice of the batch
    alone_theta, alone_w = inner_adapt(model, theta, w, Xs[2:3], ys[2:3], steps=2, lr=0.1)
    torch.testing.assert_close(alone_w[0], w_k[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alone_theta["W1"][0], theta_k["W1"][2], rtol=1e-12, atol=1e-12)
    # every task against plain gradient steps on its own loss (all parameters; the head only)
    for t in range(4):
        th, ww, head = dict(theta), w, w
        for _ in range(2):
            leaves = [v.detach().requires_grad_() for v in (*th.values(), ww)]
            grads = torch.autograd.grad(task_loss(model, dict(zip(th, leaves[:-1], strict=True)), None, leaves[-1], Xs[t], ys[t]), leaves)
            th = {n: v.detach() - 0.1 * g for (n, v), g in zip(zip(th, leaves[:-1], strict=True), grads[:-1], strict=True)}
            ww = leaves[-1].detach() - 0.1 * grads[-1]
            head = head.detach().requires_grad_()
            head = head.detach() - 0.1 * torch.autograd.grad(task_loss(model, theta, None, head, Xs[t], ys[t]), head)[0]
        torch.testing.assert_close(w_k[t], ww, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w_h[t], head, rtol=1e-12, atol=1e-12)
        for n in theta:
            torch.testing.assert_close(theta_k[n][t], th[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("widths", [(1, 6, 5), (3, 6, 5)])
def test_mlp_model_is_the_network_with_an_output_bias(widths):
    theta, w = init_mlp(widths, torch.Generator().manual_seed(0), dtype=F64)
    layers = [torch.nn.Linear(widths[0], widths[1]), torch.nn.ReLU(), torch.nn.Linear(widths[1], widths[2]), torch.nn.ReLU(), torch.nn.Linear(widths[2], 1)]
    network = torch.nn.Sequential(*layers).to(F64)
    with torch.no_grad():
        for index, layer in ((1, layers[0]), (2, layers[2])):
            layer.weight.copy_(theta[f"W{index}"].T)
            layer.bias.copy_(theta[f"b{index}"])
        layers[4].weight.copy_(w[:-1].unsqueeze(0))
        layers[4].bias.copy_(w[-1:])
    X = torch.randn(4, 7, widths[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    model = mlp_model(widths)
    expected = network(X)[..., 0]
    torch.testing.assert_close(model.features(theta, X[0]) @ w, expected[0])  # one task
    torch.testing.assert_close(model.features(theta, X) @ w, expected)  # shared parameters, a batch of tasks
    stacked = {name: value.expand(4, *value.shape) for name, value in theta.items()}
    torch.testing.assert_close((model.features(stacked, X) @ w.unsqueeze(-1)).squeeze(-1), expected)  # stacked parameters


def test_split_support_is_a_partition_of_each_task():
    X = torch.arange(3 * 6, dtype=F64).reshape(3, 6, 1)
    y = X[..., 0] * 2
    Xs, ys, Xq, yq = split_support(X, y, 4, torch.Generator().manual_seed(0))
    assert Xs.shape == (3, 4, 1) and Xq.shape == (3, 2, 1)
    torch.testing.assert_close(ys, 2 * Xs[..., 0])
    for t in range(3):
        assert sorted(torch.cat([Xs[t, :, 0], Xq[t, :, 0]]).tolist()) == X[t, :, 0].tolist()
    # shuffled, and afresh for each task (not the first 4 samples, not one permutation for all)
    assert any(not torch.equal(Xs[t], X[t, :4]) for t in range(3))
    assert len({frozenset((Xs[t, :, 0] - 6 * t).tolist()) for t in range(3)}) > 1


# ---------------------------------------------------------------- meta_train


def _linear_tasks(T=12, n=10, d=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    B_star = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]
    X = torch.randn(T, n, d, generator=g, dtype=F64)
    heads = torch.randn(T, k, generator=g, dtype=F64)
    y = (X @ (B_star @ heads.unsqueeze(-1))).squeeze(-1)
    theta = {"B": torch.randn(d, k, generator=g, dtype=F64) / 2}
    return X, y, theta, torch.zeros(k, dtype=F64)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "reptile", "pooled"])
def test_meta_train_is_reproducible(algorithm):
    X, y, theta, w = _linear_tasks()
    config = MetaConfig(algorithm, inner_steps=2, inner_lr=0.1, outer_lr=0.01, meta_batch=5, iterations=15, support=0.6, compile="never")
    seen = []
    first = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(7), on_step=seen.append)
    second = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(7))
    assert seen == list(range(15)) and not first.compiled
    assert torch.equal(first.losses, second.losses) and torch.equal(first.w, second.w) and torch.equal(first.theta["B"], second.theta["B"])
    other = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(8))
    assert not torch.equal(first.losses, other.losses)


@pytest.mark.parametrize("algorithm,optimizer", [("maml", "adam"), ("anil", "adam"), ("fomaml", "sgd")])
def test_meta_train_decreases_the_loss(algorithm, optimizer):
    X, y, theta, w = _linear_tasks()
    config = MetaConfig(algorithm, inner_steps=3, inner_lr=0.1, outer_lr=0.02, optimizer=optimizer, meta_batch=6, iterations=150)
    fit = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(0))
    assert fit.losses.shape == (150,)
    assert float(fit.losses[-20:].mean()) < 0.5 * float(fit.losses[:20].mean())


def test_meta_train_adam_matches_torch_optim():
    X, y, theta, w = _linear_tasks()
    config = MetaConfig("maml", inner_steps=2, inner_lr=0.1, outer_lr=0.01, meta_batch=4, iterations=5)
    fit = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(3))
    leaves = [theta["B"].clone().requires_grad_(), w.clone().requires_grad_()]
    optimiser = torch.optim.Adam(leaves, lr=0.01)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        index = torch.randperm(12, generator=g)[:4]
        _, g_theta, g_w = meta_gradient(linear_model(), {"B": leaves[0]}, leaves[1], X[index], y[index], X[index], y[index], config)
        leaves[0].grad, leaves[1].grad = g_theta["B"], g_w
        optimiser.step()
    torch.testing.assert_close(fit.theta["B"], leaves[0].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fit.w, leaves[1].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "changes,culprit",
    [
        ({"algorithm": "protonet"}, "algorithm"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"outer_lr": -1.0}, "outer_lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"meta_batch": 13}, "meta_batch"),
        ({"support": 10}, "support"),
        ({"support": 0.05}, "support"),
        ({"support": 2.5}, "support"),
        ({"compile": "sometimes"}, "compile"),
        ({"chunk": 0}, "chunk"),
    ],
)
def test_bad_configuration_is_one_clear_error(changes, culprit):
    X, y, theta, w = _linear_tasks()
    settings = {"algorithm": "maml", "iterations": 2, "meta_batch": 4, **changes}
    with pytest.raises(ValueError) as error:
        meta_train(linear_model(), theta, w, X, y, MetaConfig(**settings), torch.Generator().manual_seed(0))
    message = str(error.value)
    assert culprit in message and "\n" not in message


@pytest.mark.skipif(os.environ.get("ADAPTREP_TEST_COMPILE") != "1", reason="torch.compile takes about a minute on two CPU cores; set ADAPTREP_TEST_COMPILE=1")
@pytest.mark.parametrize(("algorithm", "chunk"), [("maml", None), ("anil", None), ("maml", 3), ("reptile", 3)])
def test_compiled_meta_train_equals_eager(algorithm, chunk):
    """chunk 3 of a meta-batch of 4: the compiled loop over full chunks (one) plus the remainder;
    maml with a support/query split, reptile on the same data as both."""
    model = mlp_model((1, 8, 8))
    g = torch.Generator().manual_seed(0)
    theta, w = init_mlp((1, 8, 8), g, dtype=F64)
    X = torch.rand(10, 12, 1, generator=g, dtype=F64) * 10 - 5
    y = torch.sin(X[..., 0] - torch.rand(10, 1, generator=g, dtype=F64))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the compiled step runs with meta.COMPILED_THREADS (1) and restores torch's setting
    try:
        fits = [
            meta_train(
                model,
                theta,
                w,
                X,
                y,
                MetaConfig(algorithm, inner_steps=2, meta_batch=4, iterations=6, support=6, compile=c, chunk=chunk),
                torch.Generator().manual_seed(1),
            )
            for c in ("never", "always")
        ]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert not fits[0].compiled and fits[1].compiled
    torch.testing.assert_close(fits[1].losses, fits[0].losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fits[1].w, fits[0].w, rtol=1e-10, atol=1e-12)
    for name in theta:
        torch.testing.assert_close(fits[1].theta[name], fits[0].theta[name], rtol=1e-10, atol=1e-12)


def test_the_compiled_step_runs_with_its_own_thread_count_and_restores_torchs(monkeypatch):
    """compile_step (torch.compile replaced by a recorder: no compilation) runs the step with ``threads``
    torch threads, compiles its kernels for that many with a C++ driver, restores torch's setting after the
    call, and keeps torch's setting with ``threads=None``."""
    import adaptrep.meta as meta

    seen: list[tuple[int, object, bool]] = []

    def fake_compile(fn, **kwargs):
        def run(*args):
            options = kwargs["options"]
            seen.append((torch.get_num_threads(), options.get("cpp.threads"), options["cpp_wrapper"]))
            return "result"

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = MetaConfig("maml", inner_steps=1, meta_batch=4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert meta.compile_step(linear_model(), ["B"], config)() == "result"
        assert torch.get_num_threads() == 2
        assert meta.compile_step(linear_model(), ["B"], config, threads=None)() == "result"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [(meta.COMPILED_THREADS, meta.COMPILED_THREADS, True), (2, None, True)]
    with pytest.raises(ValueError, match="threads"):
        meta.compile_step(linear_model(), ["B"], config, threads=0)


def test_a_failed_compilation_falls_back_to_eager_with_a_warning(monkeypatch):
    import adaptrep.meta as meta

    def broken(*args):
        def step(*inputs):
            raise RuntimeError("no compiler here")

        return step

    monkeypatch.setattr(meta, "compile_step", broken)
    X, y, theta, w = _linear_tasks()
    config = MetaConfig("maml", inner_steps=1, meta_batch=4, iterations=3, compile="always")
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        fit = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(0))
    eager = meta_train(
        linear_model(), theta, w, X, y, MetaConfig("maml", inner_steps=1, meta_batch=4, iterations=3, compile="never"), torch.Generator().manual_seed(0)
    )
    assert not fit.compiled and torch.equal(fit.losses, eager.losses)
    assert meta.should_compile(MetaConfig("maml", iterations=meta.COMPILE_MIN_ITERATIONS)) and not meta.should_compile(MetaConfig("maml", iterations=10))


@pytest.mark.parametrize("name", ["linear", "logistic", "mlp", "module"])
@pytest.mark.parametrize("algorithm,first_order", CASES)
def test_torch_func_backend_equals_the_per_task_loop(name, algorithm, first_order):
    """The backend that torch.compile traces (torch.func.grad_and_value), run uncompiled."""
    model, theta, w = _setup(name)
    Xs, ys, Xq, yq = _data(model)
    config = MetaConfig(algorithm, inner_steps=2, inner_lr=0.1, first_order=first_order)
    leaves = {n: v.clone().requires_grad_() for n, v in theta.items()}
    loss, g_theta, g_w = _meta_gradient(model, leaves, w.clone().requires_grad_(), Batch(Xs, ys, Xq, yq), config, _grad_func)
    ref_loss, ref_theta, ref_w = _reference(model, theta, w, Xs, ys, Xq, yq, algorithm, 2, 0.1, first_order)
    ref_loss = float(ref_loss.detach())
    assert abs(float(loss.detach()) - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))
    assert _rel(_flat(g_theta, g_w).detach(), _flat(ref_theta, ref_w)) <= 1e-6


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_meta_train_with_a_support_split_equals_a_hand_driven_loop(optimizer):
    """meta_train's task sampling, support/query split and outer step, replayed by hand."""
    X, y, theta, w = _linear_tasks()
    config = MetaConfig("maml", inner_steps=2, inner_lr=0.1, outer_lr=0.01, optimizer=optimizer, meta_batch=4, iterations=4, support=6)
    fit = meta_train(linear_model(), theta, w, X, y, config, torch.Generator().manual_seed(3))
    leaves = [theta["B"].clone().requires_grad_(), w.clone().requires_grad_()]
    optimiser = torch.optim.Adam(leaves, lr=0.01) if optimizer == "adam" else torch.optim.SGD(leaves, lr=0.01)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(4):
        index = torch.randperm(12, generator=g)[:4]
        order = torch.rand(4, 10, generator=g, dtype=torch.float32).argsort(-1)
        Xp, yp = torch.take_along_dim(X[index], order.unsqueeze(-1), dim=1), torch.take_along_dim(y[index], order, dim=1)
        loss, g_theta, g_w = meta_gradient(linear_model(), {"B": leaves[0]}, leaves[1], Xp[:, :6], yp[:, :6], Xp[:, 6:], yp[:, 6:], config)
        leaves[0].grad, leaves[1].grad = g_theta["B"], g_w
        optimiser.step()
        losses.append(float(loss))
    torch.testing.assert_close(fit.losses, torch.tensor(losses, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fit.theta["B"], leaves[0].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fit.w, leaves[1].detach(), rtol=1e-12, atol=1e-12)
