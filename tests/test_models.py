"""The generic model interface: gradients, batching, the reduction to the linear case, the logistic setting."""

import math

import pytest
import torch
from torch.func import vmap

from adaptrep.environments import LinearEnvironment, LogisticEnvironment
from adaptrep.methods import TargetOnly, make_method
from adaptrep.models import Model, _objective, cv_heads, fit_heads, fit_shared, init_mlp, linear_model, mlp_model, one_standard_error, relu_model, task_loss
from adaptrep.solvers import fit_source, moment_inits

F64 = torch.float64


def _problem(loss, T=4, n=7, d=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n, d, generator=g, dtype=F64)
    y = (torch.rand(T, n, generator=g, dtype=F64) < 0.5).to(F64) if loss == "logistic" else torch.randn(T, n, generator=g, dtype=F64)
    theta = {"B": torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]}
    delta = {"B": 0.1 * torch.randn(T, d, k, generator=g, dtype=F64)}
    w = torch.randn(T, k, generator=g, dtype=F64)
    return X, y, theta, delta, w


MODELS = {"linear-logistic": (linear_model, "logistic", "B"), "linear-squared": (linear_model, "squared", "B"), "relu-squared": (relu_model, "squared", "W")}


@pytest.mark.parametrize("name", list(MODELS))
def test_objective_gradient_matches_finite_differences(name):
    factory, loss, key = MODELS[name]
    X, y, theta, delta, w = _problem(loss)
    model = factory(loss)
    theta, delta = {key: theta["B"] + 0.3}, {key: delta["B"]}  # generic position (ReLU kinks avoided a.s.)
    objective = _objective(model, lam=0.3, gamma=0.05)

    def total(t, d, w):
        return objective({key: t}, {key: d}, w, X, y).mean()

    inputs = tuple(x.clone().requires_grad_() for x in (theta[key], delta[key], w))
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_objective_and_heads_equal_a_per_task_loop(name):
    factory, loss, key = MODELS[name]
    X, y, theta, delta, w = _problem(loss)
    model = factory(loss)
    theta, delta = {key: theta["B"]}, {key: delta["B"]}
    batched = vmap(lambda d, w, X, y: task_loss(model, theta, d, w, X, y), in_dims=(0, 0, 0, 0))(delta, w, X, y)
    looped = torch.stack([task_loss(model, theta, {key: delta[key][t]}, w[t], X[t], y[t]) for t in range(X.shape[0])])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    heads = fit_heads(model, theta, X, y, ridge=0.01)
    one_by_one = torch.cat([fit_heads(model, theta, X[t : t + 1], y[t : t + 1], ridge=0.01) for t in range(X.shape[0])])
    torch.testing.assert_close(heads, one_by_one, rtol=1e-8, atol=1e-10)


def test_user_module_through_functional_call_equals_the_built_in_model():
    X, y, theta, delta, w = _problem("squared")
    layer = torch.nn.Linear(5, 2, bias=False, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(theta["B"].T)
    model, params = Model.from_module(layer)
    torch.testing.assert_close(fit_heads(model, params, X, y), fit_heads(linear_model(), theta, X, y))


def test_generic_frozen_objective_reaches_the_exact_linear_solver():
    """For the linear model and squared loss the generic Adam path solves the same FROZENREP
    problem that fit_source solves exactly (the reduction in the models docstring)."""
    env = LinearEnvironment(dim=8, rank=2, delta=0.2, noise=0.3, seed=1)
    source = env.sample_tasks(30, 20, torch.Generator().manual_seed(0))
    G, c, q = source.gram()
    exact = fit_source(G, c, q, 2)
    generic = fit_shared(linear_model(), {"B": moment_inits(G, c, 2)[0]}, source.X, source.y, lam=None, gamma=0.0, steps=600, lr=0.01)
    assert generic.objective == pytest.approx(exact.objective, rel=1e-4)
    from adaptrep.metrics import subspace_distance

    assert subspace_distance(generic.theta["B"], exact.B) < 1e-2


def test_target_only_logistic_equals_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    env = LogisticEnvironment(dim=6, rank=2, delta=0.3, scale=2.0, seed=0)
    target = env.sample_tasks(3, 60, torch.Generator().manual_seed(3))
    ridge = 0.02
    ours = TargetOnly(ridge=ridge).fit(target).adapt(target).beta
    for t in range(3):
        X, y = target.X[t].numpy(), target.y[t].numpy()
        # ours: mean log-loss + ridge ||beta||^2; scikit-learn: C sum log-loss + ||beta||^2 / 2
        peer = sklearn.LogisticRegression(C=1 / (2 * ridge * len(y)), fit_intercept=False, solver="lbfgs", tol=1e-12, max_iter=10_000).fit(X, y)
        reference = torch.tensor(peer.coef_[0], dtype=F64)
        assert ((ours[t] - reference).norm() / reference.norm()).item() < 1e-4


def test_logistic_environment_labels_and_exact_risk():
    env = LogisticEnvironment(dim=4, rank=2, delta=0.3, scale=3.0, seed=0)
    tasks = env.sample_tasks(2, 200_000, torch.Generator().manual_seed(1))
    assert tasks.loss == "logistic" and set(tasks.y.unique().tolist()) == {0.0, 1.0}
    # labels follow sigmoid(<x, beta>): the empirical log-loss of the truth is its Bayes risk
    margin = (tasks.X @ tasks.beta.unsqueeze(-1)).squeeze(-1)
    empirical = (torch.nn.functional.softplus(margin) - tasks.y * margin).mean(-1)
    from adaptrep.logistic import bayes_logistic_risk

    exact = bayes_logistic_risk(tasks.beta, env.input_scale)
    torch.testing.assert_close(empirical, exact, rtol=0.02, atol=0.0)
    assert env.excess_risk(tasks.beta, tasks.beta).abs().max() < 1e-12
    assert (env.excess_risk(0.5 * tasks.beta, tasks.beta) > 0).all() and (env.metrics(-tasks.beta, tasks.beta)["excess_error01"] > 0).all()


def test_cross_validated_heads_pick_a_strong_ridge_for_pure_noise():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 40, 10, generator=g, dtype=F64)
    y = (torch.rand(6, 40, generator=g, dtype=F64) < 0.5).to(F64)  # labels independent of x
    _, chosen = cv_heads(linear_model("logistic"), {"B": torch.eye(10, dtype=F64)}, X, y, g)
    assert chosen.median() >= 0.1


def test_one_standard_error_rule():
    losses = torch.tensor([[[1.0, 0.9, 0.5], [1.0, 0.9, 0.5], [1.0, 0.9, 0.5]]])  # no spread: the minimum
    assert one_standard_error(losses).tolist() == [2]
    noisy = torch.tensor([[[1.0, 0.95], [0.6, 0.55], [1.4, 1.35]]])  # a gain far below the spread: the first
    assert one_standard_error(noisy).tolist() == [0]
    # a gain of 0.15: above the standard error (0.163 / sqrt(4) = 0.082), below the standard deviation
    between = torch.tensor([[[1.0, 0.85], [1.2, 1.05], [0.8, 0.65], [1.0, 0.85]]])
    assert one_standard_error(between).tolist() == [1]


def test_logistic_methods_run_and_fine_tuning_helps_with_many_samples():
    env = LogisticEnvironment(dim=10, rank=2, delta=0.5, scale=3.0, seed=0)
    source = env.sample_tasks(60, 40, torch.Generator().manual_seed(0))
    target = env.sample_tasks(10, 400, torch.Generator().manual_seed(1))
    risks = {}
    for name in ("adaptrep", "frozenrep", "target-only"):
        beta = make_method(name).fit(source).adapt(target, torch.Generator().manual_seed(2)).beta
        assert beta.shape == (10, 10) and torch.isfinite(beta).all()
        risks[name] = env.excess_risk(beta, target.beta).mean().item()
    assert risks["adaptrep"] < risks["frozenrep"], risks
    assert all(math.isfinite(value) for value in risks.values())


def test_subspace_ridge_solves_its_penalised_objective():
    from adaptrep.models import _subspace_ridge

    X, y, theta, _, _ = _problem("logistic", T=3, n=40, d=5, k=2)
    B = theta["B"]
    ridge = torch.tensor([0.01, 0.05, 0.2], dtype=F64)
    penalty = torch.tensor([0.0, 0.3, 1e6], dtype=F64)
    beta = _subspace_ridge(B, X, y, ridge, penalty).requires_grad_()
    perp = beta - (beta @ B) @ B.T
    margin = (X @ beta.unsqueeze(-1)).squeeze(-1)
    objective = (torch.nn.functional.softplus(margin) - y * margin).mean(-1) + ridge * (beta**2).sum(-1) + penalty * (perp**2).sum(-1)
    (gradient,) = torch.autograd.grad(objective.sum(), beta)
    assert gradient.norm(dim=-1).max() < 1e-7
    # a huge penalty is head-only adaptation on span(B)
    head = fit_heads(linear_model("logistic"), {"B": B}, X[2:], y[2:], ridge=0.2)
    torch.testing.assert_close(beta[2].detach(), (B @ head[0]), atol=1e-5, rtol=0)


def test_relu_network_environment():
    from adaptrep.environments import ReluNetEnvironment, relu_network

    env = ReluNetEnvironment(dim=6, rank=3, delta=0.3, noise=0.1, seed=0, test_points=100_000)
    tasks = env.sample_tasks(4, 50, torch.Generator().manual_seed(1))
    W = tasks.beta[:, :18].reshape(4, 6, 3)
    w = tasks.beta[:, 18:]
    clean = torch.stack([torch.relu(tasks.X[t] @ W[t]) @ w[t] / math.sqrt(3) for t in range(4)])
    assert (tasks.y - clean).std() == pytest.approx(0.1, rel=0.15)  # the noise, nothing else
    torch.testing.assert_close(relu_network(tasks.X, tasks.beta, 3), clean)
    assert ((W - env.representation).flatten(1).norm(dim=1) - 0.3).abs().max() < 1e-12
    assert env.excess_risk(tasks.beta, tasks.beta).abs().max() == 0
    # the Monte Carlo excess risk agrees with an independent, larger estimate within 3 standard errors
    other = tasks.beta.clone()
    other[:, 18:] += 0.2
    risk, se = env.excess_risk(other, tasks.beta), env.metrics(other, tasks.beta)["excess_risk_se"]
    X = torch.randn(400_000, 6, generator=torch.Generator().manual_seed(99), dtype=F64)
    independent = ((relu_network(X, other, 3) - relu_network(X, tasks.beta, 3)) ** 2).mean(-1)
    assert ((risk - independent).abs() < 3 * se * math.sqrt(1 + 100_000 / 400_000)).all()


def test_relu_methods_run_and_fine_tuning_helps_with_many_samples():
    from adaptrep.environments import ReluNetEnvironment

    env = ReluNetEnvironment(dim=8, rank=2, delta=0.5, noise=0.1, seed=0, test_points=20_000)
    source = env.sample_tasks(80, 40, torch.Generator().manual_seed(0))
    target = env.sample_tasks(6, 200, torch.Generator().manual_seed(1))
    risks = {}
    for name in ("adaptrep", "frozenrep", "target-only", "oracle-ft"):
        beta = make_method(name).fit(source).adapt(target, torch.Generator().manual_seed(2)).beta
        assert beta.shape == (6, 8 * 2 + 2) and torch.isfinite(beta).all()
        risks[name] = env.excess_risk(beta, target.beta).mean().item()
    assert risks["adaptrep"] < risks["frozenrep"] and risks["oracle-ft"] < risks["frozenrep"], risks


def test_target_only_on_relu_tasks_is_reproducible_without_a_generator():
    from adaptrep.environments import ReluNetEnvironment

    env = ReluNetEnvironment(dim=6, rank=2, noise=0.1, seed=0)
    target = env.sample_tasks(2, 12, torch.Generator().manual_seed(1))
    torch.manual_seed(10)
    first = TargetOnly().fit(target).adapt(target).beta
    torch.manual_seed(11)  # the global random state must not matter
    torch.testing.assert_close(TargetOnly().fit(target).adapt(target).beta, first, rtol=0, atol=0)
    assert not torch.equal(TargetOnly(seed=1).fit(target).adapt(target).beta, first)  # its own seed does


@pytest.mark.slow  # the default source training of two methods on 50 x 100 ReLU tasks: minutes on a loaded 2-core machine
def test_relu_hard_environment_and_its_separation():
    """The nonlinear hard case with the default source training: ADAPTREP's layer keeps the opt
    block, FROZENREP's (the frozen objective's minimum, see the README) only in part, and head-only
    adaptation of FROZENREP's layer stays far from the targets."""
    from adaptrep.environments import ReluHardEnvironment
    from adaptrep.metrics import block_share

    env = ReluHardEnvironment(dim=10, rank=2, eps=0.1, noise=0.1, seed=0, test_points=20_000)
    tasks = env.sample_tasks(50, 100, torch.Generator().manual_seed(1))
    W = tasks.beta[:, :20].reshape(50, 10, 2)
    torch.testing.assert_close(W[:, :2, :], env.opt_scale * torch.eye(2, dtype=F64).expand(50, 2, 2))
    torch.testing.assert_close(W[:, -2:, :].norm(dim=1), torch.ones(50, 2, dtype=F64))
    assert (tasks.X[..., :8].std() ** 2).item() == pytest.approx(0.1, rel=0.05)
    adaptrep, frozen = make_method("adaptrep").fit(tasks), make_method("frozenrep").fit(tasks)
    assert block_share(adaptrep.representation, env.opt_block) > 0.85
    assert block_share(frozen.representation, env.opt_block) < 0.7
    target = env.sample_tasks(10, 200, torch.Generator().manual_seed(2))
    head_only = env.excess_risk(frozen.adapt(target).beta, target.beta).mean().item()
    fine_tuned = env.excess_risk(adaptrep.adapt(target, torch.Generator().manual_seed(3)).beta, target.beta).mean().item()
    assert fine_tuned < 0.5 * head_only, (fine_tuned, head_only)


def test_cross_validated_heads_score_every_strength_on_the_same_folds():
    """3 folds x 9 strengths (common factor 3): the batched choice equals a per-fold loop."""
    from adaptrep.models import RIDGES, _fold_masks

    X, y, theta, _, _ = _problem("squared", T=2, n=6, d=5, k=2)
    model = linear_model()
    _, chosen = cv_heads(model, theta, X, y, torch.Generator().manual_seed(5), folds=3)
    valid = _fold_masks(2, 6, 3, torch.Generator().manual_seed(5), X)
    expected = []
    for t in range(2):
        scores = []
        for ridge in RIDGES:
            losses = []
            for f in range(3):
                held = valid[t, f].bool()
                w = fit_heads(model, theta, X[t : t + 1, ~held], y[t : t + 1, ~held], ridge=ridge)
                losses.append(task_loss(model, theta, None, w[0], X[t, held], y[t, held]))
            scores.append(torch.stack(losses).mean())
        expected.append(RIDGES[int(torch.stack(scores).argmin())])
    assert chosen.tolist() == pytest.approx(expected)


def test_gradient_fine_tuning_stays_finite_under_a_strong_head_ridge():
    from adaptrep.models import finetune

    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 40, 20, generator=g, dtype=F64)
    y = torch.randn(4, 40, generator=g, dtype=F64)
    W = torch.randn(20, 5, generator=g, dtype=F64)
    theta = {"W": W / W.norm(dim=0)}
    delta, w, steps = finetune(relu_model(), theta, X, y, g, ridge=1.0)
    assert torch.isfinite(delta["W"]).all() and torch.isfinite(w).all()
    # the labels are pure noise: cross-validation keeps the head-only start, (0, the ridge head)
    assert steps.tolist() == [0, 0, 0, 0] and not delta["W"].any()
    torch.testing.assert_close(w, fit_heads(relu_model(), theta, X, y, ridge=1.0))


def test_fit_heads_solve_their_penalised_objectives():
    """Squared loss: the ridge normal equations; logistic: a stationary point of mean log-loss +
    ridge ||w||^2; zero-weight rows: the same heads as dropping those rows."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 30, 5, generator=g, dtype=F64)
    theta = {"B": torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=F64))[0]}
    y = torch.randn(3, 30, generator=g, dtype=F64)
    w = fit_heads(linear_model(), theta, X, y, ridge=0.3)
    Phi = X @ theta["B"]
    expected = torch.linalg.solve(Phi.mT @ Phi / 30 + 0.3 * torch.eye(2, dtype=F64), (Phi.mT @ y.unsqueeze(-1)).squeeze(-1) / 30)
    torch.testing.assert_close(w, expected, rtol=1e-10, atol=1e-12)
    labels = (torch.rand(3, 30, generator=g, dtype=F64) < torch.sigmoid(Phi.sum(-1))).to(F64)
    w = fit_heads(linear_model("logistic"), theta, X, labels, ridge=0.05).requires_grad_()
    margin = (Phi @ w.unsqueeze(-1)).squeeze(-1)
    objective = (torch.nn.functional.softplus(margin) - labels * margin).mean(-1) + 0.05 * (w * w).sum(-1)
    assert torch.autograd.grad(objective.sum(), w)[0].abs().max() < 1e-8
    weight = torch.ones(3, 30, dtype=F64)
    weight[:, 20:] = 0
    dropped = fit_heads(linear_model(), theta, X[:, :20], y[:, :20], ridge=0.3)
    torch.testing.assert_close(fit_heads(linear_model(), theta, X, y, weight=weight, ridge=0.3), dropped)


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_heads_minimise_the_weighted_task_loss_plus_ridge(name):
    """With weights that are not 0 or 1, the heads are a stationary point of task_loss's weighted
    mean (linear in the weights) + ridge ||w||^2 (autograd), for each task and its own ridge."""
    factory, loss, key = MODELS[name]
    X, y, theta, _, _ = _problem(loss, T=3, n=40, d=5, k=2, seed=6)
    model, theta = factory(loss), {key: theta["B"] + 0.3}
    weight = 0.1 + 2.9 * torch.rand(3, 40, generator=torch.Generator().manual_seed(7), dtype=F64)
    ridge = torch.tensor([0.01, 0.1, 0.5], dtype=F64)
    heads = fit_heads(model, theta, X, y, weight=weight, ridge=ridge)
    for t in range(3):
        w = heads[t].clone().requires_grad_()
        objective = task_loss(model, theta, None, w, X[t], y[t], weight[t]) + ridge[t] * (w * w).sum()
        (grad,) = torch.autograd.grad(objective, w)
        assert grad.abs().max() < 1e-9, (t, grad)
        unweighted = fit_heads(model, theta, X[t : t + 1], y[t : t + 1], ridge=ridge[t : t + 1])[0]
        assert (unweighted - heads[t]).abs().max() > 1e-3  # the weights matter: the test can tell them apart


@pytest.mark.parametrize("compiling", [False, True])
def test_mlp_features_with_stacked_parameters_equal_each_tasks_own(monkeypatch, compiling):
    """Stacked parameters (eager: one baddbmm a layer; under torch.compile: a batched product plus the
    bias, which inductor fuses into the next kernel) give each task's features by its own parameters."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    g = torch.Generator().manual_seed(0)
    model = mlp_model((1, 6, 5))
    stacked = [init_mlp((1, 6, 5), g, dtype=torch.float64)[0] for _ in range(3)]
    theta = {name: torch.stack([params[name] for params in stacked]) for name in stacked[0]}
    X = torch.randn(3, 7, 1, generator=g, dtype=torch.float64)
    Phi = model.features(theta, X)
    assert Phi.shape == (3, 7, 6)
    for task, params in enumerate(stacked):
        h = torch.relu(X[task] * params["W1"] + params["b1"])
        h = torch.relu(h @ params["W2"] + params["b2"])
        torch.testing.assert_close(Phi[task], torch.cat([h, torch.ones(7, 1, dtype=torch.float64)], -1), rtol=1e-12, atol=1e-12)


def test_target_only_logistic_with_an_intercept_and_fewer_samples_than_features():
    """Logistic target-only with m < d and an intercept (the constant feature after the row space's
    coordinates) equals the fit in all d coordinates."""
    from adaptrep.data import Tasks
    from adaptrep.methods import with_intercept
    from adaptrep.models import fit_heads, linear_model

    gen = torch.Generator().manual_seed(1)
    X = torch.randn(3, 6, 14, generator=gen, dtype=F64)
    y = torch.tensor([0.0, 1.0] * 3).expand(3, -1)
    tasks = Tasks(X, y, loss="logistic")
    ours = TargetOnly(ridge=0.05, standardize=False).fit(tasks).adapt(tasks).w
    full = fit_heads(with_intercept(linear_model("logistic")), {"B": torch.eye(14, dtype=F64)}, X, y, ridge=0.05)
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ridge", [0.05, 0.0])
def test_target_only_with_fewer_samples_than_features_solves_in_the_row_space_exactly(ridge):
    """Multiclass target-only with m < d is solved in each target's row space; it equals the fit in
    all d coordinates (fit_heads, or cv_heads with the same folds) and scikit-learn's multinomial
    regression, to solver tolerance."""
    from adaptrep.data import Tasks
    from adaptrep.models import cv_heads, fit_heads, linear_model

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 12, 30, generator=gen, dtype=F64)
    y = torch.arange(12).remainder(3).expand(4, -1).to(F64)
    tasks = Tasks(X, y, loss="multiclass")
    method = TargetOnly(ridge=ridge, intercept=False, standardize=False).fit(tasks)
    ours = method.adapt(tasks, torch.Generator().manual_seed(5)).w
    model, identity = linear_model("multiclass", 3), {"B": torch.eye(30, dtype=F64)}
    if ridge > 0:
        full = fit_heads(model, identity, X, y, ridge=ridge)
        sklearn = pytest.importorskip("sklearn.linear_model")
        # ours: mean cross-entropy + ridge ||W||^2; scikit-learn: C sum cross-entropy + ||W||^2 / 2
        peer = sklearn.LogisticRegression(C=1 / (2 * ridge * 12), fit_intercept=False, tol=1e-12, max_iter=10_000).fit(X[0].numpy(), y[0].numpy())
        centred = ours[0] - ours[0].mean(-1, keepdim=True)  # softmax heads are defined up to a shift per feature
        torch.testing.assert_close(centred, torch.tensor(peer.coef_.T, dtype=F64), rtol=1e-4, atol=1e-6)
    else:
        full = cv_heads(model, identity, X, y, torch.Generator().manual_seed(5))[0]
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-8)
