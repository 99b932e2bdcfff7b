"""Sweeps: a spec expands into runs (one resolved config x one seed, each with a stable id), which a
backend computes and the driver stores in the sweep folder's :class:`~adaptrep.store.Store`.

``adaptrep run`` is the one-grid case of the same machinery. A spec (YAML) has the keys::

    base:    {any run config key: value}       # applied to every run
    grid:    {key: [value, ...], ...}           # cartesian product over these keys
    runs:    [{key: value, ...}, ...]           # and/or an explicit list (each crossed with the grid)
    seeds:   [0, 1, 2]                          # or a count; default: each config's ``seeds``

Backends: :class:`InProcess` (``--workers 1``), :class:`ProcessPool` (``--backend local``) and
:class:`RayBackend` (``--backend ray``). Workers compute; only the driver writes to the store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .evaluate import EvaluateConfig
from .experiment import ConfigError, RunConfig, library_versions, read_yaml, resolve_config, run_unit
from .options import execution_keys, identity
from .store import Store, StoreError, describe_labels

__all__ = [
    "Run",
    "SweepSpec",
    "SweepOutcome",
    "load_spec",
    "expand",
    "compute",
    "execute",
    "make_backend",
    "InProcess",
    "ProcessPool",
    "RayBackend",
    "cpu_count",
]

#: What a worker returns for a run: its result rows, the seconds taken and the library versions.
Result = tuple[pd.DataFrame, float, dict[str, str]]
#: What a backend yields for a run: its result, or the exception it raised.
Outcome = Result | BaseException


@dataclass(frozen=True)
class Run:
    """One unit of work: a resolved config and one seed. ``labels`` are the sweep's values for
    the keys it varies (they become columns of ``results.csv``)."""

    config: Any  # RunConfig or EvaluateConfig
    seed: int
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """A hash of the stored config, the seed and the adaptrep version: the same sweep always has
        the same runs, a run shared by two sweeps is computed once, a new version of the library
        never reuses an older version's results, and the execution options (device, compilation,
        chunking; backend and workers are not in the config at all) never make a run new."""
        from . import __version__

        text = json.dumps({"config": self.stored_config(), "seed": self.seed, "adaptrep": __version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def stored_config(self) -> dict[str, Any]:
        """What the store keeps and the id hashes: :func:`~adaptrep.experiment.identity` of the config."""
        return identity(self.config)

    def work(self) -> dict[str, Any]:
        """What a worker computes: the whole config, execution options included."""
        return dict(self.config.model_dump())


class SweepSpec(BaseModel):
    """A sweep spec (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    runs: list[dict[str, Any]] = []
    seeds: int | list[int] | None = None

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if key == "seeds":
                raise ValueError("seeds: give seeds at the top level of the spec, not in the grid")
            if key not in RunConfig.model_fields and key not in EvaluateConfig.model_fields:
                raise ValueError(f"{key}: unknown key")
            if key in execution_keys(RunConfig) or key in execution_keys(EvaluateConfig):
                raise ValueError(f"{key}: an execution option does not change the numbers, so it cannot make a grid; set it in base")
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        return grid

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: int | list[int] | None) -> int | list[int] | None:
        if isinstance(seeds, bool):
            raise ValueError("expected a count or a list of seeds")
        if isinstance(seeds, int) and seeds <= 0:
            raise ValueError("needs a positive count")
        if isinstance(seeds, list) and (not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds)):
            raise ValueError("needs distinct non-negative seeds")
        return seeds


def load_spec(path: Path) -> SweepSpec:
    """Read and validate a spec file; :class:`ConfigError` (one line) when it is unusable."""
    data = read_yaml(path, "spec file")
    if not isinstance(data, dict):
        raise ConfigError(f"malformed spec file {path}: expected a mapping with base, grid, runs and seeds")
    try:
        return SweepSpec(**data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = "unknown key" if first["type"] == "extra_forbidden" else str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"invalid spec {path}: {where}: {message}") from None


def expand(spec: SweepSpec) -> list[Run]:
    """All runs of a spec, in order, without duplicates. Every config is validated first, so a bad
    grid point fails before anything is computed. A run's labels are its grid values and the
    keys in which the explicit ``runs`` differ."""
    keys = list(spec.grid)
    entries = spec.runs or [{}]
    varying = [key for key in dict.fromkeys(k for entry in entries for k in entry) if len({repr(entry.get(key)) for entry in entries}) > 1]
    runs: list[Run] = []
    for entry in entries:
        for values in itertools.product(*spec.grid.values()):
            point = dict(zip(keys, values, strict=True))
            labels = {**{key: entry[key] for key in varying if key in entry}, **point}
            try:
                config = resolve_config({**spec.base, **entry, **point})
            except ConfigError as error:
                where = describe_labels(labels)
                raise ConfigError(f"{error} (at {where})" if where else str(error)) from None
            seeds = spec.seeds if spec.seeds is not None else config.seeds
            runs.extend(Run(config, seed, labels) for seed in (range(seeds) if isinstance(seeds, int) else seeds))
    return list({run.id: run for run in runs}.values())


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def compute(
    config: dict[str, Any], seed: int, threads: int | None = None, on_step: Callable[[str], None] | None = None
) -> tuple[pd.DataFrame, float, dict[str, str]]:
    """What a worker does for one run: the result rows, the seconds taken and the library versions."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    rows = run_unit(config, seed, on_step)
    return rows, time.perf_counter() - start, library_versions()


# -- backends -------------------------------------------------------------------------------------


class InProcess:
    """Runs one run at a time in this process (``--workers 1``); reports steps within a run."""

    def __init__(self, on_step: Callable[[Run, str], None] | None = None) -> None:
        self.on_step = on_step

    def imap(self, runs: Iterable[Run]) -> Iterator[tuple[Run, Outcome]]:
        for run in runs:
            step = None if self.on_step is None else (lambda text, run=run: self.on_step(run, text))  # type: ignore[misc]
            try:
                outcome: Outcome = compute(run.work(), run.seed, on_step=step)
            except Exception as error:  # noqa: BLE001 - a failing run is recorded, the sweep goes on
                outcome = error
            yield run, outcome

    def close(self) -> None:
        pass


class _Windowed:
    """Keeps ``window`` runs in flight and yields them as they finish (pool and Ray backends)."""

    window = 1

    def imap(self, runs: Iterable[Run]) -> Iterator[tuple[Run, Outcome]]:
        source = iter(runs)
        pending: dict[Any, Run] = {}
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.window:
                run = next(source, None)
                if run is None:
                    exhausted = True
                else:
                    pending[self._submit(run)] = run
            if not pending:
                return
            for handle in self._wait(list(pending)):
                yield pending.pop(handle), self._result(handle)

    def _submit(self, run: Run) -> Any:
        raise NotImplementedError

    def _wait(self, handles: list[Any]) -> list[Any]:
        raise NotImplementedError

    def _result(self, handle: Any) -> Outcome:
        raise NotImplementedError


class WorkerLost(RuntimeError):
    """The process computing a run died (with every run in flight on the same pool): the run is
    not at fault, so it returns to ``pending`` instead of being recorded as failed."""


def _init_worker(threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops the workers
    torch.set_num_threads(threads)


def _ready() -> int:
    """A no-op task: its answer says that the workers are up."""
    return os.getpid()


def _context() -> multiprocessing.context.BaseContext:
    """How workers start: forked from a fork server that has imported the library once (so a
    worker starts in milliseconds instead of importing torch and pandas itself), or spawned where
    there is no fork server. The fork server is a fresh process without threads or a CUDA context,
    so its children may use CUDA, unlike children forked from the driver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # pragma: no cover - Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # every worker runs the driver's main module again: preload what it imports (the CLI when it is the driver,
    # as the console script or as python -m adaptrep.cli)
    main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    context.set_forkserver_preload([name for name in (__name__, "adaptrep.cli") if name in sys.modules or name == main])
    return context


class _Here:
    """A run computed by a thread of the driver (see :class:`ProcessPool`); a :class:`Future`."""

    def __init__(self, run: Run, threads: int) -> None:
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()
        threading.Thread(target=self._compute, args=(run, threads), daemon=True, name="adaptrep-run").start()

    def _compute(self, run: Run, threads: int) -> None:
        previous = torch.get_num_threads()
        try:
            self.future.set_result(compute(run.work(), run.seed, threads))
        except BaseException as error:  # noqa: BLE001 - handed to the driver like a worker's exception
            self.future.set_exception(error)
        finally:
            torch.set_num_threads(previous)


class ProcessPool(_Windowed):
    """A pool of ``workers`` processes on this machine (``--backend local``), each using
    ``cores // workers`` threads.

    The workers start once, when the pool is made, all together and in the background (forked from
    one fork server, which imports the library once); they serve every run of the sweep. Until they
    are up, the driver computes CPU runs itself, one at a time in a thread, instead of waiting: a
    sweep of short runs does not lose the start-up time. Once the workers are up, at most ``workers``
    runs are in flight in all.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.threads = max(1, cpu_count() // workers)
        self._up = threading.Event()
        self._pool: ProcessPoolExecutor | None = None
        self._failure: BaseException | None = None
        self._starter = threading.Thread(target=self._start_in_background, daemon=True, name="adaptrep-pool-start")
        self._starter.start()

    @property
    def window(self) -> int:  # type: ignore[override]
        return self.workers if self._up.is_set() else 1

    def _start_in_background(self) -> None:
        try:
            self._pool = self._start()
            self._pool.submit(_ready).result()
        except BaseException as error:  # noqa: BLE001 - raised by _executor (or, for a worker that died, at the next submit)
            self._failure = error
        finally:
            self._up.set()

    def _executor(self) -> ProcessPoolExecutor:
        self._starter.join()
        if self._pool is None:
            raise self._failure or RuntimeError("the worker pool did not start")
        return self._pool

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_init_worker, initargs=(self.threads,))

    def _submit(self, run: Run) -> Future:
        if not self._up.is_set() and torch.device(run.config.device).type == "cpu":
            return _Here(run, self.threads).future
        try:
            return self._executor().submit(compute, run.work(), run.seed)
        except BrokenProcessPool:
            self._pool = self._start()
            return self._pool.submit(compute, run.work(), run.seed)

    def _wait(self, handles: list[Any]) -> list[Any]:
        starting = not self._up.is_set()  # wake up when the workers are, to give them runs
        done, _ = wait(handles, timeout=0.05 if starting else None, return_when=FIRST_COMPLETED)
        return [handle for handle in handles if handle in done]

    def _result(self, handle: Any) -> Outcome:
        try:
            return handle.result()
        except BrokenProcessPool:
            return WorkerLost("the worker process died (out of memory or killed)")
        except Exception as error:  # noqa: BLE001 - recorded as the run's failure
            return error

    def processes(self) -> list[multiprocessing.process.BaseProcess]:
        """This pool's worker processes (none once it is closed)."""
        self._starter.join()
        return list((getattr(self._pool, "_processes", None) or {}).values())

    def close(self) -> None:
        """Stop this pool's workers (runs in flight are abandoned); other processes are left alone.
        A run in flight in the driver's thread finishes there, unrecorded."""
        workers = self.processes()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            if process.is_alive():
                process.terminate()
        for process in workers:
            process.join(timeout=10)


class RayBackend(_Windowed):
    """Runs on a Ray cluster (``--backend ray``): ``address`` joins an existing cluster
    (``"auto"`` or ``HOST:PORT``); with none, a local one with ``workers`` CPUs is started and
    stopped again at the end. Each run takes one CPU and one thread."""

    def __init__(self, address: str | None, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray needs Ray: pip install 'adaptrep[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            try:
                ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ConfigError(f"cannot reach a Ray cluster at {address!r}: {str(error).splitlines()[0]}") from None
        self.window = max(1, int(ray.cluster_resources().get("CPU", workers)))
        self._remote = ray.remote(num_cpus=1, max_retries=0)(compute)

    def _submit(self, run: Run) -> Any:
        gpus = 1 if torch.device(run.config.device).type == "cuda" else 0  # Ray hides GPUs from tasks that do not ask
        return self._remote.options(num_gpus=gpus).remote(run.work(), run.seed, 1)

    def _wait(self, handles: list[Any]) -> list[Any]:
        ready, _ = self._ray.wait(handles, num_returns=1)
        return list(ready)

    def _result(self, handle: Any) -> Outcome:
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            return cause if isinstance(cause, BaseException) else RuntimeError(str(error).splitlines()[-1])
        except Exception as error:  # noqa: BLE001 - recorded as the run's failure
            return error

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


Backend = InProcess | ProcessPool | RayBackend


def make_backend(name: str, workers: int | None = None, address: str | None = None, on_step: Callable[[Run, str], None] | None = None) -> Backend:
    """``local`` (a process pool; in this process when ``workers == 1``) or ``ray``."""
    check_backend(name, workers, address)
    workers = workers or cpu_count()
    if name == "local":
        return InProcess(on_step) if workers == 1 else ProcessPool(workers)
    return RayBackend(address, workers)


def check_backend(name: str, workers: int | None = None, address: str | None = None) -> None:
    """:class:`ConfigError` (one line) for backend options that cannot work."""
    if name not in ("local", "ray"):
        raise ConfigError(f"unknown backend {name!r}; choose local or ray")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1; got {workers}")
    if name == "local" and address is not None:
        raise ConfigError("--address needs --backend ray")


# -- the driver -----------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    """What a call of :func:`execute` did."""

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    busy: int = 0
    earlier_failures: int = 0
    lost: int = 0
    errors: list[tuple[Run, str]] = field(default_factory=list)
    interrupted: bool = False


def execute(
    runs: list[Run],
    store: Store,
    backend: Backend,
    *,
    retry_failed: bool = False,
    fail_fast: bool = False,
    on_event: Callable[[str, SweepOutcome], None] | None = None,
) -> SweepOutcome:
    """Compute the runs not finished yet, storing each as it completes.

    Finished runs are skipped; runs that failed before are skipped unless ``retry_failed``; a
    run claimed by another live driver is left to it. A run that raises (or whose results cannot
    be stored) is stored as failed and the sweep goes on (it stops at the first failure with
    ``fail_fast``); a run whose worker process died returns to ``pending`` for the next rerun. Ctrl-C stops cleanly:
    everything finished so far is kept and the interrupted runs return to ``pending``.
    ``on_event(kind, outcome)`` is called with ``"start"``, ``"done"``, ``"failed"`` and ``"end"``.
    """
    event = on_event or (lambda kind, outcome: None)
    outcome = SweepOutcome(total=len(runs))
    for run in runs:
        store.add(run.id, run.stored_config(), run.seed, run.labels)

    statuses = [store.status(run.id) for run in runs]
    outcome.skipped = sum(status == "done" for status in statuses)
    outcome.earlier_failures = 0 if retry_failed else sum(status == "failed" for status in statuses)
    todo = [run for run, status in zip(runs, statuses, strict=True) if status != "done" and (retry_failed or status != "failed")]
    counted = SweepOutcome(total=len(runs))  # counts for the runs already excluded above
    event("start", outcome)
    try:
        for run, result in backend.imap(_claim_each(todo, store, retry_failed, counted)):
            if isinstance(result, WorkerLost):
                store.unclaim(run.id)
                outcome.lost += 1
                continue
            if not isinstance(result, BaseException):
                rows, seconds, versions = result
                try:
                    store.finish(run.id, rows, seconds, versions)
                except StoreError as error:
                    result = error
                else:
                    outcome.done += 1
                    event("done", outcome)
                    continue
            message = f"{type(result).__name__}: {result}".splitlines()[0]
            store.fail(run.id, message)
            outcome.failed += 1
            outcome.errors.append((run, message))
            event("failed", outcome)
            if fail_fast:
                break
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        backend.close()
        store.release()
    outcome.skipped += counted.skipped
    outcome.earlier_failures += counted.earlier_failures
    outcome.busy += counted.busy
    event("end", outcome)
    return outcome


def _claim_each(runs: list[Run], store: Store, retry_failed: bool, counts: SweepOutcome) -> Iterator[Run]:
    """The runs this driver claims, claimed one by one as the backend asks for work."""
    for run in runs:
        verdict = store.claim(run.id, retry_failed)
        if verdict == "claimed":
            yield run
        elif verdict == "done":
            counts.skipped += 1
        elif verdict == "failed":
            counts.earlier_failures += 1
        else:
            counts.busy += 1
