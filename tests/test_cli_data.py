"""The command line on task data: adaptrep fit / predict / evaluate, and their bad-data messages (in-process)."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from adaptrep.cli import entry
from adaptrep.data import read_tasks
from adaptrep.methods import AdaptRep
from adaptrep.saving import load_method


def cli(monkeypatch, capsys, *args):
    """Run ``adaptrep ARGS`` in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["adaptrep", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        entry()
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def make_data(path, T=24, d=4, seed=0, loss="squared"):
    rng = np.random.default_rng(seed)
    B = np.linalg.qr(rng.normal(size=(d, 2)))[0]
    frames = []
    for t in range(T):
        n = int(rng.integers(25, 40))
        X = rng.normal(size=(n, d)) * 2 + 3
        f = X @ (B @ rng.normal(size=2)) + rng.normal()
        y = f + 0.3 * rng.normal(size=n) if loss == "squared" else (rng.random(n) < 1 / (1 + np.exp(-f))).astype(float)
        frames.append(pd.DataFrame(X, columns=[f"x{i}" for i in range(d)]).assign(label=y, school=f"s{t:02d}"))
    frame = pd.concat(frames, ignore_index=True)
    frame.to_csv(path, index=False)
    return frame


def test_fit_then_predict_equals_the_python_api(tmp_path, monkeypatch, capsys):
    frame = make_data(tmp_path / "all.csv")
    source = frame[frame["school"] < "s18"]
    target = frame[frame["school"] >= "s18"]
    support = target.groupby("school").head(6)
    query = target.drop(support.index).drop(columns="label")
    source.to_csv(tmp_path / "source.csv", index=False)
    support.to_csv(tmp_path / "support.csv", index=False)
    query.to_csv(tmp_path / "query.csv", index=False)
    model = tmp_path / "model.adaptrep"
    code, _, err = cli(monkeypatch, capsys, "fit", tmp_path / "source.csv", "--task-col", "school", "--label-col", "label", "--rank", "2", "--out", model)
    assert code == 0, err
    code, _, err = cli(
        monkeypatch, capsys, "predict", model, "--support", tmp_path / "support.csv", "--query", tmp_path / "query.csv", "--out", tmp_path / "p.csv"
    )
    assert code == 0, err
    predicted = pd.read_csv(tmp_path / "p.csv")
    assert len(predicted) == len(query) and list(predicted["school"]) == list(query["school"])
    # the same in Python, on the same samples
    method = AdaptRep(rank=2).fit(read_tasks(tmp_path / "source.csv", "school", "label"))
    targets = read_tasks(tmp_path / "support.csv", "school", "label")
    adapted = method.adapt(targets, torch.Generator().manual_seed(0))
    for t, name in enumerate(targets.names):
        rows = query[query["school"] == name]
        X = torch.as_tensor(rows[[f"x{i}" for i in range(4)]].to_numpy().copy())[None].expand(targets.num_tasks, -1, -1)
        expected = adapted.predict(X)[t].numpy()
        np.testing.assert_array_equal(predicted.loc[predicted["school"] == name, "prediction"].to_numpy(), expected)
    assert load_method(model).spec.feature_names == ("x0", "x1", "x2", "x3")


def test_evaluate_writes_results_report_and_resumes(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "all.csv")
    args = ["evaluate", tmp_path / "all.csv", "--task-col", "school", "--label-col", "label", "--rank", "2", "--shots", "5,10"]
    args += ["--methods", "adaptrep,frozenrep,target-only", "--seeds", "2", "--workers", "1", "--out", tmp_path / "out"]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(results["method"]) == {"adaptrep", "frozenrep", "target-only"} and set(results["m"]) == {5, 10}
    assert results.groupby(["method", "m", "seed"]).size().eq(7).all()  # 30% of 24 tasks are targets
    assert results["query_loss"].notna().all() and (results.query("m == 10").groupby("method")["query_loss"].mean()["adaptrep"] < 1.0)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "query loss" in report and "5 shots: best" in report
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and "2 skipped" in err.replace("\n", " ")


def test_evaluate_scores_source_predictors_on_held_out_samples(tmp_path, monkeypatch, capsys):
    """``--source-holdout``: each method's own predictor of every source task, fitted without a quarter
    of that task's samples, scored on them; checked against numpy predictions from the fitted method's
    slopes with intercepts from the kept samples' means, in the original units."""
    from adaptrep.data import split_samples, split_tasks
    from adaptrep.evaluate import resolve_evaluate
    from adaptrep.methods import make_method

    make_data(tmp_path / "all.csv")
    args = ["evaluate", tmp_path / "all.csv", "--task-col", "school", "--label-col", "label", "--rank", "2", "--shots", "5", "--source-holdout", "0.25"]
    args += ["--methods", "adaptrep,frozenrep,perm,target-only", "--seeds", "1", "--workers", "1", "--out", tmp_path / "out"]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    results = pd.read_csv(tmp_path / "out" / "results.csv").groupby("method")[["source_loss_max", "source_loss_mean"]].first()
    assert results.loc["target-only"].isna().all()
    config = resolve_evaluate({"data": str(tmp_path / "all.csv"), "task_col": "school", "label_col": "label", "rank": 2})
    source, _ = split_tasks(read_tasks(tmp_path / "all.csv", "school", "label"), config.target_tasks, 0)
    kept, held, scored = split_samples(source, 0.25, 0)
    for name in ("adaptrep", "frozenrep", "perm"):
        method = make_method(name, config.method_options(0)).fit(kept)
        scaler = method.spec.standardizer
        mean, scale = scaler.mean.numpy(), scaler.scale.numpy()
        losses = []
        for row, t in enumerate(scored.tolist()):
            Xk, yk = kept.X[t, : int(kept.counts[t])].numpy(), kept.y[t, : int(kept.counts[t])].numpy()
            Xh, yh = held.X[row, : int(held.counts[row])].numpy(), held.y[row, : int(held.counts[row])].numpy()
            zk, zh = (Xk - mean) / scale, (Xh - mean) / scale  # the method's standardised units
            uk = (yk - scaler.label_mean) / scaler.label_scale
            beta = method.source_predictors[t].numpy()
            predicted = (uk.mean() + (zh - zk.mean(0)) @ beta) * scaler.label_scale + scaler.label_mean
            losses.append(np.mean((yh - predicted) ** 2))
        assert results.loc[name, "source_loss_max"] == pytest.approx(max(losses), rel=1e-8)
        assert results.loc[name, "source_loss_mean"] == pytest.approx(np.mean(losses), rel=1e-8)
    # the noise variance is 0.09, and every task lies in the shared span
    assert results.loc["adaptrep", "source_loss_mean"] < 0.2
    report = (tmp_path / "out" / "report.md").read_text().splitlines()
    row = [line for line in report if line.startswith("| perm |")][-1].strip("|").split("|")
    assert [float(cell) for cell in row[1:]] == pytest.approx([results.loc["perm", "source_loss_max"], results.loc["perm", "source_loss_mean"]], abs=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "{data}", "--task-col", "nope", "--label-col", "label", "--rank", "2"], "no task column 'nope'"),
        (["fit", "{data}", "--task-col", "school", "--label-col", "label", "--features", "x0,zz", "--rank", "2"], "no feature column 'zz'"),
        (["fit", "{data}", "--task-col", "school", "--label-col", "label", "--loss", "logistic", "--rank", "2"], "the logistic loss needs labels 0 and 1"),
        (["fit", "{data}", "--task-col", "school", "--label-col", "label", "--model", "relu"], "needs rank="),
        (["fit", "{missing}", "--task-col", "school", "--label-col", "label"], "data file not found"),
        (["evaluate", "{data}", "--task-col", "school", "--label-col", "label", "--rank", "2", "--shots", "60"], "60 shots need at least 61"),
        (["evaluate", "{data}", "--task-col", "school", "--label-col", "label", "--methods", "adaptrep,oracle-ft"], "needs a simulated environment"),
        (["evaluate", "{data}", "--task-col", "school", "--label-col", "label", "--source-holdout", "0.2", "--model", "relu"], "it scores linear"),
        (["evaluate", "{data}", "--task-col", "school", "--label-col", "label", "--source-holdout", "1"], "source_holdout"),
        (["evaluate", "{data}", "--task-col", "school", "--label-col", "label", "--source-holdout", "0.01"], "leaves no task with a held-out sample"),
        (["predict", "{foreign}", "--support", "{data}", "--query", "{data}"], "is not an adaptrep model file"),
    ],
)
def test_bad_data_gives_one_line_and_status_2(tmp_path, monkeypatch, capsys, args, message):
    make_data(tmp_path / "data.csv")
    (tmp_path / "foreign.adaptrep").write_bytes(b"\x00" * 64)
    paths = {"data": tmp_path / "data.csv", "missing": tmp_path / "missing.csv", "foreign": tmp_path / "foreign.adaptrep"}
    args = [arg.format(**paths) for arg in args] + ["--out", tmp_path / "out"]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_other_features(tmp_path, monkeypatch, capsys):
    frame = make_data(tmp_path / "data.csv")
    code, _, err = cli(
        monkeypatch, capsys, "fit", tmp_path / "data.csv", "--task-col", "school", "--label-col", "label", "--rank", "2", "--out", tmp_path / "m"
    )
    assert code == 0, err
    frame.drop(columns="x2").to_csv(tmp_path / "other.csv", index=False)
    code, _, err = cli(
        monkeypatch, capsys, "predict", tmp_path / "m", "--support", tmp_path / "other.csv", "--query", tmp_path / "data.csv", "--out", tmp_path / "p.csv"
    )
    assert code == 2 and "no feature column 'x2'" in err
    frame.assign(school="elsewhere").to_csv(tmp_path / "query.csv", index=False)
    code, _, err = cli(
        monkeypatch, capsys, "predict", tmp_path / "m", "--support", tmp_path / "data.csv", "--query", tmp_path / "query.csv", "--out", tmp_path / "p.csv"
    )
    assert code == 2 and "task 'elsewhere' has no samples in" in err
    assert not (tmp_path / "p.csv").exists()
