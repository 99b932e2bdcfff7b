"""Task data without ground truth: constructors, ragged tasks, splits, intercept, scaling, saved models."""

import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from adaptrep import LinearEnvironment
from adaptrep.data import DataError, Standardizer, Tasks, read_tasks, split_samples, split_shots, split_tasks
from adaptrep.methods import AdaptRep, FrozenRep, TargetOnly
from adaptrep.saving import load_method, save_method
from adaptrep.solvers import fit_source, source_objective


def ragged_problem(seed=0, T=30, d=6, k=2, low=10, high=60, offset=0.0, scale=1.0, delta=0.1):
    """Ragged linear tasks with sizes uniform on [low, high], per-task offsets and feature scales."""
    rng = np.random.default_rng(seed)
    B = np.linalg.qr(rng.normal(size=(d, k)))[0]
    Xs, ys = [], []
    for _ in range(T):
        n = int(rng.integers(low, high + 1))
        X = rng.normal(size=(n, d)) * scale + 1.0
        y = X @ (B @ rng.normal(size=k) + delta * rng.normal(size=d)) + offset * rng.normal() + 0.3 * rng.normal(size=n)
        Xs.append(X)
        ys.append(y)
    return Xs, ys


def test_constructors_agree_and_pad_with_zeros(tmp_path):
    Xs, ys = ragged_problem(T=5)
    names = [f"task{t}" for t in range(5)]
    a = Tasks.from_arrays(Xs, ys, names=names)
    assert a.ragged and a.counts.tolist() == [len(y) for y in ys]
    for t in range(5):
        n = len(ys[t])
        assert torch.equal(a.X[t, :n], torch.as_tensor(Xs[t])) and torch.equal(a.y[t, :n], torch.as_tensor(ys[t]))
        assert bool((a.X[t, n:] == 0).all()) and bool((a.y[t, n:] == 0).all())
    # one array with a task id per row, rows shuffled: tasks in order of first appearance, rows in order
    ids = np.repeat(names, [len(y) for y in ys])
    order = np.random.default_rng(1).permutation(len(ids))
    b = Tasks.from_ids(np.concatenate(Xs)[order], np.concatenate(ys)[order], ids[order])
    first = list(dict.fromkeys(ids[order]))
    for t, name in enumerate(first):
        rows = order[ids[order] == name]
        n = len(rows)
        assert b.names[t] == name
        assert torch.equal(b.X[t, :n], torch.as_tensor(np.concatenate(Xs)[rows]))
    frame = pd.DataFrame(np.concatenate(Xs), columns=[f"x{i}" for i in range(6)]).assign(y=np.concatenate(ys), task=ids, note="text")
    frame.to_csv(tmp_path / "data.csv", index=False)
    frame.to_parquet(tmp_path / "data.parquet")
    for path in ("data.csv", "data.parquet"):
        c = read_tasks(tmp_path / path, "task", "y")
        assert c.feature_names == tuple(f"x{i}" for i in range(6)) and c.names == tuple(names)
        torch.testing.assert_close(c.X, a.X, rtol=0, atol=1e-15)
    chosen = read_tasks(tmp_path / "data.csv", "task", "y", features=["x3", "x1"])
    torch.testing.assert_close(chosen.X[0, : len(ys[0])], torch.as_tensor(Xs[0][:, [3, 1]]))


def test_image_inputs_keep_their_shape():
    images = [np.random.default_rng(t).normal(size=(4 + t, 1, 5, 5)) for t in range(3)]
    tasks = Tasks.from_arrays(images, [np.arange(4 + t) % 2 for t in range(3)], loss="logistic")
    assert tasks.X.shape == (3, 6, 1, 5, 5) and tasks.input_shape == (1, 5, 5) and tasks.dim == 25


@pytest.mark.parametrize(
    "frame, options, message",
    [
        (pd.DataFrame({"task": ["a", "a"], "x": [1.0, 2.0], "y": [1.0, 2.0]}), dict(label_col="label"), "no label column 'label'"),
        (pd.DataFrame({"task": ["a", "a"], "x": [1.0, 2.0], "y": [1.0, 2.0]}), dict(features=["z"]), "no feature column 'z'"),
        (pd.DataFrame({"task": ["a", "a"], "x": ["1", "b"], "y": [1.0, 2.0]}), dict(features=["x"]), "column 'x', row 2: not a number: 'b'"),
        (pd.DataFrame({"task": ["a", "a"], "x": [1.0, float("nan")], "y": [1.0, 2.0]}), {}, "column 'x', row 2: missing, NaN or Inf"),
        (pd.DataFrame({"task": ["a", "a"], "x": [1.0, float("inf")], "y": [1.0, 2.0]}), {}, "column 'x', row 2: missing, NaN or Inf"),
        (
            pd.DataFrame({"task": ["a", "a", "b"], "x": [1.0, 2.0, 3.0], "y": [0.0, 2.0, 1.0]}),
            dict(loss="logistic"),
            "task 'a': the logistic loss needs labels 0 and 1; got 2",
        ),
        (pd.DataFrame({"task": ["a", "a"], "x": [1.0, 2.0], "y": [0.5, 1.0]}), dict(loss="multiclass"), "multiclass labels must be integers"),
    ],
)
def test_bad_data_names_the_culprit(tmp_path, frame, options, message):
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    options = {"task_col": "task", "label_col": "y", **options}
    with pytest.raises(DataError) as error:
        read_tasks(path, **options)
    assert message in str(error.value) and "\n" not in str(error.value)
    if "task '" not in message and "multiclass" not in message:
        assert str(error.value).startswith(str(path))


def test_split_shots_is_stratified_and_partitions_each_task():
    rng = np.random.default_rng(0)
    ys = [rng.integers(0, 3, size=int(rng.integers(20, 40))) for _ in range(6)]
    ys = [np.concatenate([y, [0, 1, 2] * 3]) for y in ys]  # every class at least 3 times
    Xs = [np.c_[y, rng.normal(size=(len(y), 2))] for y in ys]  # first feature = the label: rows are traceable
    tasks = Tasks.from_arrays(Xs, ys, loss="multiclass")
    support, query = split_shots(tasks, 2, seed=3)
    for t in range(6):
        s = support.X[t][support.mask[t] if support.mask is not None else slice(None)]
        q = query.X[t][query.mask[t] if query.mask is not None else slice(None)]
        assert torch.bincount(s[:, 0].long(), minlength=3).tolist() == [2, 2, 2]
        both = torch.cat([s, q])
        assert len(both) == len(ys[t])
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, torch.as_tensor(Xs[t]).tolist()))
    assert torch.equal(split_shots(tasks, 2, seed=3)[0].X, support.X)
    with pytest.raises(DataError, match="class 0 has 1[0-9]? samples|needs at least"):
        split_shots(tasks, 50, seed=0)


def test_split_samples_holds_out_a_share_of_every_task():
    """``round(share * n_t)`` rows of each task held out (at most ``n_t - 1``), the rest kept, nothing lost
    or shared; tasks that hold out nothing are not in ``held``; the same seed, the same split."""
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 7, 20, 41]
    Xs = [np.c_[np.arange(n) + 100 * t, rng.normal(size=(n, 2))] for t, n in enumerate(sizes)]  # first feature names the row
    ys = [rng.normal(size=n) for n in sizes]
    tasks = Tasks.from_arrays(Xs, ys, names=[f"t{t}" for t in range(len(sizes))])
    kept, held, scored = split_samples(tasks, 0.25, seed=4)
    wanted = [min(round(0.25 * n), n - 1) for n in sizes]  # 0, 0, 1, 2, 5, 10
    assert scored.tolist() == [t for t, h in enumerate(wanted) if h > 0] and held.names == tuple(f"t{t}" for t in scored.tolist())
    assert kept.counts.tolist() == [n - h for n, h in zip(sizes, wanted, strict=True)]
    for row, t in enumerate(scored.tolist()):
        assert int(held.counts[row]) == wanted[t]
    for t, n in enumerate(sizes):
        rows = kept.X[t, : int(kept.counts[t]), 0].tolist()
        if t in scored.tolist():
            row = scored.tolist().index(t)
            rows += held.X[row, : int(held.counts[row]), 0].tolist()
        assert sorted(rows) == [100.0 * t + i for i in range(n)]
    again = split_samples(tasks, 0.25, seed=4)
    assert torch.equal(again[1].X, held.X) and not torch.equal(split_samples(tasks, 0.25, seed=5)[1].X, held.X)
    with pytest.raises(DataError, match="no task with a held-out sample"):
        split_samples(tasks.subset([0, 1]), 0.2)


def test_split_tasks_by_share_and_by_name():
    Xs, ys = ragged_problem(T=10)
    tasks = Tasks.from_arrays(Xs, ys, names=[f"t{i}" for i in range(10)])
    source, target = split_tasks(tasks, 0.3, seed=1)
    assert source.num_tasks == 7 and target.num_tasks == 3 and not set(source.names) & set(target.names)
    source, target = split_tasks(tasks, ["t2", "t5"])
    assert target.names == ("t2", "t5") and source.num_tasks == 8
    with pytest.raises(DataError, match="target task 'zz' is not in the data"):
        split_tasks(tasks, ["zz"])


@pytest.mark.parametrize("method", [partial(AdaptRep, penalty="theory"), FrozenRep])
def test_ragged_source_objective_matches_a_per_task_reference(method):
    """Ragged tasks: the batched fit's objective equals a per-task loop over the unpadded tasks
    at the returned solution, and the fit equals one on per-task statistics computed one by one
    (a fixed penalty: the cross-validated one ends warm-started from its path, another start)."""
    Xs, ys = ragged_problem(T=25, low=10, high=60)
    tasks = Tasks.from_arrays(Xs, ys)
    fitted = method(rank=2, intercept=False, standardize=False).fit(tasks)
    fit = fitted.source_fit
    penalty = fitted.info["source_penalty"]
    per_task = []
    for t, (X, y) in enumerate(zip(Xs, ys, strict=True)):
        X, y = torch.as_tensor(X), torch.as_tensor(y)
        beta = fit.B @ fit.W[t] + fit.V[t]
        value = ((y - X @ beta) ** 2).mean()
        if math.isfinite(penalty):
            value = value + penalty * fit.V[t].norm()
        per_task.append(value)
    assert abs(float(torch.stack(per_task).mean()) - fit.objective) < 1e-8
    G = torch.stack([torch.as_tensor(X.T @ X / len(X)) for X in Xs])
    c = torch.stack([torch.as_tensor(X.T @ y / len(X)) for X, y in zip(Xs, ys, strict=True)])
    q = torch.tensor([float(y @ y / len(y)) for y in ys], dtype=torch.float64)
    assert abs(float(source_objective(fit.B, fit.W, fit.V, G, c, q, penalty)) - fit.objective) < 1e-8
    reference = fit_source(G, c, q, 2, penalty=penalty)  # the objective depends on span(B) only
    torch.testing.assert_close(reference.B @ reference.B.T, fit.B @ fit.B.T, rtol=0, atol=1e-8)
    assert abs(reference.objective - fit.objective) < 1e-10


def test_intercept_equals_least_squares_with_intercept():
    """Target-only with an intercept is ordinary least squares with a column of ones, per task."""
    Xs, ys = ragged_problem(T=6, low=12, high=20, offset=5.0)
    tasks = Tasks.from_arrays(Xs, ys)
    adapted = TargetOnly().fit(tasks).adapt(tasks)
    for t, (X, y) in enumerate(zip(Xs, ys, strict=True)):
        coef = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)[0]
        scaled = adapted.w[t].numpy() / adapted.standardizer.scale.numpy() * adapted.standardizer.label_scale
        np.testing.assert_allclose(scaled, coef[:-1], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(adapted.predict(tasks.X)[t, : len(y)].numpy(), np.c_[X, np.ones(len(X))] @ coef, atol=1e-8)


def test_offsets_and_scales_are_handled_by_intercept_and_standardisation():
    """Tasks with large per-task offsets and badly scaled features: ADAPTREP with its defaults
    (intercept and standardisation on for data without ground truth) predicts the query samples
    about as well as the noise allows; without the intercept it cannot."""
    Xs, ys = ragged_problem(T=60, low=20, high=40, offset=10.0, scale=100.0, delta=0.0)
    tasks = Tasks.from_arrays(Xs, ys, names=[str(t) for t in range(60)])
    source, target = split_tasks(tasks, 0.25, seed=0)
    support, query = split_shots(target, 10, seed=0)
    good = AdaptRep(rank=2).fit(source).adapt(support).score(query)["loss"].mean()
    bad = AdaptRep(rank=2, intercept=False).fit(source).adapt(support).score(query)["loss"].mean()
    assert good < 0.2 and bad > 5 * good  # noise variance 0.09


def test_standardisation_leaves_least_squares_predictions_unchanged():
    Xs, ys = ragged_problem(T=4, low=15, high=20)
    plain = Tasks.from_arrays(Xs, ys)
    scaled = Tasks.from_arrays([X * np.array([1e3, 1, 1e-2, 5, 1, 1]) for X in Xs], ys)
    a = TargetOnly(standardize=False).fit(plain).adapt(plain).predict(plain.X)
    b = TargetOnly().fit(scaled).adapt(scaled).predict(scaled.X)
    torch.testing.assert_close(a * plain.weight, b * plain.weight, rtol=1e-7, atol=1e-7)
    s = Standardizer.fit(scaled)
    flat = torch.cat([torch.as_tensor(X * np.array([1e3, 1, 1e-2, 5, 1, 1])) for X in Xs])
    torch.testing.assert_close(s.mean, flat.mean(0))
    torch.testing.assert_close(s.scale, flat.std(0, unbiased=False))


def test_simulated_tasks_through_a_csv_give_the_same_predictors(tmp_path):
    """A simulated `linear` task set written to CSV and read back (no intercept, no scaling)
    gives the same predictors as the in-memory tasks."""
    env = LinearEnvironment(dim=5, rank=2, delta=0.3, noise=0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    source, target = env.sample_tasks(30, 20, g), env.sample_tasks(5, 12, g)

    def frame(tasks, prefix):
        X = tasks.X.reshape(-1, 5).numpy()
        return pd.DataFrame(X, columns=[f"x{i}" for i in range(5)]).assign(
            y=tasks.y.reshape(-1).numpy(), task=np.repeat([f"{prefix}{t}" for t in range(tasks.num_tasks)], tasks.num_samples)
        )

    frame(source, "s").to_csv(tmp_path / "source.csv", index=False)
    frame(target, "t").to_csv(tmp_path / "target.csv", index=False)
    read_source, read_target = read_tasks(tmp_path / "source.csv", "task", "y"), read_tasks(tmp_path / "target.csv", "task", "y")
    for method in (AdaptRep, FrozenRep):
        memory = method(intercept=False, standardize=False).fit(source).adapt(target, torch.Generator().manual_seed(1)).beta
        options = dict(rank=2, intercept=False, standardize=False, prior=False)
        disk = method(**options).fit(read_source).adapt(read_target, torch.Generator().manual_seed(1)).beta
        torch.testing.assert_close(disk, memory, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", [AdaptRep, FrozenRep, TargetOnly])
def test_saved_model_predicts_exactly_as_in_memory(tmp_path, method):
    Xs, ys = ragged_problem(T=20, offset=2.0, scale=3.0)
    tasks = Tasks.from_arrays(Xs, ys, feature_names=[f"f{i}" for i in range(6)])
    source, target = split_tasks(tasks, 0.25, seed=0)
    fitted = method(rank=2).fit(source) if method is not TargetOnly else method().fit(source)
    save_method(fitted, tmp_path / "m.adaptrep")
    loaded = load_method(tmp_path / "m.adaptrep")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded.adapt(target, g()).predict(target.X), fitted.adapt(target, g()).predict(target.X))
    assert loaded.spec.feature_names == tuple(f"f{i}" for i in range(6))


def test_foreign_model_file_is_refused(tmp_path):
    path = tmp_path / "model.adaptrep"
    path.write_bytes(b"not a model at all")
    with pytest.raises(DataError, match="is not an adaptrep model file"):
        load_method(path)


def test_query_loss_minus_noise_is_the_exact_excess_risk():
    """Scoring without ground truth agrees with the exact excess risk: on simulated `linear` targets,
    the mean squared error on fresh query samples minus sigma^2 equals ||beta_hat - beta||^2 within
    Monte Carlo error."""
    env = LinearEnvironment(dim=8, rank=2, delta=0.3, noise=0.5, seed=1)
    g = torch.Generator().manual_seed(4)
    source = env.sample_tasks(60, 30, g)
    support = env.sample_tasks(10, 15, g)
    query = env.sample_tasks(10, 4000, g, beta=support.beta)
    adapted = AdaptRep().fit(source).adapt(support, torch.Generator().manual_seed(0))
    exact = env.excess_risk(adapted.beta, support.beta)
    estimate = adapted.score(query)["loss"] - env.noise**2
    errors = (adapted.predict(query.X) - query.y) ** 2  # their spread gives the Monte Carlo error
    se = errors.std(-1) / math.sqrt(errors.shape[-1])
    assert bool(((estimate - exact).abs() < 4 * se).all()), (estimate, exact, se)
