"""Closed forms of our standard ``linear`` environment (expectations over data and task).

Both hold for Gaussian inputs ``x ~ N(0, I_d)`` and are used by the tests and drawn on figures.
"""

from __future__ import annotations

import math


def target_only_risk(dim: int, num_samples: int, noise: float) -> float:
    """Excess risk of least squares on the target alone: ``sigma^2 d / (m - d - 1)`` for ``m >= d + 2``.

    Also holds for any input covariance (the excess risk is measured in the ``Sigma`` metric);
    ``nan`` when ``m < d + 2`` (the expectation is infinite or undefined).
    """
    if num_samples < dim + 2:
        return math.nan
    return noise**2 * dim / (num_samples - dim - 1)


def oracle_head_risk(dim: int, rank: int, num_samples: int, noise: float, delta: float) -> float:
    """Excess risk of head-only least squares on the true ``B*`` for ``m >= k + 2``.

    ``b + (sigma^2 + b) k / (m - k - 1)`` with ``b = E||(I - B* B*^T) Delta w||^2 = delta^2 (d - k) / d``:
    the out-of-span part of the task acts as independent noise because ``x`` is Gaussian.
    """
    if num_samples < rank + 2:
        return math.nan
    b = delta**2 * (dim - rank) / dim
    return b + (noise**2 + b) * rank / (num_samples - rank - 1)
