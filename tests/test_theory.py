"""The closed forms (docs/model.md, adaptrep.theory) are reproduced by the environments + methods within Monte-Carlo error."""

import pytest
import torch

from adaptrep import LinearEnvironment, Oracle, TargetOnly
from adaptrep.theory import oracle_head_risk, target_only_risk


def _risks(method, env, m, num_targets, seed):
    g = torch.Generator().manual_seed(seed)
    source = env.sample_tasks(2, 5, g)  # only carries B* for the oracle
    method.fit(source)
    target = env.sample_tasks(num_targets, m, g)
    return env.excess_risk(method.adapt(target).beta, target.beta)


@pytest.mark.parametrize("m", [40, 80])
def test_target_only_matches_closed_form(m):
    env = LinearEnvironment(dim=20, rank=3, delta=0.4, noise=0.5, seed=0)
    risk = _risks(TargetOnly(), env, m, 6000, seed=m)
    expected = target_only_risk(20, m, 0.5)
    se = risk.std() / risk.numel() ** 0.5
    assert abs(risk.mean() - expected) < 4 * se, (float(risk.mean()), expected, float(se))


@pytest.mark.parametrize("m", [10, 40, 160])
def test_head_only_on_true_representation_matches_closed_form(m):
    env = LinearEnvironment(dim=20, rank=3, delta=0.4, noise=0.5, seed=1)
    risk = _risks(Oracle(), env, m, 6000, seed=100 + m)
    expected = oracle_head_risk(20, 3, m, 0.5, 0.4)
    se = risk.std() / risk.numel() ** 0.5
    assert abs(risk.mean() - expected) < 4 * se, (float(risk.mean()), expected, float(se))


def test_closed_forms_are_undefined_below_their_range():
    assert target_only_risk(20, 21, 0.5) != target_only_risk(20, 21, 0.5)  # nan
    assert oracle_head_risk(20, 3, 4, 0.5, 0.4) != oracle_head_risk(20, 3, 4, 0.5, 0.4)
    assert target_only_risk(20, 41, 1.0) == pytest.approx(1.0)
