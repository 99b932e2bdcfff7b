"""Experiments: a validated configuration, the grid it describes, and a tidy results table.

A :class:`RunConfig` is one setting with its sizes, target sample sizes, seeds and methods; its
keys are the ``adaptrep run`` flags with underscores. :func:`run_experiment` fits every method
once per seed on the same source tasks, adapts it to the same target tasks for every ``m``,
and returns one row per method x m x seed x target task.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .environments import SETTINGS, Environment, Tasks, TwoBlocks, make_environment
from .meta import support_size
from .methods import METHODS, MODEL_METHODS, Method, make_method, synchronize
from .metrics import block_share, source_task_errors, subspace_distance
from .options import Compute, MetaOptions

__all__ = [
    "RunConfig",
    "ConfigError",
    "SettingOptions",
    "DesignOptions",
    "preflight",
    "PRESETS",
    "DEFAULT_EXPERIMENTS",
    "resolve_config",
    "run_seed",
    "run_experiment",
    "library_versions",
]

DEFAULT_METHODS = ["adaptrep", "frozenrep", "frozenrep-ft", "target-only", "oracle-head", "oracle-ft"]

#: Per-setting defaults: the acceptance configurations of our standard environments.
PRESETS: dict[str, dict[str, Any]] = {
    "linear": dict(
        setting="linear", dim=20, rank=3, tasks=100, samples=25, target_samples=[10, 20, 40, 80, 160], target_tasks=20, delta=0.4, noise=0.5, seeds=5
    ),
    "logistic": dict(
        setting="logistic", dim=20, rank=3, tasks=200, samples=50, target_samples=[20, 40, 80, 160, 320], target_tasks=20, delta=0.4, scale=3.0, seeds=5
    ),
    "relu-net": dict(
        setting="relu-net", dim=20, rank=5, tasks=200, samples=50, target_samples=[20, 40, 80, 160, 320], target_tasks=20, delta=0.3, noise=0.1, seeds=5
    ),
    "relu-hard": dict(
        setting="relu-hard", dim=20, rank=2, tasks=50, samples=100, target_samples=[25, 50, 100, 200, 400], target_tasks=20, eps=0.1, noise=0.1, seeds=5
    ),
    "linear-hard": dict(
        setting="linear-hard", dim=20, rank=2, tasks=50, samples=100, target_samples=[10, 25, 50, 100], target_tasks=20, eps=0.1, noise=0.5, seeds=5
    ),
    # the MAML paper's sinusoid regression (its 70,000 iterations cut to methods.MLP_ITERATIONS)
    "sinusoid": dict(
        setting="sinusoid",
        dim=1,
        rank=1,
        tasks=1000,
        samples=20,
        target_samples=[5, 10, 20],
        target_tasks=100,
        noise=0.0,
        seeds=1,
        methods=["maml", "fomaml", "anil", "reptile", "pooled", "target-only"],
        # the MAML paper's K = 10 support samples and a separate query (without a split, first-order
        # MAML's initialisation diverges on some 5-shot targets: mean excess risk 2e11 at m = 5)
        support=10,
    ),
}


#: What ``adaptrep run`` does with no flags: the hard-case separation, then the benign sweep.
DEFAULT_EXPERIMENTS = ("linear-hard", "linear")


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the culprit."""


class SettingOptions(BaseModel):
    """The environment: a setting and its parameters (see :mod:`adaptrep.environments`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    setting: Literal["linear", "linear-hard", "logistic", "relu-net", "relu-hard", "sinusoid"] = Field(
        "linear", description="the environment (default: the default experiments, linear-hard then linear)"
    )
    dim: int = Field(20, gt=0, description="input dimension d")
    rank: int = Field(3, gt=0, description="representation dimension k")
    delta: float = Field(0.4, ge=0, allow_inf_nan=False, description="perturbation size delta (linear)")
    noise: float = Field(0.5, ge=0, allow_inf_nan=False, description="noise standard deviation sigma")
    eps: float = Field(0.1, gt=0, allow_inf_nan=False, description="low input variance eps (linear-hard, relu-hard)")
    scale: float = Field(3.0, gt=0, allow_inf_nan=False, description="signal scale s of the logits (logistic)")


class DesignOptions(BaseModel):
    """The experiment design: the source tasks, the targets, the seeds and the methods compared."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: int = Field(100, gt=0, description="number of source tasks T")
    samples: int = Field(25, gt=0, description="samples per source task n")
    target_samples: list[int] = Field(default_factory=lambda: [10, 20, 40, 80, 160], description="comma-separated target sample sizes m, e.g. 10,20,40")
    target_tasks: int = Field(20, gt=0, description="target tasks per m and seed")
    target: Literal["adversarial", "random"] = Field("adversarial", description="linear-hard targets")
    seeds: int = Field(5, gt=0, description="number of seeds (0 .. seeds-1)")
    methods: list[str] = Field(
        default_factory=lambda: list(DEFAULT_METHODS), description=f"comma-separated method names, e.g. adaptrep,frozenrep (names: {', '.join(METHODS)})"
    )

    @field_validator("target_samples", "methods", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            if value.strip() and not all(parts):
                raise ValueError(f"empty entry in {value!r}")
            value = [part for part in parts if part]
        return value

    @field_validator("target_samples")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one target sample size")
        if any(m <= 0 for m in value):
            raise ValueError(f"target sample sizes must be positive; got {value}")
        return sorted(set(value))

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one method")
        unknown = [name for name in value if name not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        return list(dict.fromkeys(value))


class RunConfig(Compute, MetaOptions, DesignOptions, SettingOptions):
    """One experiment. Its options are grouped by concern: the environment (:class:`SettingOptions`),
    the design (:class:`DesignOptions`), the meta-learners (:class:`~adaptrep.options.MetaOptions`) and
    the computation (:class:`~adaptrep.options.Compute`); the keys stay flat (config files, flags,
    stored configs). The bases are listed last-first: pydantic orders fields from the last base."""

    @model_validator(mode="before")
    @classmethod
    def _given(cls, values: Any) -> Any:
        """Refuse booleans for numbers and nulls where a value is needed. The meta-learners' options
        not given stay ``None``: the learner sets them from the source tasks (:meth:`adaptrep.methods.MetaLearner.resolve`)."""
        if not isinstance(values, dict):
            return values
        for key, value in values.items():
            field = cls.model_fields.get(key)
            if value is None and field is not None and field.default is not None:
                raise ValueError(f"{key}: needs a value")
            if isinstance(value, bool) and field is not None:
                raise ValueError(f"{key}: expected a number or a name, got {value}")
        return {key: value for key, value in values.items() if value is not None}

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.setting == "sinusoid":
            if self.dim != 1:
                raise ValueError(f"sinusoid has one-dimensional inputs: dim must be 1; got {self.dim}")
            misfits = [name for name in self.methods if name in MODEL_METHODS]
            if misfits:
                raise ValueError(
                    f"methods: {misfits[0]} needs a true representation and a moment start, which sinusoid does not have; "
                    "use maml, fomaml, anil, reptile, pooled or target-only"
                )
        if self.support is not None:
            try:
                support_size(self.support, self.samples)
            except ValueError as error:
                raise ValueError(f"support: {error}") from None
        if self.rank > self.dim:
            raise ValueError(f"rank ({self.rank}) must not exceed dim ({self.dim})")
        if self.setting in ("linear-hard", "relu-hard") and self.dim < 2 * self.rank:
            raise ValueError(f"{self.setting} needs dim >= 2 * rank; got dim={self.dim}, rank={self.rank}")
        return self

    def memory_estimate(self) -> int:
        """Rough peak bytes: source data and Gram matrices (4 restarts, and the source penalty's
        5 training and 5 held-out folds) or, with fewer samples than features, copies of the samples;
        the k d x k d normal matrices; and the target cross-validation batch (5 folds x 13 strengths)."""
        size = torch.finfo(self.torch_dtype).bits // 8
        d, k, m = self.dim, self.rank, max(self.target_samples)
        per_task = 16 * d * d if self.samples >= d else 6 * self.samples * d
        source = self.tasks * (self.samples * d + per_task) + 4 * (d * k) ** 2
        target = self.target_tasks * (m * d + 5 * 13 * (d * d + 4 * d))
        return int(size * (source + target))

    def method_options(self, seed: int) -> dict[str, Any]:
        """Keyword options of :func:`adaptrep.methods.make_method` (the meta-learners' settings; the
        seed of their initialisation)."""
        return {**self.learner_options(), "seed": seed}

    @property
    def adversarial_targets(self) -> bool:
        """Whether targets are built against each method's representation (``linear-hard`` only)."""
        return self.setting == "linear-hard" and self.target == "adversarial"

    def environment(self, seed: int) -> Environment:
        return make_environment(
            self.setting,
            dim=self.dim,
            rank=self.rank,
            noise=self.noise,
            delta=self.delta,
            eps=self.eps,
            scale=self.scale,
            seed=seed,
            device=self.device,
            dtype=self.torch_dtype,
        )


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_device(device: str) -> None:
    """:class:`ConfigError` (one line) unless ``device`` computes on this machine."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    try:
        torch.empty(1, device=device)
    except Exception as error:  # noqa: BLE001 - any backend failure means the device is unusable
        raise ConfigError(f"device {device!r} is not usable on this machine: {str(error).splitlines()[0]}") from None


def preflight(configs: Iterable[Any]) -> None:
    """The machine checks before anything runs (the command line calls it; validation does not
    probe the machine, so a config validates anywhere, e.g. in a worker or when read back from a
    store): every device is usable here and every :class:`RunConfig`'s memory estimate fits in
    half of this machine's memory. :class:`ConfigError` with one line otherwise."""
    configs = list(configs)
    for device in dict.fromkeys(str(config.device) for config in configs):
        check_device(device)
    have = _physical_memory()
    for config in configs:
        need = config.memory_estimate() if isinstance(config, RunConfig) else 0
        if have and need > have / 2:
            raise ConfigError(f"sizes too large: about {need / 2**30:.1f} GiB needed, this machine has {have / 2**30:.1f} GiB")


def one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"invalid config: {where}: {message}" if where else f"invalid config: {message}"


def read_yaml(path: Path, what: str) -> Any:
    """The parsed YAML file ``path`` (a ``what``: "config file", "spec", ...); :class:`ConfigError`
    with one line when it is missing, unreadable or malformed."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"malformed {what} {path}: {str(error).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {what} {path}: {error}") from None


def resolve_config(overrides: dict[str, Any]) -> Any:
    """A validated :class:`RunConfig`: the setting's preset updated with ``overrides``; or, when
    ``overrides`` name task data (``data`` or ``dataset``), an
    :class:`~adaptrep.evaluate.EvaluateConfig`.

    Raises :class:`ConfigError` with a one-line message on invalid input.
    """
    if overrides.get("kind") == "evaluate" or "data" in overrides or "dataset" in overrides:
        from .evaluate import resolve_evaluate

        return resolve_evaluate(overrides)
    setting = overrides.get("setting", "linear")
    if setting not in SETTINGS:
        raise ConfigError(f"invalid config: setting: unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    values = {**PRESETS[setting], **overrides}
    try:
        return RunConfig(**values)
    except ValidationError as error:
        raise ConfigError(one_line(error)) from None
    except TypeError as error:
        raise ConfigError(f"invalid config: {error}") from None


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that determine the numbers."""
    from . import __version__

    return {
        "adaptrep": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "platform": platform.platform(),
    }


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``keys`` (a run's seed and what is drawn: source tasks,
    targets, adaptation), so every draw of a run has its own stream."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def run_seed(config: RunConfig, seed: int, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One unit of work: every method of ``config`` fitted on seed ``seed``'s source tasks and
    adapted to its target tasks for every ``m``; one row per method x m x target task.

    ``on_step`` is called after every source fit and every adaptation (for progress bars).
    """
    step = on_step or (lambda _: None)
    env = config.environment(seed)
    source = env.sample_tasks(config.tasks, config.samples, keyed_generator(seed, 1))
    methods: dict[str, Method] = {}
    for name in config.methods:
        methods[name] = make_method(name, config.method_options(seed))
        start = time.perf_counter()
        methods[name].fit(source)
        methods[name].info.setdefault("source_time", time.perf_counter() - start)
        predictors = methods[name].source_predictors
        if predictors is not None and source.beta is not None and predictors.shape == source.beta.shape:
            methods[name].info.update(source_task_errors(predictors, source.beta))
        step(f"{config.setting} seed {seed}: fit {name}")
    needs_fallback = config.adversarial_targets and any(method.representation is None for method in methods.values())
    fallback = _reference_representation(methods, source) if needs_fallback else None
    rows: list[dict[str, Any]] = []
    for m in config.target_samples:
        rows.extend(_evaluate_targets(config, env, methods, fallback, seed, m, step))
    return pd.DataFrame(rows)


def run_experiment(config: RunConfig, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """All seeds ``0 .. config.seeds - 1`` of one experiment in this process (see :func:`run_seed`).

    ``adaptrep run`` and ``adaptrep sweep`` run the same units through :mod:`adaptrep.sweep`,
    which adds a crash-safe store and parallel workers.
    """
    return pd.concat([run_seed(config, seed, on_step) for seed in range(config.seeds)], ignore_index=True)


def steps_per_seed(config: Any) -> int:
    """Number of ``on_step`` calls :func:`run_seed` (or :func:`~adaptrep.evaluate.evaluate_seed`) makes."""
    if getattr(config, "kind", "") == "evaluate":
        return len(config.methods) * (1 + len(config.shots))
    return len(config.methods) * (1 + len(config.target_samples))


def run_unit(config: dict[str, Any], seed: int, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One unit of work from a stored config: :func:`run_seed` for a simulated setting,
    :func:`~adaptrep.evaluate.evaluate_seed` for task data."""
    if config.get("kind") == "evaluate":
        from .evaluate import EvaluateConfig, evaluate_seed

        return evaluate_seed(EvaluateConfig(**config), seed, on_step)
    return run_seed(RunConfig(**config), seed, on_step)


def _reference_representation(methods: dict[str, Method], source: Tasks) -> torch.Tensor:
    """The representation adversarial targets are built against for methods without one:
    FROZENREP's (fitted here when the run has no FROZENREP method)."""
    for name in ("frozenrep", "frozenrep-ft"):
        rep = methods[name].representation if name in methods else None
        if rep is not None:
            return rep
    rep = make_method("frozenrep").fit(source).representation
    assert rep is not None
    return rep


def _evaluate_targets(
    config: RunConfig, env: Environment, methods: dict[str, Method], fallback: torch.Tensor | None, seed: int, m: int, step: Callable[[str], None]
) -> list[dict[str, Any]]:
    R = config.target_tasks
    generator = keyed_generator(seed, 2, m)
    adversarial = config.adversarial_targets
    shared_beta = None if adversarial else env.sample_parameters(R, generator)
    Z, xi = env.sample_inputs(R, m, generator)
    rows = []
    for name, method in methods.items():
        if adversarial:
            rep = method.representation if method.representation is not None else fallback
            assert rep is not None
            beta = env.adversarial_parameters(rep, R)
        else:
            assert shared_beta is not None
            beta = shared_beta
        target = env.make_tasks(beta, Z, xi)
        assert target.beta is not None
        start = time.perf_counter()
        beta_hat = method.adapt(target, keyed_generator(seed, 3, m)).beta
        synchronize(beta_hat.device)
        adapt_time = (time.perf_counter() - start) / R
        risk = env.excess_risk(beta_hat, target.beta).cpu().numpy()
        extra = {name: values.cpu().numpy() for name, values in env.metrics(beta_hat, target.beta).items()}
        rep, truth = method.representation, env.representation
        common: dict[str, Any] = {
            "setting": config.setting,
            "method": name,
            "m": m,
            "seed": seed,
            "subspace_distance": subspace_distance(rep, truth) if rep is not None and truth is not None else math.nan,
            "source_time": method.info.get("source_time", 0.0),
            "adapt_time": adapt_time,
            "source_objective": method.info.get("source_objective", math.nan),
            "source_grad_norm": method.info.get("source_grad_norm", math.nan),
            "source_error_max": method.info.get("source_error_max", math.nan),
            "source_error_mean": method.info.get("source_error_mean", math.nan),
        }
        if isinstance(env, TwoBlocks):
            common["opt_block_share"] = block_share(rep, env.opt_block) if rep is not None else math.nan
        strength = method.last_strength
        for r in range(R):
            row = {**common, "target_task": r, "excess_risk": float(risk[r]), **{name: float(values[r]) for name, values in extra.items()}}
            row["finetune_strength"] = float(strength[r]) if strength is not None else math.nan
            rows.append(row)
        step(f"{config.setting} seed {seed}: adapt {name} (m={m})")
    return rows
