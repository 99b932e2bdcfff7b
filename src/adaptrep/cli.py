"""The ``adaptrep`` command line: ``run``, ``sweep`` and ``report`` (a layer on top of
:mod:`adaptrep.sweep`, :mod:`adaptrep.store` and :mod:`adaptrep.report`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

try:  # typer >= 0.20 vendors click
    from typer import TyperException as CommandLineError
except ImportError:  # pragma: no cover - older typer on click
    from click import ClickException as CommandLineError  # type: ignore[no-redef,assignment]

from .data import DataError
from .experiment import DEFAULT_EXPERIMENTS, ConfigError, library_versions, preflight, read_yaml, resolve_config, steps_per_seed
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


BACKEND = typer.Option("local", "--backend", help="local (a process pool on this machine) | ray")
WORKERS = typer.Option(None, "--workers", help="parallel runs (default: the number of cores; 1 runs in this process)")
ADDRESS = typer.Option(None, "--address", help="Ray cluster to join: auto | HOST:PORT (default: start a local one)")
RETRY = typer.Option(False, "--retry-failed", help="run again the runs that failed before")
FAIL_FAST = typer.Option(False, "--fail-fast", help="stop at the first failing run")
DEVICE = typer.Option(None, help="torch device, e.g. cpu or cuda")
DTYPE = typer.Option(None, help="float64 (default) | float32")
FORCE = typer.Option(False, "--force", help="write into a non-empty --out")


@dataclass
class Execution:
    """How to execute runs: the backend options of ``run`` and ``sweep``."""

    backend: str = "local"
    workers: Optional[int] = None
    address: Optional[str] = None
    retry_failed: bool = False
    fail_fast: bool = False

    def __post_init__(self) -> None:
        check_backend(self.backend, self.workers, self.address)


@app.command()
def run(
    setting: Optional[str] = typer.Option(None, help="linear | linear-hard | logistic | relu-net | relu-hard | sinusoid"),
    dim: Optional[int] = typer.Option(None, help="input dimension d"),
    rank: Optional[int] = typer.Option(None, help="representation dimension k"),
    tasks: Optional[int] = typer.Option(None, help="number of source tasks T"),
    samples: Optional[int] = typer.Option(None, help="samples per source task n"),
    target_samples: Optional[str] = typer.Option(None, help="comma-separated target sample sizes, e.g. 10,20,40"),
    target_tasks: Optional[int] = typer.Option(None, help="target tasks per m and seed"),
    target: Optional[str] = typer.Option(None, help="linear-hard targets: adversarial | random"),
    delta: Optional[float] = typer.Option(None, help="perturbation size delta (linear)"),
    noise: Optional[float] = typer.Option(None, help="noise standard deviation sigma"),
    eps: Optional[float] = typer.Option(None, help="low input variance eps (linear-hard, relu-hard)"),
    scale: Optional[float] = typer.Option(None, help="signal scale s of the logits (logistic)"),
    seeds: Optional[int] = typer.Option(None, help="number of seeds"),
    methods: Optional[str] = typer.Option(
        None, help="comma-separated: adaptrep,frozenrep,frozenrep-ft,target-only,oracle-head,oracle-ft,maml,fomaml,anil,reptile,pooled"
    ),
    inner_steps: Optional[int] = typer.Option(None, help="meta-learners: inner-loop gradient steps K (default 5)"),
    inner_lr: Optional[float] = typer.Option(None, help="meta-learners: inner step size (default 0.1 / (curvature x input variance); sinusoid 0.01)"),
    outer_lr: Optional[float] = typer.Option(None, help="meta-learners: outer step size (default 0.01; sinusoid 0.001)"),
    meta_batch: Optional[int] = typer.Option(None, help="meta-learners: tasks per meta-batch (default 25)"),
    meta_iterations: Optional[int] = typer.Option(None, help="meta-learners: outer iterations (default 1000; sinusoid 1500)"),
    outer_optimizer: Optional[str] = typer.Option(None, help="meta-learners: adam (default) | sgd"),
    support: Optional[float] = typer.Option(None, help="maml/fomaml/anil: support share of each task's samples, a fraction or a count (0: all, the default)"),
    compile: Optional[str] = typer.Option(None, "--compile", help="meta-learners: torch.compile the meta-step: auto (long runs) | always | never"),
    meta_chunk: Optional[int] = typer.Option(None, help="meta-learners: tasks per chunk of a meta-batch, for less memory (0: all at once, the default)"),
    adapt_steps: Optional[int] = typer.Option(None, help="meta-learners, target-only on sinusoid: inner-loop steps on the target (default: inner steps)"),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with the same keys (underscores)"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: adaptrep-runs/run-<time>); rerunning into it resumes"),
    force: bool = FORCE,
    backend: str = BACKEND,
    workers: Optional[int] = WORKERS,
    address: Optional[str] = ADDRESS,
    retry_failed: bool = RETRY,
    fail_fast: bool = FAIL_FAST,
) -> None:
    """Run an experiment; with no flags, the default one (hard-case separation + benign sweep)."""
    flags = dict(
        setting=setting,
        dim=dim,
        rank=rank,
        tasks=tasks,
        samples=samples,
        target_samples=target_samples,
        target_tasks=target_tasks,
        target=target,
        delta=delta,
        noise=noise,
        eps=eps,
        scale=scale,
        seeds=seeds,
        methods=methods,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        outer_lr=outer_lr,
        meta_batch=meta_batch,
        meta_iterations=meta_iterations,
        outer_optimizer=outer_optimizer,
        support=support,
        compile=compile,
        meta_chunk=meta_chunk,
        adapt_steps=adapt_steps,
        device=device,
        dtype=dtype,
    )
    flags = {key: value for key, value in flags.items() if value is not None}
    if config is not None:
        bases = _load_config_file(config)
    elif set(flags) - {"device", "dtype"}:
        bases = [{}]
    else:
        bases = [{"setting": name} for name in DEFAULT_EXPERIMENTS]
    configs = [resolve_config({**base, **flags}) for base in bases]
    runs = expand(SweepSpec(runs=[{**base, **flags} for base in bases]))
    how = Execution(backend, workers, address, retry_failed, fail_fast)
    preflight(configs)
    out_dir = _prepare_out(out or Path("adaptrep-runs") / time.strftime("run-%Y%m%d-%H%M%S"), force)
    resolved = {"experiments": [c.model_dump() for c in configs], "versions": library_versions()}
    (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    _execute(runs, out_dir, how, "adaptrep run")


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="sweep spec (YAML): base, grid, runs, seeds"),
    out: Optional[Path] = typer.Option(None, help="sweep folder (default: adaptrep-runs/<spec name>); rerunning into it resumes"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty folder that holds no sweep"),
    backend: str = BACKEND,
    workers: Optional[int] = WORKERS,
    address: Optional[str] = ADDRESS,
    retry_failed: bool = RETRY,
    fail_fast: bool = FAIL_FAST,
) -> None:
    """Run every config x seed of a spec; finished runs are kept in DIR/sweep.db and skipped on a rerun."""
    parsed = load_spec(spec)
    runs = expand(parsed)
    how = Execution(backend, workers, address, retry_failed, fail_fast)
    preflight(run.config for run in runs)
    out_dir = _prepare_out(out or Path("adaptrep-runs") / spec.stem, force)
    record = {"spec": parsed.model_dump(), "runs": len(runs), "versions": library_versions()}
    (out_dir / "sweep.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    _execute(runs, out_dir, how, f"sweep {spec.stem}")


DATA_OPTIONS = dict(
    task_col=typer.Option("task", "--task-col", help="column naming each row's task"),
    label_col=typer.Option("y", "--label-col", help="column of the labels"),
    features=typer.Option(None, "--features", help="comma-separated feature columns (default: every other numeric column)"),
    loss=typer.Option("squared", "--loss", help="squared | logistic (labels 0/1) | multiclass (class ids, relabelled per task)"),
    model=typer.Option("linear", "--model", help="linear | relu (a two-layer ReLU network's first layer)"),
    rank=typer.Option(None, "--rank", help="representation dimension k"),
)


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


@app.command()
def evaluate(
    data: Optional[Path] = typer.Argument(None, help="CSV or Parquet file, one row per sample (or --dataset)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="a bundled dataset by name (see adaptrep.datasets)"),
    task_col: str = DATA_OPTIONS["task_col"],
    label_col: str = DATA_OPTIONS["label_col"],
    features: Optional[str] = DATA_OPTIONS["features"],
    loss: Optional[str] = typer.Option(None, "--loss", help="squared | logistic | multiclass (default: squared, or the dataset's)"),
    model: str = DATA_OPTIONS["model"],
    rank: Optional[int] = DATA_OPTIONS["rank"],
    target_tasks: Optional[str] = typer.Option(
        None, "--target-tasks", help="share of tasks held out as targets, or a comma-separated list of task names (default: 0.3, or the dataset's)"
    ),
    shots: Optional[str] = typer.Option(
        None, "--shots", help="comma-separated support sizes per target task, per class for classification (default: 5,10,20, or the dataset's)"
    ),
    methods: Optional[str] = typer.Option(
        None, "--methods", help="comma-separated methods (default: adaptrep,frozenrep,frozenrep-ft,target-only, or the dataset's)"
    ),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds (random task splits; default: 3, or the dataset's)"),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    out: Optional[Path] = typer.Option(None, help="output directory (default: adaptrep-runs/evaluate-<time>); rerunning into it resumes"),
    force: bool = FORCE,
    backend: str = BACKEND,
    workers: Optional[int] = WORKERS,
    address: Optional[str] = ADDRESS,
    retry_failed: bool = RETRY,
    fail_fast: bool = FAIL_FAST,
) -> None:
    """Evaluate methods on task data: split tasks, fit on the source tasks, adapt with each shot count, score on query samples."""
    if (data is None) == (dataset is None):
        raise UserError("give a data file or --dataset NAME (one of them)")
    values: dict[str, Any] = dict(
        data=str(data) if data is not None else None,
        dataset=dataset,
        task_col=task_col,
        label_col=label_col,
        features=features,
        loss=loss,
        model=model,
        rank=rank,
        target_tasks=target_tasks,
        shots=shots,
        methods=methods,
        seeds=seeds,
        device=device,
        dtype=dtype,
    )
    if dataset is not None:
        from .datasets import dataset_defaults

        values = {**dataset_defaults(dataset), **{key: value for key, value in values.items() if value is not None and key not in ("task_col", "label_col")}}
    values = {key: value for key, value in values.items() if value is not None}
    config = resolve_config(values)
    preflight([config])
    from .evaluate import check_data

    check_data(config)  # bad data fail here, before anything is written
    runs = expand(SweepSpec(runs=[config.model_dump()]))
    how = Execution(backend, workers, address, retry_failed, fail_fast)
    out_dir = _prepare_out(out or Path("adaptrep-runs") / time.strftime("evaluate-%Y%m%d-%H%M%S"), force)
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
