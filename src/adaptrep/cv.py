"""Cross-validation, in one place: the folds, the grid of (task, fold, candidate) rows, and the
rules that pick a candidate from the held-out losses.

Every tuning loop of the library (the ridge of the heads, :func:`adaptrep.models.cv_heads`; the
number of fine-tuning steps, :func:`adaptrep.models.finetune`; the subspace penalty of
:func:`adaptrep.models.logistic_finetune`; the strength of :class:`adaptrep.finetune.FineTune`)
draws its folds with :func:`fold_masks` and chooses with :func:`select`.

Tasks may be ragged: given as zero-padded rows with a per-sample ``weight`` ``(R, n)`` (``> 0`` for
real samples, 0 for padding), folds are drawn among each task's real samples only. A task with
``c`` real samples gets ``min(folds, c)`` folds (``c >= 2`` needed); the fold tensors have the
largest count of folds of any task, and ``present`` marks the folds that a task has. Every
present fold holds out at least one real sample and no padding. The rules average over a task's
present folds only.

The draw: a random order of each task's real samples (``argsort`` of float64 uniforms from
``generator``, padding sorted last) dealt to its folds in turn, so fold sizes differ by at most one.
Equal-size tasks get the same folds with or without an all-ones ``weight``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["Folds", "fold_masks", "fold_counts", "grid_weights", "fold_mean", "select", "one_standard_error", "paired_rule", "Rule"]

Rule = Literal["min", "1se", "paired"]


class Folds(NamedTuple):
    """Held-out masks ``(R, F, n)`` (1 where sample ``i`` of task ``r`` is held out in fold ``f``) and
    ``present`` ``(R, F)`` (bool: whether task ``r`` has fold ``f``; all true for equal-size tasks
    with at least ``folds`` samples)."""

    held_out: Tensor
    present: Tensor

    def partial(self) -> Tensor | None:
        """``present``, or ``None`` when every task has every fold (the rules' unmasked path)."""
        return None if bool(self.present.all()) else self.present


def fold_counts(counts: Tensor, folds: int) -> Tensor:
    """The number of folds of each task, ``min(max(2, folds), count)``, from its number of real
    samples ``counts`` ``(R,)``; a ``ValueError`` naming the first task with fewer than 2 samples."""
    small = (counts < 2).nonzero()
    if small.numel():
        first = int(small[0, 0])
        raise ValueError(f"cross-validation needs at least 2 samples per task; task {first} has {int(counts[first])}")
    return counts.clamp(max=max(2, folds))


def fold_masks(like: Tensor, folds: int, generator: torch.Generator | None = None, weight: Tensor | None = None) -> Folds:
    """Random fold masks for the ``R`` tasks of ``like`` (``(R, n, ...)``: its dtype and device are
    the masks'): each task's real samples (``weight > 0``; all ``n`` when ``weight`` is ``None``) in a
    random order, dealt to its ``min(folds, count)`` folds in turn (module docstring)."""
    R, n = like.shape[:2]
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    scores = torch.rand(R, n, generator=generator, dtype=torch.float64, device=generator.device)
    if weight is None:
        counts = torch.full((R,), n, dtype=torch.long)
        valid = None
    else:
        if weight.shape != (R, n):
            raise ValueError(f"weight must have shape {(R, n)} (tasks, samples); got {tuple(weight.shape)}")
        valid = (weight > 0).to(scores.device)
        counts = valid.sum(-1).cpu()
        scores = scores + 2 * (~valid)  # padding sorts after every real sample
    per_task = fold_counts(counts, folds)
    F = int(per_task.max())
    order = torch.argsort(scores, dim=-1)
    rank = torch.empty(R, n, dtype=torch.long, device=scores.device)
    rank.scatter_(1, order, torch.arange(n, device=scores.device).expand(R, n).contiguous())
    per_task = per_task.to(scores.device)
    fold_of = rank % per_task.unsqueeze(-1)
    if valid is not None:
        fold_of = torch.where(valid, fold_of, -1)
    held_out = fold_of.unsqueeze(1) == torch.arange(F, device=scores.device).view(1, F, 1)
    present = torch.arange(F, device=scores.device).unsqueeze(0) < per_task.unsqueeze(-1)
    return Folds(held_out.to(like.device, like.dtype), present.to(like.device))


def grid_weights(folds: Folds, weight: Tensor | None, candidates: int) -> tuple[Tensor, Tensor]:
    """Training and held-out sample weights ``(R * F * C, n)`` for ``C`` candidates scored on the
    same folds, rows ordered (task, fold, candidate): the task's ``weight`` (1 when ``None``) off,
    resp. on, the fold."""
    held = folds.held_out
    R, F, n = held.shape
    base = torch.ones(R, n, dtype=held.dtype, device=held.device) if weight is None else weight.to(held.dtype)
    train = base.unsqueeze(1) * (1 - held)
    valid = base.unsqueeze(1) * held
    expand = lambda mask: mask.unsqueeze(2).expand(R, F, candidates, n).reshape(R * F * candidates, n)  # noqa: E731
    return expand(train), expand(valid)


def _masked(losses: Tensor, present: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-candidate mean over a task's present folds, its standard deviation (``n - 1``) and the
    number of folds, from losses ``(R, F, C)``."""
    if present is None:
        return losses.mean(1), losses.std(1), torch.full(losses.shape[:1], losses.shape[1], dtype=losses.dtype, device=losses.device)
    mask = present.unsqueeze(-1)
    count = present.sum(1).to(losses.dtype)
    mean = torch.where(mask, losses, 0).sum(1) / count.unsqueeze(-1)
    spread = torch.where(mask, losses - mean.unsqueeze(1), 0)
    std = ((spread * spread).sum(1) / (count.unsqueeze(-1) - 1)).sqrt()
    return mean, std, count


def fold_mean(losses: Tensor, present: Tensor | None = None) -> Tensor:
    """Mean held-out loss per task and candidate ``(R, C)`` over the task's present folds."""
    return _masked(losses, present)[0]


def one_standard_error(losses: Tensor, tolerance: float = 1.0, present: Tensor | None = None) -> Tensor:
    """The one-standard-error rule on held-out losses ``(R, F, C)`` (folds ``F``, candidates ``C``
    ordered from the most to the least regularised): per task, the first candidate whose mean
    loss is within ``tolerance`` standard errors (over the task's present folds) of the lowest mean."""
    mean, std, count = _masked(losses, present)
    error = std / count.sqrt().unsqueeze(-1) if present is not None else std / math.sqrt(losses.shape[1])
    best = mean.argmin(-1, keepdim=True)
    threshold = mean.gather(-1, best) + tolerance * error.gather(-1, best)
    return (mean <= threshold).to(torch.int64).argmax(-1)


def paired_rule(losses: Tensor, present: Tensor | None = None) -> Tensor:
    """The strongest candidate (first in order) whose fold-paired loss difference to the candidate
    of lowest mean loss is, on average, within one standard error of those differences: a weaker
    candidate is taken only as far as the held-out folds show a real gain. ``(R, F, C)`` -> ``(R,)``."""
    mean = fold_mean(losses, present)
    best = mean.argmin(-1, keepdim=True)
    diff = losses - torch.gather(losses, 2, best.unsqueeze(1).expand(-1, losses.shape[1], 1))
    diff_mean, diff_std, count = _masked(diff, present)
    se = diff_std / count.sqrt().unsqueeze(-1) if present is not None else diff_std / losses.shape[1] ** 0.5
    return torch.argmax((diff_mean <= se).to(torch.int8), dim=-1)


def select(losses: Tensor, rule: Rule = "min", present: Tensor | None = None) -> Tensor:
    """The chosen candidate per task ``(R,)`` from held-out losses ``(R, F, C)`` (candidates from the
    most to the least regularised): ``"min"`` the lowest mean (ties: the first), ``"1se"``
    :func:`one_standard_error`, ``"paired"`` :func:`paired_rule`."""
    if rule == "min":
        return fold_mean(losses, present).argmin(-1)
    if rule == "1se":
        return one_standard_error(losses, present=present)
    if rule == "paired":
        return paired_rule(losses, present)
    raise ValueError(f"unknown selection rule {rule!r}; choose min, 1se or paired")
