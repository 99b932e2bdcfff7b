"""The ``adaptrep`` command line: ``run``, ``sweep`` and ``report`` (a layer on top of
:mod:`adaptrep.sweep`, :mod:`adaptrep.store` and :mod:`adaptrep.report`)."""

from __future__ import annotations

import inspect
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional, Union

import typer
import yaml
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

try:  # typer >= 0.20 vendors click
    from typer import TyperException as CommandLineError
except ImportError:  # pragma: no cover - older typer on click
    from click import ClickException as CommandLineError  # type: ignore[no-redef,assignment]

from .data import DataError
from .evaluate import EvaluateConfig
from .experiment import DEFAULT_EXPERIMENTS, ConfigError, RunConfig, library_versions, preflight, read_yaml, resolve_config, steps_per_seed
from .options import execution_keys
from .store import Store, StoreError, describe_labels
from .sweep import Run, SweepOutcome, SweepSpec, check_backend, execute, expand, load_spec, make_backend

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Fine-tuning-based meta-learning of representations (ADAPTREP vs FROZENREP).")
#: Messages for people on stderr: never wrapped at the console width (rich wraps output that is not a
#: terminal at 80 columns, which would break a message and its paths mid-sentence) and taken literally
#: (no markup, so "[...]" in an error or a path is printed as it is).
console = Console(stderr=True, soft_wrap=True, markup=False)


class UserError(Exception):
    """Bad input: reported as one line, exit status 2."""


@app.callback()
def main() -> None:
    """adaptrep: ADAPTREP, FROZENREP and baselines on task environments with known ground truth."""


def _load_config_file(path: Path) -> list[dict[str, Any]]:
    data = read_yaml(path, "config file")
    if isinstance(data, dict) and "experiments" in data:
        data = data["experiments"]
        if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
            raise UserError(f"malformed config file {path}: 'experiments' must be a non-empty list of mappings")
        return data
    if not isinstance(data, dict):
        raise UserError(f"malformed config file {path}: expected a mapping of run keys")
    data.pop("versions", None)
    return [data]


STORE = "sweep.db"


def _prepare_out(out: Path, force: bool) -> Path:
    """The output folder: new, empty, a sweep folder (resumed), or any folder with ``--force``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / STORE).is_file() and not force:
        raise UserError(f"--out {out} is not empty; choose another directory or pass --force to write into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--out {out} is not writable: {error.strerror or error}") from None
    return out


class Execution(BaseModel):
    """How runs are executed: the backend options of ``run``, ``sweep`` and ``evaluate`` (not part of
    a run's identity: a folder resumed with other options keeps its finished runs)."""

    backend: Literal["local", "ray"] = Field("local", description="local (a process pool on this machine) | ray")
    workers: Optional[int] = Field(None, description="parallel runs (default: the number of cores; 1 runs in this process)")
    address: Optional[str] = Field(None, description="Ray cluster to join: auto | HOST:PORT (default: start a local one)")
    retry_failed: bool = Field(False, description="run again the runs that failed before")
    fail_fast: bool = Field(False, description="stop at the first failing run")

    @classmethod
    def of(cls, values: dict[str, Any]) -> Execution:
        """The execution options among a command's ``values``, checked (:class:`ConfigError`, one line)."""
        how = cls.model_construct(**{key: values[key] for key in cls.model_fields})
        check_backend(how.backend, how.workers, how.address)
        return how


# -- flags generated from the configs' fields ------------------------------------------------------


def _flag_type(annotation: Any) -> tuple[type, tuple[str, ...]]:
    """The command-line type of a field (int, float, bool or str: lists and mixed unions are
    comma-separated text that the config parses) and its choices (a ``Literal``'s values)."""
    origin, args = typing.get_origin(annotation), [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if origin is Literal:
        return str, tuple(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return _flag_type(args[0]) if len(args) == 1 else (str, ())
    if annotation in (int, float, bool):
        return annotation, ()
    return str, ()


def _help(info: FieldInfo, choices: tuple[str, ...], default: bool) -> str:
    """A flag's help: the field's description, its choices (the default marked) where the
    description does not name them, and with ``default`` its default where the description does not."""
    text, value = info.description or "", info.get_default(call_default_factory=True)
    if choices and not all(choice in text for choice in choices):
        marked = value if "default" not in text else None
        listed = " | ".join(f"{choice} (default)" if choice == marked else choice for choice in choices)
        text = f"{text}: {listed}" if text else listed
    elif default and value not in (None, "") and "default" not in text:
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        text = f"{text} (default: {shown})"
    return text


def flags(
    model: type[BaseModel], *, skip: tuple[str, ...] = (), arguments: tuple[str, ...] = (), given: bool = True, defaults: bool = False
) -> list[inspect.Parameter]:
    """Command-line parameters for ``model``'s fields (``--inner-lr`` for ``inner_lr``), with the
    field's description as help. ``given``: every flag defaults to ``None``, "not given" (the
    config's preset or file applies), and ``defaults`` adds the field's default to the help;
    otherwise a flag defaults to the field's default. ``arguments`` are positional (optional)."""
    parameters = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        kind, choices = _flag_type(info.annotation)
        help = _help(info, choices, defaults)
        if name in arguments:
            default: Any = typer.Argument(None, metavar=name.upper(), help=help, show_default=False)
        elif given:
            default = typer.Option(None, "--" + name.replace("_", "-"), help=help, show_default=False)
        else:
            value = info.get_default(call_default_factory=True)
            default = typer.Option(value, "--" + name.replace("_", "-"), help=help, show_default=kind is not bool and value is not None)
        annotation = kind if kind is bool and not given else Optional[kind]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return parameters


def option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A command-line parameter that is not a config field (where to write, which file to read)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def command(name: str, parameters: list[inspect.Parameter]) -> Callable[[Callable[[dict[str, Any]], None]], Callable[..., None]]:
    """Register ``body(values)`` as the subcommand ``name`` with these parameters (typer reads the
    signature); ``values`` maps each parameter's name to its value. The body's docstring is the help."""

    def register(body: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
        def call(**values: Any) -> None:
            body(values)

        call.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        call.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        call.__doc__, call.__name__, call.__qualname__ = body.__doc__, body.__name__, body.__qualname__
        app.command(name)(call)
        return call

    return register


EXECUTION_FLAGS = flags(Execution, given=False)
FORCE = option("force", bool, typer.Option(False, "--force", help="write into a non-empty --out"))


def _out(default: str) -> inspect.Parameter:
    return option("out", Optional[Path], typer.Option(None, "--out", help=f"output directory (default: adaptrep-runs/{default}); rerunning into it resumes"))


@command(
    "run",
    [
        *flags(RunConfig),
        option("config", Optional[Path], typer.Option(None, "--config", help="YAML file with the same keys (underscores)")),
        _out("run-<time>"),
        FORCE,
        *EXECUTION_FLAGS,
    ],
)
def run(values: dict[str, Any]) -> None:
    """Run an experiment; with no flags, the default one (hard-case separation + benign sweep). Flags not given take the setting's preset."""
    given = {key: value for key, value in values.items() if key in RunConfig.model_fields and value is not None}
    if values["config"] is not None:
        bases = _load_config_file(values["config"])
    elif set(given) - {"dtype", *execution_keys(RunConfig)}:
        bases = [{}]
    else:
        bases = [{"setting": name} for name in DEFAULT_EXPERIMENTS]
    configs = [resolve_config({**base, **given}) for base in bases]
    runs = expand(SweepSpec(runs=[{**base, **given} for base in bases]))
    how = Execution.of(values)
    preflight(configs)
    out_dir = _prepare_out(values["out"] or Path("adaptrep-runs") / time.strftime("run-%Y%m%d-%H%M%S"), values["force"])
    resolved = {"experiments": [c.model_dump() for c in configs], "versions": library_versions()}
    (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    _execute(runs, out_dir, how, "adaptrep run")


@command(
    "sweep",
    [
        option("spec", Path, typer.Argument(..., help="sweep spec (YAML): base, grid, runs, seeds")),
        option("out", Optional[Path], typer.Option(None, "--out", help="sweep folder (default: adaptrep-runs/<spec name>); rerunning into it resumes")),
        option("force", bool, typer.Option(False, "--force", help="write into a non-empty folder that holds no sweep")),
        *EXECUTION_FLAGS,
    ],
)
def sweep(values: dict[str, Any]) -> None:
    """Run every config x seed of a spec; finished runs are kept in DIR/sweep.db and skipped on a rerun."""
    spec: Path = values["spec"]
    parsed = load_spec(spec)
    runs = expand(parsed)
    how = Execution.of(values)
    preflight(run.config for run in runs)
    out_dir = _prepare_out(values["out"] or Path("adaptrep-runs") / spec.stem, values["force"])
    record = {"spec": parsed.model_dump(), "runs": len(runs), "versions": library_versions()}
    (out_dir / "sweep.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    _execute(runs, out_dir, how, f"sweep {spec.stem}")


#: The data options of ``fit``: the fields of :class:`~adaptrep.evaluate.EvaluateConfig` with their defaults.
DATA_OPTIONS = {
    parameter.name: parameter.default
    for parameter in flags(
        EvaluateConfig, given=False, skip=tuple(set(EvaluateConfig.model_fields) - {"task_col", "label_col", "features", "loss", "model", "rank"})
    )
}


def _columns(features: Optional[str]) -> Optional[list[str]]:
    if features is None:
        return None
    names = [name.strip() for name in features.split(",")]
    if not all(names):
        raise UserError(f"--features: empty entry in {features!r}")
    return names


def _check_loss(loss: str, model: str) -> None:
    from .data import LOSSES

    if loss not in LOSSES:
        raise UserError(f"--loss: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if model not in ("linear", "relu"):
        raise UserError(f"--model: unknown model {model!r}; choose linear or relu")


@app.command()
def fit(
    data: Path = typer.Argument(..., help="CSV or Parquet file, one row per sample, with a task column"),
    task_col: str = DATA_OPTIONS["task_col"],
    label_col: str = DATA_OPTIONS["label_col"],
    features: Optional[str] = DATA_OPTIONS["features"],
    loss: str = DATA_OPTIONS["loss"],
    model: str = DATA_OPTIONS["model"],
    rank: Optional[int] = DATA_OPTIONS["rank"],
    method: str = typer.Option("adaptrep", "--method", help="adaptrep | frozenrep | frozenrep-ft | target-only | maml | fomaml | anil | reptile | pooled"),
    seed: int = typer.Option(0, "--seed", help="seed of the methods' random starts"),
    intercept: bool = typer.Option(True, "--intercept/--no-intercept", help="a free intercept per task"),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize", help="scale features by the source tasks' statistics"),
    out: Path = typer.Option(Path("model.adaptrep"), "--out", help="the model file to write"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out"),
) -> None:
    """Learn a representation from the source tasks in DATA and save it (a safetensors file)."""
    from .data import read_tasks
    from .methods import METHODS, make_method
    from .saving import save_method

    _check_loss(loss, model)
    if method not in METHODS:
        raise UserError(f"--method: unknown method {method!r}; choose from {', '.join(METHODS)}")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    tasks = read_tasks(data, task_col, label_col, _columns(features), loss=loss)
    learner = make_method(method, {"rank": rank, "model": model, "seed": seed, "intercept": intercept, "standardize": standardize})
    start = time.perf_counter()
    with console.status(f"fitting {method} on {tasks.num_tasks} tasks ({int(tasks.counts.sum())} samples, {tasks.dim} features)"):
        try:
            learner.fit(tasks)
        except ValueError as error:
            raise UserError(str(error)) from None
    save_method(learner, out, data={"task_col": task_col, "label_col": label_col, "file": str(data)})
    console.print(f"fitted {method} on {tasks.num_tasks} tasks in {time.perf_counter() - start:.1f} s; saved to {out}", soft_wrap=True)


@app.command()
def predict(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="a model file written by adaptrep fit"),
    support: Path = typer.Option(..., "--support", help="CSV/Parquet with the target tasks' labelled samples (same columns as the training data)"),
    query: Path = typer.Option(..., "--query", help="CSV/Parquet with the rows to predict (task and feature columns; labels not needed)"),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write: the query's rows with a prediction column"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out"),
) -> None:
    """Adapt a saved model to the target tasks in SUPPORT and predict QUERY's rows."""
    from .predict import predict_file

    if out.exists() and not force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    with console.status("adapting to the support tasks"):
        rows, tasks = predict_file(model_file, support, query, out)
    console.print(f"predicted {rows} rows of {tasks} tasks; wrote {out}", soft_wrap=True)


@command(
    "evaluate",
    [
        *flags(EvaluateConfig, skip=("kind", "setting", "data_hash"), arguments=("data",), defaults=True),
        _out("evaluate-<time>"),
        FORCE,
        *EXECUTION_FLAGS,
    ],
)
def evaluate(values: dict[str, Any]) -> None:
    """Evaluate methods on task data: split tasks, fit on the source tasks, adapt with each shot count, score on query samples.

    With --dataset, flags not given take the dataset's settings."""
    if (values["data"] is None) == (values["dataset"] is None):
        raise UserError("give a data file or --dataset NAME (one of them)")
    given = {key: value for key, value in values.items() if key in EvaluateConfig.model_fields and value is not None}
    if values["dataset"] is not None:
        from .datasets import dataset_defaults

        given = {**dataset_defaults(values["dataset"]), **{key: value for key, value in given.items() if key not in ("task_col", "label_col")}}
    config = resolve_config(given)
    preflight([config])
    from .evaluate import check_data

    check_data(config)  # bad data fail here, before anything is written
    runs = expand(SweepSpec(runs=[config.model_dump()]))
    how = Execution.of(values)
    out_dir = _prepare_out(values["out"] or Path("adaptrep-runs") / time.strftime("evaluate-%Y%m%d-%H%M%S"), values["force"])
    (out_dir / "config.yaml").write_text(yaml.safe_dump({"experiments": [config.model_dump()], "versions": library_versions()}, sort_keys=False))
    _execute(runs, out_dir, how, "adaptrep evaluate")


@app.command()
def report(directory: Path = typer.Argument(..., help="a run or sweep folder (holding sweep.db)")) -> None:
    """Regenerate results.csv, figures and report.md from a folder's store (also mid-sweep)."""
    if not (directory / STORE).is_file():
        raise UserError(f"{directory} holds no {STORE}; give a folder written by adaptrep run or adaptrep sweep")
    with Store(directory / STORE) as store:
        _publish(store, directory)


def _execute(runs: list[Run], out_dir: Path, how: Execution, title: str) -> None:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    progress = Progress(*columns, console=console, transient=False)
    bar = progress.add_task(title, total=None)

    def describe(outcome: SweepOutcome) -> str:
        parts = [f"{title}: {outcome.done} done", f"{outcome.failed} failed", f"{outcome.skipped} skipped"]
        parts += [f"{outcome.busy} busy elsewhere"] * bool(outcome.busy)
        return " · ".join(parts)

    def on_event(kind: str, outcome: SweepOutcome) -> None:
        if kind == "start":
            progress.update(bar, total=outcome.total - outcome.skipped - outcome.earlier_failures, completed=0)
        else:
            progress.update(bar, completed=outcome.done + outcome.failed)
        progress.update(bar, description=describe(outcome))

    def on_step(run: Run, text: str) -> None:
        progress.update(bar, advance=1 / steps_per_seed(run.config))

    engine = make_backend(how.backend, how.workers, how.address, on_step)
    with Store(out_dir / STORE) as store:
        with progress:
            outcome = execute(runs, store, engine, retry_failed=how.retry_failed, fail_fast=how.fail_fast, on_event=on_event)
        if outcome.done + outcome.skipped:
            _publish(store, out_dir)
    for run, message in outcome.errors[:5]:
        console.print(f"run {run.id} ({describe_labels({'seed': run.seed, **run.labels})}) failed: {message}")
    if outcome.busy:
        console.print(f"{outcome.busy} runs are being computed by another adaptrep process on this folder; rerun later to include them")
    if outcome.earlier_failures:
        console.print(f"{outcome.earlier_failures} runs failed in an earlier sweep; pass --retry-failed to run them again")
    if outcome.interrupted:
        console.print(f"interrupted; the {outcome.done + outcome.skipped} finished runs are kept in {out_dir / STORE}; rerun the same command to resume")
        raise typer.Exit(130)
    if outcome.lost:
        console.print(f"{outcome.lost} runs were lost with a worker process that died; rerun the same command to compute them")
    if outcome.failed:
        where = f"{out_dir / 'report.md'} and {out_dir / STORE}" if outcome.done + outcome.skipped else str(out_dir / STORE)
        console.print(f"{outcome.failed} of {outcome.total} runs failed; their messages are in {where}")
        raise typer.Exit(1)


def _publish(store: Store, out_dir: Path) -> None:
    """results.csv (and .parquet with pyarrow), figures and report.md from the store; a summary."""
    from .report import metric_of, summarise, write_report  # matplotlib: imported only when a report is written

    results = store.results()
    failed = store.runs().query("status == 'failed'")
    if results.empty:
        console.print(f"no finished runs in {out_dir / STORE} yet")
        return
    results.to_csv(out_dir / "results.csv", index=False)
    try:
        results.to_parquet(out_dir / "results.parquet", index=False)
    except ImportError:
        pass
    experiments = store.experiments()
    report_path = write_report(results, [config for config, _ in experiments], out_dir, labels=[labels for _, labels in experiments], failed=failed)
    summary = summarise(results)
    out = Console()
    what = "mean excess risk on target tasks" if metric_of(results) == "excess_risk" else "mean loss on the target tasks' query samples"
    for (number, setting), part in summary.groupby(["experiment", "setting"], sort=False):
        labels = experiments[int(number)][1]
        varied = describe_labels(labels, skip=("setting",))
        title = f"{setting}{', ' + varied if varied else ''}: {what}"
        table = Table(title=title)
        table.add_column("method")
        ms = sorted(part["m"].unique())
        for m in ms:
            table.add_column(f"m={m}", justify="right")
        for method, rows in part.groupby("method", sort=False):
            values = dict(zip(rows["m"], rows["mean"], strict=True))
            table.add_row(str(method), *[f"{values[m]:.4f}" if m in values else "" for m in ms])
        out.print(table)
    where = f"results: {out_dir / 'results.csv'}\nreport:  {report_path}\nfigures: {out_dir / 'figures'}\nstore:   {out_dir / STORE}"
    out.print(where, soft_wrap=True, markup=False)


def entry() -> None:
    """Console-script entry point: bad input gives one line on stderr and exit status 2."""
    try:
        code = app(standalone_mode=False)
    except (UserError, ConfigError, StoreError, DataError) as error:
        print(f"adaptrep: error: {error}", file=sys.stderr)
        sys.exit(2)
    except CommandLineError as error:
        print(f"adaptrep: error: {error.format_message()}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("adaptrep: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    entry()
