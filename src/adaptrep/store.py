"""The results store of a sweep folder: one SQLite database, ``DIR/sweep.db``, in WAL mode.

Two tables. ``runs`` holds one row per unit of work (one resolved config x one seed, keyed by a
hash of both): its config, seed, labels (the sweep's grid values), status (``pending``,
``running``, ``done``, ``failed``), owner, timestamps, error message and library versions.
``results`` holds the numbers in long format, one row per run x result row x metric, with the
result row's keys (method, m, target task) beside it.

A run's results and its ``done`` status are written in one transaction, so a crash (even
``kill -9``) leaves every run either finished with all its rows or unfinished with none; the
primary keys make duplicates impossible. Only the sweep's driver process writes; several
drivers may share one store (they claim runs before computing them, and skip runs that a live
driver has claimed).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["Store", "StoreError", "KEY_COLUMNS", "describe_labels"]

#: The columns that identify a result row within a run; every other column is a numeric metric.
KEY_COLUMNS = ("method", "m", "target_task")
#: Columns that come from the run, not from its result rows.
RUN_COLUMNS = ("setting", "seed")
#: The leading columns of the results table, in order; labels, ``experiment`` and ``run_id`` follow.
COLUMNS = (
    "setting",
    "method",
    "m",
    "seed",
    "target_task",
    "excess_risk",
    "subspace_distance",
    "opt_block_share",
    "finetune_strength",
    "source_objective",
    "source_grad_norm",
    "source_time",
    "adapt_time",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    labels TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    duration REAL,
    error TEXT,
    versions TEXT
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL REFERENCES runs (id),
    row INTEGER NOT NULL,
    method TEXT NOT NULL,
    m INTEGER NOT NULL,
    target_task INTEGER NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, row, metric)
) WITHOUT ROWID;
"""


class StoreError(RuntimeError):
    """The store cannot be opened or holds something unexpected; the message is one line."""


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _alive(owner: str | None) -> bool:
    """Whether the driver that claimed a run still runs (drivers of one store share a host:
    SQLite's WAL mode needs shared memory)."""
    if not owner:
        return False
    host, pid, _ = owner.split(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A sweep's SQLite store. ``Store(path)`` creates it if needed."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.owner = _owner()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=120.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=120000")
            self._db.executescript(SCHEMA)
        except (sqlite3.DatabaseError, OSError) as error:
            raise StoreError(f"cannot open the results store {self.path}: {error}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- runs -------------------------------------------------------------------------------

    def add(self, run_id: str, config: dict[str, Any], seed: int, labels: dict[str, Any]) -> None:
        """Register a run as pending (a run already known keeps its status; its labels follow
        the latest sweep that names it)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (id, config, seed, labels, status, created) VALUES (?, ?, ?, ?, 'pending', ?) "
                "ON CONFLICT (id) DO UPDATE SET labels = excluded.labels",
                (run_id, json.dumps(config, sort_keys=True), seed, json.dumps(labels, sort_keys=True), time.time()),
            )

    def status(self, run_id: str) -> str | None:
        row = self._db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else str(row[0])

    def claim(self, run_id: str, retry_failed: bool = False) -> str:
        """Claim a run for this driver. Returns ``"claimed"``, or why not: ``"done"``,
        ``"failed"`` (an earlier failure, without ``retry_failed``) or ``"busy"`` (a live
        driver is computing it). A run left ``running`` by a dead driver is claimed again."""
        with self._transaction() as db:
            row = db.execute("SELECT status, owner FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"run {run_id} is not in the store {self.path}")
            status, owner = row
            if status == "done":
                return "done"
            if status == "failed" and not retry_failed:
                return "failed"
            if status == "running" and owner != self.owner and _alive(owner):
                return "busy"
            db.execute(
                "UPDATE runs SET status = 'running', owner = ?, started = ?, attempts = attempts + 1, error = NULL WHERE id = ?",
                (self.owner, time.time(), run_id),
            )
            return "claimed"

    def finish(self, run_id: str, rows: pd.DataFrame, duration: float, versions: dict[str, str]) -> None:
        """Store a run's result rows and mark it done, atomically."""
        records = list(_long_records(run_id, rows))
        with self._transaction() as db:
            db.execute("DELETE FROM results WHERE run_id = ?", (run_id,))
            db.executemany("INSERT INTO results (run_id, row, method, m, target_task, metric, value) VALUES (?, ?, ?, ?, ?, ?, ?)", records)
            db.execute(
                "UPDATE runs SET status = 'done', owner = NULL, finished = ?, duration = ?, error = NULL, versions = ? WHERE id = ?",
                (time.time(), duration, json.dumps(versions, sort_keys=True), run_id),
            )

    def fail(self, run_id: str, message: str) -> None:
        """Mark a run failed with its error message."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET status = 'failed', owner = NULL, finished = ?, error = ? WHERE id = ?", (time.time(), message, run_id))

    def unclaim(self, run_id: str) -> None:
        """Return one run this driver claimed to ``pending`` (its worker was lost)."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET status = 'pending', owner = NULL WHERE id = ? AND owner = ?", (run_id, self.owner))

    def release(self) -> int:
        """Return this driver's unfinished claims to ``pending`` (after an interruption)."""
        with self._transaction() as db:
            return db.execute("UPDATE runs SET status = 'pending', owner = NULL WHERE status = 'running' AND owner = ?", (self.owner,)).rowcount

    # -- reading ------------------------------------------------------------------------------

    def runs(self) -> pd.DataFrame:
        """One row per run: id, status, seed, config and labels (parsed), timings, error."""
        frame = pd.read_sql_query(
            "SELECT rowid AS position, id, status, seed, config, labels, attempts, created, started, finished, duration, error, versions "
            "FROM runs ORDER BY rowid",
            self._db,
        )
        for column in ("config", "labels", "versions"):
            frame[column] = [json.loads(text) if isinstance(text, str) else {} for text in frame[column]]
        return frame

    def experiments(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(config, labels) of every experiment in the store, indexed by experiment number (the
        numbers of :meth:`results`; runs are never removed, so numbers never shift)."""
        runs = self.runs()
        first: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        for number, config, labels in zip(_experiment_numbers(runs), runs["config"], runs["labels"], strict=True):
            first.setdefault(number, (config, labels))
        return [first[number] for number in sorted(first)]

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        return {str(status): int(count) for status, count in rows}

    def results(self) -> pd.DataFrame:
        """The finished runs' results as one wide table, one row per method x m x seed x target
        task of each run, with the run's setting, seed, labels, experiment number and id.

        A run's id hashes the adaptrep version, so a folder resumed after an upgrade that changed
        the numbers holds two finished runs of one config and seed: only the one finished last is
        in the table (the older stays in the store), so that no seed counts twice.
        """
        every = self.runs()
        every["experiment"] = _experiment_numbers(every)  # numbered over all runs, finished or not
        runs = every[every["status"] == "done"]
        keys = pd.Series([json.dumps(config, sort_keys=True) for config in runs["config"]], index=runs.index)
        latest = runs.assign(key=keys).sort_values("finished", kind="stable").drop_duplicates(["key", "seed"], keep="last").index
        runs = runs.loc[runs.index.isin(latest)]
        if runs.empty:
            return pd.DataFrame()
        long = pd.read_sql_query(
            "SELECT r.run_id, r.row, r.method, r.m, r.target_task, r.metric, r.value FROM results r JOIN runs ON runs.id = r.run_id WHERE runs.status = 'done'",
            self._db,
        )
        wide = long.pivot(index=["run_id", "row", *KEY_COLUMNS], columns="metric", values="value").reset_index()
        wide.columns.name = None
        info = pd.DataFrame(
            {
                "run_id": runs["id"].to_numpy(),
                "setting": [c["setting"] for c in runs["config"]],
                "seed": runs["seed"].to_numpy(),
                "experiment": runs["experiment"].to_numpy(),
                "position": runs["position"].to_numpy(),
            }
        )
        labels = pd.DataFrame([{k: _cell(v) for k, v in item.items()} for item in runs["labels"]])
        labels = labels.drop(columns=[c for c in labels if c in info or c in wide], errors="ignore")
        info = pd.concat([info, labels.set_index(info.index)], axis=1)
        table = wide.merge(info, on="run_id", how="inner").sort_values(["experiment", "seed", "position", "row"], kind="stable")
        table = table.drop(columns=["row", "position"]).reset_index(drop=True)
        leading = [c for c in COLUMNS if c in table]
        trailing = [c for c in table if c not in COLUMNS and c not in ("experiment", "run_id")]
        return table[[*leading, *trailing, "experiment", "run_id"]]


def _experiment_numbers(runs: pd.DataFrame) -> list[int]:
    """Runs that share a config (all but the seed) form one experiment; experiments are numbered
    in the order their first run entered the store."""
    keys = [json.dumps(config, sort_keys=True) for config in runs["config"]]
    numbers = {key: number for number, key in enumerate(dict.fromkeys(keys))}
    return [numbers[key] for key in keys]


def _cell(value: Any) -> Any:
    """A label value as a table cell: lists become comma-separated text."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


def describe_labels(labels: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """A run's or experiment's sweep values as ``key=value, ...`` (lists comma-separated)."""
    return ", ".join(f"{key}={_cell(value)}" for key, value in labels.items() if key not in skip)


def _long_records(run_id: str, rows: pd.DataFrame) -> Iterator[tuple[Any, ...]]:
    metrics = [c for c in rows.columns if c not in KEY_COLUMNS and c not in RUN_COLUMNS and c != "experiment"]
    for position, values in enumerate(rows.to_dict("records")):
        for metric in metrics:
            value = values[metric]
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise StoreError(f"result column {metric!r} is not numeric ({value!r})") from None
            yield (run_id, position, str(values["method"]), int(values["m"]), int(values["target_task"]), metric, None if math.isnan(number) else number)
