"""``adaptrep predict``: adapt a saved model to the target tasks of a support file and predict the
rows of a query file (a layer on top of :mod:`adaptrep.saving` and :mod:`adaptrep.data`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import DataError, pad, read_tasks
from .saving import load_method, read_metadata

__all__ = ["predict_file", "read_frame"]


def read_frame(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame; :class:`DataError` naming the file otherwise."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        return pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as error:  # noqa: BLE001 - any parser failure is a bad file
        raise DataError(f"{path}: cannot read: {str(error).splitlines()[0]}") from None


def predict_file(model_file: Path, support_file: Path, query_file: Path, out: Path) -> tuple[int, int]:
    """Write ``out``: the query rows with a ``prediction`` column (and class probabilities for
    classification). Returns the numbers of rows and tasks predicted."""
    meta = read_metadata(model_file)
    if meta["spec"]["kind"] == "module":
        raise DataError(f"{model_file} was fitted with your own torch.nn.Module: predict with the Python API (adaptrep.saving.load_method)")
    method = load_method(model_file)
    columns = meta.get("data", {})
    task_col, label_col = columns.get("task_col", "task"), columns.get("label_col", "y")
    features = list(method.spec.feature_names or [])
    loss = method.spec.model.loss
    support = read_tasks(support_file, task_col, label_col, features, loss=loss)
    frame = read_frame(query_file)
    missing = [name for name in [task_col, *features] if name not in frame.columns]
    if missing:
        raise DataError(f"{query_file}: no column {missing[0]!r} (the model was fitted on features {', '.join(features)})")
    values = frame[features].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise DataError(f"{query_file}: column {features[col]!r}, row {row + 1}: missing or not a number")
    names = frame[task_col].astype(str).to_numpy()
    index = {name: t for t, name in enumerate(support.names or ())}
    unknown = [name for name in dict.fromkeys(names) if name not in index]
    if unknown:
        raise DataError(f"{query_file}: task {unknown[0]!r} has no samples in {support_file}")
    task_of = np.array([index[name] for name in names], dtype=np.int64)
    order = np.argsort(task_of, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(task_of[order])) + 1)
    present = [int(task_of[g[0]]) for g in groups]
    X, _, mask = pad([values[g] for g in groups], [np.zeros(len(g)) for g in groups])
    targets = support.subset(present)
    adapted = method.adapt(targets, torch.Generator().manual_seed(0))
    Xq = torch.as_tensor(X, dtype=targets.X.dtype)
    out_frame = frame.copy()
    prediction = np.zeros(len(frame))
    flat_rows = np.concatenate(groups)
    valid = torch.as_tensor(mask)
    if loss == "multiclass":
        index_pred = adapted.predict(Xq)
        labels = adapted.labels(index_pred)
        prediction[flat_rows] = labels[valid].numpy()
        proba = adapted.predict_proba(Xq).max(-1).values
        out_frame["probability"] = np.nan
        out_frame.loc[out_frame.index[flat_rows], "probability"] = proba[valid].numpy()
    else:
        prediction[flat_rows] = adapted.predict(Xq)[valid].detach().numpy()
        if loss == "logistic":
            out_frame["probability"] = np.nan
            out_frame.loc[out_frame.index[flat_rows], "probability"] = adapted.predict_proba(Xq)[valid].detach().numpy()
    out_frame["prediction"] = prediction
    temporary = out.with_name(out.name + ".partial")
    out_frame.to_csv(temporary, index=False)
    temporary.replace(out)
    return len(frame), len(groups)
