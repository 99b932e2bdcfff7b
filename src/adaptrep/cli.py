"""The ``adaptrep`` command line: ``adaptrep run`` (a layer on top of :mod:`adaptrep.experiment`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

try:  # typer >= 0.20 vendors click
    from typer import TyperException as CommandLineError
except ImportError:  # pragma: no cover - older typer on click
    from click import ClickException as CommandLineError  # type: ignore[no-redef,assignment]

from .experiment import DEFAULT_EXPERIMENTS, ConfigError, RunConfig, library_versions, resolve_config, run_experiment, steps_per_experiment
from .report import summarise, write_report

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Fine-tuning-based meta-learning of representations (ADAPTREP vs FROZENREP).")
console = Console(stderr=True)

COLUMNS = [
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
]


class UserError(Exception):
    """Bad input: reported as one line, exit status 2."""


@app.callback()
def main() -> None:
    """adaptrep: ADAPTREP, FROZENREP and baselines on task environments with known ground truth."""


def _load_config_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"malformed config file {path}: {str(error).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {error}") from None
    if isinstance(data, dict) and "experiments" in data:
        data = data["experiments"]
        if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
            raise UserError(f"malformed config file {path}: 'experiments' must be a non-empty list of mappings")
        return data
    if not isinstance(data, dict):
        raise UserError(f"malformed config file {path}: expected a mapping of run keys")
    data.pop("versions", None)
    return [data]


def _prepare_out(out: Optional[Path], force: bool) -> Path:
    if out is None:
        out = Path("adaptrep-runs") / time.strftime("run-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; choose another directory or pass --force to write into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--out {out} is not writable: {error.strerror or error}") from None
    return out


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in COLUMNS if c in frame] + [c for c in frame if c not in COLUMNS]]


@app.command()
def run(
    setting: Optional[str] = typer.Option(None, help="linear | linear-hard"),
    dim: Optional[int] = typer.Option(None, help="input dimension d"),
    rank: Optional[int] = typer.Option(None, help="representation dimension k"),
    tasks: Optional[int] = typer.Option(None, help="number of source tasks T"),
    samples: Optional[int] = typer.Option(None, help="samples per source task n"),
    target_samples: Optional[str] = typer.Option(None, help="comma-separated target sample sizes, e.g. 10,20,40"),
    target_tasks: Optional[int] = typer.Option(None, help="target tasks per m and seed"),
    target: Optional[str] = typer.Option(None, help="linear-hard targets: adversarial | random"),
    delta: Optional[float] = typer.Option(None, help="perturbation size delta (linear)"),
    noise: Optional[float] = typer.Option(None, help="noise standard deviation sigma"),
    eps: Optional[float] = typer.Option(None, help="low input variance eps (linear-hard)"),
    seeds: Optional[int] = typer.Option(None, help="number of seeds"),
    methods: Optional[str] = typer.Option(None, help="comma-separated: adaptrep,frozenrep,frozenrep-ft,target-only,oracle-head,oracle-ft"),
    device: Optional[str] = typer.Option(None, help="torch device, e.g. cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, help="float64 (default) | float32"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with the same keys (underscores)"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: adaptrep-runs/run-<time>)"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
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
        seeds=seeds,
        methods=methods,
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
    out_dir = _prepare_out(out, force)
    resolved = {"experiments": [c.model_dump() for c in configs], "versions": library_versions()}
    (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    results = _run_all(configs, out_dir)
    _finish(results, configs, out_dir)


def _run_all(configs: list[RunConfig], out_dir: Path) -> pd.DataFrame:
    done: list[pd.DataFrame] = []
    partial = out_dir / "results.csv"

    def save(current: pd.DataFrame) -> None:
        _order(pd.concat([*done, current], ignore_index=True)).to_csv(partial, index=False)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("adaptrep run", total=sum(steps_per_experiment(c) for c in configs))
        for index, config in enumerate(configs):
            try:
                frame = run_experiment(config, on_step=lambda text: progress.update(bar, advance=1, description=text), on_seed=save, experiment=index)
            except KeyboardInterrupt:
                console.print(f"interrupted; results so far are in {partial}")
                raise typer.Exit(130) from None
            done.append(frame)
        progress.update(bar, description="adaptrep run: done")
    results = _order(pd.concat(done, ignore_index=True))
    results.to_csv(partial, index=False)
    return results


def _finish(results: pd.DataFrame, configs: list[RunConfig], out_dir: Path) -> None:
    report = write_report(results, [c.model_dump() for c in configs], out_dir)
    summary = summarise(results)
    out = Console()
    for (_, setting), part in summary.groupby(["experiment", "setting"], sort=False):
        table = Table(title=f"{setting}: mean excess risk on target tasks")
        table.add_column("method")
        ms = sorted(part["m"].unique())
        for m in ms:
            table.add_column(f"m={m}", justify="right")
        for method, rows in part.groupby("method", sort=False):
            values = dict(zip(rows["m"], rows["mean"], strict=True))
            table.add_row(str(method), *[f"{values[m]:.4f}" if m in values else "" for m in ms])
        out.print(table)
    out.print(f"results: {out_dir / 'results.csv'}\nreport:  {report}\nfigures: {out_dir / 'figures'}\nconfig:  {out_dir / 'config.yaml'}")


def entry() -> None:
    """Console-script entry point: bad input gives one line on stderr and exit status 2."""
    try:
        code = app(standalone_mode=False)
    except (UserError, ConfigError) as error:
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
