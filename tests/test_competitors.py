"""Linear-representation competitors (pERM, spectral, method of moments) and ADAPTREP's
cross-validated source penalty, against closed forms, optimality conditions and plain numpy."""

import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import brentq

from adaptrep import AdaptRep, LinearEnvironment, Tasks, cv
from adaptrep.adaptive import cv_penalty, masked_statistics
from adaptrep.competitors import (
    MethodOfMoments,
    PenalizedERM,
    Spectral,
    angle_penalty,
    least_squares,
    moment_matrix,
    perm_representation,
    perm_tasks,
    refit_toward,
)
from adaptrep.experiment import resolve_config, run_experiment
from adaptrep.methods import FrozenRep, make_method, theory_penalty
from adaptrep.metrics import source_task_errors, subspace_distance
from adaptrep.solvers import estimate_noise, fit_source, predictor, spd_solve, task_statistics


def _source(delta=0.4, dim=6, rank=2, tasks=20, samples=40, noise=0.5, seed=0):
    env = LinearEnvironment(dim, rank, delta=delta, noise=noise, seed=seed)
    return env, env.sample_tasks(tasks, samples, torch.Generator().manual_seed(seed + 1))


def _projector(A: np.ndarray) -> np.ndarray:
    Q = np.linalg.qr(A)[0]
    return Q @ Q.T


# --------------------------------------------------------------------------- pERM


def test_angle_penalty_is_the_smallest_spectral_distance_of_spans_containing_beta():
    rng = np.random.default_rng(0)
    d, k = 7, 3
    A = np.linalg.qr(rng.standard_normal((d, k)))[0]
    for _ in range(5):
        beta = rng.standard_normal(d)
        s = float(angle_penalty(torch.tensor(beta), torch.tensor(A)))
        # the span that turns A's direction nearest beta onto beta attains it
        u = A @ (A.T @ beta)
        u /= np.linalg.norm(u)
        rest = A - np.outer(u, u @ A)  # span(A) without u: rank k - 1
        basis = np.linalg.svd(rest)[0][:, : k - 1]
        attained = np.linalg.norm(_projector(np.column_stack([basis, beta])) - A @ A.T, 2)
        assert attained == pytest.approx(s, abs=1e-10)
        # no other span containing beta does better
        for _ in range(200):
            other = _projector(np.column_stack([beta, rng.standard_normal((d, k - 1))]))
            assert np.linalg.norm(other - A @ A.T, 2) >= s - 1e-10
    assert float(angle_penalty(torch.zeros(d, dtype=torch.float64), torch.tensor(A))) == 0.0


def test_perm_with_infinite_penalties_is_erm():
    _, source = _source()
    perm = PenalizedERM(lam=math.inf, gamma=math.inf).fit(source)
    erm = FrozenRep().fit(source)
    torch.testing.assert_close(perm.source_predictors, erm.source_predictors, rtol=0, atol=1e-10)
    assert subspace_distance(perm.representation, erm.representation) < 1e-8


def test_perm_without_penalties_is_per_task_least_squares():
    _, source = _source(samples=60)
    G, c, _ = source.gram()
    ols = spd_solve(G, c)
    perm = PenalizedERM(lam=0.0, gamma=0.0).fit(source)
    torch.testing.assert_close(perm.step1, ols, rtol=0, atol=1e-7)
    torch.testing.assert_close(perm.source_predictors, ols, rtol=0, atol=1e-7)


def test_perm_step_one_never_increases_its_objective_and_ends_stationary():
    _, source = _source(delta=0.8, noise=0.5)
    perm = PenalizedERM(C1=0.5).fit(source)
    history = np.array(perm.info["source_objective_history"])
    assert len(history) > 2 and (np.diff(history) <= 1e-12 * abs(history[0])).all()
    A = perm.representation
    G, c, q = source.gram()
    tau = torch.full((source.num_tasks,), perm.lam_ / math.sqrt(source.num_samples), dtype=torch.float64)
    beta = perm_tasks(A, G, c, q, tau, perm.step1, 3000)
    P = A @ A.T
    for t in range(source.num_tasks):
        b = beta[t].clone().requires_grad_(True)
        grad_f = torch.autograd.grad((b @ G[t] @ b - 2 * c[t] @ b), b)[0]
        outside = (beta[t] - P @ beta[t]).norm()
        if outside > 1e-6 * beta[t].norm():  # smooth there: the full gradient vanishes
            b = beta[t].clone().requires_grad_(True)
            value = b @ G[t] @ b - 2 * c[t] @ b + tau[t] * (b - P @ b).norm() / b.norm()
            assert torch.autograd.grad(value, b)[0].norm() < 1e-5
        else:  # in the span: the head is optimal and the outside gradient within the threshold
            assert (P @ grad_f).norm() < 1e-5
            assert (grad_f - P @ grad_f).norm() <= tau[t] / beta[t].norm() + 1e-6


def test_perm_target_step_one_is_stationary_for_the_fixed_shared_representation():
    """Target step with ``gamma = inf`` (no refit): each target's predictor is a stationary point of
    ``f(beta) + (lam / sqrt(m)) ||(I - P) beta|| / ||beta||`` for the learned ``A_bar`` (autograd), and
    some targets leave the span (so the step is not the head-only fit)."""
    env, source = _source(delta=1.0, dim=6, rank=2, tasks=20, samples=40)
    perm = PenalizedERM(C1=0.5, gamma=math.inf).fit(source)
    target = env.sample_tasks(5, 30, torch.Generator().manual_seed(9))
    beta = perm.adapt(target).beta
    A = perm.representation
    P = A @ A.T
    tau = perm.lam_ / math.sqrt(30)
    G, c, _ = target.gram()
    left = 0
    for t in range(5):
        b = beta[t].clone().requires_grad_(True)
        outside = (beta[t] - P @ beta[t]).norm()
        if outside > 1e-6 * beta[t].norm():
            value = b @ G[t] @ b - 2 * c[t] @ b + tau * (b - P @ b).norm() / b.norm()
            assert torch.autograd.grad(value, b)[0].norm() < 1e-5
            left += 1
        else:
            grad = torch.autograd.grad(b @ G[t] @ b - 2 * c[t] @ b, b)[0]
            assert (P @ grad).norm() < 1e-5 and (grad - P @ grad).norm() <= tau / beta[t].norm() + 1e-6
    assert left >= 1


def test_refit_toward_satisfies_its_optimality_conditions():
    _, source = _source(samples=15)
    G, c, _ = source.gram()
    ols = spd_solve(G, c)
    anchor = ols + 0.2 * torch.randn(source.num_tasks, source.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tau = torch.linspace(0.05, 3.0, source.num_tasks, dtype=torch.float64)
    beta = refit_toward(G, c, anchor, tau, steps=3000)
    for t in range(source.num_tasks):
        grad = 2 * (G[t] @ beta[t] - c[t])
        move = beta[t] - anchor[t]
        if move.norm() > 1e-9:
            torch.testing.assert_close(grad + tau[t] * move / move.norm(), torch.zeros_like(grad), rtol=0, atol=1e-6)
        else:
            assert grad.norm() <= tau[t] + 1e-6
    assert (beta - anchor).norm(dim=-1).eq(0).any() and (beta - anchor).norm(dim=-1).gt(0).any()  # both cases happen
    torch.testing.assert_close(refit_toward(G, c, anchor, torch.full_like(tau, math.inf)), anchor)


def test_perm_adapts_like_erm_when_tasks_share_the_representation_and_better_when_they_do_not():
    for delta, better in ((0.0, False), (1.0, True)):
        env, source = _source(delta=delta, dim=10, rank=2, tasks=40, samples=50, noise=0.5)
        perm = source_task_errors(make_method("perm").fit(source).source_predictors, source.beta)["source_error_max"]
        erm = source_task_errors(make_method("frozenrep").fit(source).source_predictors, source.beta)["source_error_max"]
        if better:
            assert perm < 0.8 * erm
        else:
            assert perm < 1.15 * erm


# --------------------------------------------------------------------------- spectral and method of moments


def test_spectral_representation_matches_numpy():
    _, source = _source(samples=30)
    method = Spectral(gamma=math.inf).fit(source)
    X, y = source.X.numpy(), source.y.numpy()
    estimates = np.stack([np.linalg.lstsq(X[t], y[t], rcond=None)[0] for t in range(len(X))])
    U = np.linalg.svd(estimates.T)[0][:, :2]
    np.testing.assert_allclose(_projector(method.representation.numpy()), U @ U.T, atol=1e-9)
    # gamma = inf: the source predictors are the head-only fits on that span
    heads = np.stack([U @ np.linalg.lstsq(X[t] @ U, y[t], rcond=None)[0] for t in range(len(X))])
    np.testing.assert_allclose(method.source_predictors.numpy(), heads, atol=1e-9)


def _ragged(source, counts):
    mask = torch.zeros(source.y.shape, dtype=torch.bool)
    for t, n in enumerate(counts):
        mask[t, :n] = True
    m = mask.to(source.X.dtype)
    return Tasks(X=source.X * m.unsqueeze(-1), y=source.y * m, beta=source.beta, representation=source.representation, mask=mask)


def test_perm_constants_are_the_papers_rates_with_the_estimated_noise():
    """``lam = C1 sigma_hat sqrt(k (d + log T))``, ``gamma = C2 sigma_hat sqrt(d + log T)``: ``lam`` grows
    like ``sqrt(k)`` at the same noise level, ``gamma`` not at all."""
    _, source = _source(dim=6, rank=2, tasks=20)
    two, three = PenalizedERM(rank=2, C1=1.5, C2=0.7).fit(source), PenalizedERM(rank=3, C1=1.5, C2=0.7).fit(source)
    for perm, k in ((two, 2), (three, 3)):
        sigma = perm.noise_estimate
        assert perm.lam_ == pytest.approx(1.5 * sigma * math.sqrt(k * (6 + math.log(20))), rel=1e-12)
        assert perm.gamma_ == pytest.approx(0.7 * sigma * math.sqrt(6 + math.log(20)), rel=1e-12)


def test_perm_step_one_ends_at_a_fixed_point_of_both_its_steps_on_ragged_tasks():
    """On tasks of different sizes, pERM's step 1 ends where neither of its alternating steps moves: the
    ``beta``-step with ``tau_t = lam / sqrt(n_t)`` and the ``A_bar``-step weighted by ``(n_t / N) tau_t``
    (the paper's ``lam sqrt(n_t) / N``)."""
    _, full = _source(delta=0.8, dim=6, rank=2, tasks=12, samples=80, noise=0.5)
    counts = [10, 80, 15, 60, 12, 40, 20, 80, 10, 30, 50, 25]
    source = _ragged(full, counts)
    perm = PenalizedERM(C1=0.5).fit(source)
    A, beta = perm.representation, perm.step1
    n = torch.tensor(counts, dtype=torch.float64)
    G, c, q = masked_statistics(source.X, source.y, source.mask.to(torch.float64))
    tau = perm.lam_ / n.sqrt()
    again = perm_tasks(A, G, c, q, tau, beta, 400)
    torch.testing.assert_close(again, beta, rtol=0, atol=1e-6)
    A_next = perm_representation(beta, A, n / n.sum() * tau)
    torch.testing.assert_close(A_next @ A_next.T, A @ A.T, rtol=0, atol=1e-6)
    P = A @ A.T
    assert ((beta - beta @ P).norm(dim=-1) > 1e-3 * beta.norm(dim=-1)).sum() >= 2  # some tasks leave the span


def test_spectral_weights_ragged_tasks_by_their_sample_counts():
    """Ragged tasks: the span is the top of ``sum_t (n_t / N) beta_tilde_t beta_tilde_t^T``, numpy's
    per-task least squares on each task's own samples (the unweighted span differs)."""
    _, full = _source(delta=1.0, dim=6, rank=2, tasks=10, samples=60)
    counts = [8, 60, 10, 50, 9, 40, 12, 60, 8, 30]
    source = _ragged(full, counts)
    method = Spectral(gamma=math.inf).fit(source)
    X, y = full.X.numpy(), full.y.numpy()
    estimates = np.stack([np.linalg.lstsq(X[t, :n], y[t, :n], rcond=None)[0] for t, n in enumerate(counts)])
    w = np.sqrt(np.array(counts) / sum(counts))
    U = np.linalg.svd((estimates * w[:, None]).T)[0][:, :2]
    np.testing.assert_allclose(method.representation.numpy() @ method.representation.numpy().T, U @ U.T, atol=1e-9)
    V = np.linalg.svd(estimates.T)[0][:, :2]
    assert np.abs(U @ U.T - V @ V.T).max() > 1e-3


def test_least_squares_is_the_minimum_norm_solution():
    """Per-task ``G^+ c``: numpy's minimum-norm least squares, for tasks with fewer samples than features too."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)  # 3 samples, 7 features
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    G, c, _ = masked_statistics(X, y, torch.ones(4, 3, dtype=torch.float64))
    expected = np.stack([np.linalg.lstsq(X[t].numpy(), y[t].numpy(), rcond=None)[0] for t in range(4)])
    np.testing.assert_allclose(least_squares(G, c).numpy(), expected, atol=1e-10)
    X2 = torch.randn(4, 20, 7, generator=g, dtype=torch.float64)
    y2 = torch.randn(4, 20, generator=g, dtype=torch.float64)
    G2, c2, _ = masked_statistics(X2, y2, torch.ones(4, 20, dtype=torch.float64))
    expected2 = np.stack([np.linalg.lstsq(X2[t].numpy(), y2[t].numpy(), rcond=None)[0] for t in range(4)])
    np.testing.assert_allclose(least_squares(G2, c2).numpy(), expected2, atol=1e-10)


@pytest.mark.parametrize("cls", [MethodOfMoments, Spectral, PenalizedERM])
def test_with_an_intercept_competitors_predict_with_their_own_intercepts(cls):
    """Tasks with offsets, ``intercept=True``: the head-only methods' target predictions are numpy's least
    squares on ``[X B, 1]``; for pERM the adapted predictor, on the same centred data shifted back,
    predicts the training means at the training mean of ``X`` (the intercept is profiled out exactly)."""
    _, source = _source(delta=0.3, dim=5, rank=2, tasks=15, samples=30)
    offsets = torch.linspace(-3, 3, 15, dtype=torch.float64)
    shifted = Tasks(X=source.X + 2.0, y=source.y + offsets.unsqueeze(-1) + 5.0, beta=source.beta)
    method = cls(rank=2)
    method.intercept, method.standardize = True, False  # the defaults for real data are True, True
    method.fit(shifted)
    _, target = _source(delta=0.3, dim=5, rank=2, tasks=4, samples=12, seed=7)
    target = Tasks(X=target.X + 2.0, y=target.y - 4.0 + torch.arange(4, dtype=torch.float64).unsqueeze(-1), beta=target.beta)
    adapted = method.adapt(target)
    probe = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 2.0
    predicted = adapted.predict(probe).numpy()
    X, y, Xp = target.X.numpy(), target.y.numpy(), probe.numpy()
    if cls is PenalizedERM:
        means = adapted.predict(target.X.mean(1, keepdim=True)).numpy()[:, 0]
        np.testing.assert_allclose(means, y.mean(1), atol=1e-9)
        return
    B = method.representation.numpy()
    for t in range(4):
        design = np.column_stack([X[t] @ B, np.ones(len(y[t]))])
        coef = np.linalg.lstsq(design, y[t], rcond=None)[0]
        np.testing.assert_allclose(predicted[t], np.column_stack([Xp[t] @ B, np.ones(6)]) @ coef, atol=1e-9)


def test_moment_matrix_matches_a_per_sample_sum_with_ragged_tasks():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 9, 5, generator=g, dtype=torch.float64)
    y = torch.randn(4, 9, generator=g, dtype=torch.float64)
    counts = [9, 3, 6, 1]
    mask = torch.zeros(4, 9, dtype=torch.float64)
    for t, n in enumerate(counts):
        mask[t, :n] = 1
    X, y = X * mask.unsqueeze(-1), y * mask  # padded rows are zero
    expected = np.zeros((5, 5))
    for t, n in enumerate(counts):
        for i in range(n):
            x = X[t, i].numpy()
            expected += y[t, i].item() ** 2 * np.outer(x, x) / n / 4
    np.testing.assert_allclose(moment_matrix(X, y, mask).numpy(), expected, atol=1e-12)


def test_method_of_moments_recovers_the_representation_from_many_noiseless_samples():
    env, source = _source(delta=0.0, dim=6, rank=2, tasks=30, samples=3000, noise=0.0)
    method = MethodOfMoments().fit(source)
    assert subspace_distance(method.representation, env.representation) < 0.1
    # head-only least squares on the learned span
    G, c, _ = source.gram()
    B = method.representation
    torch.testing.assert_close(method.source_predictors, predictor(B, spd_solve(B.T @ G @ B, (c @ B))))


def test_competitors_are_methods_of_the_experiment_and_the_command_line(tmp_path, monkeypatch, capsys):
    config = resolve_config(
        dict(setting="linear", dim=6, rank=2, tasks=15, samples=12, target_samples=[5, 12], target_tasks=3, seeds=1, methods=["perm", "spectral", "mom"])
    )
    results = run_experiment(config)
    assert set(results.method) == {"perm", "spectral", "mom"} and results.excess_risk.notna().all()
    out = tmp_path / "run"
    sizes = "--dim 6 --rank 2 --tasks 15 --samples 12 --target-samples 12 --target-tasks 2 --seeds 1 --workers 1".split()
    # the console script's entry point, in this process (the command line's own tests run it in a subprocess)
    from adaptrep.cli import entry

    monkeypatch.setattr(sys, "argv", ["adaptrep", "run", "--setting", "linear", *sizes, "--methods", "perm,spectral,mom", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        entry()
    assert exit_.value.code in (0, None), capsys.readouterr().err
    results = pd.read_csv(out / "results.csv")
    assert set(results.method) == {"perm", "spectral", "mom"}
    # the report's table has each method's source-task errors (mean over seeds) next to its span's
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| perm |")]
    row = dict(zip(["subspace_distance", "source_error_max", "source_error_mean"], (float(v) for v in table[-1].strip("|").split("|")[1:]), strict=True))
    for column, value in row.items():
        assert value == pytest.approx(results[results.method == "perm"][column].mean(), abs=5e-4)


def test_results_carry_each_methods_source_task_errors():
    """``source_error_max``/``_mean`` of ``adaptrep run``: the method's own per-source-task estimates against
    the true parameters of the seed's source tasks (numpy norms of a separate fit); NaN without estimates."""
    from adaptrep.experiment import keyed_generator

    names = ["adaptrep", "frozenrep", "perm", "target-only", "oracle-ft"]
    config = resolve_config(dict(setting="linear", dim=6, rank=2, tasks=15, samples=12, target_samples=[8], target_tasks=2, seeds=2, methods=names))
    results = run_experiment(config)
    for seed in range(2):
        source = config.environment(seed).sample_tasks(config.tasks, config.samples, keyed_generator(seed, 1))
        for name in names:
            rows = results[(results.seed == seed) & (results.method == name)]
            predictors = make_method(name, config.method_options(seed)).fit(source).source_predictors
            if predictors is None:
                assert rows.source_error_max.isna().all() and rows.source_error_mean.isna().all()
                continue
            errors = np.linalg.norm(predictors.numpy() - source.beta.numpy(), axis=1)
            assert rows.source_error_max.to_numpy() == pytest.approx(errors.max(), rel=1e-10)
            assert rows.source_error_mean.to_numpy() == pytest.approx(errors.mean(), rel=1e-10)
    assert results.groupby("method").source_error_max.first()[["adaptrep", "frozenrep", "perm"]].gt(0).all()


def test_competitors_reject_other_losses_in_one_line():
    from adaptrep.environments import LogisticEnvironment

    source = LogisticEnvironment(6, 2).sample_tasks(5, 10, torch.Generator().manual_seed(0))
    for name in ("perm", "spectral", "mom"):
        with pytest.raises(ValueError, match="squared loss"):
            make_method(name).fit(source)


# --------------------------------------------------------------------------- the cross-validated penalty


def test_masked_statistics_match_numpy():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 7, generator=g, dtype=torch.float64)
    w = (torch.rand(2, 7, generator=g) < 0.6).to(torch.float64)
    G, c, q = masked_statistics(X, y, w)
    for t in range(2):
        rows = w[t].bool().numpy()
        Xs, ys = X[t].numpy()[rows], y[t].numpy()[rows]
        np.testing.assert_allclose(G[t].numpy(), Xs.T @ Xs / len(ys), atol=1e-12)
        np.testing.assert_allclose(c[t].numpy(), Xs.T @ ys / len(ys), atol=1e-12)
        assert q[t].item() == pytest.approx(ys @ ys / len(ys))


def _numpy_held_out(X, y, valid, B, held, scored, centre):
    """Independent reference for ``cv_penalty``'s FROZENREP held-out errors: for each scored task ``t``
    (row ``i`` of ``held``, ``(T', K, n)``) and fold ``k``, numpy's minimum-norm least-squares head on
    the training part (centred on that part's means when ``centre``), its squared errors on the
    held-out part (against the same means), summed over folds and divided by the task's count."""
    Xn, yn, rows = X.numpy(), y.numpy(), valid.bool().numpy()
    expected = np.zeros(len(scored))
    for i, t in enumerate(scored):
        for k in range(held.shape[1]):
            test, train = held[i, k], rows[t] & ~held[i, k]
            xm, ym = (Xn[t][train].mean(0), yn[t][train].mean()) if centre else (0.0, 0.0)
            w = np.linalg.lstsq((Xn[t][train] - xm) @ B, yn[t][train] - ym, rcond=None)[0]
            expected[i] += (((Xn[t][test] - xm) @ B @ w - (yn[t][test] - ym)) ** 2).sum() / rows[t].sum()
    return expected


def _centred(X, y, valid):
    """Ragged tasks centred on their own means, padding kept at zero (as ``methods._centered`` does)."""
    counts = valid.sum(-1)
    X = (X - (X.sum(1) / counts.unsqueeze(-1)).unsqueeze(1)) * valid.unsqueeze(-1)
    return X, (y - (y.sum(1) / counts).unsqueeze(-1)) * valid


@pytest.mark.parametrize("singleton", [False, True])
def test_frozen_held_out_error_is_head_only_least_squares_on_the_training_folds(singleton):
    """The held-out errors at FROZENREP against numpy, on the folds of ``adaptrep.cv``; a task with
    one sample (``singleton``: task 0) is never held out and has no held-out error, but still trains."""
    _, source = _source(tasks=8, samples=20)
    valid = torch.ones(8, 20, dtype=torch.float64)
    if singleton:
        valid[0, 1:] = 0
    X, y = source.X * valid.unsqueeze(-1), source.y * valid
    path = cv_penalty(X, y, 2, mask=valid, folds=4, strengths=1)
    B = path.fits[0].B.numpy()
    scored = list(range(1, 8)) if singleton else list(range(8))
    held = cv.fold_masks(valid[scored], 4, torch.Generator().manual_seed(0), valid[scored]).held_out.bool().numpy()  # (T', K, n)
    expected = _numpy_held_out(X, y, valid, B, held, scored, centre=False)
    np.testing.assert_allclose(path.per_task[0].numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("representation", ["gram", "samples"])
def test_with_an_intercept_each_fold_is_centred_on_its_training_part(representation):
    """``intercept=True``: the held-out errors at FROZENREP against numpy, each fold's head and intercept
    fitted on its training part (centred on that part's means) and the held-out fold scored against
    them: no held-out sample enters its own task's intercept. Tasks with offsets, ragged, centred by
    the caller (as ``methods._centered`` does); the samples path (fewer samples than features) agrees."""
    T, n, d = 8, 12, 14 if representation == "samples" else 5
    g = torch.Generator().manual_seed(3)
    valid = torch.ones(T, n, dtype=torch.float64)
    valid[::3, 9:] = 0
    X = (torch.randn(T, n, d, generator=g, dtype=torch.float64) + 2.0) * valid.unsqueeze(-1)
    y = (X @ torch.randn(d, generator=g, dtype=torch.float64) + 3.0 + torch.randn(T, n, generator=g, dtype=torch.float64)) * valid
    X, y = _centred(X, y, valid)
    path = cv_penalty(X, y, 2, mask=valid, folds=4, strengths=1, intercept=True, representation=representation, refit_steps=400)
    B = path.fits[0].B.numpy()
    held = cv.fold_masks(valid, 4, torch.Generator().manual_seed(0), valid).held_out.bool().numpy()  # (T, K, n)
    expected = _numpy_held_out(X, y, valid, B, held, range(T), centre=True)
    leaky = _numpy_held_out(X, y, valid, B, held, range(T), centre=False)  # the whole task's means (the leak)
    np.testing.assert_allclose(path.per_task[0].numpy(), expected, rtol=1e-9)
    assert (expected > leaky).mean() > 0.5  # centring on the held-out samples too made them look easier


@pytest.mark.parametrize("representation", ["gram", "samples"])
def test_with_an_intercept_a_fold_with_no_more_centred_samples_than_the_rank_takes_the_minimum_norm_head(representation):
    """A task of 5 samples in 2 folds: one training part has 2 samples, which centred span one direction,
    fewer than the rank (2). Its head is the minimum-norm least-squares one, as numpy's, on both paths.
    (The Gram path's centred Gram matrix has a second direction of rounding size; before
    ``solvers.rank_tolerance``, ``pseudo_inverse`` inverted it: a held-out error of 3.5e4 against 9.4.)"""
    T, n, d = 6, 10, 4
    g = torch.Generator().manual_seed(0)
    X = torch.randn(T, n, d, generator=g, dtype=torch.float64) + 2.0
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 3.0 + torch.randn(T, n, generator=g, dtype=torch.float64)
    valid = torch.ones(T, n, dtype=torch.float64)
    valid[0, 2:], valid[1, 1:], valid[2, 5:] = 0, 0, 0  # 2 samples (so 2 folds), 1 (never held out), 5
    X, y = _centred(X * valid.unsqueeze(-1), y * valid, valid)
    path = cv_penalty(X, y, 2, mask=valid, strengths=1, intercept=True, representation=representation)
    B = path.fits[0].B.numpy()
    scored = [0, 2, 3, 4, 5]
    held = cv.fold_masks(valid[scored], 2, torch.Generator().manual_seed(0), valid[scored]).held_out.bool().numpy()
    expected = _numpy_held_out(X, y, valid, B, held, scored, centre=True)
    rows = valid.bool().numpy()
    assert sorted(int((rows[2] & ~held[1, k]).sum()) for k in range(2)) == [2, 3]
    np.testing.assert_allclose(path.per_task[0].numpy(), expected, rtol=1e-8)


def test_with_an_intercept_the_samples_path_scores_like_the_gram_path_at_every_strength():
    """``intercept=True`` with fewer samples than features, ragged: past FROZENREP (perturbations not
    zero) the samples path, which centres each fold's copy of ``X`` directly, scores every strength
    like the Gram path, which centres the statistics (``about``); the centring is real (the scores
    differ without it). (The data of the test above, whose FROZENREP fits agree on both paths.)"""
    _, source = _source(delta=1.0, dim=12, rank=2, tasks=10, samples=10, noise=0.3, seed=2)
    valid = torch.ones(10, 10, dtype=torch.float64)
    valid[::3, 7:] = 0
    X, y = source.X * valid.unsqueeze(-1), source.y * valid
    options = dict(mask=valid, strengths=2, patience=5, refit_steps=800, path_gtol=1e-8, gtol=1e-8, intercept=True)
    gram = cv_penalty(X, y, 2, representation="gram", **options)
    samples = cv_penalty(X, y, 2, representation="samples", **options)
    assert len(gram.strengths) == 3 and samples.strengths == pytest.approx(gram.strengths, rel=1e-6)
    torch.testing.assert_close(samples.per_task, gram.per_task, rtol=1e-6, atol=1e-8)
    assert ((gram.per_task[-1] - gram.per_task[0]).abs() > 1e-4).all()  # the weaker strength's perturbations change the scores
    plain = cv_penalty(X, y, 2, representation="gram", **{**options, "intercept": False})
    assert not torch.allclose(plain.per_task, gram.per_task, rtol=1e-3)


def test_with_an_intercept_and_no_task_above_the_rank_the_random_effects_fit_counts_the_centring():
    """Every task has at most ``rank`` samples: the path is FROZENREP's random-effects fit, which with an
    intercept counts the degree of freedom each task's centring spent (``lost=1``), not the plain fit."""
    _, source = _source(delta=0.5, dim=8, rank=4, tasks=30, samples=4)
    valid = torch.ones(30, 4, dtype=torch.float64)
    X = source.X - source.X.mean(1, keepdim=True)
    y = source.y - source.y.mean(1, keepdim=True)
    path = cv_penalty(X, y, 4, mask=valid, intercept=True)
    assert path.strengths == [math.inf] and path.fit.stop_reason == "degenerate"
    G, c, q = task_statistics(X, y)
    centred, plain = fit_source(G, c, q, 4, lost=1), fit_source(G, c, q, 4, lost=0)
    torch.testing.assert_close(path.fit.B @ path.fit.B.T, centred.B @ centred.B.T, rtol=0, atol=1e-9)
    assert (path.fit.B @ path.fit.B.T - plain.B @ plain.B.T).abs().max() > 1e-4


def test_adaptrep_with_an_intercept_cross_validates_with_fold_wise_centring(monkeypatch):
    """``AdaptRep(intercept=True)`` hands its intercept to :func:`cv_penalty`: FROZENREP's held-out errors on
    its path are numpy's, each fold's head and intercept fitted on the fold's training part (tasks with
    offsets, a short path)."""
    import adaptrep.methods as methods

    def short_path(*args, **kwargs):
        return cv_penalty(*args, **{**kwargs, "strengths": 1})

    monkeypatch.setattr(methods, "cv_penalty", short_path)
    env = LinearEnvironment(5, 2, delta=0.5, noise=0.5, seed=2)
    raw = env.sample_tasks(8, 12, torch.Generator().manual_seed(3))
    offsets = torch.arange(8, dtype=torch.float64)
    source = Tasks(X=raw.X + 2.0, y=raw.y + 2.0 * raw.beta.sum(-1, keepdim=True) + offsets.unsqueeze(-1), beta=raw.beta)
    method = methods.AdaptRep(rank=2, intercept=True, finetune=None).fit(source)
    B = method.penalty_path.fits[0].B.numpy()
    held = cv.fold_masks(torch.ones(8, 12), 5, torch.Generator().manual_seed(0), torch.ones(8, 12)).held_out.bool().numpy()
    expected = _numpy_held_out(source.X, source.y, torch.ones(8, 12), B, held, range(8), centre=True)
    np.testing.assert_allclose(method.penalty_path.per_task[0].numpy(), expected, rtol=1e-9)


def test_cv_penalty_path_and_choice():
    _, source = _source(delta=1.0, dim=8, rank=2, tasks=20, samples=30, noise=0.5)
    path = cv_penalty(source.X, source.y, 2, strengths=4, rule="min")
    assert path.strengths[0] == math.inf and all(a > b for a, b in zip(path.strengths[1:-1], path.strengths[2:], strict=True))
    assert path.errors[path.chosen] == min(path.errors)
    # with large perturbations a finite penalty wins, and the returned fit is that penalty's solution
    assert math.isfinite(path.penalty)
    G, c, q = source.gram()
    direct = fit_source(G, c, q, 2, penalty=path.penalty)
    assert path.fit.objective == pytest.approx(direct.objective, rel=1e-7)
    assert len(path.strengths) == 5 and len(path.fits) == 5 and path.per_task.shape == (5, 20)


def test_the_default_rule_takes_the_weaker_neighbour_of_the_minimum_unless_frozenrep_wins():
    _, perturbed = _source(delta=1.0, dim=8, rank=2, tasks=20, samples=30, noise=0.5)
    weaker, lowest = cv_penalty(perturbed.X, perturbed.y, 2), cv_penalty(perturbed.X, perturbed.y, 2, rule="min")
    assert weaker.errors == lowest.errors and 0 < lowest.chosen
    assert weaker.chosen == lowest.chosen + 1 and weaker.penalty == pytest.approx(0.75 * lowest.penalty)
    G, c, q = perturbed.gram()
    direct = fit_source(G, c, q, 2, penalty=weaker.penalty)  # the returned fit is that penalty's solution
    assert weaker.fit.objective == pytest.approx(direct.objective, rel=1e-7)
    _, shared = _source(delta=0.0, dim=8, rank=2, tasks=30, samples=40, noise=1.0)
    frozen = cv_penalty(shared.X, shared.y, 2)
    assert frozen.errors[0] == min(frozen.errors) and frozen.chosen == 0 and frozen.penalty == math.inf


def _group_lasso_head(X, y, B, s):
    """numpy: ``argmin_{w, v} ||y - X (B w + v)||^2 / n + s ||v||`` by profiling out ``w`` and solving the
    secular equation of the group penalty: with ``A = X^T M X / n``, ``b = X^T M y / n`` (``M`` the residual
    projector of ``X B``), ``v = 0`` when ``||2 b|| <= s``, else ``v = (2 A + lam I)^{-1} 2 b`` with
    ``lam ||v|| = s``."""
    n, d = X.shape
    Z = X @ B
    M = np.eye(n) - Z @ np.linalg.pinv(Z)
    A, b = X.T @ M @ X / n, X.T @ M @ y / n
    if np.linalg.norm(2 * b) <= s:
        v = np.zeros(d)
    else:

        def v_of(lam):
            return np.linalg.solve(2 * A + lam * np.eye(d), 2 * b)

        lam = brentq(lambda lam: lam * np.linalg.norm(v_of(lam)) - s, 1e-12, 1e12, xtol=1e-14, rtol=1e-14)
        v = v_of(lam)
    w = np.linalg.lstsq(Z, y - X @ v, rcond=None)[0]
    return B @ w + v


@pytest.mark.parametrize("representation", ["gram", pytest.param("samples", marks=pytest.mark.slow)])  # samples: ~15 s (6000 refit steps per fold)
def test_held_out_errors_past_frozenrep_are_numpys_group_lasso_refits_at_the_fold_size_strength(representation):
    """Past FROZENREP, each fold's refit of task ``t`` is the group-lasso fit on its training part at the
    strength ``mu sqrt(n_t / n_train)`` (same ``mu`` for a smaller sample): numpy's secular-equation
    solution with that path strength's representation, scored on the held-out fold; some refits have
    ``v != 0`` (else the strength would not matter)."""
    d = 12 if representation == "samples" else 5
    _, source = _source(delta=1.0, dim=d, rank=2, tasks=6, samples=10 if representation == "samples" else 20, noise=0.3, seed=2)
    X, y = source.X, source.y
    T, n = y.shape
    path = cv_penalty(X, y, 2, folds=4, strengths=3, patience=5, refit_steps=3000, path_gtol=1e-9, gtol=1e-9, representation=representation)
    ones = torch.ones(T, n, dtype=torch.float64)
    held = cv.fold_masks(ones, 4, torch.Generator().manual_seed(0), ones).held_out.bool().numpy()  # (T, K, n)
    Xn, yn = X.numpy(), y.numpy()
    moved = 0
    for j in range(1, len(path.strengths)):
        B = path.fits[j].B.numpy()
        expected = np.zeros(T)
        for t in range(T):
            for k in range(held.shape[1]):
                test = held[t, k]
                train = ~test
                s = path.strengths[j] * math.sqrt(n / train.sum())  # the same strength for a smaller sample
                beta = _group_lasso_head(Xn[t][train], yn[t][train], B, s)
                expected[t] += ((Xn[t][test] @ beta - yn[t][test]) ** 2).sum() / n
                head_only = _group_lasso_head(Xn[t][train], yn[t][train], B, math.inf)
                moved += not np.allclose(beta, head_only)
        np.testing.assert_allclose(path.per_task[j].numpy(), expected, rtol=1e-6)
    assert moved > 0


def test_the_path_starts_at_the_group_penalty_threshold_of_the_frozenrep_fit():
    """``mu_max = max_t ||2 (G_t B w_t - c_t)||`` at FROZENREP: numpy's head-only least squares on every
    task, the norm of the loss gradient in ``v_t`` there; the path's first finite strength is it and,
    fitted at it, every perturbation stays zero."""
    _, source = _source(delta=1.0, dim=8, rank=2, tasks=20, samples=30, noise=0.5)
    path = cv_penalty(source.X, source.y, 2, strengths=1)
    B = path.fits[0].B.numpy()
    X, y = source.X.numpy(), source.y.numpy()
    gradients = []
    for t in range(len(X)):
        w = np.linalg.lstsq(X[t] @ B, y[t], rcond=None)[0]
        gradients.append(np.linalg.norm(2 * X[t].T @ (X[t] @ B @ w - y[t]) / len(y[t])))
    assert path.strengths[1] == pytest.approx(max(gradients), rel=1e-6)
    assert max(gradients) > 1.5 * np.mean(gradients)  # the max, not the mean
    assert float(path.fits[1].V.norm(dim=-1).max()) < 1e-6 * max(gradients)


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_the_path_stops_once_the_error_has_been_above_its_running_minimum_for_patience_strengths(patience):
    """The stopping rule replayed on the returned mean errors: the path ends at the first strength where
    the last ``patience`` errors all failed to lower the running minimum (or after all ``strengths``)."""
    _, source = _source(delta=0.3, dim=8, rank=2, tasks=20, samples=30, noise=0.5, seed=5)
    strengths = 12
    path = cv_penalty(source.X, source.y, 2, strengths=strengths, patience=patience, refit_steps=20)
    errors = path.errors
    expected, best, worse = strengths + 1, errors[0], 0  # all strengths unless the rule stops the path
    for j in range(1, len(errors)):
        if errors[j] < best:
            best, worse = errors[j], 0
        else:
            worse += 1
            if worse >= patience:
                expected = j + 1
                break
    assert len(errors) == expected and len(path.strengths) == expected
    assert expected < strengths + 1  # it did stop early
    assert errors[1] >= errors[0]  # a worse strength first (patience 1 stops there) ...
    assert patience == 1 or min(errors[2:]) < errors[0]  # ... then a new minimum, where the count restarts
    assert path.strengths[1:] == pytest.approx([path.strengths[1] * 0.75**j for j in range(expected - 1)], rel=1e-12)


def test_the_one_standard_error_rule_takes_the_strongest_penalty_within_one_standard_error():
    """``rule="1se"``: numpy's paired standard errors of the per-task differences from the minimiser
    (``std / sqrt(T)``) and the strongest strength whose mean difference is within them."""
    _, source = _source(delta=0.6, dim=8, rank=2, tasks=20, samples=30, noise=0.5, seed=1)
    path = cv_penalty(source.X, source.y, 2, rule="1se", patience=4)
    errors = path.per_task.numpy()
    best = int(np.argmin(errors.mean(-1)))
    diff = errors - errors[best]
    se = diff.std(-1, ddof=1) / math.sqrt(errors.shape[-1])
    np.testing.assert_allclose(path.standard_errors, se, rtol=1e-10, atol=1e-15)
    within = np.flatnonzero(diff.mean(-1) <= se)
    assert len(within) > 1 and path.chosen == within[0] and path.chosen != best


def test_cv_penalty_on_the_samples_equals_it_on_gram_matrices():
    """Fewer samples than features: the samples path (one fold at a time, O(T n d) memory) scores
    and chooses like the Gram-matrix path, once both refits have converged."""
    _, source = _source(delta=1.0, dim=12, rank=2, tasks=10, samples=10, noise=0.3, seed=2)
    mask = torch.ones(10, 10, dtype=torch.float64)
    mask[::3, 7:] = 0  # ragged
    X, y = source.X * mask.unsqueeze(-1), source.y * mask
    options = dict(mask=mask, strengths=3, refit_steps=800, path_gtol=1e-8, gtol=1e-8)
    gram = cv_penalty(X, y, 2, representation="gram", **options)
    samples = cv_penalty(X, y, 2, representation="samples", **options)
    assert samples.strengths == pytest.approx(gram.strengths, rel=1e-6) and samples.chosen == gram.chosen
    torch.testing.assert_close(samples.per_task, gram.per_task, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(samples.fit.B @ samples.fit.B.T, gram.fit.B @ gram.fit.B.T, rtol=0, atol=1e-6)


def test_cv_penalty_with_fewer_samples_than_the_rank_keeps_frozenrep():
    """n_t <= k: FROZENREP's heads fit every task exactly, so no perturbation can lower a loss and the path is
    FROZENREP alone: fit_source's random-effects fit, with no folds."""
    _, source = _source(delta=0.5, dim=12, rank=6, tasks=30, samples=5)
    path = cv_penalty(source.X, source.y, 6)
    assert path.strengths == [math.inf] and path.chosen == 0 and path.fit.stop_reason == "degenerate"
    direct = fit_source(*task_statistics(source.X, source.y), 6)
    torch.testing.assert_close(path.fit.B, direct.B, rtol=0, atol=1e-12)


def test_cv_penalty_keeps_the_shared_representation_when_tasks_share_it():
    _, source = _source(delta=0.0, dim=10, rank=2, tasks=30, samples=40, noise=1.0)
    method = AdaptRep(penalty="cv", finetune=None).fit(source)
    assert method.info["source_penalty"] == method.penalty_path.penalty
    fit = method.penalty_path.fit
    torch.testing.assert_close(method.source_predictors, predictor(fit.B, fit.W, fit.V))
    frozen = FrozenRep().fit(source)
    ratio = (
        source_task_errors(method.source_predictors, source.beta)["source_error_max"]
        / source_task_errors(frozen.source_predictors, source.beta)["source_error_max"]
    )
    assert ratio < 1.05


def test_theory_penalty_stays_available_and_bad_rules_are_named():
    _, source = _source()
    method = AdaptRep(penalty="theory", finetune=None).fit(source)
    sigma = estimate_noise(*source.gram(), source.num_samples, 2)[0]
    assert method.info["source_penalty"] == pytest.approx(theory_penalty(sigma, source.dim, 2, source.num_tasks, source.num_samples))
    with pytest.raises(ValueError, match="'cv' or 'theory'"):
        AdaptRep(penalty="loo").fit(source)


def test_cv_penalty_handles_ragged_tasks_like_their_trimmed_samples():
    env, full = _source(delta=0.5, tasks=10, samples=16)
    X, y = full.X.clone(), full.y.clone()
    mask = torch.ones(10, 16, dtype=torch.float64)
    mask[::2, 12:] = 0
    X, y = X * mask.unsqueeze(-1), y * mask
    ragged = cv_penalty(X, y, 2, mask=mask, strengths=3)
    G, c, q = masked_statistics(X, y, mask)
    frozen = fit_source(G, c, q, 2)
    assert ragged.fits[0].objective == pytest.approx(frozen.objective, rel=1e-9)
    assert np.isfinite(ragged.errors).all()


def test_every_representation_method_exposes_source_predictors():
    _, source = _source()
    for name in ("adaptrep", "frozenrep", "perm", "spectral", "mom"):
        method = make_method(name).fit(source)
        assert method.source_predictors is not None and method.source_predictors.shape == source.beta.shape, name
    frozen = make_method("frozenrep").fit(source)
    B = frozen.representation
    torch.testing.assert_close(frozen.source_predictors, frozen.source_predictors @ B @ B.T)  # in the span
    errors = source_task_errors(frozen.source_predictors, source.beta)
    norms = (frozen.source_predictors - source.beta).norm(dim=-1)
    assert errors == {"source_error_max": pytest.approx(float(norms.max())), "source_error_mean": pytest.approx(float(norms.mean()))}


def test_source_tasks_are_tasks():
    # Tasks without a true representation need an explicit rank
    _, source = _source()
    bare = Tasks(source.X, source.y, source.beta, None)
    with pytest.raises(ValueError, match="needs rank"):
        PenalizedERM().fit(bare)
    assert PenalizedERM(rank=2).fit(bare).representation.shape == (6, 2)
