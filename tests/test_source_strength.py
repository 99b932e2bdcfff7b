"""``FineTune(strength="source")`` on the exact path (the target step's default): the free-head posterior
mean with the source tasks' perturbation variance, checked per target against numpy."""

import math

import numpy as np
import pytest
import torch

from adaptrep import LinearEnvironment, Tasks, load_method, save_method
from adaptrep.bayes import perturbation_variance
from adaptrep.finetune import FineTune
from adaptrep.methods import FrozenRep, Oracle


def _reference(X, y, B, sigma2, tau2, intercept):
    """``argmin (1/m) ||y - X (B h + v) - b||^2 + (sigma^2 / (m tau^2)) ||v||^2`` over a free head ``h``, a free
    intercept ``b`` (when ``intercept``) and ``v``: the minimum-norm least-squares solution of the stacked system
    ``[X B, 1, X; 0, 0, sqrt(sigma^2 / tau^2) I] (h, b, v) = (y, 0)``. Returns ``(beta, bias)``."""
    m, d = X.shape
    k = B.shape[1]
    blocks = [X @ B] + ([np.ones((m, 1))] if intercept else []) + [X]
    A = np.hstack(blocks)
    free = k + int(intercept)
    ridge = np.hstack([np.zeros((d, free)), math.sqrt(sigma2 / tau2) * np.eye(d)])
    theta = np.linalg.lstsq(np.vstack([A, ridge]), np.concatenate([y, np.zeros(d)]), rcond=None)[0]
    beta = B @ theta[:k] + theta[free:]
    return beta, (theta[k] if intercept else None)


def _ragged_targets(d, sizes, seed):
    rng = np.random.default_rng(seed)
    Xs = [rng.standard_normal((m, d)) + 0.7 for m in sizes]  # non-centred inputs: the intercept matters
    ys = [X @ rng.standard_normal(d) + 2.0 + 0.5 * rng.standard_normal(len(X)) for X in Xs]
    return Xs, ys


@pytest.mark.parametrize("intercept", [False, True])
def test_frozenrep_ft_is_the_per_target_penalised_least_squares_solution_on_ragged_targets(intercept):
    """frozenrep-ft (``FineTune()``, strength "source"): the source tau^2 and sigma^2, ragged targets of 1 to
    20 samples (fewer than the head's dimension too: the minimum-norm head), with and without an unpenalised
    intercept column."""
    d, k = 6, 2
    env = LinearEnvironment(d, k, delta=0.8, noise=0.5, seed=3)
    source = env.sample_tasks(25, 30, torch.Generator().manual_seed(4))
    method = FrozenRep(rank=k, finetune=FineTune(), intercept=intercept).fit(source)
    tau2, sigma2 = method.perturbation_variance, method.noise_estimate**2
    assert tau2 is not None and tau2 > 0
    B = method.representation.to(torch.float64)
    assert tau2 == pytest.approx(perturbation_variance(source, B, intercept, method.noise_estimate), rel=1e-12)
    sizes = (1, 2, 5, 12, 20)
    Xs, ys = _ragged_targets(d, sizes, seed=5)
    adapted = method.adapt(Tasks.from_arrays(Xs, ys))
    for t, (X, y) in enumerate(zip(Xs, ys, strict=True)):
        beta, bias = _reference(X, y, B.numpy(), sigma2, tau2, intercept)
        np.testing.assert_allclose(adapted.beta[t].numpy(), beta, rtol=0, atol=1e-8)
        if intercept:
            np.testing.assert_allclose(float(adapted.bias[t]), bias, rtol=0, atol=1e-8)
        else:
            assert adapted.bias is None
        assert float(adapted.strength[t]) == pytest.approx(sigma2 / (len(y) * tau2), rel=1e-12)


def test_oracle_ft_uses_the_source_perturbation_variance_of_the_true_representation():
    d, k = 6, 2
    env = LinearEnvironment(d, k, delta=0.8, noise=0.5, seed=7)
    source = env.sample_tasks(25, 30, torch.Generator().manual_seed(8))
    method = Oracle(finetune=FineTune()).fit(source)
    B = source.representation
    tau2, sigma2 = method.perturbation_variance, method.noise_estimate**2
    assert tau2 is not None and tau2 == pytest.approx(perturbation_variance(source, B, False, method.noise_estimate), rel=1e-12) and tau2 > 0
    Xs, ys = _ragged_targets(d, (3, 9, 15), seed=9)
    adapted = method.adapt(Tasks.from_arrays(Xs, ys))
    for t, (X, y) in enumerate(zip(Xs, ys, strict=True)):
        beta, _ = _reference(X, y, B.numpy(), sigma2, tau2, False)
        np.testing.assert_allclose(adapted.beta[t].numpy(), beta, rtol=0, atol=1e-8)
    # head only (finetune=None) is a different fit: the source tau^2 really moves the target's predictor
    head_only = Oracle().fit(source).adapt(Tasks.from_arrays(Xs, ys))
    assert float((head_only.beta - adapted.beta).abs().max()) > 1e-3


def test_a_numeric_strength_still_fine_tunes_by_its_penalty():
    """``FineTune(strength=0.1)`` is not the source rule: no tau^2 is learned and the chosen strength is 0.1."""
    env = LinearEnvironment(6, 2, delta=0.8, noise=0.5, seed=3)
    source = env.sample_tasks(25, 30, torch.Generator().manual_seed(4))
    method = FrozenRep(rank=2, finetune=FineTune(strength=0.1)).fit(source)
    assert method.perturbation_variance is None
    target = env.sample_tasks(4, 15, torch.Generator().manual_seed(5))
    adapted = method.adapt(target)
    torch.testing.assert_close(adapted.strength, torch.full((4,), 0.1, dtype=torch.float64))
    assert torch.isfinite(adapted.beta).all()


def test_a_saved_source_strength_model_predicts_the_same_after_loading(tmp_path):
    env = LinearEnvironment(6, 2, delta=0.8, noise=0.5, seed=3)
    source = env.sample_tasks(25, 30, torch.Generator().manual_seed(4))
    method = FrozenRep(rank=2, finetune=FineTune(), intercept=True).fit(source)
    Xs, ys = _ragged_targets(6, (4, 11), seed=6)
    before = method.adapt(Tasks.from_arrays(Xs, ys))
    loaded = load_method(save_method(method, tmp_path / "model.safetensors"))
    assert loaded.finetune is not None and loaded.finetune.strength == "source"
    assert loaded.perturbation_variance == method.perturbation_variance
    after = loaded.adapt(Tasks.from_arrays(Xs, ys))
    torch.testing.assert_close(after.beta, before.beta, rtol=0, atol=1e-12)
    torch.testing.assert_close(after.bias, before.bias, rtol=0, atol=1e-12)


def test_adaptrep_chooses_its_source_penalty_by_cross_validation_by_default(monkeypatch):
    """``DEFAULT_PENALTY = "cv"``: a plain ``AdaptRep`` calls :func:`cv_penalty` (here with a short path), keeps
    its path and fits the penalty it chose."""
    import adaptrep.methods as methods
    from adaptrep.adaptive import cv_penalty

    calls = []

    def short_path(*args, **kwargs):
        calls.append(kwargs)
        return cv_penalty(*args, **{**kwargs, "strengths": 2})

    monkeypatch.setattr(methods, "cv_penalty", short_path)
    env = LinearEnvironment(6, 2, delta=0.8, noise=0.5, seed=3)
    source = env.sample_tasks(10, 20, torch.Generator().manual_seed(4))
    method = methods.AdaptRep(rank=2, finetune=None).fit(source)
    path = method.penalty_path
    assert len(calls) == 1 and path is not None and method.info["source_penalty"] == path.penalty
    assert path.strengths[path.chosen] == path.penalty and method.representation is path.fit.B


@pytest.mark.parametrize("constraint", ["ball", "early-stop"])
def test_the_prior_names_the_fine_tuning_option_the_user_set(constraint):
    """``FineTune(constraint=...)`` also changes the default strength to "cv": the error names the constraint."""
    env = LinearEnvironment(6, 2, delta=0.8, noise=0.5, seed=3)
    source = env.sample_tasks(10, 20, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"^FineTune\.constraint applies without the prior"):
        FrozenRep(rank=2, finetune=FineTune(constraint=constraint), prior=True).fit(source)


def test_noiseless_float32_targets_with_more_samples_than_features_are_recovered():
    """No noise, float32, m > d: ``tau^2 X X^T + sigma^2 I`` is singular to working precision (sigma ~ 1e-4 from
    float32 rounding); the fine-tuned predictor is still the target's own (no Cholesky failure)."""
    env = LinearEnvironment(6, 2, delta=0.8, noise=0.0, seed=3, dtype=torch.float32)
    source = env.sample_tasks(25, 30, torch.Generator().manual_seed(4))
    target = env.sample_tasks(4, 40, torch.Generator().manual_seed(5))
    method = Oracle(finetune=FineTune()).fit(source)
    assert method.perturbation_variance > 0
    adapted = method.adapt(target)
    assert adapted.beta.dtype == torch.float32 and float((adapted.beta - target.beta).norm(dim=-1).max()) < 1e-4


def test_options_of_the_cross_validation_are_refused_with_the_source_strength_and_cv_is_the_generic_paths_own():
    with pytest.raises(ValueError, match="FineTune.rule applies to strength='cv' or a number"):
        FineTune(rule="paired")
    with pytest.raises(ValueError, match="FineTune.folds applies to strength='cv' or a number"):
        FineTune(folds=3)
    assert FineTune(strength="cv", rule="paired", folds=3).rule == "paired"
    # the generic path fine-tunes with cross-validated early stopping: strength="cv" names what it does
    env = LinearEnvironment(6, 2, delta=0.3, noise=0.5, seed=0)
    tasks = env.sample_tasks(12, 15, torch.Generator().manual_seed(1))
    relu = FrozenRep(rank=2, model="relu", finetune=FineTune(strength="cv"))
    relu.fit(tasks).adapt(env.sample_tasks(3, 10, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="FineTune.constraint applies to the exact linear path only"):
        FrozenRep(rank=2, model="relu", finetune=FineTune(constraint="ball")).fit(tasks).adapt(tasks)


def test_a_given_noise_level_sets_the_source_strength():
    from adaptrep.methods import AdaptRep

    env = LinearEnvironment(8, 2, delta=0.6, noise=0.5, seed=4)
    source = env.sample_tasks(30, 40, torch.Generator().manual_seed(5))
    target = env.sample_tasks(4, 12, torch.Generator().manual_seed(6))
    given = AdaptRep(rank=2, penalty="theory", noise=0.55).fit(source)
    tau2 = given.perturbation_variance
    assert tau2 == pytest.approx(perturbation_variance(source, given.representation, False, 0.55)) and tau2 > 0
    adapted = given.adapt(target)
    torch.testing.assert_close(adapted.strength, torch.full((4,), 0.55**2 / (12 * tau2), dtype=torch.float64))
    B = given.representation.numpy()
    for t in range(4):
        beta, _ = _reference(target.X[t].numpy(), target.y[t].numpy(), B, 0.55**2, tau2, False)
        np.testing.assert_allclose(adapted.beta[t].numpy(), beta, rtol=0, atol=1e-9)
