"""Methods end to end: invariances, reproducibility, dtypes, the hard-case separation."""

import dataclasses

import pandas as pd
import pytest
import torch

from adaptrep import AdaptRep, LinearEnvironment, LinearHardEnvironment, Tasks, make_method
from adaptrep.experiment import resolve_config, run_experiment
from adaptrep.metrics import block_share, subspace_distance

ALL = ["adaptrep", "frozenrep", "frozenrep-ft", "target-only", "oracle-head", "oracle-ft"]


def _rotate(tasks: Tasks, Q: torch.Tensor) -> Tasks:
    return dataclasses.replace(tasks, X=tasks.X @ Q.T, beta=tasks.beta @ Q.T, representation=Q @ tasks.representation)


def test_risks_are_invariant_under_rotation_of_the_input_space():
    env = LinearEnvironment(dim=8, rank=2, delta=0.4, noise=0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    source = env.sample_tasks(30, 12, g)
    target = env.sample_tasks(5, 10, g)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    for name in ALL:
        plain = make_method(name).fit(source).adapt(target, torch.Generator().manual_seed(1)).beta
        rotated = make_method(name).fit(_rotate(source, Q)).adapt(_rotate(target, Q), torch.Generator().manual_seed(1)).beta
        risk = env.excess_risk(plain, target.beta)
        risk_rotated = env.excess_risk(rotated, target.beta @ Q.T)
        torch.testing.assert_close(risk_rotated, risk, rtol=1e-6, atol=1e-9, msg=name)


def _small_config(**overrides):
    base = dict(setting="linear", dim=6, rank=2, tasks=20, samples=10, target_samples=[5, 12], target_tasks=3, seeds=2)
    return resolve_config({**base, **overrides})


def test_same_seed_gives_same_numbers():
    config = _small_config()
    numbers = ["excess_risk", "subspace_distance", "finetune_strength", "source_objective"]
    first, second = run_experiment(config)[numbers], run_experiment(config)[numbers]
    pd.testing.assert_frame_equal(first, second)


def test_float32_agrees_with_float64():
    r64 = run_experiment(_small_config(seeds=1))
    r32 = run_experiment(_small_config(seeds=1, dtype="float32"))
    mean64 = r64.groupby("method").excess_risk.mean()
    mean32 = r32.groupby("method").excess_risk.mean()
    pd.testing.assert_series_equal(mean32, mean64, rtol=2e-2)


def test_results_have_one_row_per_method_m_seed_target():
    config = _small_config(setting="linear-hard", dim=6, rank=2, target_samples=[8, 16])
    results = run_experiment(config)
    assert len(results) == len(config.methods) * 2 * 2 * 3
    assert not results.duplicated(["method", "m", "seed", "target_task"]).any()
    assert {"setting", "method", "m", "seed", "target_task", "excess_risk", "subspace_distance", "opt_block_share"} <= set(results)


def test_hard_case_representations_separate():
    env = LinearHardEnvironment(dim=20, rank=2, eps=0.1, noise=0.5, seed=0)
    source = env.sample_tasks(50, 100, torch.Generator().manual_seed(1))
    adaptrep = make_method("adaptrep").fit(source)
    frozen = make_method("frozenrep").fit(source)
    assert block_share(adaptrep.representation, env.opt_block) >= 0.85
    assert block_share(frozen.representation, env.opt_block) <= 0.4
    # the adversarial target against the frozen span lies in the opt block it missed
    theta = env.adversarial_parameters(frozen.representation, 1)[0]
    assert theta[:2].norm() == pytest.approx(env.opt_scale)
    assert theta[-2:].norm() == pytest.approx(1.0)
    assert subspace_distance(adaptrep.representation, env.representation) < subspace_distance(frozen.representation, env.representation)


def test_bad_task_data_is_rejected():
    X = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.randn(2, 5, dtype=torch.float64)
    y[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Tasks(X, y, torch.zeros(2, 3), torch.eye(3)[:, :1])
    y[0, 1] = 0.0
    for bad in (float("inf"), -float("inf"), float("nan")):  # in X, where the check sums first
        X_bad = X.clone()
        X_bad[1, 4, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            Tasks(X_bad, y)
    Tasks(torch.full((2, 5, 3), 1e308, dtype=torch.float64), y)  # finite values whose sum overflows are fine
    with pytest.raises(ValueError, match="unknown method"):
        make_method("maml-typo")


def test_paper_regularisation_weights_map_to_the_folded_penalty():
    env = LinearEnvironment(dim=6, rank=2, delta=0.5, noise=0.3, seed=3)
    source = env.sample_tasks(20, 15, torch.Generator().manual_seed(3))
    by_weights = AdaptRep(lam=1.0, gamma=0.01).fit(source)  # paper's loss is half the MSE: mu = 2 sqrt(lam gamma)
    by_penalty = AdaptRep(penalty=0.2).fit(source)
    assert by_weights.info["source_penalty"] == pytest.approx(0.2)
    torch.testing.assert_close(by_weights.representation, by_penalty.representation)


def test_adversarial_targets_without_a_frozen_method_use_a_frozen_fit():
    config = _small_config(setting="linear-hard", dim=6, rank=2, methods=["target-only"], seeds=1)
    with_frozen = _small_config(setting="linear-hard", dim=6, rank=2, methods=["frozenrep", "target-only"], seeds=1)
    alone = run_experiment(config)
    reference = run_experiment(with_frozen)
    pd.testing.assert_series_equal(
        alone["excess_risk"].reset_index(drop=True), reference.loc[reference.method == "target-only", "excess_risk"].reset_index(drop=True)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = run_experiment(_small_config(seeds=1))
    cuda = run_experiment(_small_config(seeds=1, device="cuda"))
    pd.testing.assert_series_equal(cuda["excess_risk"], cpu["excess_risk"], rtol=1e-6)
