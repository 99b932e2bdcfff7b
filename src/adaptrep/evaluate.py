"""Evaluation on task data without ground truth: the real-data counterpart of :mod:`adaptrep.experiment`.

An :class:`EvaluateConfig` names the data (a CSV/Parquet file with a task column, or a dataset of
:mod:`adaptrep.datasets`), the loss and model, the share of tasks held out as targets, the shot
counts and the methods. One unit of work (:func:`evaluate_seed`) splits the tasks into source and
target tasks with the seed, fits every method on the source tasks, and for every shot count draws
each target task's support ("shots") and query samples, adapts on the support and scores on the
query. One row per method x shots x target task, with ``query_loss`` (squared error, log-loss or
cross-entropy) and, for classification, ``query_accuracy``. The store, sweep and report layers are
the same as for the simulated settings.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor

from .data import DataError, Tasks, read_tasks, split_samples, split_shots, split_tasks
from .experiment import keyed_generator
from .methods import METHODS, Method, make_method, synchronize
from .options import Compute, MetaOptions

__all__ = ["EvaluateConfig", "resolve_evaluate", "evaluate_seed", "load_data", "EVALUATE_METHODS"]

#: Methods that ``adaptrep evaluate`` runs by default.
EVALUATE_METHODS = ["adaptrep", "frozenrep", "frozenrep-ft", "target-only"]
#: Methods that need a simulated environment's true representation.
NEEDS_TRUTH = ("oracle-head", "oracle-ft")


class DataOptions(BaseModel):
    """The data and the evaluation design: which tasks, which loss and model, the targets held out,
    the shot counts, the seeds and the methods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["evaluate"] = "evaluate"
    setting: str = Field("", description="a name for the data in results and reports (default: the file's or dataset's name)")
    data: str = Field("", description="CSV or Parquet file, one row per sample (or --dataset)")
    dataset: str = Field("", description="a bundled dataset by name (see adaptrep.datasets)")
    data_hash: str = Field("", description="content hash of the data file (set automatically; part of a run's identity)")
    task_col: str = Field("task", description="column naming each row's task")
    label_col: str = Field("y", description="column of the labels")
    features: list[str] | None = Field(None, description="comma-separated feature columns (default: every other numeric column)")
    loss: Literal["squared", "logistic", "multiclass"] = Field(
        "squared", description="squared | logistic (labels 0/1) | multiclass (class ids, relabelled per task)"
    )
    model: Literal["linear", "relu"] = Field("linear", description="linear | relu (a two-layer ReLU network's first layer)")
    rank: int | None = Field(None, gt=0, description="representation dimension k")
    target_tasks: float | list[str] = Field(0.3, description="share of tasks held out as targets, or a comma-separated list of task names")
    shots: list[int] = Field(default_factory=lambda: [5, 10, 20], description="comma-separated support sizes per target task, per class for classification")
    methods: list[str] = Field(default_factory=lambda: list(EVALUATE_METHODS), description="comma-separated methods")
    seeds: int = Field(3, gt=0, description="number of seeds (random task splits)")
    source_holdout: float = Field(
        0.0, ge=0, lt=1, description="share of each source task's samples held out from fitting, to score the methods' own source-task predictors on (0: none)"
    )


class EvaluateConfig(Compute, MetaOptions, DataOptions):
    """One evaluation on task data (keys: the ``adaptrep evaluate`` flags with underscores): the data
    and design (:class:`DataOptions`), the meta-learners' options (``None``: the learner's defaults for
    the data, :func:`adaptrep.methods.meta_defaults`) and the computation."""

    @field_validator("shots", "methods", "features", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            if not all(parts):
                raise ValueError(f"empty entry in {value!r}")
            return parts
        return value

    @field_validator("target_tasks", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value or any(m < 1 for m in value):
            raise ValueError(f"needs positive shot counts; got {value}")
        return sorted(set(value))

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        misfit = [name for name in value if name in NEEDS_TRUTH]
        if misfit:
            raise ValueError(f"{misfit[0]} needs a simulated environment's true representation; data have none")
        if not value:
            raise ValueError("needs at least one method")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _source(self) -> EvaluateConfig:
        if bool(self.data) == bool(self.dataset):
            raise ValueError("give either data (a file) or dataset (a name)")
        if self.source_holdout > 0 and (self.loss != "squared" or self.model != "linear"):
            wanted = "it scores linear per-source-task predictors: it needs the squared loss and the linear model"
            raise ValueError(f"source_holdout: {wanted}, not the {self.loss} loss and the {self.model} model")
        if isinstance(self.target_tasks, float) and not 0 < self.target_tasks < 1:
            raise ValueError(f"target_tasks: a share must be in (0, 1); got {self.target_tasks}")
        return self

    def method_options(self, seed: int) -> dict[str, Any]:
        """Options of :func:`adaptrep.methods.make_method`."""
        return {**self.learner_options(), "rank": self.rank, "model": self.model, "seed": seed}


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resolve_evaluate(values: dict[str, Any]) -> EvaluateConfig:
    """A validated :class:`EvaluateConfig` (with the data file's hash and a default ``setting``);
    :class:`~adaptrep.experiment.ConfigError` with one line on invalid input."""
    from .experiment import ConfigError, one_line

    values = {key: value for key, value in values.items() if value is not None}
    try:
        config = EvaluateConfig(**values)
    except ValidationError as error:
        raise ConfigError(one_line(error)) from None
    updates: dict[str, Any] = {}
    if config.data:
        path = Path(config.data)
        if not path.is_file():
            raise ConfigError(f"data file not found: {path}")
        updates["data"] = str(path.resolve())
        updates["data_hash"] = file_hash(path)
    if not config.setting:
        updates["setting"] = config.dataset or Path(config.data).stem
    return config.model_copy(update=updates)


@functools.lru_cache(maxsize=4)
def _cached(data: str, dataset: str, data_hash: str, task_col: str, label_col: str, features: tuple[str, ...] | None, loss: str, seed: int) -> Tasks:
    if dataset:
        from .datasets import load_dataset

        return load_dataset(dataset, seed=seed)
    return read_tasks(data, task_col, label_col, list(features) if features is not None else None, loss=loss)


def load_data(config: EvaluateConfig, seed: int = 0) -> Tasks:
    """The config's task data (cached per process: every seed of a sweep reads the file once; a
    dataset whose tasks are drawn per seed, such as ``digits``, is drawn with ``seed``)."""
    from .datasets import is_seeded

    features = tuple(config.features) if config.features is not None else None
    seed = seed if config.dataset and is_seeded(config.dataset) else 0
    tasks = _cached(config.data, config.dataset, config.data_hash, config.task_col, config.label_col, features, config.loss, seed)
    if tasks.loss != config.loss:
        raise DataError(f"{config.setting} has {tasks.loss} labels; the config asks for the {config.loss} loss")
    return tasks.to(config.device, config.torch_dtype)


def check_data(config: EvaluateConfig) -> Tasks:
    """Load the data and check, before anything is computed, that the target tasks (every task that
    a random split may hold out, or the named ones) have more samples than the largest shot count
    (per class for classification), and that ``source_holdout`` holds out a sample of some task;
    :class:`DataError` with one line otherwise."""
    tasks = load_data(config)
    if config.source_holdout > 0:
        split_samples(tasks, config.source_holdout)  # some task must have a sample to hold out
    targets = tasks if isinstance(target := config.target_tasks, float) else split_tasks(tasks, target)[1]
    split_shots(targets, max(config.shots))
    if isinstance(target, float):
        split_tasks(tasks, target)
    return tasks


def evaluate_seed(config: EvaluateConfig, seed: int, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One unit of work: split the tasks with ``seed``, fit every method on the source tasks, adapt
    to each target's support for every shot count and score on its query samples."""
    step = on_step or (lambda _: None)
    tasks = load_data(config, seed)
    source, target = split_tasks(tasks, config.target_tasks, seed)
    held = split_samples(source, config.source_holdout, seed) if config.source_holdout > 0 else None
    if held is not None:
        source = held[0]
    rows: list[dict[str, Any]] = []
    fitted = {}
    for name in config.methods:
        method = make_method(name, config.method_options(seed))
        method.fit(source)
        fitted[name] = method
        if held is not None:
            method.info.update(source_holdout_losses(method, source, held[1], held[2]))
        step(f"{config.setting} seed {seed}: fit {name}")
    for shots in config.shots:
        support, query = split_shots(target, shots, seed=1000 * seed + shots)
        for name, method in fitted.items():
            start = time.perf_counter()
            adapted = method.adapt(support, keyed_generator(seed, 3, shots))
            synchronize(adapted.w.device)
            adapt_time = (time.perf_counter() - start) / target.num_tasks
            scores = {key: value.cpu().numpy() for key, value in adapted.score(query).items()}
            for r in range(target.num_tasks):
                row = {
                    "setting": config.setting,
                    "method": name,
                    "m": shots,
                    "seed": seed,
                    "target_task": r,
                    "query_loss": float(scores["loss"][r]),
                    "source_time": method.info.get("source_time", 0.0),
                    "adapt_time": adapt_time,
                }
                if held is not None:
                    row.update({key: method.info[key] for key in ("source_loss_max", "source_loss_mean")})
                if "accuracy" in scores:
                    row["query_accuracy"] = float(scores["accuracy"][r])
                rows.append(row)
            step(f"{config.setting} seed {seed}: adapt {name} ({shots} shots)")
    return pd.DataFrame(rows)


def source_holdout_losses(method: Method, source: Tasks, held: Tasks, scored: Tensor) -> dict[str, float]:
    """Largest and mean over the source tasks ``scored`` of the held-out loss (``held``: their held-out
    samples) of ``method``'s own predictor of each source task, fitted on ``source``; NaN for methods
    without per-source-task predictors."""
    adapted = method.source_adapted(source)
    if adapted is None:
        return {"source_loss_max": math.nan, "source_loss_mean": math.nan}
    index = scored.to(adapted.w.device)
    bias = None if adapted.bias is None else adapted.bias[index]
    losses = replace(adapted, w=adapted.w[index], bias=bias).score(held)["loss"]
    return {"source_loss_max": float(losses.max()), "source_loss_mean": float(losses.mean())}


def evaluate_steps(config: EvaluateConfig) -> int:
    """Number of ``on_step`` calls :func:`evaluate_seed` makes."""
    return len(config.methods) * (1 + len(config.shots))
