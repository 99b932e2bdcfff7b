"""The ``adaptrep run`` contract: bad input -> one line and exit status 2; a tiny end-to-end run.

Error cases run in this process through the console script's entry point (:func:`adaptrep.cli.entry`);
a few tests run the real command in a subprocess for its exit status and output.
"""

import importlib.util
import subprocess
import sys

import pandas as pd
import pytest
import yaml

TINY = [
    "--setting",
    "linear",
    "--dim",
    "6",
    "--rank",
    "2",
    "--tasks",
    "15",
    "--samples",
    "10",
    "--target-samples",
    "5,12",
    "--target-tasks",
    "3",
    "--seeds",
    "2",
]


def adaptrep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptrep.cli", *args], capture_output=True, text=True, timeout=300)


def in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``adaptrep ARGS`` run by the console script's entry point in this process: (exit status, stdout, stderr)."""
    from adaptrep.cli import entry

    monkeypatch.setattr(sys, "argv", ["adaptrep", *args])
    with pytest.raises(SystemExit) as exit_:
        entry()
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


CONFIG_FILES = {
    "malformed.yaml": b"dim: [1, 2\n",
    "unknown.yaml": b"setting: linear\ndimension: 5\n",
    "empty.yaml": b"experiments: []\n",
    "boolean.yaml": b"setting: linear\ndim: true\n",
    "null.yaml": b"setting: linear\ndim:\n",
    "binary.yaml": b"\xff\xfe\x00bad",
    "a-file": b"x",
}

# name: (arguments, with {tmp} for the test's folder; a word the one-line message must contain)
BAD_INPUT = {
    "unknown setting": (["run", "--setting", "cubic"], "setting"),
    "unknown method": (["run", "--setting", "linear", "--methods", "adaptrep,mamll"], "mamll"),
    "zero dim": (["run", "--setting", "linear", "--dim", "0"], "dim"),
    "negative tasks": (["run", "--setting", "linear", "--tasks", "-3"], "tasks"),
    "rank above dim": (["run", "--setting", "linear", "--dim", "4", "--rank", "6"], "rank"),
    "empty m list": (["run", "--setting", "linear", "--target-samples", ""], "target_samples"),
    "non-numeric m": (["run", "--setting", "linear", "--target-samples", "10,abc"], "target_samples"),
    "empty m entry": (["run", "--setting", "linear", "--target-samples", "10,,20"], "target_samples"),
    "negative delta": (["run", "--setting", "linear", "--delta", "-0.1"], "delta"),
    "nan noise": (["run", "--setting", "linear", "--noise", "nan"], "noise"),
    "non-numeric dim": (["run", "--dim", "twenty"], "dim"),
    "sizes too large": (["run", "--setting", "linear", "--dim", "100000", "--tasks", "100000"], "too large"),
    "unusable device": (["run", *TINY, "--device", "meta"], "device"),
    "unknown device": (["run", *TINY, "--device", "tpu9"], "device"),
    "missing config": (["run", "--config", "{tmp}/nope.yaml"], "not found"),
    "malformed config": (["run", "--config", "{tmp}/malformed.yaml"], "malformed"),
    "unknown config key": (["run", "--config", "{tmp}/unknown.yaml"], "dimension"),
    "empty experiment list": (["run", "--config", "{tmp}/empty.yaml"], "experiments"),
    "boolean size": (["run", "--config", "{tmp}/boolean.yaml"], "dim"),
    "null size": (["run", "--config", "{tmp}/null.yaml"], "dim"),
    "binary config": (["run", "--config", "{tmp}/binary.yaml"], "config"),
    "unwritable out": (["run", *TINY, "--out", "{tmp}/a-file/sub"], "out"),
    "non-empty out": (["run", *TINY, "--out", "{tmp}/full"], "not empty"),
    "zero workers": (["run", *TINY, "--workers", "0", "--out", "{tmp}/w"], "workers"),
    "unknown backend": (["run", *TINY, "--backend", "slurm", "--out", "{tmp}/b"], "backend"),
    "address without ray": (["run", *TINY, "--address", "auto", "--out", "{tmp}/a"], "address"),
    "negative inner lr": (["run", *TINY, "--inner-lr", "-0.1"], "inner_lr"),
    "zero meta batch": (["run", *TINY, "--meta-batch", "0"], "meta_batch"),
    "unknown outer optimizer": (["run", *TINY, "--outer-optimizer", "rmsprop"], "outer_optimizer"),
    "bad support": (["run", *TINY, "--support", "1.5"], "support"),
    "support leaves no query": (["run", *TINY, "--support", "10"], "support"),
    "unknown compile mode": (["run", *TINY, "--compile", "sometimes"], "compile"),
    "negative adapt steps": (["run", *TINY, "--adapt-steps", "-1"], "adapt_steps"),
    "adaptrep on sinusoid": (["run", "--setting", "sinusoid", "--methods", "maml,adaptrep"], "adaptrep needs a true representation"),
    "missing spec": (["sweep", "{tmp}/nope.yaml"], "not found"),
    "malformed spec": (["sweep", "{tmp}/malformed.yaml"], "malformed"),
    "report without store": (["report", "{tmp}/full"], "sweep.db"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_line_and_status_2(case, tmp_path, monkeypatch, capsys):
    for name, content in CONFIG_FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.csv").write_text("keep me")
    monkeypatch.chdir(tmp_path)  # a run that wrongly starts writes here, not into the repository
    args, culprit = BAD_INPUT[case]
    status, out, err = in_process(monkeypatch, capsys, *(arg.format(tmp=tmp_path) for arg in args))
    assert status == 2, (case, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("adaptrep: error: ") and culprit in lines[0], lines[0]
    assert out == ""
    if case == "non-empty out":
        assert (tmp_path / "full" / "old.csv").read_text() == "keep me"


@pytest.mark.parametrize("command", [["run", *TINY], ["evaluate", "--dataset", "hsb82"], ["sweep", "{tmp}/spec.yaml"]])
def test_a_missing_device_is_found_before_the_run_not_by_validation(command, tmp_path, monkeypatch, capsys):
    """The machine is probed by the command's pre-flight step: a config naming CUDA validates on a
    machine without it (a worker or a report reads it back), and the command stops with one line,
    exit status 2 and nothing written."""
    import torch

    from adaptrep.evaluate import resolve_evaluate
    from adaptrep.experiment import ConfigError, preflight, resolve_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = resolve_config({"setting": "linear", "device": "cuda:1"})
    assert config.device == "cuda:1" and resolve_evaluate({"dataset": "hsb82", "device": "cuda"}).device == "cuda"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        preflight([resolve_config({"setting": "linear"}), config])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"base": {"setting": "linear", "dim": 6, "rank": 2, "seeds": 1, "device": "cuda"}}))
    args = [arg.format(tmp=tmp_path) for arg in command] + ["--device", "cuda"] * (command[0] != "sweep")
    status, out, err = in_process(monkeypatch, capsys, *args, "--out", str(tmp_path / "out"))
    assert (status, out) == (2, "") and err.splitlines() == ["adaptrep: error: device 'cuda' requested but CUDA is not available on this machine"]
    assert not (tmp_path / "out").exists()


def test_the_console_command_exits_with_status_2_on_bad_input():
    result = adaptrep("run", "--setting", "cubic")
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("adaptrep: error: ") and "'cubic'" in line


def test_messages_are_not_wrapped_at_the_console_width(tmp_path, monkeypatch, capsys):
    """Output that is not a terminal is 80 columns wide for rich; a message with a long path (and
    brackets, which rich would read as markup) must still come out whole, on one line."""
    from adaptrep.store import Store

    folder = tmp_path / ("runs[nan]-" + "x" * 190)
    folder.mkdir()
    with Store(folder / "sweep.db"):
        pass  # a sweep folder without finished runs
    status, _, err = in_process(monkeypatch, capsys, "report", str(folder))
    assert status == 0, err
    assert err.splitlines() == [f"no finished runs in {folder / 'sweep.db'} yet"]


def test_tiny_end_to_end_run(tmp_path):
    out = tmp_path / "run"
    result = adaptrep("run", *TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 6 * 2 * 2 * 3
    if importlib.util.find_spec("pyarrow"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), results, check_dtype=False)
    assert list(results.columns[:7]) == ["setting", "method", "m", "seed", "target_task", "excess_risk", "subspace_distance"]
    assert results["excess_risk"].notna().all() and (results["excess_risk"] >= 0).all()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["experiments"][0]["dim"] == 6 and "torch" in config["versions"]
    assert (out / "figures" / "linear_risk.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "figures/linear_risk.png" in report and "adaptrep" in report
    assert "results:" in result.stdout
    # the resolved config reruns to the same numbers
    again = adaptrep("run", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    pd.testing.assert_series_equal(pd.read_csv(tmp_path / "again" / "results.csv")["excess_risk"], results["excess_risk"])


def test_two_experiments_of_one_setting_are_kept_apart(tmp_path):
    config = tmp_path / "two.yaml"
    tiny = "{setting: linear, dim: 5, rank: 1, tasks: 10, samples: 9, target_samples: [6], target_tasks: 2, seeds: 1, methods: [frozenrep, oracle-head]"
    config.write_text(f"experiments:\n  - {tiny}, delta: 0.0}}\n  - {tiny}, delta: 2.0}}\n")
    result = adaptrep("run", "--config", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    means = results.groupby("experiment").excess_risk.mean()
    assert list(means.index) == [0, 1] and means[1] > 10 * means[0]  # delta^2 (d - k) / d dominates
    assert {p.name for p in (tmp_path / "out" / "figures").iterdir()} == {"0-linear_risk.png", "1-linear_risk.png"}


@pytest.mark.slow
@pytest.mark.parametrize("setting, column", [("logistic", "excess_error01"), ("relu-net", "excess_risk_se")])
def test_other_settings_run_from_the_command_line(tmp_path, setting, column):
    sizes = ["--dim", "6", "--rank", "2", "--tasks", "20", "--samples", "20", "--target-samples", "10,40", "--target-tasks", "3", "--seeds", "1"]
    result = adaptrep("run", "--setting", setting, *sizes, "--out", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(results) == 6 * 2 * 3 and results["excess_risk"].notna().all() and (results[column] >= 0).all()
    assert "adaptrep run --setting linear-hard" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_sinusoid_meta_learners_run_from_the_command_line(tmp_path):
    out = tmp_path / "out"
    sizes = ["--tasks", "30", "--target-samples", "5,10", "--target-tasks", "3", "--meta-iterations", "5", "--meta-batch", "10", "--adapt-steps", "3"]
    result = adaptrep("run", "--setting", "sinusoid", *sizes, "--out", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    results = pd.read_csv(out / "results.csv")
    assert set(results["method"]) == {"maml", "fomaml", "anil", "reptile", "pooled", "target-only"}
    assert len(results) == 6 * 2 * 3 and results["excess_risk"].notna().all() and results["subspace_distance"].isna().all()
    config = yaml.safe_load((out / "config.yaml").read_text())["experiments"][0]
    # options not given stay null: the learner takes its defaults from the source tasks
    assert (config["meta_iterations"], config["meta_batch"], config["adapt_steps"], config["inner_lr"], config["inner_steps"]) == (5, 10, 3, None, None)


def flags_of(command: str) -> dict[str, str]:
    """``adaptrep COMMAND``'s flags (long names) and their help texts, as click sees them."""
    import typer

    from adaptrep.cli import app

    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return {opt: param.help or "" for param in params for opt in param.opts if opt.startswith("--")} | {
        param.name: param.help or "" for param in params if param.param_type_name == "argument"
    }


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_flags_are_the_config_fields_with_their_descriptions(command):
    """One definition per option: every flag of ``run`` and ``evaluate`` is a config field (named
    with dashes, its description as help) or one of the few options that say where to read and
    write and how to execute."""
    from adaptrep.cli import Execution
    from adaptrep.evaluate import EvaluateConfig
    from adaptrep.experiment import RunConfig

    model = RunConfig if command == "run" else EvaluateConfig
    fields = {name: info for name, info in model.model_fields.items() if name not in ("kind", "setting", "data_hash") or command == "run"}
    shown = flags_of(command)
    for name, info in fields.items():
        flag = name if name == "data" and command == "evaluate" else "--" + name.replace("_", "-")
        assert flag in shown, flag
        assert info.description and shown[flag].startswith(info.description), (flag, shown[flag], info.description)
    others = {flag for flag in shown if flag.lstrip("-").replace("-", "_") not in fields}
    assert others == {"--out", "--force", *("--" + name.replace("_", "-") for name in Execution.model_fields), *["--config"] * (command == "run")}
    # the meta-learners' options are one definition, shared by both commands
    assert shown["--inner-lr"] == flags_of("run")["--inner-lr"] and "sinusoid 0.01" in shown["--inner-lr"]
    assert "adam (default) | sgd" in shown["--outer-optimizer"]


def test_inner_lr_goes_from_its_flag_to_the_meta_learner(monkeypatch, capsys, tmp_path):
    """``--inner-lr`` sets the field ``inner_lr`` (None when not given: the learner's default from the
    source tasks), which becomes the MetaLearner's ``options.inner_lr`` and the ``MetaConfig`` that meta_train uses."""
    import torch

    from adaptrep import cli
    from adaptrep.methods import make_method

    captured = []
    monkeypatch.setattr(cli, "_execute", lambda runs, out, how, title: captured.append((runs, how)))
    status, _, err = in_process(
        monkeypatch, capsys, "run", *TINY, "--methods", "maml,adaptrep", "--inner-lr", "0.07", "--workers", "1", "--out", str(tmp_path / "o")
    )
    assert status == 0, err
    runs, how = captured[0]
    config = runs[0].config
    assert config.inner_lr == 0.07 and how.workers == 1
    learner = make_method("maml", config.method_options(0))
    source = config.environment(0).sample_tasks(15, 10, torch.Generator().manual_seed(0))
    assert learner.options.inner_lr == 0.07 and learner.resolve(source).inner_lr == 0.07
    # not given: None in the config, and the learner's rule 0.1 / (2 v) with v the source inputs' largest variance;
    # a null in a file is "not given"
    status, _, err = in_process(monkeypatch, capsys, "run", *TINY, "--methods", "maml", "--out", str(tmp_path / "p"))
    assert status == 0, err
    config = captured[1][0][0].config
    variance = float((source.X**2).mean((0, 1)).max())
    assert config.inner_lr is None and make_method("maml", config.method_options(0)).resolve(source).inner_lr == pytest.approx(0.05 / variance)
    (tmp_path / "null.yaml").write_text("setting: linear\ninner_lr:\nsupport:\nmeta_chunk:\n")
    status, _, err = in_process(monkeypatch, capsys, "run", "--config", str(tmp_path / "null.yaml"), "--out", str(tmp_path / "q"))
    assert status == 0, err
    config = captured[2][0][0].config
    assert (config.inner_lr, config.support, config.meta_chunk) == (None, None, None)


def test_evaluate_takes_the_meta_learners_flags(monkeypatch, capsys, tmp_path):
    from adaptrep import cli

    captured = []
    monkeypatch.setattr(cli, "_execute", lambda runs, out, how, title: captured.append(runs))
    args = ["evaluate", "--dataset", "hsb82", "--methods", "maml", "--inner-lr", "0.2", "--meta-iterations", "7", "--out", str(tmp_path / "o")]
    status, _, err = in_process(monkeypatch, capsys, *args)
    assert status == 0, err
    options = captured[0][0].config.method_options(3)
    assert (options["inner_lr"], options["iterations"], options["outer_lr"], options["seed"]) == (0.2, 7, None, 3)
