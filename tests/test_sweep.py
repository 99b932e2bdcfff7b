"""Sweeps: spec expansion, the SQLite store, failures, kill -9 and resume, concurrent drivers, Ray."""

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from adaptrep import sweep as sweep_module
from adaptrep.experiment import ConfigError
from adaptrep.store import Store
from adaptrep.sweep import InProcess, ProcessPool, SweepSpec, execute, expand, load_spec

BASE = {
    "setting": "linear",
    "dim": 8,
    "rank": 2,
    "tasks": 30,
    "samples": 15,
    "target_samples": [6, 16],
    "target_tasks": 3,
    "methods": ["adaptrep", "frozenrep", "target-only"],
}
SPEC = {"base": BASE, "grid": {"delta": [0.2, 0.6]}, "seeds": [0, 1, 2, 3, 4]}
ROWS_PER_RUN = 3 * 2 * 3  # methods x m x target tasks


def adaptrep(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptrep.cli", *args], capture_output=True, text=True, timeout=600, **kwargs)


def sweep_command(spec, out, workers):
    return [sys.executable, "-m", "adaptrep.cli", "sweep", str(spec), "--out", str(out), "--workers", str(workers)]


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """The results without wall times (which differ between any two executions)."""
    frame = frame[[c for c in frame if not c.endswith("_time")]]
    return frame.sort_values(["run_id", "method", "m", "target_task"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The spec's results from one uninterrupted in-process sweep."""
    folder = tmp_path_factory.mktemp("reference")
    with Store(folder / "sweep.db") as store:
        outcome = execute(expand(SweepSpec(**SPEC)), store, InProcess())
        assert outcome.done == 10 and outcome.failed == 0
        return comparable(store.results())


def write_spec(path, spec=SPEC):
    path.write_text(yaml.safe_dump(spec))
    return path


def test_spec_expands_to_stable_runs_with_labels():
    runs = expand(SweepSpec(**SPEC))
    assert len(runs) == 10 and len({run.id for run in runs}) == 10
    assert [run.labels for run in runs[:2]] == [{"delta": 0.2}] * 2 and runs[5].labels == {"delta": 0.6}
    assert [run.id for run in expand(SweepSpec(**SPEC))] == [run.id for run in runs]  # same sweep, same runs
    assert runs[0].config.delta == 0.2 and runs[0].config.dim == 8
    # explicit runs cross the grid; their differing keys are labels; duplicates collapse
    spec = SweepSpec(base=BASE, runs=[{"noise": 0.1}, {"noise": 0.3}, {"noise": 0.1}], grid={"delta": [0.0]}, seeds=2)
    runs = expand(spec)
    assert len(runs) == 4 and runs[0].labels == {"noise": 0.1, "delta": 0.0}
    # without spec seeds, each config's own seed count applies
    assert len(expand(SweepSpec(base={**BASE, "seeds": 3}))) == 3


def test_execution_options_do_not_change_a_run_id(tmp_path):
    """The device, compilation and chunking say how a run is computed, not what: the same config on
    another device is the same run (resumed, not recomputed); the dtype changes the numbers, so it
    makes a new run."""
    runs = expand(SweepSpec(base=BASE, seeds=[0, 1]))
    elsewhere = expand(SweepSpec(base={**BASE, "device": "cuda", "compile": "never", "meta_chunk": 2}, seeds=[0, 1]))
    assert [run.id for run in elsewhere] == [run.id for run in runs] and elsewhere[0].work()["device"] == "cuda"
    assert "device" not in runs[0].stored_config() and runs[0].stored_config()["dtype"] == "float64"
    in_float32 = expand(SweepSpec(base={**BASE, "dtype": "float32"}, seeds=[0, 1]))
    assert not {run.id for run in in_float32} & {run.id for run in runs}
    with Store(tmp_path / "sweep.db") as store:
        assert execute(runs, store, InProcess()).done == 2
        # resumed with other execution options (and other workers): nothing to compute again
        again = expand(SweepSpec(base={**BASE, "compile": "always", "meta_chunk": 1}, seeds=[0, 1]))
        outcome = execute(again, store, ProcessPool(2))
        assert (outcome.done, outcome.skipped) == (0, 2)


@pytest.mark.parametrize(
    "spec, culprit",
    [
        ({"base": BASE, "grid": {"delta": [0.1, -1.0]}}, "delta"),
        ({"base": BASE, "grid": {"dimension": [5]}}, "dimension"),
        ({"base": BASE, "grid": {"delta": []}}, "delta"),
        ({"base": BASE, "grid": {"seeds": [1, 2]}}, "seeds"),
        ({"base": BASE, "grid": {"device": ["cpu", "cuda"]}}, "device: an execution option"),
        ({"base": BASE, "seeds": [0, -1]}, "seeds"),
        ({"base": BASE, "grids": {}}, "grids"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_spec_is_one_line_naming_the_culprit(tmp_path, spec, culprit, monkeypatch, capsys):
    from adaptrep.cli import entry

    path = write_spec(tmp_path / "bad.yaml", spec)
    with pytest.raises(ConfigError, match=culprit) as error:
        expand(load_spec(path))
    assert "\n" not in str(error.value)
    monkeypatch.setattr(sys, "argv", ["adaptrep", "sweep", str(path), "--out", str(tmp_path / "out")])  # the command, in this process
    with pytest.raises(SystemExit) as exit_:
        entry()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.splitlines() == [f"adaptrep: error: {error.value}"], stderr
    assert not (tmp_path / "out").exists()


def test_store_commits_runs_atomically_and_claims_them_once(tmp_path):
    runs = expand(SweepSpec(**{**SPEC, "seeds": [0]}))
    first, other = Store(tmp_path / "sweep.db"), Store(tmp_path / "sweep.db")
    for run in runs:
        first.add(run.id, run.stored_config(), run.seed, run.labels)
    run = runs[0]
    assert first.claim(run.id) == "claimed"
    assert other.claim(run.id) == "busy"  # a live driver holds it
    rows, seconds, versions = sweep_module.compute(run.stored_config(), run.seed)
    first.finish(run.id, rows, seconds, versions)
    first.finish(run.id, rows, seconds, versions)  # storing twice replaces, never duplicates
    assert other.claim(run.id) == "done"
    assert len(other.results()) == ROWS_PER_RUN
    # a claim left by a dead driver is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    with sqlite3.connect(tmp_path / "sweep.db") as db:
        db.execute("UPDATE runs SET status = 'running', owner = ? WHERE id = ?", (f"{os.uname().nodename}:{dead}:x", runs[1].id))
    assert other.claim(runs[1].id) == "claimed"
    first.close()
    other.close()


@pytest.mark.parametrize("newer", ["f" * 16, "0" * 16])
def test_a_run_recomputed_by_another_version_supersedes_the_older_in_the_results(tmp_path, newer):
    """Resuming a folder after an upgrade that changed the numbers: the run ids differ (they hash the
    version), so the store holds both runs of one config and seed; the results table keeps only the one
    finished last (whatever the ids' order), and the other seeds' runs of the older version stay."""
    run0, run1 = expand(SweepSpec(**{**SPEC, "grid": {}, "seeds": [0, 1]}))
    with Store(tmp_path / "sweep.db") as store:
        rows = {}
        for run in (run0, run1):
            store.add(run.id, run.stored_config(), run.seed, run.labels)
            assert store.claim(run.id) == "claimed"
            rows[run.id], seconds, versions = sweep_module.compute(run.stored_config(), run.seed)
            store.finish(run.id, rows[run.id], seconds, {**versions, "adaptrep": "0.0.1"})
        # the same config and seed 0 under a newer version
        store.add(newer, run0.stored_config(), 0, run0.labels)
        assert store.claim(newer) == "claimed"
        changed = rows[run0.id].assign(excess_risk=rows[run0.id]["excess_risk"] + 1.0)
        store.finish(newer, changed, 1.0, versions)
        table = store.results()
        assert sorted(table["run_id"].unique()) == sorted([newer, run1.id]) and len(table) == 2 * ROWS_PER_RUN
        mine = table[table["seed"] == 0].sort_values(["method", "m", "target_task"])
        expected = changed.sort_values(["method", "m", "target_task"])["excess_risk"].to_numpy()
        assert (mine["excess_risk"].to_numpy() == expected).all()
        assert set(table["experiment"]) == {0}


def test_a_raising_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, reference):
    real = sweep_module.run_unit

    def flaky(config, seed, on_step=None):
        if seed == 1:
            raise FloatingPointError("simulated divergence")
        return real(config, seed, on_step)

    runs = expand(SweepSpec(**SPEC))
    monkeypatch.setattr(sweep_module, "run_unit", flaky)
    with Store(tmp_path / "sweep.db") as store:
        outcome = execute(runs, store, InProcess())
        assert (outcome.done, outcome.failed) == (8, 2)
        failed = store.runs().query("status == 'failed'")
        assert set(failed["seed"]) == {1} and (failed["error"] == "FloatingPointError: simulated divergence").all()
        assert len(store.results()) == 8 * ROWS_PER_RUN
        # a rerun skips finished and failed runs; --retry-failed redoes the failures
        again = execute(runs, store, InProcess())
        assert (again.done, again.skipped, again.earlier_failures) == (0, 8, 2)
        monkeypatch.setattr(sweep_module, "run_unit", real)
        retried = execute(runs, store, InProcess(), retry_failed=True)
        assert (retried.done, retried.failed, retried.skipped) == (2, 0, 8)
        pd.testing.assert_frame_equal(comparable(store.results()), reference)
    # --fail-fast stops at the first failure
    monkeypatch.setattr(sweep_module, "run_unit", flaky)
    with Store(tmp_path / "fast.db") as store:
        outcome = execute(runs, store, InProcess(), fail_fast=True)
        assert (outcome.done, outcome.failed) == (1, 1)
        assert store.counts() == {"done": 1, "failed": 1, "pending": 8}


def wait_for_done(db_path, at_least, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db_path.exists():
            try:
                with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
                    done = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= at_least:
                return done
        time.sleep(0.02)
    raise AssertionError("the sweep did not progress")


def test_a_process_pool_gives_the_in_process_results(tmp_path, reference):
    """Runs computed by the pool (its workers, and the driver's thread while they start) are the
    in-process runs, number for number."""
    pool = ProcessPool(2)
    with Store(tmp_path / "sweep.db") as store:
        outcome = execute(expand(SweepSpec(**SPEC)), store, pool)
        assert outcome.done == 10 and outcome.failed == 0, outcome.errors
        pd.testing.assert_frame_equal(comparable(store.results()), reference)


def test_closing_a_pool_stops_its_workers_and_no_other_process():
    foreign = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,), daemon=True)
    foreign.start()
    try:
        pool = ProcessPool(1)
        worker = pool._executor().submit(os.getpid).result(timeout=300)
        assert worker not in (os.getpid(), foreign.pid)
        pool.close()
        with pytest.raises(ProcessLookupError):  # the pool's worker is gone (and reaped)
            os.kill(worker, 0)
        assert foreign.is_alive(), "close() stopped a process that is not one of its workers"
    finally:
        foreign.terminate()
        foreign.join()


@pytest.mark.slow
def test_kill_9_part_way_then_resume_gives_the_uninterrupted_results(tmp_path, reference):
    spec, out = write_spec(tmp_path / "spec.yaml"), tmp_path / "out"
    process = subprocess.Popen(
        sweep_command(spec, out, 2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    done = wait_for_done(out / "sweep.db", at_least=2)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its workers
    process.wait()
    assert done < 10, "the sweep finished before it could be killed"
    with Store(out / "sweep.db") as store:
        killed = store.counts()
        assert killed.get("done", 0) < 10 and len(store.results()) == killed["done"] * ROWS_PER_RUN  # no partial runs
    result = adaptrep("sweep", str(spec), "--out", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"{killed['done']} skipped" in result.stderr
    resumed = pd.read_csv(out / "results.csv")
    assert not resumed.duplicated(["run_id", "method", "m", "target_task"]).any()
    pd.testing.assert_frame_equal(comparable(resumed), reference)
    assert {"delta", "experiment", "run_id"} <= set(resumed.columns)


@pytest.mark.slow
def test_two_sweeps_on_one_store_leave_it_consistent(tmp_path, reference):
    spec, out = write_spec(tmp_path / "spec.yaml"), tmp_path / "out"
    command = sweep_command(spec, out, 1)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # two drivers share 2 cores
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=one_thread) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read() if process.stderr else ""
    with Store(out / "sweep.db") as store:
        assert store.counts() == {"done": 10}
        assert store.runs()["attempts"].sum() == 10  # each run computed once
        pd.testing.assert_frame_equal(comparable(store.results()), reference)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_finished_runs(tmp_path):
    # 40 short runs (~0.3 s each on a quiet machine): enough left to interrupt
    spec, out = write_spec(tmp_path / "spec.yaml", {**SPEC, "seeds": list(range(20))}), tmp_path / "out"
    process = subprocess.Popen(
        sweep_command(spec, out, 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, and the child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_done(out / "sweep.db", at_least=2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "rerun the same command to resume" in " ".join(stderr.split())  # whatever the width
    with Store(out / "sweep.db") as store:
        counts = store.counts()
        assert "running" not in counts and counts["done"] >= 2
        assert len(pd.read_csv(out / "results.csv")) == counts["done"] * ROWS_PER_RUN
    report = adaptrep("report", str(out))
    assert report.returncode == 0 and (out / "report.md").is_file(), report.stderr


@pytest.mark.slow
def test_ray_backend_matches_the_local_backend(tmp_path, reference):
    pytest.importorskip("ray")
    from adaptrep.sweep import RayBackend

    with Store(tmp_path / "sweep.db") as store:
        outcome = execute(expand(SweepSpec(**SPEC)), store, RayBackend(address=None, workers=2))
        assert outcome.done == 10 and outcome.failed == 0, outcome.errors
        pd.testing.assert_frame_equal(comparable(store.results()), reference)
