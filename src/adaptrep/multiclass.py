"""Multiclass cross-entropy with an N-way linear head: the loss, and its batched exact solver.

A head ``W`` (``(k, N)``) maps features ``phi`` (``(k,)``) to the logits ``z = W^T phi`` (``(N,)``);
the loss of a label ``y`` in ``{0, ..., N-1}`` is ``CE(z, y) = logsumexp(z) - z_y``, its gradient in
``z`` is ``softmax(z) - e_y`` and its Hessian ``diag(p) - p p^T`` (``p = softmax(z)``), whose largest
eigenvalue is at most 1/2. With two classes ``CE((0, f), y) = softplus(f) - y f``, the logistic loss
of the logit difference.

:func:`fit_multinomial` fits, per task, L2-regularised multinomial logistic regression on fixed
features by damped Newton (Cholesky on the ``kN x kN`` Hessian), every task at once, in chunks of
tasks that keep the Hessians within a memory budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .solvers import spd_solve

__all__ = ["cross_entropy", "cross_entropy_slope", "fit_multinomial", "labels_as_indices"]

#: Sufficient-decrease constant of the Armijo line search, and the most step halvings per iteration.
ARMIJO = 1e-4
MAX_HALVINGS = 50
#: Memory budget (bytes) of one chunk of tasks in :func:`fit_multinomial`.
CHUNK_BYTES = 512 * 2**20


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``logsumexp(z) - z_y`` for logits ``(..., N)`` and labels ``(...)`` (class indices,
    integer or float)."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)


def cross_entropy_slope(logits: Tensor, y: Tensor) -> Tensor:
    """Derivative of :func:`cross_entropy` in the logits: ``softmax(z) - e_y`` (``(..., N)``)."""
    classes = torch.arange(logits.shape[-1], device=logits.device)
    return torch.softmax(logits, -1) - (y.long().unsqueeze(-1) == classes).to(logits.dtype)


def labels_as_indices(y: Tensor, classes: int, weight: Tensor | None = None) -> Tensor:
    """Labels as ``long`` class indices, checked to be integers in ``[0, classes)`` where ``weight > 0``
    (padding, weight 0, is mapped to class 0); a ``ValueError`` naming the first bad label."""
    real = torch.ones_like(y, dtype=torch.bool) if weight is None else weight > 0
    bad = real & ((y != y.round()) | (y < 0) | (y >= classes))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"multiclass labels must be integer class indices in [0, {classes}); got {float(y[index])!r} at (task, sample) {index}")
    return torch.where(real, y, torch.zeros_like(y)).long()


def _objective(Phi: Tensor, labels: Tensor, weight: Tensor, count: Tensor, ridge: Tensor, W: Tensor, offset: Tensor) -> Tensor:
    """``sum_i a_i CE(W^T phi_i + o_i, y_i) / sum_i a_i + ridge ||W||_F^2`` per task ``(T,)``."""
    losses = cross_entropy(Phi @ W + offset, labels)
    return (losses * weight).sum(-1) / count + ridge * (W * W).sum((-1, -2))


def _newton_chunk(
    Phi: Tensor, labels: Tensor, weight: Tensor, ridge: Tensor, offset: Tensor, classes: int, max_iter: int, tol: float, init: Tensor | None = None
) -> Tensor:
    T, n, k = Phi.shape
    N = classes
    dtype, device = Phi.dtype, Phi.device
    count = weight.sum(-1)
    onehot = (labels.unsqueeze(-1) == torch.arange(N, device=device)).to(dtype)
    W = torch.zeros(T, k, N, dtype=dtype, device=device) if init is None else init.to(dtype).clone()
    eye = torch.eye(N * k, dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    active = torch.arange(T, device=device)
    for _ in range(max_iter):
        P_, L_, A_, C_, R_, W_, O_ = Phi[active], labels[active], weight[active], count[active], ridge[active], W[active], offset[active]
        Y_ = onehot[active]
        P = torch.softmax(P_ @ W_ + O_, -1)  # (t, n, N)
        scaled = P_ * (A_ / C_.unsqueeze(-1)).unsqueeze(-1)  # a_i phi_i / sum a
        grad = scaled.transpose(-1, -2) @ (P - Y_) + 2 * R_[:, None, None] * W_  # (t, k, N)
        todo = grad.flatten(1).norm(dim=-1) > tol
        if not bool(todo.all()):
            active, P_, L_, A_, C_, R_, W_, O_, P, scaled, grad = (v[todo] for v in (active, P_, L_, A_, C_, R_, W_, O_, P, scaled, grad))
        if active.numel() == 0:
            break
        t = active.numel()
        # Hessian in the order (class c, feature j): blocks Phi^T diag(a (p_c delta_cc' - p_c p_c')) Phi / sum a
        M = (P.unsqueeze(-1) * P_.unsqueeze(-2)).reshape(t, n, N * k)  # p_ic phi_ij
        H = -(M.transpose(-1, -2) @ (M * (A_ / C_.unsqueeze(-1)).unsqueeze(-1)))
        blocks = torch.einsum("tnj,tnc,tnl->tcjl", scaled, P, P_)  # (t, N, k, k)
        H = H.view(t, N, k, N, k)
        H.diagonal(dim1=1, dim2=3).add_(blocks.permute(0, 2, 3, 1))
        H = H.reshape(t, N * k, N * k) + 2 * R_[:, None, None] * eye
        jitter = 1e-12 * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
        g = grad.transpose(-1, -2).reshape(t, N * k)
        step = -spd_solve(H + jitter[:, None, None] * eye, g).reshape(t, N, k).transpose(-1, -2)
        value = _objective(P_, L_, A_, C_, R_, W_, O_)
        slope = (grad * step).sum((-1, -2))
        slack = 16 * eps * value.abs()  # accept changes below rounding (near the minimum)
        size = torch.ones_like(value)
        accepted = torch.zeros_like(value, dtype=torch.bool)
        new = W_
        for _ in range(MAX_HALVINGS):
            candidate = W_ + size[:, None, None] * step
            trial = _objective(P_, L_, A_, C_, R_, candidate, O_)
            ok = ~accepted & torch.isfinite(trial) & (trial <= value + ARMIJO * size * slope + slack)
            new = torch.where(ok[:, None, None], candidate, new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            size = torch.where(accepted, size, size / 2)
        W[active] = new
        active = active[accepted]  # stalled tasks (no decrease beyond rounding) are frozen
    return W


def fit_multinomial(
    Phi: Tensor,
    y: Tensor,
    ridge: float | Tensor,
    classes: int,
    *,
    weight: Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
    chunk_bytes: int = CHUNK_BYTES,
    offset: Tensor | None = None,
    init: Tensor | None = None,
) -> Tensor:
    """Per-task heads ``W`` ``(T, k, N)`` minimising ``sum_i a_i CE(W^T phi_i, y_i) / sum_i a_i +
    ridge ||W||_F^2`` (``a`` = ``weight``, 1 when ``None``; ``ridge`` a number or ``(T,)``, ``> 0``
    for a unique minimiser) for features ``Phi`` ``(T, n, k)`` and labels ``y`` ``(T, n)`` in
    ``{0, ..., classes - 1}``.

    Damped Newton from ``W = 0`` (or ``init``, e.g. the solution for a nearby ridge): the direction solves the ``kN x kN`` Hessian system by Cholesky
    (a ``1e-12`` relative jitter), the step is backtracked (Armijo) per task, and a task stops once
    its gradient norm is at most ``tol`` or no step decreases its objective beyond rounding. Tasks
    are processed in chunks whose Hessians and intermediates fit in ``chunk_bytes``. ``offset``
    ``(T, n, classes)``: fixed logits added to ``W^T phi_i`` (default 0), e.g. a prior mean's logits
    when ``W`` is the deviation from it."""
    if Phi.ndim != 3 or y.shape != Phi.shape[:2]:
        raise ValueError(f"fit_multinomial needs features (T, n, k) and labels (T, n); got {tuple(Phi.shape)} and {tuple(y.shape)}")
    T, n, k = Phi.shape
    if classes < 2:
        raise ValueError(f"multiclass heads need at least 2 classes; got {classes}")
    weight = torch.ones(T, n, dtype=Phi.dtype, device=Phi.device) if weight is None else weight.to(Phi.dtype)
    labels = labels_as_indices(y, classes, weight)
    lam = torch.as_tensor(ridge, dtype=Phi.dtype, device=Phi.device).expand(T)
    if not bool((torch.isfinite(lam) & (lam >= 0)).all()):
        raise ValueError("ridge must be finite and non-negative")
    if offset is not None and offset.shape != (T, n, classes):
        raise ValueError(f"offset must have shape {(T, n, classes)}; got {tuple(offset.shape)}")
    base = torch.zeros(T, n, classes, dtype=Phi.dtype, device=Phi.device) if offset is None else offset.to(Phi.dtype)
    Nk = classes * k
    per_task = Phi.element_size() * (4 * Nk * Nk + 3 * n * Nk + 4 * n * classes + 2 * n * k)
    chunk = max(1, chunk_bytes // per_task)
    parts = []
    for start in range(0, T, chunk):  # chunks of tasks (memory), not a loop over tasks
        part = slice(start, start + chunk)
        parts.append(_newton_chunk(Phi[part], labels[part], weight[part], lam[part], base[part], classes, max_iter, tol, None if init is None else init[part]))
    return torch.cat(parts) if parts else torch.zeros(0, k, classes, dtype=Phi.dtype, device=Phi.device)
