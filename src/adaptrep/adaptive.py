"""ADAPTREP's source penalty chosen from the data: K-fold cross-validation on a warm-started path.

The penalty ``mu`` of the ADAPTREP source objective (:mod:`adaptrep.solvers`) decides how much of
each task's predictor may leave the shared span (``v_t``). Too strong and the tasks that really are
perturbed are forced into the span (FROZENREP at ``mu = inf``); too weak and every ``v_t`` fits the
task's noise. :func:`cv_penalty` picks ``mu`` by held-out prediction error:

1. **Path.** From FROZENREP (``mu = inf``) the strengths run geometrically (``step = 0.75``) from
   ``mu_max`` down, where ``mu_max = max_t ||2 (G_t beta_t - c_t)||`` at the FROZENREP fit is the
   smallest penalty at which every ``v_t = 0`` is optimal for that representation (the gradient of
   the loss in ``v_t``; the group penalty's threshold). Each strength is fitted by
   :func:`~adaptrep.solvers.fit_source` on all source samples, warm-started from the previous
   strength's representation (``inits``). The path stops two strengths after the held-out error's
   minimum (``patience``).
2. **Folds.** Every task's samples are split into ``K`` folds (padded rows of ragged tasks, given
   by ``mask``, are in no fold). For each strength, each fold and each task, the task's own part
   (head ``w_t`` and perturbation ``v_t``) is refitted on the other folds with that strength's
   representation, and scored by the mean squared error on the held-out fold; all strengths,
   folds and tasks are one batch. With a per-task intercept (``intercept=True``) each fold's
   training part is centred on its own means and the held-out fold is scored against them, so that
   no held-out sample enters its task's intercept. The representation itself is not refitted per
   fold (that would cost ``K`` times the path): it is shared by ``T`` tasks, so one held-out fold
   of one task moves it by ``O(1 / T)``, while the per-task fits that the penalty controls are
   held out exactly.
3. **Rule** (``"weaker"``, the default). FROZENREP if it has the smallest mean held-out error;
   otherwise the strength one path step (a factor 0.75) weaker than the minimiser. Two biases of
   the held-out minimum point the same way, toward penalties that are too strong for the
   estimates the user gets:

   - held-out error is a *mean* over tasks of squared errors, and the tasks with the largest
     perturbations, which set the largest source-task error ``max_t ||beta_hat_t - beta_t||``,
     want a weaker penalty than the average task (the bias of the group penalty on a task is
     about ``mu / 2`` whatever its perturbation, while its variance saving does not grow with it);
   - the held-out folds leak into the representation (not refitted per fold), which fits them
     better the stronger the penalty.

   Refitting the representation on every fold for the minimiser and its weaker neighbour moved
   the choice that way at 6-9x the cost. FROZENREP keeps its place when it wins, so tasks that
   share the representation exactly get FROZENREP's fit. ``"min"`` (the minimiser itself) and
   ``"1se"`` (the strongest within one standard error) stay available.

The cost is the path (each fit warm-started; the FROZENREP end is cheap) plus one batched
proximal-gradient solve per strength; the chosen fit is refined and returned, not fitted again.

Measured (``benchmarks/delta_sweep.py``: ``linear``, d = 30, k = 5, T = 50, n = 100, sigma = 1,
10 seeds; max over source tasks of ``||beta_hat_t - beta_t||``; ``docs/results.md`` has the tables),
this rule / the theory formula / FROZENREP / pERM: delta = 0: 0.451 / 0.593 / 0.451 / 0.504;
0.3: 0.572 / 0.621 / 0.604 / 0.570; 0.6: 0.688 / 0.694 / 0.969 / 0.718; 1.0: 0.782 / 0.779 / 1.514 /
0.861; 1.5: 0.828 / 0.841 / 2.204 / 0.961; at 1.2-3.6x the time of one theory-penalty fit (means over
seeds). With 40 seeds (``docs/results/delta_sweep_source.csv``) the two closest cells are level, paired
by seed: against pERM at delta = 0.3, +0.004 +- 0.006; against the theory formula at 1.0, +0.001 +-
0.0013. In the 5-seed run of 0.4.0 the minimiser itself (``"min"``, step 0.6, the rule of 0.3.0)
gave 0.727 at delta = 0.6 and 0.784 at 1.0, against this rule's 0.682 and 0.780.
On two independent configurations (d = 20, k = 3, T = 100, n = 50 and d = 50, k = 4, T = 40,
n = 150; deltas 0 to 1.5, 4 seeds) the minimiser trailed the theory formula by up to 0.04 at
delta >= 0.6 on the second, and this rule came within 0.003 of it or ahead, and matched FROZENREP
at delta = 0 on both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from . import cv
from .solvers import Gram, HeadSolver, SourceFit, as_gram, fit_perturbation, fit_source, lipschitz, matvec, mse, penalty_prox, predictor, task_statistics

__all__ = ["PenaltyPath", "about", "cv_penalty", "masked_means", "masked_statistics", "sample_mask"]


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


def masked_means(X: Tensor, y: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The means ``(x_bar, y_bar)`` (``(..., T, d)``, ``(..., T)``) of the samples selected by ``weights``."""
    count = weights.sum(-1).clamp_min(1)
    return torch.einsum("...tn,tnd->...td", weights, X) / count.unsqueeze(-1), (weights * y).sum(-1) / count


def about(statistics: tuple[Tensor, Tensor, Tensor], means: tuple[Tensor, Tensor], centre: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(G, c, q)`` of the same samples taken about ``centre = (a, b)`` instead of 0, from their raw
    statistics and ``means = (x_bar, y_bar)``: ``E[(x - a)(x - a)^T] = G - x_bar a^T - a x_bar^T + a a^T``,
    ``E[(x - a)(y - b)] = c - x_bar b - a y_bar + a b``, ``E[(y - b)^2] = q - 2 y_bar b + b^2``."""
    (G, c, q), (xbar, ybar), (a, b) = statistics, means, centre
    cross = xbar.unsqueeze(-1) * a.unsqueeze(-2)
    G = G - cross - cross.transpose(-1, -2) + a.unsqueeze(-1) * a.unsqueeze(-2)
    c = c - xbar * b.unsqueeze(-1) - a * ybar.unsqueeze(-1) + a * b.unsqueeze(-1)
    return G, c, q - 2 * ybar * b + b * b


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
    strengths: int = 16,
    step: float = 0.75,
    patience: int = 2,
    rule: str = "weaker",
    refit_steps: int = 60,
    seed: int = 0,
    path_gtol: float = 1e-4,
    max_iter: int = 2000,
    inner_steps: int = 10,
    gtol: float = 1e-6,
    representation: Literal["auto", "gram", "samples"] = "auto",
    intercept: bool = False,
) -> PenaltyPath:
    """Choose ADAPTREP's source penalty by ``folds``-fold cross-validation (see the module docstring).

    ``X (T, n, d)``, ``y (T, n)``; ``mask (T, n)`` marks real samples of ragged tasks (padded rows
    are zero); a task with a single sample is never held out (it still trains), and ``per_task`` has the
    held-out errors of the others. After FROZENREP, up to ``strengths`` finite penalties ``mu_max * step^j`` are tried,
    strongest first; the path stops once the held-out error has been above its running minimum for
    ``patience`` strengths in a row. ``rule`` is ``"weaker"`` (the strength one step weaker than the
    smallest mean held-out error, unless that is FROZENREP; the default, see the module docstring),
    ``"min"`` (the smallest mean held-out error) or ``"1se"`` (the strongest within one standard error of it). ``seed`` fixes the fold split. Path
    fits stop at the gradient tolerance ``path_gtol``; the chosen one is then refined (warm-started)
    to ``gtol``. ``max_iter``, ``inner_steps`` and ``gtol`` go to :func:`~adaptrep.solvers.fit_source`.
    ``representation`` chooses the task statistics as :func:`~adaptrep.solvers.task_statistics` does
    (``"auto"``: the samples when ``n < d``); with the samples the folds are refitted one at a time,
    from zero perturbations, with ``2 * refit_steps`` steps. ``intercept``: every task has its own free
    intercept (``X`` and ``y`` centred per task by the caller, see ``methods._centered``). Each fold's
    refit then centres its training part on that part's own means, and the held-out fold is scored
    against them, so no held-out sample enters its own task's intercept (centring by the whole task's
    means would). The random-effects fit (no task with more samples than ``rank``) counts the degree of
    freedom that centring spends.
    """
    if folds < 2 or strengths < 1 or not 0 < step < 1 or patience < 1:
        raise ValueError(f"cv_penalty needs folds >= 2, strengths >= 1, 0 < step < 1 and patience >= 1; got {folds}, {strengths}, {step}, {patience}")
    if rule not in ("weaker", "min", "1se"):
        raise ValueError(f"cv_penalty rule must be 'weaker', 'min' or '1se'; got {rule!r}")
    valid = sample_mask(X, mask)
    counts = valid.sum(-1)
    eligible = counts >= 2  # a task with one sample is never held out; it still trains
    if not bool(eligible.any()):
        raise ValueError("cv_penalty needs a source task with at least 2 samples")
    # as task_statistics: Gram matrices when n >= d, else the samples themselves (O(T n d) memory)
    samples = representation == "samples" or (representation == "auto" and X.shape[-2] < X.shape[-1])
    G: Tensor | Gram
    if samples:
        G, c, q = task_statistics(X if mask is None else X * valid.unsqueeze(-1), y if mask is None else y * valid, counts, representation="samples")
    else:
        G, c, q = masked_statistics(X, y, valid)
    options = dict(max_iter=max_iter, inner_steps=inner_steps)
    if bool((counts <= rank).all()):  # every head fits its task exactly: no perturbation can lower a loss, and folds say nothing
        fit = fit_source(G, c, q, rank, penalty=math.inf, gtol=gtol, lost=int(intercept), **options)  # type: ignore[arg-type]
        return PenaltyPath(strengths=[math.inf], errors=[math.nan], standard_errors=[math.nan], chosen=0, penalty=math.inf, fit=fit, fits=[fit])
    # the folds of adaptrep.cv, one count for every task (the smallest eligible task's), tasks with one sample in none
    K = min(folds, int(counts[eligible].min()))
    held = torch.zeros(K, *valid.shape, dtype=valid.dtype, device=valid.device)
    held[:, eligible] = cv.fold_masks(valid[eligible], K, torch.Generator().manual_seed(seed), valid[eligible]).held_out.transpose(0, 1)
    train = valid * (1 - held)
    weight = held.sum(-1)  # held-out samples per fold and task (K, T)
    # the same strength for a smaller sample: the noise in the gradient grows like 1 / sqrt(count)
    scale = (counts / train.sum(-1).clamp_min(1)).sqrt()  # (K, T)

    if samples:  # one fold at a time (a loop over folds, never over tasks): one masked copy of X at once

        def fold(k: int) -> tuple[Gram, Tensor, Tensor, Tensor]:
            """Fold ``k``'s training statistics (on samples) and the means they are centred on (0 without an intercept)."""
            part = train[k]
            xbar, ybar = masked_means(X, y, part) if intercept else (X.new_zeros(X.shape[0], X.shape[-1]), y.new_zeros(y.shape[0]))
            Xk = (X - xbar.unsqueeze(-2)).mul_(part.unsqueeze(-1))
            Gk, ck, _ = task_statistics(Xk, (y - ybar.unsqueeze(-1)) * part, part.sum(-1).clamp_min(1), representation="samples")
            return Gk, ck, xbar, ybar

        Ls = [lipschitz(fold(k)[0]) for k in range(held.shape[0])]  # per fold, once: not per strength

        def held_out(fit: SourceFit, mu: float) -> Tensor:
            """Per-task held-out error ``(T,)`` (see the dense version below), fold by fold, each fold's
            perturbations from zero (their coordinates live in that fold's own sample space)."""
            total = torch.zeros_like(counts)
            for k in range(held.shape[0]):
                Gk, ck, xbar, ybar = fold(k)
                heads = HeadSolver.build(fit.B, Gk)
                strength = torch.as_tensor(mu, dtype=X.dtype, device=X.device) * scale[k]
                w, a = fit_perturbation(heads, ck, Ls[k], torch.zeros_like(y), penalty_prox, strength, 2 * refit_steps)
                beta = predictor(fit.B, w, Gk.coord_vector(a))
                fitted = torch.einsum("tnd,td->tn", X, beta) - (xbar * beta).sum(-1, keepdim=True)
                residual = (y - ybar.unsqueeze(-1) - fitted) * held[k]
                total = total + residual.square().sum(-1)
            return total[eligible] / weight.sum(0)[eligible]

    else:
        Gt, ct, qt = masked_statistics(X, y, train)
        Gv, cv_, qv = masked_statistics(X, y, held)
        if intercept:  # each fold's training part about its own means; the held-out fold about the same
            centre = masked_means(X, y, train)
            Gt, ct, _ = about((Gt, ct, qt), centre, centre)
            Gv, cv_, qv = about((Gv, cv_, qv), masked_means(X, y, held), centre)
        L = lipschitz(Gt)

        def held_out(fit: SourceFit, mu: float) -> Tensor:
            """Per-task held-out error ``(T,)``: each task's head and perturbation refitted on the
            training folds with ``fit``'s representation, scored on the held-out fold."""
            heads = HeadSolver.build(fit.B, Gt)
            strength = torch.as_tensor(mu, dtype=X.dtype, device=X.device) * scale
            w, v = fit_perturbation(heads, ct, L, fit.V.expand_as(ct), penalty_prox, strength, refit_steps)
            return (mse(Gv, cv_, qv, predictor(fit.B, w, v)) * weight).sum(0)[eligible] / weight.sum(0)[eligible]

    frozen = fit_source(G, c, q, rank, penalty=math.inf, gtol=gtol, **options)  # type: ignore[arg-type]
    top = float((2 * (as_gram(G).matvec(predictor(frozen.B, frozen.W)) - c)).norm(dim=-1).max())
    path, fits, per_task = [math.inf], [frozen], [held_out(frozen, math.inf)]
    best, worse = 0, 0
    # top = 0: FROZENREP fits every task exactly (n_t <= k): no perturbation can lower any loss
    for j in range(strengths if top > 1e-12 * float(c.norm(dim=-1).max().clamp_min(1e-300)) else 0):
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
    errors = torch.stack(per_task)  # (S, T'): the tasks with at least 2 samples
    mean = errors.mean(-1)
    diff = errors - errors[best]
    se = diff.std(-1) / math.sqrt(errors.shape[-1]) if errors.shape[-1] > 1 else torch.zeros_like(mean)
    if rule == "1se":
        chosen = int((diff.mean(-1) <= se).nonzero().flatten()[0])
    elif rule == "weaker" and best > 0:  # the path always runs at least one strength past its minimum
        chosen = min(best + 1, len(path) - 1)
    else:
        chosen = best
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
