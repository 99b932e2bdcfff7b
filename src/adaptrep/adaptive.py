"""ADAPTREP's source penalty chosen from the data: K-fold cross-validation on a warm-started path.

The penalty ``mu`` of the ADAPTREP source objective (:mod:`adaptrep.solvers`) decides how much of
each task's predictor may leave the shared span (``v_t``). Too strong and the tasks that really are
perturbed are forced into the span (FROZENREP at ``mu = inf``); too weak and every ``v_t`` fits the
task's noise. :func:`cv_penalty` picks ``mu`` by held-out prediction error:

1. **Path.** From FROZENREP (``mu = inf``) the strengths run geometrically from ``mu_max`` down to
   ``ratio * mu_max``, where ``mu_max = max_t ||2 (G_t beta_t - c_t)||`` at the FROZENREP fit is
   the smallest penalty at which every ``v_t = 0`` is optimal for that representation (the
   gradient of the loss in ``v_t``; the group penalty's threshold). Each strength is fitted by
   :func:`~adaptrep.solvers.fit_source` on all source samples, warm-started from the previous
   strength's representation (``inits``).
2. **Folds.** Every task's samples are split into ``K`` folds (padded rows of ragged tasks, given
   by ``mask``, are in no fold). For each strength, each fold and each task, the task's own part
   (head ``w_t`` and perturbation ``v_t``) is refitted on the other folds with that strength's
   representation, and scored by the mean squared error on the held-out fold; all strengths,
   folds and tasks are one batch. The representation itself is not refitted per fold (that would
   cost ``K`` times the path): it is shared by ``T`` tasks, so one held-out fold of one task moves
   it by ``O(1 / T)``, while the per-task fits that the penalty controls are held out exactly.
3. **Rule.** One standard error toward the stronger penalty: among the strengths whose mean
   held-out error exceeds the minimum's by at most one standard error of the task-paired
   differences, the strongest. Held-out error is flat near its minimum and noisy, and the
   errors of a too-weak penalty (every task fits noise in ``d`` directions) are worse for the
   source-task estimates than the held-out error shows, so ties go to the shared representation.

The cost is the path (``strengths`` fits, each warm-started; the FROZENREP end is cheap) plus one
batched proximal-gradient solve; the chosen fit is returned so that it is not fitted again.

Measured (``benchmarks/delta_sweep.py``: ``linear``, d = 30, k = 5, T = 50, n = 100, sigma = 1, 5 seeds;
max over source tasks of ``||beta_hat_t - beta_t||``, FROZENREP / theory formula / this rule):
delta = 0: 0.424 / 0.562 / 0.424; 0.3: 0.591 / 0.598 / 0.577; 0.6: 0.953 / 0.684 / 0.727;
1.0: 1.470 / 0.777 / 0.784; 1.5: 2.108 / 0.845 / 0.836; about 2-4x the time of one theory-penalty fit.
So it removes the formula's loss at delta = 0 but trails it at delta = 0.6: held-out prediction
error is a mean over tasks of squared errors, and its minimum sits at a stronger penalty than the
one that minimises the largest task's error (the most perturbed tasks want a weaker one). The leak
of the held-out folds into the representation also favours strong penalties a little: refitting the
representation on every fold for the chosen strength and the next weaker one moved delta = 0.6 to
0.712 and delta = 1 to 0.779, at 6-9x the cost, so it is not done. The rule ``"1se"`` (strongest
within one standard error) chose stronger penalties still (delta = 1: 0.754 against 0.741 for
``"min"`` on the 5 seeds of an earlier grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .solvers import HeadSolver, SourceFit, fit_perturbation, fit_source, lipschitz, matvec, mse, penalty_prox, predictor

__all__ = ["PenaltyPath", "cv_penalty", "fold_masks", "masked_statistics", "sample_mask"]


def sample_mask(X: Tensor, mask: Tensor | None = None) -> Tensor:
    """The ``(T, n)`` float mask of real samples: ``mask`` if given, else all ones."""
    if mask is not None:
        return mask.to(X.dtype)
    return torch.ones(X.shape[:2], dtype=X.dtype, device=X.device)


def masked_statistics(X: Tensor, y: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(G, c, q)`` of the samples selected by ``weights`` (``(..., T, n)`` of 0/1), each task
    divided by its own count: ``G = X^T diag(m) X / sum(m)`` etc. (leading dims of ``weights`` broadcast)."""
    count = weights.sum(-1).clamp_min(1)
    Xm = X * weights.unsqueeze(-1)
    G = Xm.transpose(-1, -2) @ X / count[..., None, None]
    c = matvec(Xm.transpose(-1, -2), y) / count[..., None]
    q = (weights * y * y).sum(-1) / count
    return G, c, q


def fold_masks(valid: Tensor, folds: int, generator: torch.Generator) -> Tensor:
    """Held-out masks ``(K, T, n)``: each task's real samples (``valid``, ``(T, n)``) dealt at random
    into ``K`` folds of sizes differing by at most one; padded samples are in no fold."""
    T, n = valid.shape
    noise = torch.rand(T, n, generator=generator, dtype=torch.float64)
    order = torch.argsort(noise + 2.0 * (valid.cpu() <= 0), dim=-1)  # real samples first, shuffled
    rank = torch.empty(T, n, dtype=torch.long)
    rank.scatter_(1, order, torch.arange(n).expand(T, n).contiguous())
    fold_of = torch.where(valid.cpu() > 0, rank % folds, torch.full_like(rank, -1))
    return (fold_of.unsqueeze(0) == torch.arange(folds).view(folds, 1, 1)).to(valid.device, valid.dtype)


@dataclass
class PenaltyPath:
    """Result of :func:`cv_penalty`: the strengths (strongest first, ``inf`` = FROZENREP), their mean
    held-out errors and standard errors, the chosen index and penalty, and the chosen fit."""

    strengths: list[float]
    errors: list[float]
    standard_errors: list[float]
    chosen: int
    penalty: float
    fit: SourceFit
    per_task: Tensor | None = None
    fits: list[SourceFit] | None = None


def cv_penalty(
    X: Tensor,
    y: Tensor,
    rank: int,
    mask: Tensor | None = None,
    folds: int = 5,
    strengths: int = 8,
    step: float = 0.6,
    patience: int = 2,
    rule: str = "min",
    refit_steps: int = 150,
    seed: int = 0,
    path_gtol: float = 1e-4,
    max_iter: int = 2000,
    inner_steps: int = 10,
    gtol: float = 1e-6,
) -> PenaltyPath:
    """Choose ADAPTREP's source penalty by ``folds``-fold cross-validation (see the module docstring).

    ``X (T, n, d)``, ``y (T, n)``; ``mask (T, n)`` marks real samples of ragged tasks (padded rows
    are zero). After FROZENREP, up to ``strengths`` finite penalties ``mu_max * step^j`` are tried,
    strongest first; the path stops once the held-out error has been above its running minimum for
    ``patience`` strengths in a row. ``rule`` is ``"min"`` (the smallest mean held-out error) or
    ``"1se"`` (the strongest within one standard error of it). ``seed`` fixes the fold split. Path
    fits stop at the gradient tolerance ``path_gtol``; the chosen one is then refined (warm-started)
    to ``gtol``. ``max_iter``, ``inner_steps`` and ``gtol`` go to :func:`~adaptrep.solvers.fit_source`.
    """
    if folds < 2 or strengths < 1 or not 0 < step < 1 or patience < 1:
        raise ValueError(f"cv_penalty needs folds >= 2, strengths >= 1, 0 < step < 1 and patience >= 1; got {folds}, {strengths}, {step}, {patience}")
    if rule not in ("min", "1se"):
        raise ValueError(f"cv_penalty rule must be 'min' or '1se'; got {rule!r}")
    valid = sample_mask(X, mask)
    counts = valid.sum(-1)
    if float(counts.min()) < 2:
        raise ValueError("cv_penalty needs at least 2 samples in every source task")
    G, c, q = masked_statistics(X, y, valid)
    options = dict(max_iter=max_iter, inner_steps=inner_steps)
    held = fold_masks(valid, min(folds, int(counts.min())), torch.Generator().manual_seed(seed))
    Gt, ct, _ = masked_statistics(X, y, valid * (1 - held))
    Gv, cv, qv = masked_statistics(X, y, held)
    weight = held.sum(-1)  # held-out samples per fold and task (K, T)
    # the same strength for a smaller sample: the noise in the gradient grows like 1 / sqrt(count)
    scale = (counts / (valid * (1 - held)).sum(-1).clamp_min(1)).sqrt()  # (K, T)
    L = lipschitz(Gt)

    def held_out(fit: SourceFit, mu: float) -> Tensor:
        """Per-task held-out error ``(T,)``: each task's head and perturbation refitted on the
        training folds with ``fit``'s representation, scored on the held-out fold."""
        heads = HeadSolver.build(fit.B, Gt)
        strength = torch.as_tensor(mu, dtype=X.dtype, device=X.device) * scale
        w, v = fit_perturbation(heads, ct, L, fit.V.expand_as(ct), penalty_prox, strength, refit_steps)
        return (mse(Gv, cv, qv, predictor(fit.B, w, v)) * weight).sum(0) / weight.sum(0)

    frozen = fit_source(G, c, q, rank, penalty=math.inf, gtol=gtol, **options)  # type: ignore[arg-type]
    top = float((2 * (matvec(G, predictor(frozen.B, frozen.W)) - c)).norm(dim=-1).max())
    path, fits, per_task = [math.inf], [frozen], [held_out(frozen, math.inf)]
    best, worse = 0, 0
    for j in range(strengths):
        mu = top * step**j
        fit = fit_source(G, c, q, rank, penalty=mu, inits=fits[-1].B.unsqueeze(0), select_after=1, gtol=path_gtol, **options)  # type: ignore[arg-type]
        path.append(mu)
        fits.append(fit)
        per_task.append(held_out(fit, mu))
        if per_task[-1].mean() < per_task[best].mean():
            best, worse = len(path) - 1, 0
        else:
            worse += 1
            if worse >= patience:
                break
    errors = torch.stack(per_task)  # (S, T)
    mean = errors.mean(-1)
    diff = errors - errors[best]
    se = diff.std(-1) / math.sqrt(errors.shape[-1]) if errors.shape[-1] > 1 else torch.zeros_like(mean)
    chosen = best if rule == "min" else int((diff.mean(-1) <= se).nonzero().flatten()[0])
    fit = fits[chosen]
    if chosen > 0 and path_gtol > gtol:  # refine the chosen fit, warm-started
        fit = fit_source(G, c, q, rank, penalty=path[chosen], inits=fit.B.unsqueeze(0), select_after=1, gtol=gtol, **options)  # type: ignore[arg-type]
    return PenaltyPath(
        strengths=path,
        errors=[float(e) for e in mean],
        standard_errors=[float(s) for s in se],
        chosen=chosen,
        penalty=path[chosen],
        fit=fit,
        per_task=errors,
        fits=fits,
    )
