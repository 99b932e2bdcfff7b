"""The meta-learning baselines as methods (MetaLearner) and the sinusoid environment."""

import math

import numpy as np
import pytest
import torch

from adaptrep import LinearEnvironment, MetaLearner, SinusoidEnvironment, make_method
from adaptrep.environments import make_environment
from adaptrep.experiment import ConfigError, resolve_config
from adaptrep.meta import ALGORITHMS, MetaConfig
from adaptrep.metrics import subspace_distance
from adaptrep.models import MLP_WIDTHS, init_mlp, task_parameters, unflatten_mlp
from adaptrep.options import MetaOptions


def _linear(seed: int = 0):
    env = LinearEnvironment(dim=6, rank=2, delta=0.1, noise=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return env, env.sample_tasks(40, 12, g), env.sample_tasks(10, 8, g)


def test_maml_reduces_target_risk_and_moves_the_representation_from_a_zero_head():
    env, source, target = _linear()
    init = MetaLearner("maml", iterations=0).fit(source)
    fitted = MetaLearner("maml", iterations=300, outer_lr=0.02).fit(source)
    g = torch.Generator().manual_seed(1)
    before = env.excess_risk(init.adapt(target, g).beta, target.beta).mean()
    after = env.excess_risk(fitted.adapt(target, g).beta, target.beta).mean()
    assert after < 0.5 * before
    assert not torch.allclose(fitted.theta["B"], init.theta["B"])  # w0 = 0 does not freeze B
    assert subspace_distance(fitted.representation, env.representation) < subspace_distance(init.representation, env.representation)
    assert fitted.info["meta_loss_last"] < fitted.info["meta_loss_first"] and fitted.info["compiled"] is False


def test_same_seed_gives_same_numbers():
    _, source, target = _linear()
    runs = [MetaLearner("anil", iterations=20, seed=3).fit(source).adapt(target).beta for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    other = MetaLearner("anil", iterations=20, seed=4).fit(source).adapt(target).beta
    assert not torch.equal(other, runs[0])


def test_longer_adaptation_fits_the_target_better():
    env, source, target = _linear()
    method = MetaLearner("fomaml", iterations=50).fit(source)
    short = env.excess_risk(method.adapt(target).beta, target.beta).mean()
    method.options = method.options.model_copy(update={"adapt_steps": 50})
    assert env.excess_risk(method.adapt(target).beta, target.beta).mean() < short


@pytest.mark.parametrize("setting", ["linear", "linear-hard", "logistic", "relu-net", "relu-hard", "sinusoid"])
def test_every_algorithm_runs_in_every_setting(setting):
    dim, rank = (1, 1) if setting == "sinusoid" else (6, 2)
    env = make_environment(setting, dim=dim, rank=rank, noise=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    source, target = env.sample_tasks(12, 10, g), env.sample_tasks(3, 5, g)
    for name in ALGORITHMS:
        method = make_method(name, {"iterations": 3, "meta_batch": 5})
        beta = method.fit(source).adapt(target).beta
        risk = env.excess_risk(beta, target.beta)
        assert risk.shape == (3,) and torch.isfinite(risk).all(), name
        assert (method.representation is None) == (setting == "sinusoid")
        assert method.config.meta_batch == 5
        # meta-training moved the initialisation (against the same seed with no iterations)
        start = make_method(name, {"iterations": 0, "meta_batch": 5}).fit(source)
        assert not torch.equal(method.w, start.w) or any(not torch.equal(method.theta[n], start.theta[n]) for n in method.theta), name


def test_default_inner_step_follows_the_rule():
    _, source, _ = _linear()
    config = MetaLearner("maml").resolve(source)
    variance = float((source.X**2).mean((0, 1)).max())
    assert math.isclose(config.inner_lr, 0.1 / (2 * variance)) and config.outer_lr == 0.01
    assert MetaLearner("maml", inner_lr=0.3).resolve(source).inner_lr == 0.3


def test_sinusoid_tasks_and_excess_risk_match_an_independent_evaluation():
    env = SinusoidEnvironment()
    g = torch.Generator().manual_seed(0)
    tasks = env.sample_tasks(4, 20, g)
    A, phi = tasks.beta[:, 0], tasks.beta[:, 1]
    assert ((A >= 0.1) & (A <= 5)).all() and ((phi >= 0) & (phi <= math.pi)).all() and tasks.X.abs().max() <= 5
    torch.testing.assert_close(tasks.y, A[:, None] * torch.sin(tasks.X[..., 0] - phi[:, None]))
    thetas = [init_mlp(MLP_WIDTHS, torch.Generator().manual_seed(s), torch.float64) for s in range(4)]
    flat = torch.cat([task_parameters("mlp", theta, w.unsqueeze(0)) for theta, w in thetas])
    theta, w = unflatten_mlp(flat)
    torch.testing.assert_close(theta["W2"][2], thetas[2][0]["W2"])
    grid = np.linspace(-5, 5, 1000)
    expected = []
    for (params, head), (a, p) in zip(thetas, tasks.beta.numpy(), strict=True):
        h = grid[:, None]
        for layer in (1, 2):
            h = np.maximum(h @ params[f"W{layer}"].numpy() + params[f"b{layer}"].numpy(), 0)
        out = h @ head.numpy()[:-1] + head.numpy()[-1]
        expected.append(np.mean((out - a * np.sin(grid - p)) ** 2))
    np.testing.assert_allclose(env.excess_risk(flat, tasks.beta).numpy(), expected, rtol=1e-10)
    assert env.grid.shape == (1000,) and env.grid[0] == -5 and env.grid[-1] == 5


def test_sinusoid_covariance_diagonal_is_the_inputs_variance():
    env = SinusoidEnvironment()
    Z, _ = env.sample_inputs(1, 400_000, torch.Generator().manual_seed(1))
    tasks = env.make_tasks(env.sample_parameters(1, torch.Generator()), Z, torch.zeros(1, 400_000, dtype=torch.float64))
    assert torch.equal(tasks.X, Z)  # the data stay as they were: x ~ U[-5, 5], unscaled
    # the sample variance's standard error is sqrt((mu4 - sigma^4) / N) = sqrt((125 - 625 / 9) / N) ~ 0.012
    assert env.covariance_diagonal.shape == (1,)
    assert abs(float(env.covariance_diagonal[0]) - float(tasks.X.var())) < 0.06
    assert math.isclose(float(env.covariance_diagonal[0]), 25 / 3)


def test_representation_methods_refuse_sinusoid():
    env = SinusoidEnvironment()
    source = env.sample_tasks(5, 10, torch.Generator().manual_seed(0))
    for name in ("adaptrep", "frozenrep", "oracle-head"):
        with pytest.raises(ValueError, match="moment start|true representation"):
            make_method(name).fit(source)
    with pytest.raises(ConfigError, match="frozenrep"):
        resolve_config({"setting": "sinusoid", "methods": "maml,frozenrep"})
    config = resolve_config({"setting": "sinusoid"})
    assert config.methods == ["maml", "fomaml", "anil", "reptile", "pooled", "target-only"] and config.inner_lr is None
    # the one rule for the defaults is the learner's, from the source tasks (sinusoid: the MAML paper's 0.01)
    assert make_method("maml", config.method_options(0)).resolve(source).inner_lr == 0.01


def test_meta_options_not_given_take_one_rule():
    """A config leaves the options not given as ``None``; the learner fills them from the source
    tasks by :func:`meta_defaults` (the inner step from the inputs' largest estimated variance), and
    the target adaptation takes ``adapt_steps``, else ``inner_steps``, else the resolved inner steps."""
    config = resolve_config({"setting": "logistic", "inner_steps": 3, "meta_iterations": 0})
    assert config.inner_lr is None and config.adapt_steps is None and config.target_steps() == 3
    env = config.environment(0)
    source = env.sample_tasks(20, 30, torch.Generator().manual_seed(0))
    learner = make_method("maml", config.method_options(0))
    resolved = learner.resolve(source)
    variance = float((source.X**2).mean((0, 1)).max())
    assert math.isclose(resolved.inner_lr, 0.1 / (0.25 * variance)) and abs(resolved.inner_lr - 0.4) < 0.1  # x ~ N(0, I): about 0.4
    assert (resolved.inner_steps, resolved.iterations, resolved.meta_batch) == (3, 0, 20)
    assert MetaOptions(inner_steps=3, adapt_steps=7).target_steps(5) == 7 and MetaOptions().target_steps(5) == 5
    target_only = make_method("target-only", {"inner_steps": 4, "inner_lr": 0.2})
    assert (target_only.inner_steps, target_only.inner_lr) == (4, 0.2)
    assert make_method("target-only", {"inner_steps": 4, "adapt_steps": 9}).inner_steps == 9


def test_learner_options_are_validated_where_they_are_defined():
    """``MetaLearner``'s keywords and ``MetaConfig``'s values are checked by :class:`MetaOptions`: one-line errors naming the keyword."""
    for make, culprit in [
        (lambda: MetaLearner("maml", inner_lr=-1.0), "inner_lr"),
        (lambda: MetaLearner("maml", iterations=-2), "iterations"),
        (lambda: MetaLearner("maml", inner_rate=0.1), "inner_rate"),
        (lambda: MetaConfig("maml", chunk=0), "chunk"),
        (lambda: MetaConfig("maml", inner_steps=None), "inner_steps"),
    ]:
        with pytest.raises(ValueError) as error:
            make()
        assert culprit in str(error.value) and "\n" not in str(error.value)
    assert MetaLearner("anil", iterations=7, chunk=2).options == MetaOptions(meta_iterations=7, meta_chunk=2)


def test_target_adaptation_is_the_inner_loop_in_closed_form():
    """From the initialisation (no meta-training, ``w_0 = 0``): one inner step moves only the head,
    ``beta_t = B_0 (2 lr / m) B_0^T X_t^T y_t``; ANIL's steps keep ``beta_t`` in ``span(B_0)``, MAML's
    later steps leave it."""
    _, source, target = _linear()
    lr, m = 0.05, target.X.shape[1]
    one = MetaLearner("maml", iterations=0, inner_lr=lr, adapt_steps=1).fit(source)
    B0 = one.theta["B"]
    heads = (2 * lr / m) * ((target.X @ B0).mT @ target.y.unsqueeze(-1)).squeeze(-1)  # (R, k)
    expected = heads @ B0.T
    torch.testing.assert_close(one.adapt(target).beta, expected, rtol=1e-10, atol=1e-12)
    outside = torch.eye(6, dtype=B0.dtype) - B0 @ B0.T
    anil = MetaLearner("anil", iterations=0, inner_lr=lr, adapt_steps=3).fit(source).adapt(target).beta
    maml = MetaLearner("maml", iterations=0, inner_lr=lr, adapt_steps=3).fit(source).adapt(target).beta
    assert (anil @ outside).norm(dim=-1).max() < 1e-12
    assert (maml @ outside).norm(dim=-1).min() > 1e-8 and (maml @ outside).norm(dim=-1).mean() > 1e-5
    # the 3 steps by hand (squared loss: gradient (2/m) X^T r): the head only, and (B, w) together
    X, y = target.X, target.y.unsqueeze(-1)
    h = torch.zeros(X.shape[0], B0.shape[1], 1, dtype=B0.dtype)
    B, v = B0.expand(X.shape[0], *B0.shape), h
    for _ in range(3):
        Phi = X @ B0
        h = h - lr * (2 / m) * Phi.mT @ (Phi @ h - y)
        r = X @ B @ v - y
        B, v = B - lr * (2 / m) * (X.mT @ r) @ v.mT, v - lr * (2 / m) * B.mT @ X.mT @ r
    torch.testing.assert_close(anil, (B0 @ h).squeeze(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maml, (B @ v).squeeze(-1), rtol=1e-10, atol=1e-12)
