"""Peer meta-learning libraries (learn2learn, higher, TorchOpt) doing the same MAML / ANIL meta-gradient
step as a plain per-task autograd loop, for side-by-side timings and gradient checks.

The peers are never a dependency of ``adaptrep``; they live in a separate virtual environment,
``PEERS`` below, where learn2learn 0.2.0, higher 0.2.1 and TorchOpt 0.7.3 import beside torch (on
Python 3.11, learn2learn 0.2.0's sdist needs its C sources regenerated from the .pyx with Cython 0.29,
and only its MAML path, not torchvision, is needed)::

    PEERS/bin/pip install --no-deps -e .   # plus pandas pyyaml pydantic typer rich matplotlib
    PEERS/bin/python benchmarks/peers.py --check     # meta-gradients agree (float64)
    PEERS/bin/python benchmarks/peers.py --time      # it/s per peer and configuration (float32)
    PEERS/bin/python benchmarks/peers.py --memory    # peak memory per configuration

Problems (``problem``), each a meta-batch of tasks ``(Xs (B,ns,d), ys (B,ns), Xq (B,nq,d), yq (B,nq))``:

* ``sinusoid``: a 1-40-40-1 ReLU MLP, B = 25 tasks, 10 support + 10 query points, inner SGD lr 0.01.
  Our layout: ``W1 (1,40), b1 (40,), W2 (40,40), b2 (40,)``, features ``relu(relu(x @ W1 + b1) @ W2 + b2)``
  with a constant 1 appended, head ``w (41,)`` = [output weights (40), output bias].
* ``linear``: ``f(x) = w^T B^T x``, ``B (50,5)``, head ``w (5,)``; B = 64 tasks, 25 + 25 points, 5 inner steps,
  inner SGD lr 0.01 by default here (``PROBLEMS``); the peers' module is
  ``nn.Sequential(Linear(50,5,bias=False), Linear(5,1,bias=False))``.

The reference differs from the peers in one respect on purpose: it keeps the whole meta-batch's graph
and takes one ``torch.autograd.grad`` of the mean query loss (as a batched implementation would), so
its peak memory is about B times a peer's.

Losses: the inner loss is the task's mean squared error on its support set; the outer loss is the mean
over tasks of each task's mean squared error on its query set. ``algorithm="maml"`` adapts every
parameter in the inner loop; ``"anil"`` adapts the head ``w`` only, the representation being a fixed
feature extractor inside the inner loop which still receives the outer gradient. ``first_order=True``
drops the second-order terms (the inner gradients are constants for the outer gradient, FOMAML).

Each peer is used the way its documentation and examples use it, with a Python loop over tasks and
one ``backward()`` of each task's query loss (scaled by 1/B) so that gradients accumulate in the
module's ``.grad`` and every task's graph is freed before the next one (as in the libraries' MAML
examples):

* learn2learn: ``l2l.algorithms.MAML(net, lr, first_order)``, per task ``learner = maml.clone()`` and
  ``learner.adapt(support_loss)``; ANIL wraps only the head in ``MAML`` and runs the feature extractor
  outside it (as in learn2learn's ANIL examples).
* higher: ``higher.innerloop_ctx(net, torch.optim.SGD(...), copy_initial_weights=False)`` and
  ``diffopt.step(support_loss)``. First order: ``track_higher_grads=False`` (higher has no first-order
  switch; its fast weights are then detached leaves), and the gradient of the query loss with respect
  to the final fast weights is added to the initial weights' ``.grad`` by hand.
* TorchOpt: its functional API, ``torchopt.sgd(lr)`` with ``opt.update(grads, state, inplace=False)``
  and ``torchopt.apply_updates(params, updates, inplace=False)``, the model evaluated with
  ``torch.func.functional_call``; inner gradients from ``torch.autograd.grad(..., create_graph=not
  first_order)`` (TorchOpt's ``MetaSGD``/``FuncOptimizer`` always differentiate through the step, so
  the functional form is the one that expresses first order). ``"torchopt-metasgd"`` is TorchOpt's
  object-oriented form of its MAML examples, ``torchopt.MetaSGD(net, lr)`` with ``extract_state_dict`` /
  ``recover_state_dict`` around each task (second order only).
* JAX (``benchmarks/jax_peer.py``, set up by ``benchmarks/setup_jax_peer.sh``): not a per-task loop but the
  idiomatic batched form, ``jax.vmap`` over tasks of ``jax.grad`` inner steps inside one ``jax.jit``; the peer
  of our compiled step. Its memory is not the PyTorch profiler's to measure (``--memory`` skips it).

API (importable by other benchmarks; ``benchmarks/`` is put on ``sys.path`` or run from the root)::

    available_peers() -> {library: version or import error}
    init_params(problem, dtype, seed) -> {name: Tensor} in our layout (including the head "w")
    make_batch(problem, dtype, seed) -> (Xs, ys, Xq, yq)
    make_peer_step(library, problem, algorithm, inner_steps, first_order, params, inner_lr)
        -> step(Xs, ys, Xq, yq) -> (mean query loss, {name: meta-gradient} in our layout)
        library: "learn2learn" | "higher" | "torchopt" | "torchopt-metasgd" (second order only) | "jax" | "reference"
    supports(library, first_order) -> bool
    reference_step(...)   same signature, plain autograd (library "reference" in make_peer_step)
    time_step(step, batch, seconds=2.0, clock="wall" | "cpu") -> it/s (or iterations per CPU-second)
    peak_memory(library, problem, algorithm, inner_steps, first_order, ...) -> {"rss_kib", "tensor_kib"}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

LIBRARIES = ("learn2learn", "higher", "torchopt", "jax")
# make_peer_step's ``library``: the peers, TorchOpt's MetaSGD form (second order only), our plain loop
STEP_KINDS = LIBRARIES + ("torchopt-metasgd", "reference")
PROBLEMS = {
    # problem: (input dim, hidden/rank, meta-batch, support, query, default inner lr)
    "sinusoid": dict(dim=1, meta_batch=25, support=10, query=10, inner_lr=0.01),
    "linear": dict(dim=50, rank=5, meta_batch=64, support=25, query=25, inner_lr=0.01),
}
ALGORITHMS = ("maml", "anil")
Step = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


def _import(library: str):
    if library == "learn2learn":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import contextlib
            import io

            # learn2learn imports gym, which prints an unmaintained-package notice on stderr
            with contextlib.redirect_stderr(io.StringIO()):
                import learn2learn
        return learn2learn
    if library == "higher":
        import higher

        return higher
    if library == "torchopt":
        import torchopt

        return torchopt
    if library == "jax":
        import jax
        import jax_peer  # noqa: F401 - benchmarks/jax_peer.py, next to this file

        return jax
    raise ValueError(f"unknown peer library {library!r}; choose from {LIBRARIES}")


def available_peers() -> dict[str, str | None]:
    """Library -> its version (``"unknown"`` when it has none), or ``"import failed: ..."`` with the import error."""
    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            mod = _import(lib)
        except Exception as exc:  # noqa: BLE001 - report any import failure
            out[lib] = f"import failed: {type(exc).__name__}: {exc}"
            continue
        version = getattr(mod, "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(lib)
            except Exception:  # noqa: BLE001
                version = "unknown"
        out[lib] = str(version)
    return out


# ----------------------------------------------------------------------------------------------------
# problems: our parameter layout, data, and the peers' nn.Module form


def init_params(problem: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Tensor]:
    """Initial meta-parameters in our layout (PyTorch's default ``nn.Linear`` init for the sinusoid net)."""
    g = torch.Generator().manual_seed(seed)
    if problem == "sinusoid":

        def lin(i: int, o: int) -> tuple[Tensor, Tensor]:
            bound = 1 / math.sqrt(i)
            return (torch.rand(i, o, generator=g, dtype=torch.float64) * 2 - 1) * bound, (torch.rand(o, generator=g, dtype=torch.float64) * 2 - 1) * bound

        W1, b1 = lin(1, 40)
        W2, b2 = lin(40, 40)
        W3, b3 = lin(40, 1)
        p = {"W1": W1, "b1": b1, "W2": W2, "b2": b2, "w": torch.cat([W3[:, 0], b3])}
    elif problem == "linear":
        d, k = PROBLEMS["linear"]["dim"], PROBLEMS["linear"]["rank"]
        p = {"B": torch.randn(d, k, generator=g, dtype=torch.float64) / math.sqrt(d), "w": torch.randn(k, generator=g, dtype=torch.float64)}
    else:
        raise ValueError(f"unknown problem {problem!r}; choose from {tuple(PROBLEMS)}")
    return {k: v.to(dtype) for k, v in p.items()}


def make_batch(problem: str, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One meta-batch. Sinusoid: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]. Linear: x ~ N(0, I_50),
    y = x^T B* v_t + 0.1 noise with a random orthonormal B* (50x5) and v_t ~ N(0, I_5)."""
    c = PROBLEMS[problem]
    g = torch.Generator().manual_seed(seed)
    T, ns, nq, d = c["meta_batch"], c["support"], c["query"], c["dim"]
    if problem == "sinusoid":
        amp = torch.rand(T, 1, generator=g, dtype=torch.float64) * 4.9 + 0.1
        phase = torch.rand(T, 1, generator=g, dtype=torch.float64) * math.pi
        X = torch.rand(T, ns + nq, 1, generator=g, dtype=torch.float64) * 10 - 5
        y = amp * torch.sin(X[..., 0] - phase)
    else:
        Bstar = torch.linalg.qr(torch.randn(d, c["rank"], generator=g, dtype=torch.float64))[0]
        v = torch.randn(T, c["rank"], generator=g, dtype=torch.float64)
        X = torch.randn(T, ns + nq, d, generator=g, dtype=torch.float64)
        y = torch.einsum("tnd,dk,tk->tn", X, Bstar, v) + 0.1 * torch.randn(T, ns + nq, generator=g, dtype=torch.float64)
    X, y = X.to(dtype), y.to(dtype)
    # separate tensors, as adaptrep.meta.split_support makes them (a compiled chunked step needs inputs that share no memory)
    return X[:, :ns].contiguous(), y[:, :ns].contiguous(), X[:, ns:].contiguous(), y[:, ns:].contiguous()


def build_module(problem: str, params: dict[str, Tensor]) -> nn.Sequential:
    """The peers' ``nn.Sequential`` holding (copies of) our parameter values; its last layer is the head."""
    dtype = params["w"].dtype
    if problem == "sinusoid":
        net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(dtype)
        with torch.no_grad():
            net[0].weight.copy_(params["W1"].T)
            net[0].bias.copy_(params["b1"])
            net[2].weight.copy_(params["W2"].T)
            net[2].bias.copy_(params["b2"])
            net[4].weight.copy_(params["w"][:40].unsqueeze(0))
            net[4].bias.copy_(params["w"][40:])
    elif problem == "linear":
        d, k = params["B"].shape
        net = nn.Sequential(nn.Linear(d, k, bias=False), nn.Linear(k, 1, bias=False)).to(dtype)
        with torch.no_grad():
            net[0].weight.copy_(params["B"].T)
            net[1].weight.copy_(params["w"].unsqueeze(0))
    else:
        raise ValueError(f"unknown problem {problem!r}")
    return net


def module_grads(problem: str, net: nn.Sequential) -> dict[str, Tensor]:
    """``net``'s accumulated ``.grad`` in our layout (``nn.Linear.weight`` is (out, in): W = weight.T)."""

    def g(p: nn.Parameter) -> Tensor:
        return p.grad if p.grad is not None else torch.zeros_like(p)

    if problem == "sinusoid":
        return {
            "W1": g(net[0].weight).T.clone(),
            "b1": g(net[0].bias).clone(),
            "W2": g(net[2].weight).T.clone(),
            "b2": g(net[2].bias).clone(),
            "w": torch.cat([g(net[4].weight)[0], g(net[4].bias)]),
        }
    return {"B": g(net[0].weight).T.clone(), "w": g(net[1].weight)[0].clone()}


def _mse(pred: Tensor, y: Tensor) -> Tensor:
    return ((pred.squeeze(-1) - y) ** 2).mean()


def _check_args(library: str, problem: str, algorithm: str, inner_steps: int) -> None:
    if library not in STEP_KINDS:
        raise ValueError(f"unknown library {library!r}; choose from {STEP_KINDS}")
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; choose from {tuple(PROBLEMS)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {ALGORITHMS}")
    if inner_steps < 1:
        raise ValueError("inner_steps must be >= 1")


# ----------------------------------------------------------------------------------------------------
# the peers


def _learn2learn_step(problem, algorithm, inner_steps, first_order, net, inner_lr) -> Callable:
    l2l = _import("learn2learn")
    anil = algorithm == "anil"
    features = net[:-1] if anil else None
    maml = l2l.algorithms.MAML(net[-1] if anil else net, lr=inner_lr, first_order=first_order)

    def step(Xs, ys, Xq, yq):
        net.zero_grad(set_to_none=True)
        T = Xs.shape[0]
        total = Xs.new_zeros(())
        for t in range(T):
            learner = maml.clone()
            xs, xq = (features(Xs[t]), features(Xq[t])) if anil else (Xs[t], Xq[t])
            for _ in range(inner_steps):
                learner.adapt(_mse(learner(xs), ys[t]))
            loss = _mse(learner(xq), yq[t]) / T
            loss.backward()
            total += loss.detach()
        return total

    return step


def _higher_step(problem, algorithm, inner_steps, first_order, net, inner_lr) -> Callable:
    higher = _import("higher")
    anil = algorithm == "anil"
    features = net[:-1] if anil else None
    inner = net[-1] if anil else net
    inner_opt = torch.optim.SGD(inner.parameters(), lr=inner_lr)

    def step(Xs, ys, Xq, yq):
        net.zero_grad(set_to_none=True)
        T = Xs.shape[0]
        total = Xs.new_zeros(())
        for t in range(T):
            with higher.innerloop_ctx(inner, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order) as (fnet, diffopt):
                xs, xq = (features(Xs[t]), features(Xq[t])) if anil else (Xs[t], Xq[t])
                for _ in range(inner_steps):
                    diffopt.step(_mse(fnet(xs), ys[t]))
                loss = _mse(fnet(xq), yq[t]) / T
                loss.backward()
                if first_order:
                    # fast weights are detached leaves: carry their gradient to the initial weights
                    for p, fp in zip(inner.parameters(), fnet.parameters(), strict=True):
                        p.grad = fp.grad.clone() if p.grad is None else p.grad.add_(fp.grad)
            total += loss.detach()
        return total

    return step


def _torchopt_step(problem, algorithm, inner_steps, first_order, net, inner_lr) -> Callable:
    torchopt = _import("torchopt")
    from torch.func import functional_call

    anil = algorithm == "anil"
    features = net[:-1] if anil else None
    inner = net[-1] if anil else net
    names = [n for n, _ in inner.named_parameters()]
    opt = torchopt.sgd(lr=inner_lr)

    def step(Xs, ys, Xq, yq):
        net.zero_grad(set_to_none=True)
        T = Xs.shape[0]
        total = Xs.new_zeros(())
        for t in range(T):
            params = tuple(inner.parameters())
            state = opt.init(params)
            xs, xq = (features(Xs[t]), features(Xq[t])) if anil else (Xs[t], Xq[t])
            for _ in range(inner_steps):
                loss = _mse(functional_call(inner, dict(zip(names, params, strict=True)), (xs,)), ys[t])
                grads = torch.autograd.grad(loss, params, create_graph=not first_order)
                updates, state = opt.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            loss = _mse(functional_call(inner, dict(zip(names, params, strict=True)), (xq,)), yq[t]) / T
            loss.backward()
            total += loss.detach()
        return total

    return step


def _torchopt_metasgd_step(problem, algorithm, inner_steps, first_order, net, inner_lr) -> Callable:
    """TorchOpt's object-oriented form, as in its MAML examples: ``torchopt.MetaSGD(net, lr)`` replaces the
    module's parameters by differentiable updates in place; ``extract_state_dict``/``recover_state_dict``
    restore the initial parameters (with their accumulated ``.grad``) after each task. Second order only:
    ``MetaOptimizer.step`` always differentiates through the update."""
    if first_order:
        raise ValueError("torchopt-metasgd is second order only (MetaSGD always differentiates through its step); use 'torchopt'")
    torchopt = _import("torchopt")
    anil = algorithm == "anil"
    features = net[:-1] if anil else None
    inner = net[-1] if anil else net
    inner_opt = torchopt.MetaSGD(inner, lr=inner_lr)

    def step(Xs, ys, Xq, yq):
        net.zero_grad(set_to_none=True)
        T = Xs.shape[0]
        total = Xs.new_zeros(())
        net_state = torchopt.extract_state_dict(inner, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for t in range(T):
            xs, xq = (features(Xs[t]), features(Xq[t])) if anil else (Xs[t], Xq[t])
            for _ in range(inner_steps):
                inner_opt.step(_mse(inner(xs), ys[t]))
            loss = _mse(inner(xq), yq[t]) / T
            loss.backward()
            torchopt.recover_state_dict(inner, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
            total += loss.detach()
        return total

    return step


# ----------------------------------------------------------------------------------------------------
# the independent reference: plain autograd on our layout, one graph for the whole meta-batch


def _features(problem: str, theta: dict[str, Tensor], X: Tensor) -> Tensor:
    if problem == "sinusoid":
        h = torch.relu(torch.relu(X @ theta["W1"] + theta["b1"]) @ theta["W2"] + theta["b2"])
        return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
    return X @ theta["B"]


def reference_step(problem: str, algorithm: str, inner_steps: int, first_order: bool, params: dict[str, Tensor], inner_lr: float) -> Step:
    """Plain autograd, per-task loop, ``create_graph=not first_order``; gradients of the mean query loss
    taken once for the whole meta-batch with ``torch.autograd.grad``."""
    _check_args("reference", problem, algorithm, inner_steps)
    names = list(params)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    def step(Xs, ys, Xq, yq):
        T = Xs.shape[0]
        losses = []
        for t in range(T):
            fast = dict(leaves)
            adapted = names if algorithm == "maml" else ["w"]
            for _ in range(inner_steps):
                pred = _features(problem, fast, Xs[t]) @ fast["w"]
                inner = ((pred - ys[t]) ** 2).mean()
                gs = torch.autograd.grad(inner, [fast[k] for k in adapted], create_graph=not first_order)
                fast = {**fast, **{k: fast[k] - inner_lr * g for k, g in zip(adapted, gs, strict=True)}}
            losses.append(((_features(problem, fast, Xq[t]) @ fast["w"] - yq[t]) ** 2).mean())
        outer = torch.stack(losses).mean()
        grads = torch.autograd.grad(outer, [leaves[k] for k in names])
        return outer.detach(), dict(zip(names, grads, strict=True))

    return step


def make_peer_step(library: str, problem: str, algorithm: str, inner_steps: int, first_order: bool, params: dict[str, Tensor], inner_lr: float) -> Step:
    """A meta-gradient step of ``library`` (or ``"reference"``) on ``problem``.

    ``params``: our layout, including the head ``"w"`` (see the module docstring); their values (and
    dtype) are copied into the peer's module once, here. The step takes ``(Xs, ys, Xq, yq)`` and returns
    ``(mean query loss over tasks, {name: meta-gradient})`` keyed like ``params``.
    """
    _check_args(library, problem, algorithm, inner_steps)
    if library == "reference":
        return reference_step(problem, algorithm, inner_steps, first_order, params, inner_lr)
    if library == "jax":
        _import("jax")
        import jax_peer

        return jax_peer.make_step(problem, algorithm, inner_steps, first_order, params, inner_lr)
    net = build_module(problem, params)
    build = {"learn2learn": _learn2learn_step, "higher": _higher_step, "torchopt": _torchopt_step, "torchopt-metasgd": _torchopt_metasgd_step}[library]
    run = build(problem, algorithm, inner_steps, first_order, net, inner_lr)

    def step(Xs, ys, Xq, yq):
        loss = run(Xs, ys, Xq, yq)
        return loss, module_grads(problem, net)

    step.module = net  # type: ignore[attr-defined]
    return step


# ----------------------------------------------------------------------------------------------------
# timing and memory


def time_step(step: Step, batch: tuple[Tensor, Tensor, Tensor, Tensor], seconds: float = 2.0, warmup: int = 2, clock: str = "wall") -> float:
    """Iterations per second of ``step(*batch)`` (forward, inner loops, backward, gradients in our
    layout): ``warmup`` untimed calls, then as many calls as fit in ``seconds`` (at least 3).

    ``clock="wall"``: elapsed time (``time.perf_counter``). ``clock="cpu"``: this process's CPU time
    (``time.process_time``, all its threads), i.e. iterations per CPU-second, which other jobs on a
    shared machine disturb much less; with one torch thread it approximates an idle machine's wall rate."""
    now = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
    for _ in range(warmup):
        step(*batch)
    n, start = 0, now()
    while True:
        step(*batch)
        n += 1
        elapsed = now() - start
        if elapsed >= seconds and n >= 3:
            return n / elapsed


def measure_memory(iterate: Callable[[], object], steps: int = 5) -> dict[str, float]:
    """Memory of ``steps`` calls of ``iterate()`` (after the caller's warm-up), then of one more call under
    the profiler: ``rss_kib`` (growth of the peak RSS over the calls), ``tensor_kib`` (peak of live CPU
    tensor bytes during the profiled call, relative to those alive when it starts) and ``baseline_rss_kib``.
    See :func:`peak_memory`; shared with ``benchmarks/maml_throughput.py`` so every step is measured alike."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        iterate()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # live tensor bytes from the profiler's allocation events (one more step, profiled)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        iterate()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"rss_kib": after - before, "tensor_kib": peak / 1024, "baseline_rss_kib": before}


def _memory_child(spec: dict) -> dict:
    """Runs in a fresh process: see :func:`peak_memory`."""
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    if spec["library"] != "reference":
        _import(spec["library"].split("-")[0])
    params = init_params(spec["problem"], dtype)
    batch = make_batch(spec["problem"], dtype)
    step = make_peer_step(spec["library"], spec["problem"], spec["algorithm"], spec["inner_steps"], spec["first_order"], params, spec["inner_lr"])
    # one-off start-up costs (autograd engine and intra-op threads, kernels' first use, allocator arenas)
    # go into the baseline alike for every library: the plain reference step on the batch's first task
    # (same operations, 1/B of the graph), then one peer step on one task (the library's own first use)
    one_task = tuple(x[:1] for x in batch)
    reference_step(spec["problem"], spec["algorithm"], spec["inner_steps"], spec["first_order"], params, spec["inner_lr"])(*one_task)
    step(*one_task)
    return measure_memory(lambda: step(*batch), spec["steps"])


def peak_memory(
    library: str,
    problem: str,
    algorithm: str = "maml",
    inner_steps: int = 5,
    first_order: bool = False,
    inner_lr: float | None = None,
    steps: int = 5,
    dtype: str = "float32",
    threads: int | None = None,
    python: str | None = None,
) -> dict[str, float]:
    """Peak memory of ``steps`` meta-gradient steps, measured in a fresh subprocess (``python``, default
    this interpreter) so that nothing another configuration allocated is counted.

    * ``rss_kib``: growth of the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``)
      over the steps, the baseline being taken after importing torch and the library, building the
      module and the data, and a warm-up on the batch's first task alone (the reference step, then the
      peer's step) that pays the one-off start-up costs (threads, first kernel use, allocator arenas).
      Counts everything the process touches (tensors, Python objects, allocator slack), page-granular
      (4 KiB) and at the mercy of glibc malloc's reuse, so differences under ~1 MiB mean little.
    * ``tensor_kib``: the peak of live CPU tensor bytes during one more step, from the PyTorch profiler's
      allocation/free events (``profile_memory=True``), relative to the tensors alive when the step
      starts (the parameters and the batch). Allocator- and import-independent, so the fairest
      comparison of what each library keeps alive (graphs, fast weights, clones).
    """
    spec = dict(
        library=library,
        problem=problem,
        algorithm=algorithm,
        inner_steps=inner_steps,
        first_order=first_order,
        inner_lr=PROBLEMS[problem]["inner_lr"] if inner_lr is None else inner_lr,
        steps=steps,
        dtype=dtype,
        threads=threads or torch.get_num_threads(),
    )
    out = subprocess.run(
        [python or sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# command line


def configurations() -> list[tuple[str, str, int, bool]]:
    """(problem, algorithm, inner_steps, first_order) of the benchmark."""
    out = []
    for steps in (1, 5):
        for fo in (False, True):
            out.append(("sinusoid", "maml", steps, fo))
    out += [("linear", "maml", 5, False), ("linear", "anil", 5, False)]
    return out


def check_configurations() -> list[tuple[str, str, int, bool]]:
    return [(p, a, s, fo) for p in PROBLEMS for a in ALGORITHMS for s in (1, 5) for fo in (False, True)]


def supports(library: str, first_order: bool) -> bool:
    """Whether ``make_peer_step`` has ``library`` in this order (TorchOpt's MetaSGD form is second order only)."""
    return not (first_order and library == "torchopt-metasgd")


def _label(problem: str, algorithm: str, steps: int, first_order: bool) -> str:
    return f"{problem:8s} {algorithm:4s} {steps} step{'s' if steps > 1 else ' '} {'1st' if first_order else '2nd'} order"


def check(libraries: list[str]) -> float:
    """Each peer's float64 meta-gradient against the reference; prints, returns the worst relative error."""
    worst = 0.0
    print("float64 meta-gradients against the plain-autograd reference, per peer: ||g_peer - g_ref|| / ||g_ref|| over all")
    print("parameters (our layout) / the worst single parameter tensor / the mean query loss's relative error;")
    print("'other order': the same relative difference between the first- and second-order reference gradients")
    print(f"{'configuration':34s} " + " ".join(f"{lib:>22s}" for lib in libraries) + f" {'peers among themselves':>24s} {'other order':>12s}")
    for problem, algorithm, steps, fo in check_configurations():
        params = init_params(problem, torch.float64)
        batch = make_batch(problem, torch.float64)
        lr = PROBLEMS[problem]["inner_lr"]
        ref_loss, ref = reference_step(problem, algorithm, steps, fo, params, lr)(*batch)
        ref_norm = torch.sqrt(sum((g**2).sum() for g in ref.values()))
        # how much the check can tell apart: the other order's reference gradient differs by this much
        _, other = reference_step(problem, algorithm, steps, not fo, params, lr)(*batch)
        sensitivity = float(torch.sqrt(sum(((other[k] - ref[k]) ** 2).sum() for k in ref)) / ref_norm)
        cells, peer_grads = [], []
        for lib in libraries:
            if not supports(lib, fo):
                cells.append("-")
                continue
            loss, got = make_peer_step(lib, problem, algorithm, steps, fo, params, lr)(*batch)
            assert set(got) == set(ref) and all(got[k].shape == ref[k].shape for k in ref), f"{lib}: layout mismatch"
            err = float(torch.sqrt(sum(((got[k] - ref[k]) ** 2).sum() for k in ref)) / ref_norm)
            per = max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref if ref[k].norm() > 0)
            lerr = float(abs(loss - ref_loss) / abs(ref_loss))
            worst = max(worst, err, per, lerr)
            cells.append(f"{err:.1e}/{per:.1e}/{lerr:.0e}")
            peer_grads.append(got)
        pairs = [(a, b) for i, a in enumerate(peer_grads) for b in peer_grads[i + 1 :]]
        among = max((float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in ref)) / ref_norm) for a, b in pairs), default=0.0)
        worst = max(worst, among)
        print(f"{_label(problem, algorithm, steps, fo):34s} " + " ".join(f"{c:>22s}" for c in cells) + f" {among:24.1e} {sensitivity:12.1e}")
    ok = worst <= 1e-8
    print(f"worst relative error {worst:.1e}: {'OK' if ok else 'FAILED'} (tolerance 1e-8)")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="meta-gradients of every peer against the reference (float64)")
    parser.add_argument("--time", action="store_true", help="it/s per peer and configuration (float32)")
    parser.add_argument("--memory", action="store_true", help="peak memory per peer and configuration (fresh subprocesses)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (interleaved across libraries); median and range are printed")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or process CPU time (iterations per CPU-second)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--libraries",
        default=",".join(STEP_KINDS),
        help="comma-separated; 'torchopt-metasgd' is TorchOpt's MetaSGD form (second order only), 'reference' the plain autograd loop",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(_memory_child(json.loads(args.memory_child))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    peers = available_peers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; " + ", ".join(f"{k} {v}" for k, v in peers.items()))
    wanted = [lib for lib in args.libraries.split(",") if lib]
    usable = [lib for lib in wanted if lib == "reference" or not (peers.get(lib.split("-")[0]) or "import failed").startswith("import failed")]
    if args.check:
        if not [lib for lib in usable if lib != "reference"]:
            sys.exit("--check: no peer library imports here; run it with the peers' environment (see the module docstring)")
        worst = check([lib for lib in usable if lib != "reference"])
        if worst > 1e-8:
            sys.exit(1)
    if args.time:
        unit = "it/s" if args.clock == "wall" else "iterations per CPU-second"
        print(f"\n{unit} (float32), {args.seconds:g} s per measurement, {args.repeats} repeats interleaved: median [min-max]")
        print(f"{'configuration':34s} " + " ".join(f"{lib:>20s}" for lib in usable))
        for problem, algorithm, steps, fo in configurations():
            params, batch = init_params(problem, torch.float32), make_batch(problem, torch.float32)
            lr = PROBLEMS[problem]["inner_lr"]
            fns = {lib: make_peer_step(lib, problem, algorithm, steps, fo, params, lr) for lib in usable if supports(lib, fo)}
            rates: dict[str, list[float]] = {lib: [] for lib in fns}
            for _ in range(args.repeats):
                for lib in fns:
                    rates[lib].append(time_step(fns[lib], batch, args.seconds, clock=args.clock))
            cells = [f"{sorted(r)[len(r) // 2]:6.1f} [{min(r):.1f}-{max(r):.1f}]" if (r := rates.get(lib)) else "-" for lib in usable]
            print(f"{_label(problem, algorithm, steps, fo):34s} " + " ".join(f"{c:>20s}" for c in cells), flush=True)
    if args.memory:
        print("\npeak memory (float32, fresh process each): RSS growth over 5 steps KiB / peak live tensor KiB in a step")
        print(f"{'configuration':34s} " + " ".join(f"{lib:>20s}" for lib in usable))
        for problem, algorithm, steps, fo in configurations():
            cells = []
            for lib in usable:
                if not supports(lib, fo) or lib == "jax":
                    cells.append("-")
                    continue
                m = peak_memory(lib, problem, algorithm, steps, fo, threads=args.threads)
                cells.append(f"{m['rss_kib']:.0f} / {m['tensor_kib']:.0f}")
            print(f"{_label(problem, algorithm, steps, fo):34s} " + " ".join(f"{c:>20s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
