"""Task data: the one dataset type of adaptrep, and how to build, split and scale it.

A :class:`Tasks` holds ``T`` tasks of inputs and labels and nothing else that a user must supply.
Tasks may have different numbers of samples (*ragged*): they are stored padded to the largest,
``X (T, n_max, *input_shape)`` and ``y (T, n_max)``, with a boolean ``mask (T, n_max)`` that marks the
real samples. Padded entries are **zero** in ``X`` and ``y``, so that sums over samples (the
sufficient statistics ``X_t^T X_t``, ``X_t^T y_t``, products ``X_t v``) need no mask at all and only
the division by the task's own count ``n_t`` does; losses are weighted means with the mask as weight.
Every hot path therefore stays one batched computation over tasks.

Ground truth is optional: ``beta`` (the true task parameters) and ``representation`` (``B*``) are
attached by the simulated environments for scoring and by nobody else.

Constructors: :meth:`Tasks.from_arrays` (one array per task), :meth:`Tasks.from_ids` (one array with
a task id per row), :meth:`Tasks.from_frame` (a pandas DataFrame with a task column) and
:func:`read_tasks` (CSV or Parquet files). :func:`split_tasks` draws source and target tasks,
:func:`split_shots` the support ("shots") and query samples of each target task, stratified by class
for classification. :class:`Standardizer` scales features with statistics of the source tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Tasks", "DataError", "LOSSES", "read_tasks", "split_tasks", "split_shots", "split_samples", "Standardizer", "pad"]

#: The losses a task set can be labelled for.
LOSSES = ("squared", "logistic", "multiclass")


class DataError(ValueError):
    """Unusable task data; the message is one line naming the culprit (file, column, task, row)."""


@dataclass(frozen=True)
class Tasks:
    """``T`` tasks of inputs and labels, possibly of different sizes (see the module docstring).

    Attributes:
        X: inputs ``(T, n_max, *input_shape)`` (vectors: ``(T, n, d)``; images: ``(T, n, C, H, W)``),
            zero where ``mask`` is false.
        y: labels ``(T, n_max)``: real numbers (``squared``), 0/1 (``logistic``) or class indices
            ``0 .. N_t - 1`` per task (``multiclass``; see ``classes``), zero where ``mask`` is false.
        beta: true task parameters (simulated environments only; for scoring).
        representation: the environment's true representation ``B*`` (simulated only).
        loss: ``"squared"``, ``"logistic"`` or ``"multiclass"``.
        model: the simulated environment's kind of predictor (``"linear"``, ``"relu"``, ``"mlp"``), which
            its ``beta`` describes; real data are ``"linear"`` and methods choose their own model.
        mask: ``(T, n_max)`` booleans, true for real samples; ``None`` when every task has ``n_max``.
        names: task names (e.g. the values of the task column), ``None`` for ``0 .. T-1``.
        feature_names: names of the input features (vector inputs from tables).
        classes: ``multiclass``: ``(T, N_max)`` original label of each per-task class index (``NaN``
            where a task has fewer classes); labels are relabelled per task to ``0 .. N_t - 1``.
    """

    X: Tensor
    y: Tensor
    beta: Tensor | None = None
    representation: Tensor | None = None
    loss: str = "squared"
    model: str = "linear"
    mask: Tensor | None = None
    names: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] | None = None
    classes: Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.X.ndim < 3 or self.y.shape != self.X.shape[:2]:
            raise DataError(f"Tasks need X of shape (T, n, ...) and y of shape (T, n); got {tuple(self.X.shape)} and {tuple(self.y.shape)}")
        if self.loss not in LOSSES:
            raise DataError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.mask is not None:
            if self.mask.shape != self.y.shape or self.mask.dtype != torch.bool:
                raise DataError(f"mask must be a boolean tensor of shape {tuple(self.y.shape)}; got {self.mask.dtype} {tuple(self.mask.shape)}")
            empty = (~self.mask.any(1)).nonzero()
            if empty.numel():
                raise DataError(f"task {self._name(int(empty[0]))} has no samples")
        if not (_all_finite(self.X) and _all_finite(self.y)):
            raise DataError("Tasks contain NaN or Inf values in X or y")
        if self.names is not None and len(self.names) != self.num_tasks:
            raise DataError(f"{len(self.names)} task names for {self.num_tasks} tasks")
        _check_labels(self.y, self.loss, self.mask, self._name)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return int(self.X.shape[0])

    @property
    def num_samples(self) -> int:
        """The largest number of samples of a task (``n_max``; every task's with no mask)."""
        return int(self.X.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[2:])

    @property
    def dim(self) -> int:
        """Number of input features (``d``; the product of ``input_shape`` for tensors)."""
        return math.prod(self.input_shape)

    @property
    def ragged(self) -> bool:
        return self.mask is not None and not bool(self.mask.all())

    @property
    def counts(self) -> Tensor:
        """Samples per task ``n_t`` (``(T,)``, in ``X``'s dtype)."""
        if self.mask is None:
            return torch.full((self.num_tasks,), float(self.num_samples), dtype=self.X.dtype, device=self.X.device)
        return self.mask.sum(1).to(self.X.dtype)

    @property
    def weight(self) -> Tensor:
        """``(T, n_max)``: 1 for real samples, 0 for padding (in ``X``'s dtype)."""
        if self.mask is None:
            return torch.ones(self.y.shape, dtype=self.X.dtype, device=self.X.device)
        return self.mask.to(self.X.dtype)

    @property
    def num_classes(self) -> int:
        """``multiclass``: the largest number of classes of a task (``N``); 2 for ``logistic``."""
        if self.loss == "logistic":
            return 2
        if self.loss != "multiclass":
            raise DataError("num_classes is defined for classification tasks only")
        return int(self.y.max().item()) + 1

    def _name(self, index: int) -> str:
        return repr(self.names[index]) if self.names is not None else str(index)

    def task_name(self, index: int) -> str:
        """The name of task ``index`` (its value in the task column, or its index)."""
        return self.names[index] if self.names is not None else str(index)

    # -- statistics ---------------------------------------------------------------------------
    def gram(self, center: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Sufficient statistics of the squared loss, per task: ``G = X^T X / n_t``,
        ``c = X^T y / n_t``, ``q = y^T y / n_t`` (vector inputs).

        The mean squared error of a predictor ``beta`` is ``beta^T G beta - 2 c^T beta + q``. With
        ``center``, the statistics of the data centred by the task's own means (covariances): the
        same for the loss with a free per-task intercept, which is thus profiled out exactly.
        """
        X = self.X.reshape(self.num_tasks, self.num_samples, -1)
        n = self.counts
        G = X.transpose(-1, -2) @ X / n[:, None, None]
        c = (X.transpose(-1, -2) @ self.y.unsqueeze(-1)).squeeze(-1) / n[:, None]
        q = (self.y * self.y).sum(-1) / n
        if center:
            mx, my = self.means()
            G = G - mx.unsqueeze(-1) * mx.unsqueeze(-2)
            c = c - mx * my.unsqueeze(-1)
            q = q - my * my
        return G, c, q

    def means(self) -> tuple[Tensor, Tensor]:
        """Per-task means of the inputs (``(T, d)``) and labels (``(T,)``) over real samples."""
        X = self.X.reshape(self.num_tasks, self.num_samples, -1)
        n = self.counts
        return X.sum(1) / n[:, None], self.y.sum(1) / n

    # -- transformations ----------------------------------------------------------------------
    def subset(self, index: Sequence[int] | Tensor) -> Tasks:
        """The tasks ``index`` (in that order), padding trimmed to the largest of them."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = None if self.mask is None else self.mask[index.to(self.mask.device)]
        n = self.num_samples if mask is None else max(1, int(mask.sum(1).max()))
        dev = index.to(self.X.device)
        return replace(
            self,
            X=self.X[dev][:, :n],
            y=self.y[dev][:, :n],
            mask=None if mask is None or bool(mask[:, :n].all()) else mask[:, :n],
            beta=None if self.beta is None else self.beta[index.to(self.beta.device)],
            names=None if self.names is None else tuple(self.names[i] for i in index.tolist()),
            classes=None if self.classes is None else self.classes[index.to(self.classes.device)],
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tasks:
        """The same tasks on ``device`` with floating tensors in ``dtype``."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype is not None else t.dtype)

        return replace(
            self,
            X=self.X.to(device=device, dtype=dtype),
            y=self.y.to(device=device, dtype=dtype),
            beta=move(self.beta),
            representation=move(self.representation),
            mask=None if self.mask is None else self.mask.to(device),
        )

    def flat(self) -> Tensor:
        """Inputs as vectors, ``(T, n_max, d)``."""
        return self.X.reshape(self.num_tasks, self.num_samples, -1)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        X: Sequence[Any],
        y: Sequence[Any],
        *,
        loss: str = "squared",
        names: Sequence[Any] | None = None,
        feature_names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> Tasks:
        """Tasks from one input array ``(n_t, *input_shape)`` and one label array ``(n_t,)`` per task
        (numpy arrays, tensors or nested lists; sizes may differ)."""
        if len(X) != len(y):
            raise DataError(f"{len(X)} input arrays but {len(y)} label arrays")
        if not len(X):
            raise DataError("no tasks given")
        xs = [np.asarray(x, dtype=np.float64) for x in X]
        ys = [np.asarray(v, dtype=np.float64).reshape(-1) for v in y]
        task_names = tuple(str(name) for name in names) if names is not None else None
        label = (lambda t: repr(task_names[t])) if task_names is not None else str
        shape = xs[0].shape[1:] if xs[0].ndim > 1 else ()
        for t, (x, v) in enumerate(zip(xs, ys, strict=True)):
            if x.ndim == 1 and not shape:
                raise DataError(f"task {label(t)}: inputs must have one row per sample, shape (n, d); got shape {x.shape}")
            if x.shape[1:] != shape:
                raise DataError(f"task {label(t)}: inputs of shape {x.shape[1:]} per sample; task {label(0)} has {shape}")
            if x.shape[0] != v.shape[0]:
                raise DataError(f"task {label(t)}: {x.shape[0]} input rows but {v.shape[0]} labels")
            if x.shape[0] == 0:
                raise DataError(f"task {label(t)} has no samples")
            bad = ~(np.isfinite(x).reshape(len(x), -1).all(1) & np.isfinite(v))
            if bad.any():
                raise DataError(f"task {label(t)}, row {int(np.argmax(bad))}: NaN or Inf value")
        Xp, yp, mask = pad(xs, ys)
        classes = None
        if loss == "multiclass":
            yp, classes = _relabel(yp, mask, label)
        tensor = lambda a: torch.as_tensor(a, dtype=dtype).to(device)  # noqa: E731
        return cls(
            tensor(Xp),
            tensor(yp),
            loss=loss,
            mask=None if mask.all() else torch.as_tensor(mask).to(device),
            names=task_names,
            feature_names=tuple(feature_names) if feature_names is not None else None,
            classes=None if classes is None else torch.as_tensor(classes, dtype=torch.float64),
        )

    @classmethod
    def from_ids(cls, X: Any, y: Any, task_ids: Any, **options: Any) -> Tasks:
        """Tasks from one input array ``(N, ...)``, labels ``(N,)`` and a task id per row; tasks are in
        the order of their first row, samples in row order (``options`` as :meth:`from_arrays`)."""
        X, y, ids = np.asarray(X), np.asarray(y), np.asarray(task_ids)
        if not (len(X) == len(y) == len(ids)):
            raise DataError(f"{len(X)} input rows, {len(y)} labels and {len(ids)} task ids: they must match")
        codes, order, names = _group(ids)
        starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
        rows = np.split(order, starts[1:])
        return cls.from_arrays([X[r] for r in rows], [y[r] for r in rows], names=[str(n) for n in names], **options)

    @classmethod
    def from_frame(cls, frame: Any, task_col: str, label_col: str, features: Sequence[str] | None = None, *, source: str = "data", **options: Any) -> Tasks:
        """Tasks from a pandas DataFrame with one row per sample: ``task_col`` names the task,
        ``label_col`` holds the label, ``features`` the input columns (default: every other numeric
        column). ``source`` names the data in error messages (e.g. the file)."""
        import pandas as pd

        columns = [str(c) for c in frame.columns]
        for role, name in (("task", task_col), ("label", label_col)):
            if name not in columns:
                raise DataError(f"{source}: no {role} column {name!r}; columns are {', '.join(columns)}")
        if features is None:
            features = [c for c in columns if c not in (task_col, label_col) and pd.api.types.is_numeric_dtype(frame[c])]
            if not features:
                raise DataError(f"{source}: no numeric feature columns besides {task_col!r} and {label_col!r}")
        else:
            features = list(features)
            missing = [c for c in features if c not in columns]
            if missing:
                raise DataError(f"{source}: no feature column {missing[0]!r}; columns are {', '.join(columns)}")
            if len(set(features)) != len(features):
                raise DataError(f"{source}: a feature column is listed twice")
            if task_col in features or label_col in features:
                raise DataError(f"{source}: the task and label columns cannot also be features")
        for name in [*features, label_col]:
            values = frame[name]
            if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values) and name != label_col:
                numeric = pd.to_numeric(values, errors="coerce")
                bad = numeric.isna() & values.notna()
                if bad.any():
                    row = int(np.argmax(bad.to_numpy()))
                    raise DataError(f"{source}: column {name!r}, row {row + 1}: not a number: {values.iloc[row]!r}")
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(numbers)
            if bad.any():
                row = int(np.argmax(bad))
                raise DataError(f"{source}: column {name!r}, row {row + 1}: missing, NaN or Inf value")
        tasks = frame[task_col]
        if tasks.isna().any():
            row = int(np.argmax(tasks.isna().to_numpy()))
            raise DataError(f"{source}: column {task_col!r}, row {row + 1}: missing task id")
        X = frame[features].apply(pd.to_numeric).to_numpy(dtype=np.float64)
        y = pd.to_numeric(frame[label_col]).to_numpy(dtype=np.float64)
        return cls.from_ids(X, y, tasks.astype(str).to_numpy(), feature_names=features, **options)


def pad(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-padded ``(T, n_max, ...)`` inputs, ``(T, n_max)`` labels and the mask of real samples."""
    counts = np.array([len(v) for v in ys])
    T, n = len(ys), int(counts.max())
    X = np.zeros((T, n, *xs[0].shape[1:]), dtype=np.float64)
    y = np.zeros((T, n), dtype=np.float64)
    mask = np.arange(n)[None, :] < counts[:, None]
    X[mask] = np.concatenate(list(xs))
    y[mask] = np.concatenate(list(ys))
    return X, y, mask


def _group(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Codes of the ids in order of first appearance, a stable order of the rows by code, the names."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    codes = rank[inverse.reshape(-1)]
    names = [ids[i] for i in np.sort(first)]
    return codes, np.argsort(codes, kind="stable"), names


def _relabel(y: np.ndarray, mask: np.ndarray, label: Any) -> tuple[np.ndarray, np.ndarray]:
    """Class indices ``0 .. N_t - 1`` per task (in the order of the sorted labels) and each task's classes."""
    valid = y[mask]
    if not np.all(valid == np.round(valid)):
        t = int(np.argmax((~(y == np.round(y)) & mask).any(1)))
        raise DataError(f"task {label(t)}: multiclass labels must be integers (class ids); got {y[t][mask[t] & (y[t] != np.round(y[t]))][0]}")
    T = y.shape[0]
    per_task = [np.unique(y[t][mask[t]]) for t in range(T)]  # a per-task loop at load time only
    N = max(len(c) for c in per_task)
    classes = np.full((T, N), np.nan)
    out = np.zeros_like(y)
    for t, c in enumerate(per_task):
        classes[t, : len(c)] = c
        out[t] = np.where(mask[t], np.searchsorted(c, y[t]), 0)
    return out, classes


def _all_finite(values: Tensor) -> bool:
    """Whether every entry is finite, without a full-size temporary (``torch.isfinite`` of a large
    ``X`` allocated a copy of it): a finite sum means every entry is finite; an infinite or NaN sum is
    checked again task by task, since finite values can overflow a sum."""
    if not values.is_floating_point() or bool(torch.isfinite(values.sum())):
        return True
    return all(bool(torch.isfinite(part).all()) for part in values)


def _check_labels(y: Tensor, loss: str, mask: Tensor | None, name: Any) -> None:
    """One-line :class:`DataError` for labels that do not fit the loss."""
    valid = y if mask is None else torch.where(mask, y, torch.zeros_like(y))
    if loss == "logistic":
        bad = (valid != 0) & (valid != 1)
        if bool(bad.any()):
            t = int(bad.any(1).nonzero()[0])
            raise DataError(f"task {name(t)}: the logistic loss needs labels 0 and 1; got {valid[t][bad[t]][0].item():g}")
    elif loss == "multiclass":
        bad = (valid < 0) | (valid != valid.round())
        if bool(bad.any()):
            t = int(bad.any(1).nonzero()[0])
            raise DataError(f"task {name(t)}: multiclass labels must be class indices 0, 1, ...; got {valid[t][bad[t]][0].item():g}")


def read_tasks(path: str | Path, task_col: str, label_col: str, features: Sequence[str] | None = None, **options: Any) -> Tasks:
    """Tasks from a CSV or Parquet file (by its suffix; ``.parquet``/``.pq`` need pyarrow) with one row
    per sample (see :meth:`Tasks.from_frame`). Errors name the file, column and row."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path)
    except ImportError as error:
        raise DataError(f"{path}: reading Parquet needs pyarrow ({error})") from None
    except Exception as error:  # noqa: BLE001 - any parser failure is a bad file
        raise DataError(f"{path}: cannot read as {'Parquet' if path.suffix.lower() in ('.parquet', '.pq') else 'CSV'}: {str(error).splitlines()[0]}") from None
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return Tasks.from_frame(frame, task_col, label_col, features, source=str(path), **options)


# -- splits ---------------------------------------------------------------------------------------


def split_tasks(tasks: Tasks, target: float | Sequence[str], seed: int = 0) -> tuple[Tasks, Tasks]:
    """``(source, target)`` tasks: a random ``target`` fraction of the tasks (at least one, and at
    least one left as source), or the tasks named in ``target`` (their ``names``)."""
    T = tasks.num_tasks
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        if not 0 < target < 1:
            raise DataError(f"the target fraction must be in (0, 1); got {target}")
        count = min(T - 1, max(1, round(target * T)))
        if T < 2:
            raise DataError("splitting into source and target tasks needs at least 2 tasks")
        order = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
        chosen = order[:count].sort().values
    else:
        names = [tasks.task_name(t) for t in range(T)]
        wanted = [str(name) for name in target]  # type: ignore[union-attr]
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise DataError(f"target task {unknown[0]!r} is not in the data")
        chosen = torch.tensor(sorted({names.index(name) for name in wanted}), dtype=torch.long)
        if len(chosen) == T:
            raise DataError("every task is a target: no source tasks are left")
    rest = torch.ones(T, dtype=torch.bool)
    rest[chosen] = False
    return tasks.subset(rest.nonzero().squeeze(1)), tasks.subset(chosen)


def _random_keys(tasks: Tasks, seed: int) -> tuple[Tensor, Tensor]:
    """``(valid, key)``: which entries are real samples, and a uniform random key per sample from
    ``seed`` (padding gets 2, so it sorts after every real sample)."""
    T, n = tasks.y.shape
    valid = tasks.mask if tasks.mask is not None else torch.ones(T, n, dtype=torch.bool, device=tasks.y.device)
    key = torch.rand(T, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(tasks.y.device)
    return valid, torch.where(valid, key, torch.full_like(key, 2.0))


def split_shots(tasks: Tasks, shots: int, seed: int = 0, stratify: bool | None = None) -> tuple[Tasks, Tasks]:
    """``(support, query)``: ``shots`` random samples of each task as its support (for
    classification, with ``stratify`` (default), ``shots`` samples *of each class*: N-way K-shot)
    and the task's other samples as its query. One-line :class:`DataError` when a task (or class)
    has too few samples to leave at least one for the query."""
    if shots < 1:
        raise DataError(f"shots must be at least 1; got {shots}")
    stratify = tasks.loss != "squared" if stratify is None else stratify
    valid, key = _random_keys(tasks, seed)
    if stratify:
        labels = torch.where(valid, tasks.y, torch.full_like(tasks.y, -1)).long()
        N = int(labels.max()) + 1
        onehot = torch.nn.functional.one_hot(labels.clamp_min(0), N).to(torch.long) * valid.unsqueeze(-1)
        per_class = onehot.sum(1)  # (T, N)
        present = per_class > 0
        short = present & (per_class <= shots)
        if bool(short.any()):
            t, c = (int(v) for v in short.nonzero()[0])
            raise DataError(
                f"task {tasks._name(t)}: class {_class_name(tasks, t, c)} has {int(per_class[t, c])} samples; {shots} shots per class need at least {shots + 1}"
            )
        order = key.argsort(1)  # random order within the task
        ranked = torch.take_along_dim(onehot, order.unsqueeze(-1), 1).cumsum(1)  # rank within its class, in that order
        rank_sorted = (ranked * torch.take_along_dim(onehot, order.unsqueeze(-1), 1)).sum(-1) - 1
        rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
        support = valid & (rank < shots)
    else:
        counts = valid.sum(1)
        if bool((counts <= shots).any()):
            t = int((counts <= shots).nonzero()[0])
            raise DataError(f"task {tasks._name(t)} has {int(counts[t])} samples; {shots} shots need at least {shots + 1}")
        rank = key.argsort(1).argsort(1)
        support = valid & (rank < shots)
    return _select(tasks, support, key), _select(tasks, valid & ~support, key)


def split_samples(tasks: Tasks, share: float, seed: int = 0) -> tuple[Tasks, Tasks, Tensor]:
    """``(kept, held, scored)``: ``round(share * n_t)`` random samples of each task (at most ``n_t - 1``)
    held out. ``kept`` has every task and the rest of its samples; ``held`` only the tasks that hold
    out at least one sample, whose indices are ``scored`` (``(T',)``)."""
    if not 0 < share < 1:
        raise DataError(f"the held-out share must be in (0, 1); got {share}")
    valid, key = _random_keys(tasks, seed)
    counts = valid.sum(1)
    held_count = torch.minimum((share * counts.to(torch.float64)).round().long(), counts - 1)
    scored = (held_count > 0).nonzero().squeeze(1)
    if scored.numel() == 0:
        raise DataError(f"holding out {share:g} of each task's samples leaves no task with a held-out sample")
    held = valid & (key.argsort(1).argsort(1) < held_count.unsqueeze(1))
    part = tasks.subset(scored)  # real samples come first, so its columns are the first of tasks'
    rows = scored.to(held.device)
    return _select(tasks, valid & ~held, key), _select(part, held[rows, : part.num_samples], key[rows, : part.num_samples]), scored


def _class_name(tasks: Tasks, t: int, c: int) -> str:
    if tasks.classes is not None:
        return f"{tasks.classes[t, c].item():g}"
    return str(c)


def _select(tasks: Tasks, chosen: Tensor, key: Tensor) -> Tasks:
    """The samples ``chosen`` (``(T, n)`` booleans) of every task, packed to the front in random
    (``key``) order, as new tasks padded to the largest count."""
    order = torch.where(chosen, key, key + 3.0).argsort(1)
    counts = chosen.sum(1)
    n = int(counts.max())
    order = order[:, :n]
    mask = torch.arange(n, device=chosen.device)[None, :] < counts[:, None]
    X = torch.take_along_dim(tasks.X, order.view(*order.shape, *[1] * (tasks.X.ndim - 2)), 1)
    X = X * mask.view(*mask.shape, *[1] * (X.ndim - 2)).to(X.dtype)
    y = torch.take_along_dim(tasks.y, order, 1) * mask.to(tasks.y.dtype)
    return replace(tasks, X=X, y=y, mask=None if bool(mask.all()) else mask)


# -- feature scaling ------------------------------------------------------------------------------


@dataclass
class Standardizer:
    """Feature standardisation ``(x - mean) / scale`` with the statistics of the source tasks'
    samples (every real sample of every task, per input element), stored with a fitted model.
    Constant features keep scale 1. For the squared loss the labels are standardised too
    (``label_mean``, ``label_scale``; predictions are mapped back), so that every default step size
    and penalty sees data on a unit scale."""

    mean: Tensor
    scale: Tensor
    label_mean: float = 0.0
    label_scale: float = 1.0

    @classmethod
    def fit(cls, tasks: Tasks) -> Standardizer:
        weight = tasks.weight.view(*tasks.y.shape, *[1] * len(tasks.input_shape))
        total = tasks.counts.sum()
        mean = (tasks.X * weight).sum((0, 1)) / total
        var = (((tasks.X - mean) * weight) ** 2).sum((0, 1)) / total
        scale = var.sqrt()
        scale = torch.where(scale > 1e-12 * scale.max().clamp_min(1e-300), scale, torch.ones_like(scale))
        if tasks.loss != "squared":
            return cls(mean, scale)
        label_mean = float(tasks.y.sum() / total)
        label_scale = float((((tasks.y - label_mean) * tasks.weight) ** 2).sum() / total) ** 0.5
        return cls(mean, scale, label_mean, label_scale if label_scale > 0 else 1.0)

    def __call__(self, tasks: Tasks) -> Tasks:
        """The tasks with standardised inputs (and labels for the squared loss; padding stays zero)."""
        mean, scale = self.mean.to(tasks.X), self.scale.to(tasks.X)
        weight = tasks.weight.view(*tasks.y.shape, *[1] * len(tasks.input_shape))
        y = tasks.y if tasks.loss != "squared" else (tasks.y - self.label_mean) / self.label_scale * tasks.weight
        return replace(tasks, X=(tasks.X - mean) / scale * weight, y=y)

    def restore(self, output: Tensor) -> Tensor:
        """Predictions on the standardised label scale mapped back (squared loss)."""
        return output * self.label_scale + self.label_mean

    def transform(self, X: Tensor) -> Tensor:
        """Standardise raw inputs ``(..., *input_shape)``."""
        return (X - self.mean.to(X)) / self.scale.to(X)
