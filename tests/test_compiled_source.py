"""The compiled source training of the generic objective (fit_shared(compile="always")) and fine-tuning
(finetune(compile="always")) against the eager reference (torch.optim.Adam and the cosine schedule on
autograd leaves; the eager Nesterov loop): the same numbers up to rounding. The compilations take
seconds, so those tests are slow; the default run checks the step functions uncompiled, the fallback and
the auto rule."""

from __future__ import annotations

import pytest
import torch

from adaptrep import models
from adaptrep.models import Model, finetune, fit_shared, relu_model

F64 = torch.float64


def _relu_tasks(dtype=F64, T=12, n=15, d=6, k=3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(T, n, d, generator=g, dtype=F64)
    W = torch.randn(d, k, generator=g, dtype=F64)
    y = torch.relu(X @ W) @ torch.randn(T, k, 1, generator=g, dtype=F64) + 0.1 * torch.randn(T, n, 1, generator=g, dtype=F64)
    theta0 = {"W": torch.randn(d, k, generator=g, dtype=F64).to(dtype)}
    return X.to(dtype), y.squeeze(-1).to(dtype), theta0


def _assert_same_fit(compiled, eager, rtol, atol):
    for name in eager.theta:
        torch.testing.assert_close(compiled.theta[name], eager.theta[name], rtol=rtol, atol=atol)
    if eager.delta is None:
        assert compiled.delta is None
    else:
        for name in eager.delta:
            torch.testing.assert_close(compiled.delta[name], eager.delta[name], rtol=rtol, atol=atol)
    torch.testing.assert_close(compiled.w, eager.w, rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.tensor(compiled.history), torch.tensor(eager.history), rtol=rtol, atol=atol)
    assert compiled.objective == pytest.approx(eager.objective, rel=rtol, abs=atol)
    assert compiled.grad_norm == pytest.approx(eager.grad_norm, rel=100 * rtol, abs=atol)


@pytest.mark.slow  # 5 s with the on-disk inductor cache warm, 9 s cold; the uncompiled step's numbers are checked by default below
def test_compiled_fit_shared_equals_eager_in_float64():
    """ADAPTREP's objective on a ReLU representation, 60 steps: the iterates move far from the start
    (the objective falls by a factor), and every output matches the eager path to rounding."""
    X, y, theta0 = _relu_tasks()
    fits = [fit_shared(relu_model(), theta0, X, y, lam=0.05, gamma=1e-3, steps=60, compile=mode) for mode in ("never", "always")]
    eager, compiled = fits
    assert eager.history[-1] < 0.7 * eager.history[0]  # a real descent, not a few steps near the start
    _assert_same_fit(compiled, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compiled.theta["W"].norm(dim=0), torch.ones(3, dtype=F64))  # retracted every step


@pytest.mark.slow
def test_compiled_fit_shared_equals_eager_frozen_ragged_and_float32():
    """FROZENREP (no perturbations) on ragged tasks (a per-sample weight) in float64 to rounding, and
    ADAPTREP in float32 loosely (Adam divides by root-mean-square gradients: rounding grows)."""
    X, y, theta0 = _relu_tasks()
    weight = torch.ones(y.shape, dtype=F64)
    weight[::2, 10:] = 0.0
    frozen = [fit_shared(relu_model(), theta0, X, y, lam=None, gamma=1e-3, steps=40, weight=weight, compile=mode) for mode in ("never", "always")]
    _assert_same_fit(frozen[1], frozen[0], rtol=1e-10, atol=1e-12)
    X32, y32, theta32 = _relu_tasks(torch.float32)
    single = [fit_shared(relu_model(), theta32, X32, y32, lam=0.05, gamma=1e-3, steps=40, compile=mode) for mode in ("never", "always")]
    _assert_same_fit(single[1], single[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_fit_shared_equals_eager_on_a_cnn_module():
    """A user's CNN (Model.from_module) with the multiclass loss, heads (T, k, N), in float64."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 20, 1, 6, 6, generator=g, dtype=F64)
    y = torch.arange(3, dtype=F64).repeat(7)[:20].expand(6, 20).contiguous()
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(18, 4)).double()
    model, theta0 = Model.from_module(cnn, "multiclass", classes=3)
    fits = [fit_shared(model, theta0, X, y, lam=0.1, gamma=1e-3, steps=30, compile=mode) for mode in ("never", "always")]
    assert fits[1].w.shape == (6, 4, 3)
    _assert_same_fit(fits[1], fits[0], rtol=1e-9, atol=1e-11)


def test_a_failed_compilation_of_the_source_step_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(fn, *args, **kwargs):
        def step(*inputs):
            raise RuntimeError("no compiler here")

        return step

    monkeypatch.setattr(models, "compile_function", broken)
    X, y, theta0 = _relu_tasks()
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        fit = fit_shared(relu_model(), theta0, X, y, lam=0.05, steps=5, compile="always")
    eager = fit_shared(relu_model(), theta0, X, y, lam=0.05, steps=5, compile="never")
    assert torch.equal(fit.theta["W"], eager.theta["W"]) and fit.history == eager.history


def test_auto_compiles_long_runs_only_and_a_bad_mode_is_one_line(monkeypatch):
    """With torch.compile's part replaced by the identity (the pure step functions run uncompiled: fast),
    ``"auto"`` uses them from COMPILE_MIN_STEPS steps on only, and they give the eager numbers."""
    assert not models.should_compile_steps(600) and models.should_compile_steps(models.COMPILE_MIN_STEPS)
    used: list[str] = []
    monkeypatch.setattr(models, "compile_function", lambda fn: used.append(fn.__qualname__) or fn)
    X, y, theta0 = _relu_tasks()
    eager = fit_shared(relu_model(), theta0, X, y, lam=0.05, steps=8)
    finetuned = finetune(relu_model(), eager.theta, X[:3], y[:3], torch.Generator().manual_seed(3), max_steps=8)
    assert used == []
    monkeypatch.setattr(models, "COMPILE_MIN_STEPS", 8)
    functional = fit_shared(relu_model(), theta0, X, y, lam=0.05, steps=8)
    assert used == ["_shared_step.<locals>.step"]
    torch.testing.assert_close(functional.theta["W"], eager.theta["W"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.tensor(functional.history), torch.tensor(eager.history), rtol=1e-12, atol=1e-14)
    again = finetune(relu_model(), eager.theta, X[:3], y[:3], torch.Generator().manual_seed(3), max_steps=8)
    assert used[1:] == ["_descent_step.<locals>.step"] * 2  # the folds' paths, then the path on all the samples
    assert torch.equal(again[2], finetuned[2])
    torch.testing.assert_close(again[0]["W"], finetuned[0]["W"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(again[1], finetuned[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="compile must be one of auto, always, never; got 'yes'"):
        fit_shared(relu_model(), theta0, X, y, lam=0.05, steps=3, compile="yes")
    with pytest.raises(ValueError, match="compile must be one of auto, always, never; got True"):
        finetune(relu_model(), eager.theta, X, y, compile=True)


def _finetune_both(model, theta, X, y, **options):
    return [finetune(model, theta, X, y, torch.Generator().manual_seed(3), compile=mode, **options) for mode in ("never", "always")]


@pytest.mark.slow
def test_compiled_finetune_equals_eager_in_float64():
    """Fine-tuning a ReLU representation on 4 targets, 5 folds, up to 32 steps: the same chosen step
    counts, perturbations and heads as the eager descent."""
    X, y, theta0 = _relu_tasks(T=4, n=20)
    theta = relu_model().retract(theta0)
    (d_e, w_e, s_e), (d_c, w_c, s_c) = _finetune_both(relu_model(), theta, X, y, max_steps=32, ridge=0.01)
    assert torch.equal(s_c, s_e) and int(s_e.max()) > 0  # some targets fine-tuned, not head-only everywhere
    torch.testing.assert_close(d_c["W"], d_e["W"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_c, w_e, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_finetune_equals_eager_with_a_head_prior_and_weights():
    X, y, theta0 = _relu_tasks(T=4, n=20)
    theta = relu_model().retract(theta0)
    weight = torch.ones(y.shape, dtype=F64)
    weight[1, 14:] = 0.0
    prior = (torch.full((3,), 0.5, dtype=F64), 0.3 * torch.eye(3, dtype=F64))
    (d_e, w_e, s_e), (d_c, w_c, s_c) = _finetune_both(relu_model(), theta, X, y, max_steps=16, ridge=0.05, weight=weight, prior=prior)
    assert torch.equal(s_c, s_e)
    torch.testing.assert_close(d_c["W"], d_e["W"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_c, w_e, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_more_shapes_than_dynamos_recompile_limit_still_compile(monkeypatch):
    """Each shape is one more graph of the step's code; past torch._dynamo's recompile limit (here 1) the
    code's graphs are forgotten and the new one compiled, instead of failing to eager with a warning."""
    import warnings

    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "recompile_limit", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        for T in (5, 6, 7):
            X, y, theta0 = _relu_tasks(T=T)
            fits = [fit_shared(relu_model(), theta0, X, y, lam=0.05, steps=10, compile=mode) for mode in ("never", "always")]
            _assert_same_fit(fits[1], fits[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["adaptrep", "frozenrep-ft", "pretrain-ft"])
def test_the_methods_pass_their_compile_option_to_training_and_fine_tuning(monkeypatch, name):
    """``compile`` (``--compile``) reaches fit_shared and finetune from make_method's options (recorded, not compiled)."""
    from adaptrep import methods, pretrain
    from adaptrep.environments import make_environment

    seen: list[str] = []

    def recording(function):
        def wrapper(*args, **kwargs):
            seen.append(kwargs.get("compile", "missing"))
            return function(*args, **kwargs)

        return wrapper

    for module in (methods, pretrain):
        monkeypatch.setattr(module, "fit_shared", recording(fit_shared))
        monkeypatch.setattr(module, "finetune", recording(finetune))
    env = make_environment("relu-net", dim=5, rank=2, noise=0.1, seed=0)
    method = methods.make_method(name, {"compile": "never", "rank": 2})
    method.fit(env.sample_tasks(8, 10, torch.Generator().manual_seed(1)))
    method.adapt(env.sample_tasks(3, 10, torch.Generator().manual_seed(2)), torch.Generator().manual_seed(3))
    assert seen and set(seen) == {"never"}
    with pytest.raises(ValueError, match="compile must be one of"):
        methods.make_method(name, {"compile": "sometimes"}).fit(env.sample_tasks(8, 10, torch.Generator().manual_seed(1)))
