"""Metrics of a learned representation (excess risk itself is :meth:`Environment.excess_risk`)."""

from __future__ import annotations

import torch
from torch import Tensor


def orthonormal_basis(B: Tensor) -> Tensor:
    """An orthonormal basis of the column span of ``B`` (``(d, k)``)."""
    return torch.linalg.qr(B)[0]


def subspace_distance(B_hat: Tensor, B_star: Tensor) -> float:
    """``sin`` of the largest principal angle between ``span(B_hat)`` and ``span(B_star)``.

    Equals ``||(I - P_*) Q_hat||_2`` for an orthonormal basis ``Q_hat`` of ``span(B_hat)`` and the
    projector ``P_*`` onto ``span(B_star)`` (when both spans have the same dimension): 0 for the
    same subspace, 1 when some learned direction is orthogonal to the truth.
    """
    Q = orthonormal_basis(B_hat)
    Qs = orthonormal_basis(B_star.to(Q))
    residual = Q - Qs @ (Qs.T @ Q)
    return float(torch.linalg.matrix_norm(residual, ord=2).clamp(0, 1))


def block_share(B_hat: Tensor, block: Tensor) -> float:
    """Share of ``span(B_hat)`` inside the span of ``block``: ``||E^T Q||_F^2 / k`` in ``[0, 1]``.

    For ``linear-hard`` with ``block`` the opt block this is ``opt_block_share``: 1 when the
    learned representation is the opt block, 0 when it is orthogonal to it.
    """
    Q = orthonormal_basis(B_hat)
    E = orthonormal_basis(block.to(Q))
    return float((E.T @ Q).square().sum() / Q.shape[1])


def source_task_errors(predictors: Tensor, beta: Tensor) -> dict[str, float]:
    """Source-task estimation error: max and mean over the tasks of ``||beta_hat_t - beta_t||_2``
    (``source_error_max``, ``source_error_mean``), for predictors ``(T, d)`` and true parameters ``beta``."""
    errors = (predictors.to(beta) - beta).norm(dim=-1)
    return {"source_error_max": float(errors.max()), "source_error_mean": float(errors.mean())}
