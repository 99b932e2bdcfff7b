"""The pre-training baselines pretrain-probe / pretrain-ft (adaptrep.pretrain) against closed forms."""

import copy
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from adaptrep.cli import entry
from adaptrep.data import Tasks, split_shots
from adaptrep.methods import METHODS, TargetOnly, make_method
from adaptrep.models import RIDGES
from adaptrep.pretrain import Pretrain, global_labels, pooled
from adaptrep.saving import load_method, save_method


def regression_tasks(T=12, d=4, seed=0, loss="squared", dtype=torch.float64):
    """Ragged tasks around one shared coefficient vector, with per-task offsets."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=d) * (1.0 if loss == "squared" else 3.0)
    xs, ys = [], []
    for _ in range(T):
        n = int(rng.integers(12, 30)) if loss == "squared" else int(rng.integers(40, 60))
        X = rng.normal(size=(n, d)) + (1.0 if loss == "squared" else 0.0)
        f = X @ (beta + 0.2 * rng.normal(size=d)) + (rng.normal() if loss == "squared" else 0.3 * rng.normal())
        ys.append(f + 0.5 * rng.normal(size=n) if loss == "squared" else (rng.random(n) < 1 / (1 + np.exp(-f))).astype(float))
        xs.append(X)
    return Tasks.from_arrays(xs, ys, loss=loss, dtype=dtype)


def class_tasks(num_tasks, classes, ways, per_class, means, rng, ragged=True):
    """N-way tasks over ``classes``: Gaussian samples (unit noise) around each class's mean; labels
    are the original classes (Tasks.from_arrays relabels them per task)."""
    xs, ys = [], []
    for _ in range(num_tasks):
        chosen = rng.choice(classes, ways, replace=False)
        counts = rng.integers(per_class // 2, per_class + 1, size=ways) if ragged else np.full(ways, per_class)
        labels = np.repeat(chosen, counts)
        xs.append(means[labels] + rng.normal(size=(len(labels), means.shape[1])))
        ys.append(labels.astype(float))
    return xs, ys


@pytest.fixture(scope="module")
def few_shot():
    """Base classes 0..7 and novel classes 8..11 whose means share one 3-dimensional subspace of R^20."""
    rng = np.random.default_rng(1)
    d, k = 20, 3
    U = np.linalg.qr(rng.normal(size=(d, k)))[0]
    means = 2.5 * rng.normal(size=(12, k)) @ U.T
    source = Tasks.from_arrays(*class_tasks(40, np.arange(8), 3, 12, means, rng), loss="multiclass")
    target = Tasks.from_arrays(*class_tasks(12, np.arange(8, 12), 3, 12, means, rng, ragged=False), loss="multiclass")
    return source, target, U


@pytest.fixture(scope="module")
def fitted(few_shot):
    """pretrain-probe, and pretrain-ft with 0 and up to 8 steps, fitted on ``few_shot``'s base classes
    (one fit: the options apply to the target step only)."""
    probe = Pretrain(rank=3, train_steps=300).fit(few_shot[0])
    tuned = [copy.copy(probe) for _ in range(2)]
    for method, steps in zip(tuned, (0, 8), strict=True):
        method.finetune, method.max_steps = True, steps
    return probe, *tuned


def test_global_labels_map_every_task_back_to_its_original_classes(few_shot):
    source = few_shot[0]
    index, classes = global_labels(source)
    assert classes.tolist() == list(range(8))
    original = torch.take_along_dim(source.classes, source.y.long(), 1)  # per-task index -> class
    assert torch.equal(classes[index][source.mask], original[source.mask])
    X, y = pooled(source, index)
    assert X.shape[0] == y.shape[0] == int(source.counts.sum())


def test_pooled_head_separates_the_global_classes(few_shot, fitted):
    """One 8-way head over the base classes: it classifies the pooled source samples by their global
    class as well as an independent multinomial logistic regression on all 20 inputs does (impossible
    had the 3-way tasks' per-task indices 0..2 been pooled as labels: at most 3 of the 8 classes)."""
    from sklearn.linear_model import LogisticRegression

    source, method = few_shot[0], fitted[0]
    assert method.head.shape == (4, 8) and method.info["pretrain_classes"] == 8
    index, _ = global_labels(source)
    X, y = pooled(method._prepare(source), index)
    logits = method.spec.model.features(method.theta, X) @ method.head
    accuracy = float((logits.argmax(-1) == y).double().mean())
    raw_X, raw_y = pooled(source, index)
    reference = LogisticRegression(max_iter=2000).fit(raw_X.numpy(), raw_y.numpy()).score(raw_X.numpy(), raw_y.numpy())
    assert accuracy > reference - 0.03 and accuracy > 0.7, (accuracy, reference)


def test_pretrained_representation_transfers_to_novel_classes(few_shot, fitted):
    """The base classes' representation spans the novel classes' subspace: the probe's query accuracy
    is far above chance (1/3) at 1 and 5 shots and above the target-only fit in all 20 dimensions."""
    source, target, U = few_shot
    probe = fitted[0]
    scale = probe.spec.standardizer.scale  # the representation lives in standardised coordinates
    B = probe.representation / scale.unsqueeze(-1)
    B = torch.linalg.qr(B)[0].numpy()
    assert np.linalg.svd(U.T @ B, compute_uv=False).min() > 0.95  # cosines of the principal angles
    only = TargetOnly().fit(source)
    for shots in (1, 5):
        support, query = split_shots(target, shots, seed=shots)
        g = torch.Generator().manual_seed(0)
        accuracy = float(probe.adapt(support, g).score(query)["accuracy"].mean())
        baseline = float(only.adapt(support, torch.Generator().manual_seed(0)).score(query)["accuracy"].mean())
        # measured: 0.73 / 0.63 at 1 shot, 0.78 / 0.72 at 5 shots (the classes overlap within the subspace)
        assert accuracy > {1: 0.6, 5: 0.7}[shots], (shots, accuracy)
        assert accuracy > baseline + 0.04, (shots, accuracy, baseline)


def test_pooled_least_squares_equals_numpy_lstsq():
    tasks = regression_tasks()
    method = Pretrain(standardize=False).fit(tasks)
    rows = tasks.mask
    A = np.c_[tasks.X[rows].numpy(), np.ones(int(rows.sum()))]
    coef = np.linalg.lstsq(A, tasks.y[rows].numpy(), rcond=None)[0]
    beta, bias = method.pooled_fit
    np.testing.assert_allclose(beta.numpy(), coef[:-1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(float(bias), coef[-1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(method.representation[:, 0].numpy(), coef[:-1] / np.linalg.norm(coef[:-1]), atol=1e-10)


def test_probe_head_is_a_ridge_fit_on_the_frozen_features():
    tasks = regression_tasks(T=18)
    source, target = tasks.subset(range(12)), tasks.subset(range(12, 18))
    method = Pretrain(standardize=False).fit(source)
    b = method.representation[:, 0]
    assert target.ragged
    for support in (split_shots(target, 6, seed=0)[0], target):  # 6 shots each, and all samples of ragged targets
        adapted = method.adapt(support, torch.Generator().manual_seed(0))
        for r in range(support.num_tasks):  # the closed form, one target at a time
            keep = support.mask[r] if support.mask is not None else torch.ones(support.num_samples, dtype=torch.bool)
            Phi = torch.stack([support.X[r][keep] @ b, torch.ones(int(keep.sum()), dtype=b.dtype)], -1)
            y = support.y[r][keep]
            m = Phi.shape[0]
            closed = [torch.linalg.solve(Phi.T @ Phi / m + ridge * torch.eye(2, dtype=b.dtype), Phi.T @ y / m) for ridge in RIDGES]
            gap = min(float((adapted.w[r] - w).abs().max()) for w in closed)
            assert gap < 1e-9, (r, gap)


@pytest.mark.parametrize("kind", ["multiclass", "squared"])
def test_finetuning_with_no_steps_is_the_probe(few_shot, fitted, kind):
    if kind == "multiclass":
        target = few_shot[1]
        probe, tuned, moving = fitted
        support, query = split_shots(target, 3, seed=0)
    else:
        tasks = regression_tasks(T=18)
        source, target = tasks.subset(range(12)), tasks.subset(range(12, 18))
        probe, tuned, moving = (Pretrain(**options).fit(source) for options in ({}, {"finetune": True, "max_steps": 0}, {"finetune": True}))
        support, query = split_shots(target, 6, seed=0)
    a = probe.adapt(support, torch.Generator().manual_seed(5)).decision_function(query.X)
    b = tuned.adapt(support, torch.Generator().manual_seed(5)).decision_function(query.X)
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    # with steps allowed: per-target representations, 0 steps for some targets at most
    moved = moving.adapt(support, torch.Generator().manual_seed(5))
    assert moved.stacked and moved.strength is not None and torch.isfinite(moved.decision_function(query.X)).all()


def test_logistic_float32_ragged_and_save_load(tmp_path):
    tasks = regression_tasks(T=20, loss="logistic", dtype=torch.float32)
    source, target = tasks.subset(range(14)), tasks.subset(range(14, 20))
    support, query = split_shots(target, 4, seed=0)
    for name in ("pretrain-probe", "pretrain-ft"):
        method = make_method(name).fit(source)
        adapted = method.adapt(support, torch.Generator().manual_seed(0))
        scores = adapted.score(query)
        assert scores["loss"].dtype == torch.float32 and torch.isfinite(scores["loss"]).all()
        assert float(scores["accuracy"].mean()) > 0.6
        path = save_method(method, tmp_path / f"{name}.adaptrep")
        again = load_method(path)
        torch.testing.assert_close(again.adapt(support, torch.Generator().manual_seed(0)).decision_function(query.X), adapted.decision_function(query.X))


def test_relu_model_and_errors(few_shot):
    source, target, _ = few_shot
    method = Pretrain(model="relu", rank=6, train_steps=200).fit(source)
    assert method.representation.shape == (20, 6)
    support, query = split_shots(target, 5, seed=0)
    assert float(method.adapt(support, torch.Generator().manual_seed(0)).score(query)["accuracy"].mean()) > 0.6
    with pytest.raises(ValueError, match="max_steps"):
        Pretrain(max_steps=-1)
    with pytest.raises(RuntimeError, match="before fit"):
        Pretrain().adapt(target)
    assert {"pretrain-probe", "pretrain-ft"} <= set(METHODS)


def test_evaluate_cli_runs_both_baselines(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    frames = []
    for t in range(16):
        n = int(rng.integers(20, 30))
        X = rng.normal(size=(n, 3))
        frames.append(pd.DataFrame(X, columns=["a", "b", "c"]).assign(y=X @ [1.0, -1.0, 0.5] + rng.normal() + 0.3 * rng.normal(size=n), task=f"s{t}"))
    pd.concat(frames).to_csv(tmp_path / "data.csv", index=False)
    args = ["evaluate", tmp_path / "data.csv", "--methods", "pretrain-probe,pretrain-ft,target-only", "--shots", "5", "--seeds", "1", "--workers", "1"]
    args += ["--out", tmp_path / "out"]
    assert cli(monkeypatch, capsys, *args) == 0
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    loss = results.groupby("method")["query_loss"].mean()
    assert set(loss.index) == {"pretrain-probe", "pretrain-ft", "target-only"}
    assert loss["pretrain-probe"] < loss["target-only"]  # a shared slope: 2 parameters beat 4 at 5 shots
    # fit -> model file -> predict
    frame = pd.read_csv(tmp_path / "data.csv")
    frame[frame["task"] != "s15"].to_csv(tmp_path / "source.csv", index=False)
    target = frame[frame["task"] == "s15"]
    target.head(6).to_csv(tmp_path / "support.csv", index=False)
    target.iloc[6:].drop(columns="y").to_csv(tmp_path / "query.csv", index=False)
    assert cli(monkeypatch, capsys, "fit", tmp_path / "source.csv", "--method", "pretrain-ft", "--out", tmp_path / "m.adaptrep") == 0
    args = ["predict", tmp_path / "m.adaptrep", "--support", tmp_path / "support.csv", "--query", tmp_path / "query.csv", "--out", tmp_path / "p.csv"]
    assert cli(monkeypatch, capsys, *args) == 0
    predicted = pd.read_csv(tmp_path / "p.csv")
    error = float(((predicted["prediction"].to_numpy() - target["y"].iloc[6:].to_numpy()) ** 2).mean())
    assert len(predicted) == len(target) - 6 and error < 1.0, error  # the noise variance is 0.09


def cli(monkeypatch, capsys, *args):
    """``adaptrep ARGS`` in this process: its exit status (stderr shown on failure)."""
    monkeypatch.setattr(sys, "argv", ["adaptrep", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        entry()
    err = capsys.readouterr().err
    assert stop.value.code == 0, err
    return stop.value.code
