"""The generic path on ragged tasks (zero-padded, with a per-sample weight) and with the multiclass
cross-entropy: against scikit-learn, stationarity, per-task loops over the unpadded tasks, and
finite differences."""

import math
import os

import pytest
import torch
from helpers import random_labels
from torch.func import vmap

from adaptrep import cv
from adaptrep.meta import MetaConfig, inner_adapt, meta_gradient, meta_train, split_support, support_sizes
from adaptrep.models import (
    Model,
    _descend,
    _objective,
    cv_heads,
    finetune,
    fit_heads,
    fit_shared,
    init_mlp,
    linear_model,
    logistic_finetune,
    mlp_model,
    pointwise_loss,
    pointwise_loss_slope,
    relu_model,
    task_loss,
)
from adaptrep.multiclass import fit_multinomial

F64 = torch.float64
D, K, N = 4, 3, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread


def _ragged(loss, sizes=(5, 9, 3, 7), d=D, seed=0):
    """Per-task unpadded data and the zero-padded batch with its 0/1 weight."""
    g = torch.Generator().manual_seed(seed)
    tasks = [(torch.randn(n, d, generator=g, dtype=F64), random_labels(loss, (n,), g)) for n in sizes]
    n_max = max(sizes)
    X = torch.zeros(len(sizes), n_max, d, dtype=F64)
    y = torch.zeros(len(sizes), n_max, dtype=F64)
    weight = torch.zeros(len(sizes), n_max, dtype=F64)
    for t, (Xt, yt) in enumerate(tasks):
        X[t, : len(yt)], y[t, : len(yt)], weight[t, : len(yt)] = Xt, yt, 1
    return tasks, X, y, weight


def _module(k=K):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(), torch.nn.Linear(6, k)).to(F64)


def _model(name):
    """A model, its parameters and a head of the right shape (``(k,)`` or ``(k, N)``)."""
    g = torch.Generator().manual_seed(7)
    if name == "module-multiclass":
        model, theta = Model.from_module(_module(), "multiclass", classes=N)
        return model, theta, torch.randn(K, N, generator=g, dtype=F64) / 2
    if name == "mlp-multiclass":
        theta, _ = init_mlp((D, 5, 4), g, dtype=F64)
        return mlp_model((D, 5, 4), "multiclass", N), theta, torch.randn(5, N, generator=g, dtype=F64) / 2
    kinds = {"linear-logistic": (linear_model, "logistic"), "relu-squared": (relu_model, "squared"), "linear-multiclass": (linear_model, "multiclass")}
    factory, loss = kinds[name]
    key = "W" if factory is relu_model else "B"
    theta = {key: torch.randn(D, K, generator=g, dtype=F64) / 2 + 0.1}
    w = torch.randn(K, N, generator=g, dtype=F64) if loss == "multiclass" else torch.randn(K, generator=g, dtype=F64)
    return factory(loss, N if loss == "multiclass" else None), theta, w


NAMES = ["linear-logistic", "relu-squared", "linear-multiclass", "mlp-multiclass", "module-multiclass"]


# ---------------------------------------------------------------- the multiclass loss and heads


def test_cross_entropy_with_two_classes_is_the_logistic_loss_of_the_logit_difference():
    g = torch.Generator().manual_seed(0)
    f = 3 * torch.randn(50, generator=g, dtype=F64)
    y = (torch.rand(50, generator=g, dtype=F64) < 0.5).to(F64)
    logits = torch.stack([torch.zeros_like(f), f], -1)
    torch.testing.assert_close(pointwise_loss("multiclass", logits, y), pointwise_loss("logistic", f, y), rtol=1e-13, atol=1e-13)
    slope = pointwise_loss_slope("multiclass", logits, y)
    torch.testing.assert_close(slope[:, 1], pointwise_loss_slope("logistic", f, y), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(slope.sum(-1), torch.zeros_like(f), rtol=0, atol=1e-15)
    # heads: with W = [W0, W1] and penalty r (|W0|^2 + |W1|^2), the optimum has W0 = -W1, so the
    # logit difference v = W1 - W0 is the logistic fit with the penalty (r / 2) |v|^2
    X = torch.randn(3, 30, D, generator=g, dtype=F64)
    labels = (torch.rand(3, 30, generator=g, dtype=F64) < torch.sigmoid(X.sum(-1))).to(F64)
    eye = {"B": torch.eye(D, dtype=F64)}
    W = fit_heads(linear_model("multiclass", 2), eye, X, labels, ridge=0.04)
    v = fit_heads(linear_model("logistic"), eye, X, labels, ridge=0.02)
    torch.testing.assert_close(W[..., 1] - W[..., 0], v, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(W[..., 1], -W[..., 0], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
def test_multiclass_heads_equal_scikit_learn(weighted):
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(1)
    T, n, ridge = 3, 60, 0.03
    X = torch.randn(T, n, D, generator=g, dtype=F64)
    truth = 2 * torch.randn(T, D, N, generator=g, dtype=F64)
    y = torch.distributions.Categorical(logits=X @ truth).sample().to(F64)  # global RNG: any labels will do
    weight = 0.2 + torch.rand(T, n, generator=g, dtype=F64) if weighted else None
    W = fit_heads(linear_model("multiclass", N), {"B": torch.eye(D, dtype=F64)}, X, y, weight=weight, ridge=ridge)
    assert W.shape == (T, D, N)
    for t in range(T):
        a = torch.ones(n, dtype=F64) if weight is None else weight[t]
        # ours: sum a_i CE_i / sum a + ridge |W|^2; scikit-learn: C sum a_i CE_i + |W|^2 / 2
        peer = sklearn.LogisticRegression(C=1 / (2 * ridge * float(a.sum())), fit_intercept=False, tol=1e-12, max_iter=10_000)
        peer.fit(X[t].numpy(), y[t].long().numpy(), sample_weight=a.numpy())
        reference = torch.tensor(peer.coef_.T, dtype=F64)  # (d, N)
        assert (W[t] - reference).abs().max() < 1e-5, (W[t] - reference).abs().max()


@pytest.mark.parametrize("loss", ["squared", "logistic", "multiclass"])
def test_weighted_heads_are_stationary_points_of_the_weighted_objective(loss):
    """The heads minimise sum_i a_i l_i / sum_i a_i + ridge |w|^2 with fractional weights and
    padding (linear in the weight, as task_loss)."""
    _, X, y, weight = _ragged(loss, sizes=(25, 40, 12), seed=3)
    weight = weight * (0.3 + torch.rand(weight.shape, generator=torch.Generator().manual_seed(4), dtype=F64))
    model = linear_model(loss, N if loss == "multiclass" else None)
    theta = {"B": torch.linalg.qr(torch.randn(D, 2, generator=torch.Generator().manual_seed(5), dtype=F64))[0]}
    ridge = torch.tensor([0.01, 0.1, 0.003], dtype=F64)
    w = fit_heads(model, theta, X, y, weight=weight, ridge=ridge).requires_grad_()
    objective = vmap(lambda w, X, y, a: task_loss(model, theta, None, w, X, y, a))(w, X, y, weight) + ridge * (w * w).flatten(1).sum(-1)
    (gradient,) = torch.autograd.grad(objective.sum(), w)
    assert gradient.abs().max() < 1e-9
    # and weights enter linearly: doubling every weight changes nothing
    torch.testing.assert_close(fit_heads(model, theta, X, y, weight=2 * weight, ridge=ridge), w.detach(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("loss", ["squared", "logistic", "multiclass"])
def test_integer_weights_equal_repeated_samples(loss):
    """A weight of 2 is the sample twice, 0 is no sample: an independent check of the weighted fits
    and of the class count inferred from the labels (no ``classes`` given)."""
    g = torch.Generator().manual_seed(8)
    X = torch.randn(2, 15, D, generator=g, dtype=F64)
    y = random_labels(loss, (2, 15), g)
    counts = torch.randint(0, 3, (2, 15), generator=g)
    counts[:, :N] = 1  # every class present in both tasks
    if loss == "multiclass":
        y[:, :N] = torch.arange(N, dtype=F64)
    model, theta = linear_model(loss), {"B": torch.eye(D, dtype=F64)[:, :3]}
    weighted = fit_heads(model, theta, X, y, weight=counts.to(F64), ridge=0.02)
    for t in range(2):
        repeated = fit_heads(model, theta, X[t].repeat_interleave(counts[t], 0)[None], y[t].repeat_interleave(counts[t])[None], ridge=0.02)
        torch.testing.assert_close(weighted[t], repeated[0], rtol=1e-9, atol=1e-11)


def test_multinomial_chunks_and_bad_labels():
    g = torch.Generator().manual_seed(2)
    Phi = torch.randn(7, 20, 3, generator=g, dtype=F64)
    y = torch.randint(0, 4, (7, 20), generator=g).to(F64)
    whole = fit_multinomial(Phi, y, 0.05, 4)
    torch.testing.assert_close(fit_multinomial(Phi, y, 0.05, 4, chunk_bytes=1), whole, rtol=1e-12, atol=1e-12)  # one task a chunk
    with pytest.raises(ValueError, match=r"integer class indices in \[0, 4\); got 1.5 at \(task, sample\) \(2, 3\)"):
        fit_multinomial(Phi, torch.where((torch.arange(7)[:, None] == 2) & (torch.arange(20) == 3), 1.5, y), 0.05, 4)
    with pytest.raises(ValueError, match=r"got 4.0"):
        fit_heads(linear_model("multiclass", 4), {"B": torch.eye(3, dtype=F64)}, Phi, y + (y == 3).to(F64))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        linear_model("hinge")  # type: ignore[arg-type]


# ---------------------------------------------------------------- cross-validation folds


def test_fold_masks_draw_among_real_samples_only():
    _, X, _, weight = _ragged("squared", sizes=(12, 3, 7, 2, 5), seed=0)
    folds = cv.fold_masks(X, 5, torch.Generator().manual_seed(1), weight)
    held, present = folds.held_out, folds.present
    assert held.shape == (5, 5, 12) and present.shape == (5, 5)
    assert present.sum(1).tolist() == [5, 3, 5, 2, 5]  # min(folds, count)
    assert (held * (1 - weight).unsqueeze(1)).sum() == 0  # never padding
    torch.testing.assert_close(held.sum(1), weight)  # every real sample held out exactly once
    sizes = held.sum(-1)
    assert ((sizes >= 1) == present).all()  # every present fold holds out a real sample, absent ones none
    assert (sizes.amax(1) - torch.where(present, sizes, math.inf).amin(1)).max() <= 1  # balanced
    with pytest.raises(ValueError, match="at least 2 samples per task; task 1 has 1"):
        cv.fold_masks(X[:2], 5, None, torch.tensor([[1.0] * 12, [1.0] + [0.0] * 11], dtype=F64))


def test_fold_masks_of_equal_tasks_are_unchanged_by_an_all_ones_weight():
    X = torch.randn(4, 9, 2, dtype=F64)
    a = cv.fold_masks(X, 4, torch.Generator().manual_seed(3))
    b = cv.fold_masks(X, 4, torch.Generator().manual_seed(3), torch.ones(4, 9, dtype=F64))
    assert torch.equal(a.held_out, b.held_out) and a.partial() is None
    # the linear path's folds are the same draw
    from adaptrep.finetune import fold_statistics

    (_, _, _), (_, _, q) = fold_statistics(X, torch.arange(36.0, dtype=F64).reshape(4, 9), 4, torch.Generator().manual_seed(3))
    expected = (a.held_out * torch.arange(36.0, dtype=F64).reshape(4, 1, 9) ** 2).sum(-1) / a.held_out.sum(-1)
    torch.testing.assert_close(q, expected)


def test_masked_rules_equal_the_rules_on_the_present_folds_alone():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 5, 4, generator=g, dtype=F64)
    present = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    garbage = torch.where(present.unsqueeze(-1), losses, torch.nan)
    for rule in ("min", "1se", "paired"):
        masked = cv.select(garbage, rule, present)
        alone = [int(cv.select(losses[r : r + 1, : int(present[r].sum())], rule)[0]) for r in range(3)]
        assert masked.tolist() == alone, rule


def test_cross_validated_heads_on_ragged_tasks_equal_a_per_task_loop():
    """Ridge choice among real samples: the batch (with padding, a task with fewer samples than
    folds) equals each unpadded task cross-validated on the same folds by hand."""
    from adaptrep.models import RIDGES

    for loss in ("squared", "multiclass"):
        tasks, X, y, weight = _ragged(loss, sizes=(9, 4, 14), seed=6)
        model = linear_model(loss, N if loss == "multiclass" else None)
        theta = {"B": torch.linalg.qr(torch.randn(D, 2, generator=torch.Generator().manual_seed(0), dtype=F64))[0]}
        heads, chosen = cv_heads(model, theta, X, y, torch.Generator().manual_seed(5), folds=5, weight=weight)
        folds = cv.fold_masks(X, 5, torch.Generator().manual_seed(5), weight)
        for t, (Xt, yt) in enumerate(tasks):
            scores = []
            for ridge in RIDGES:
                losses = []
                for f in range(int(folds.present[t].sum())):
                    held = folds.held_out[t, f, : len(yt)].bool()
                    w = fit_heads(model, theta, Xt[None, ~held], yt[None, ~held], ridge=ridge)
                    losses.append(task_loss(model, theta, None, w[0], Xt[held], yt[held]))
                scores.append(torch.stack(losses).mean())
            expected = RIDGES[int(torch.stack(scores).argmin())]
            assert float(chosen[t]) == pytest.approx(expected), (loss, t)
            own = fit_heads(model, theta, Xt[None], yt[None], ridge=expected)[0]
            torch.testing.assert_close(heads[t], own, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- source training


@pytest.mark.parametrize("name", NAMES)
def test_padded_source_objective_and_gradients_equal_a_per_task_loop(name):
    model, theta, w0 = _model(name)
    tasks, X, y, weight = _ragged(model.loss)
    T = len(tasks)
    g = torch.Generator().manual_seed(9)
    delta = {n: 0.1 * torch.randn(T, *v.shape, generator=g, dtype=F64) for n, v in theta.items()}
    w = w0 + 0.1 * torch.randn(T, *w0.shape, generator=g, dtype=F64)
    leaves = [*(v.clone().requires_grad_() for v in theta.values()), *(v.clone().requires_grad_() for v in delta.values()), w.clone().requires_grad_()]
    names = list(theta)

    def unpack(leaves):
        th = dict(zip(names, leaves[: len(names)], strict=True))
        de = dict(zip(names, leaves[len(names) : 2 * len(names)], strict=True))
        return th, de, leaves[-1]

    th, de, ww = unpack(leaves)
    batched = _objective(model, lam=0.3, gamma=0.05)(th, de, ww, X, y, weight).mean()
    grads = torch.autograd.grad(batched, leaves)
    th, de, ww = unpack(leaves)
    looped = sum(
        task_loss(model, th, {n: de[n][t] for n in names}, ww[t], Xt, yt) + 0.05 * (ww[t] ** 2).sum() + 0.3 * sum((de[n][t] ** 2).sum() for n in names)
        for t, (Xt, yt) in enumerate(tasks)
    )
    looped = looped / T
    reference = torch.autograd.grad(looped, leaves)
    assert abs(float(batched.detach()) - float(looped.detach())) < 1e-12
    for a, b in zip(grads, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["linear-logistic", "module-multiclass"])
def test_fit_shared_ignores_padding(name):
    """Equal-size tasks padded with garbage rows of weight 0 train exactly like the unpadded ones."""
    model, theta, _ = _model(name)
    _, X, y, _ = _ragged(model.loss, sizes=(6, 6, 6), seed=2)
    g = torch.Generator().manual_seed(3)
    Xp = torch.cat([X, torch.randn(3, 4, D, generator=g, dtype=F64)], 1)
    yp = torch.cat([y, random_labels(model.loss, (3, 4), g)], 1)
    weight = torch.cat([torch.ones(3, 6, dtype=F64), torch.zeros(3, 4, dtype=F64)], 1)
    for lam in (None, 0.5):
        plain = fit_shared(model, theta, X, y, lam=lam, gamma=0.01, steps=30, lr=0.02)
        padded = fit_shared(model, theta, Xp, yp, lam=lam, gamma=0.01, steps=30, lr=0.02, weight=weight)
        assert padded.objective == pytest.approx(plain.objective, rel=1e-10)
        torch.testing.assert_close(padded.w, plain.w, rtol=1e-8, atol=1e-10)
        for n in theta:
            torch.testing.assert_close(padded.theta[n], plain.theta[n], rtol=1e-8, atol=1e-10)
    assert plain.w.shape == ((3, K, N) if model.loss == "multiclass" else (3, K))


# ---------------------------------------------------------------- target adaptation


@pytest.mark.parametrize("name", ["relu-squared", "linear-multiclass", "module-multiclass"])
def test_padded_fine_tuning_descent_equals_a_per_task_loop(name):
    model, theta, _ = _model(name)
    tasks, X, y, weight = _ragged(model.loss, sizes=(8, 12, 5), seed=4)
    ridge = torch.tensor([0.01, 0.1, 0.03], dtype=F64)
    checkpoints = [0, 1, 2, 4, 8]
    classes = N if model.loss == "multiclass" else None
    deltas, heads, _ = _descend(model, theta, X, y, weight, None, ridge, checkpoints, 0.5, 0.5, classes)
    for t, (Xt, yt) in enumerate(tasks):
        ones = torch.ones(1, len(yt), dtype=F64)
        own_deltas, own_heads, _ = _descend(model, theta, Xt[None], yt[None], ones, None, ridge[t : t + 1], checkpoints, 0.5, 0.5, classes)
        torch.testing.assert_close(heads[:, t], own_heads[:, 0], rtol=1e-9, atol=1e-11)
        for n in theta:
            torch.testing.assert_close(deltas[n][:, t], own_deltas[n][:, 0], rtol=1e-9, atol=1e-11)


def test_fine_tuners_ignore_the_content_of_padding_and_an_all_ones_weight():
    """Garbage in the padding changes nothing; an all-ones weight gives the unweighted numbers."""
    g = torch.Generator().manual_seed(0)
    for name in ("relu-squared", "linear-multiclass", "linear-logistic"):
        model, theta, _ = _model(name)
        tasks, X, y, weight = _ragged(model.loss, sizes=(9, 6, 12), seed=1)
        garbage = (X + torch.randn(X.shape, generator=g, dtype=F64) * (1 - weight).unsqueeze(-1), y + (1 - weight) * random_labels(model.loss, y.shape, g))
        runs = []
        for Xa, ya in ((X, y), garbage):
            gen = torch.Generator().manual_seed(2)
            if model.loss == "logistic":
                ridge = cv_heads(model, theta, Xa, ya, gen, weight=weight)[1]
                runs.append(logistic_finetune(theta["B"], Xa, ya, ridge, torch.Generator().manual_seed(3), weight=weight))
            else:
                delta, w, steps = finetune(model, theta, Xa, ya, gen, max_steps=16, ridge=0.01, weight=weight)
                runs.append((*delta.values(), w, steps))
        for a, b in zip(*runs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        ones = torch.ones(3, 12, dtype=F64)
        X12, y12 = garbage[0], garbage[1]
        if model.loss == "logistic":
            y12 = y12.clamp(0, 1).round()
            a = logistic_finetune(theta["B"], X12, y12, torch.full((3,), 0.01, dtype=F64), torch.Generator().manual_seed(3))
            b = logistic_finetune(theta["B"], X12, y12, torch.full((3,), 0.01, dtype=F64), torch.Generator().manual_seed(3), weight=ones)
        else:
            y12 = y12.round().clamp(0, N - 1) if model.loss == "multiclass" else y12
            a = finetune(model, theta, X12, y12, torch.Generator().manual_seed(2), max_steps=16, ridge=0.01)
            b = finetune(model, theta, X12, y12, torch.Generator().manual_seed(2), max_steps=16, ridge=0.01, weight=ones)
            a, b = (*a[0].values(), *a[1:]), (*b[0].values(), *b[1:])
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- meta-learning


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("head_only", [False, True])
def test_padded_inner_adapt_equals_a_per_task_loop(name, head_only):
    model, theta, w = _model(name)
    tasks, X, y, weight = _ragged(model.loss)
    theta_k, w_k = inner_adapt(model, theta, w, X, y, steps=3, lr=0.3, head_only=head_only, weight=weight)
    assert w_k.shape == (len(tasks), *w.shape)
    for t, (Xt, yt) in enumerate(tasks):
        own_theta, own_w = inner_adapt(model, theta, w, Xt[None], yt[None], steps=3, lr=0.3, head_only=head_only)
        torch.testing.assert_close(w_k[t], own_w[0], rtol=1e-10, atol=1e-12)
        for n in theta:
            torch.testing.assert_close(theta_k[n][t], own_theta[n][0], rtol=1e-10, atol=1e-12)


CASES = [("maml", False), ("fomaml", False), ("anil", False), ("anil", True), ("reptile", False), ("pooled", False)]


@pytest.mark.parametrize("name", ["linear-logistic", "relu-squared", "mlp-multiclass", "module-multiclass"])
@pytest.mark.parametrize("algorithm,first_order", CASES)
def test_ragged_meta_gradient_equals_a_per_task_loop(name, algorithm, first_order):
    """Padded support and query sets with weights: the meta-gradient is the mean over tasks of each
    unpadded task's own (tasks of 3 to 9 support and 2 to 6 query samples)."""
    model, theta, w = _model(name)
    support, Xs, ys, sw = _ragged(model.loss, sizes=(5, 9, 3, 7), seed=1)
    query, Xq, yq, qw = _ragged(model.loss, sizes=(4, 2, 6, 3), seed=2)
    for chunk in (None, 3):
        config = MetaConfig(algorithm, inner_steps=2, inner_lr=0.2, first_order=first_order, chunk=chunk)
        loss, g_theta, g_w = meta_gradient(model, theta, w, Xs, ys, Xq, yq, config, support_weight=sw, query_weight=qw)
        own = [meta_gradient(model, theta, w, s[0][None], s[1][None], q[0][None], q[1][None], config) for s, q in zip(support, query, strict=True)]
        assert float(loss) == pytest.approx(sum(float(o[0]) for o in own) / 4, rel=1e-12)
        torch.testing.assert_close(g_w, sum(o[2] for o in own) / 4, rtol=1e-10, atol=1e-12)
        for n in theta:
            torch.testing.assert_close(g_theta[n], sum(o[1][n] for o in own) / 4, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,algorithm", [("linear-multiclass", "maml"), ("module-multiclass", "maml"), ("mlp-multiclass", "anil")])
def test_multiclass_meta_gradient_equals_central_finite_differences(name, algorithm):
    model, theta, w = _model(name)
    _, Xs, ys, sw = _ragged("multiclass", sizes=(5, 3, 4), seed=3)
    _, Xq, yq, qw = _ragged("multiclass", sizes=(3, 4, 2), seed=4)
    config = MetaConfig(algorithm, inner_steps=2, inner_lr=0.3)
    _, g_theta, g_w = meta_gradient(model, theta, w, Xs, ys, Xq, yq, config, support_weight=sw, query_weight=qw)
    names = sorted(theta)
    shapes = [theta[n].shape for n in names] + [w.shape]
    x0 = torch.cat([*(theta[n].reshape(-1) for n in names), w.reshape(-1)])

    def outer(x):
        parts = [p.reshape(s) for p, s in zip(torch.split(x, [math.prod(s) for s in shapes]), shapes, strict=True)]
        th = dict(zip(names, parts[:-1], strict=True))
        return float(meta_gradient(model, th, parts[-1], Xs, ys, Xq, yq, config, support_weight=sw, query_weight=qw)[0])

    eps = 1e-6
    fd = torch.tensor([(outer(x0 + eps * e) - outer(x0 - eps * e)) / (2 * eps) for e in torch.eye(x0.numel(), dtype=F64)], dtype=F64)
    got = torch.cat([*(g_theta[n].reshape(-1) for n in names), g_w.reshape(-1)])
    assert float((got - fd).norm() / fd.norm()) < 1e-6


def test_split_support_of_ragged_tasks_draws_among_real_samples():
    tasks, X, y, weight = _ragged("squared", sizes=(5, 9, 3, 7), seed=0)
    X = X + 100 * (1 - weight).unsqueeze(-1)  # padding is recognisable
    g = torch.Generator().manual_seed(0)
    for support in (2, 0.5):
        sizes = support_sizes(support, (weight > 0).sum(-1))
        assert sizes.tolist() == ([2] * 4 if support == 2 else [2, 4, 1, 3])
        Xs, ys, Xq, yq, sw, qw = split_support(X, y, sizes, g, weight=weight)
        assert Xs.shape[1] == int(sizes.max()) and Xq.shape[1] == 9 - int(sizes.min())
        assert sw.sum(-1).tolist() == sizes.tolist()
        assert qw.sum(-1).tolist() == [c - s for c, s in zip([5, 9, 3, 7], sizes.tolist(), strict=True)]
        assert (Xs[sw > 0] < 50).all() and (Xq[qw > 0] < 50).all()  # only real samples carry weight
        for t, (Xt, _) in enumerate(tasks):  # together, the task's real samples, each once
            chosen = torch.cat([Xs[t][sw[t] > 0], Xq[t][qw[t] > 0]])
            assert torch.equal(chosen[chosen[:, 0].argsort()], Xt[Xt[:, 0].argsort()])
    with pytest.raises(ValueError, match=r"support=3 gives 3 of the 3 samples of task 2 to the support.*smallest task has 3"):
        support_sizes(3, (weight > 0).sum(-1))
    with pytest.raises(ValueError, match=r"support=0.2 gives 0 of the 3 samples of task 2"):
        meta_train(*_model("relu-squared"), X, y, MetaConfig("maml", support=0.2, meta_batch=2, iterations=1), g, weight=weight)


@pytest.mark.parametrize("algorithm", ["maml", "anil", "reptile"])
def test_ragged_meta_train_runs_and_ignores_padding(algorithm):
    """The same seed gives the same run whatever the padding holds."""
    model, theta, w = _model("module-multiclass")
    _, X, y, weight = _ragged("multiclass", sizes=(6, 9, 4, 7, 5), seed=5)
    g = torch.Generator().manual_seed(0)
    garbage = (X + torch.randn(X.shape, generator=g, dtype=F64) * (1 - weight).unsqueeze(-1), y + (1 - weight))
    config = MetaConfig(algorithm, inner_steps=2, inner_lr=0.2, outer_lr=0.05, meta_batch=3, iterations=20, support=0.5, compile="never")
    fits = [meta_train(model, theta, w, Xa, ya, config, torch.Generator().manual_seed(1), weight=weight) for Xa, ya in ((X, y), garbage)]
    torch.testing.assert_close(fits[0].losses, fits[1].losses, rtol=1e-12, atol=1e-12)
    assert fits[0].w.shape == (K, N) and torch.isfinite(fits[0].losses).all()
    assert float(fits[0].losses[-5:].mean()) < float(fits[0].losses[:5].mean())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ADAPTREP_TEST_COMPILE") != "1", reason="torch.compile takes minutes on two CPU cores; set ADAPTREP_TEST_COMPILE=1")
def test_compiled_ragged_meta_train_equals_eager():
    model, theta, w = _model("mlp-multiclass")
    _, X, y, weight = _ragged("multiclass", sizes=(6, 9, 4, 7, 5), seed=5)
    for chunk in (None, 2):
        runs = {}
        for mode in ("never", "always"):
            config = MetaConfig("maml", inner_steps=2, inner_lr=0.2, meta_batch=4, iterations=3, support=0.5, chunk=chunk, compile=mode)
            runs[mode] = meta_train(model, theta, w, X, y, config, torch.Generator().manual_seed(1), weight=weight)
        eager, compiled = runs["never"], runs["always"]
        assert compiled.compiled
        torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(compiled.w, eager.w, rtol=1e-9, atol=1e-12)


def test_curvature_of_wide_inputs_equals_the_feature_space_bound():
    """Inputs wider than the sample count (images) use the n x n Gram matrix: the same eigenvalue."""
    from adaptrep.models import _curvature

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 5, 12, generator=g, dtype=F64)
    weight = torch.rand(3, 5, generator=g, dtype=F64)
    model = linear_model()
    theta = {"B": torch.linalg.qr(torch.randn(12, 2, generator=g, dtype=F64))[0]}
    w = torch.randn(3, 2, generator=g, dtype=F64)
    got = _curvature(model, theta, X, weight, w)[0]
    Xw = X * weight.unsqueeze(-1)
    expected = 2 * torch.linalg.eigvalsh(Xw.mT @ X / weight.sum(-1)[:, None, None])[..., -1] * (w * w).sum(-1) + 1e-12
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


class _TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.out = torch.nn.Linear(2 * 4 * 4, K)

    def forward(self, x):
        return torch.tanh(self.out(torch.relu(self.conv(x)).flatten(-3)))


def test_a_user_cnn_on_ragged_image_tasks():
    """Image inputs (n, 1, 4, 4) through every generic function: heads, fine-tuning, the inner loop
    and the meta-gradient, with padding (meta-gradient: equal to the per-task loop)."""
    torch.manual_seed(0)
    model, theta = Model.from_module(_TinyCNN().to(F64), "multiclass", classes=N)
    g = torch.Generator().manual_seed(1)
    sizes = (6, 9, 4)
    images = [torch.randn(n, 1, 4, 4, generator=g, dtype=F64) for n in sizes]
    labels = [torch.randint(0, N, (n,), generator=g).to(F64) for n in sizes]
    X = torch.zeros(3, 9, 1, 4, 4, dtype=F64)
    y = torch.zeros(3, 9, dtype=F64)
    weight = torch.zeros(3, 9, dtype=F64)
    for t, n in enumerate(sizes):
        X[t, :n], y[t, :n], weight[t, :n] = images[t], labels[t], 1
    heads, ridge = cv_heads(model, theta, X, y, g, weight=weight)
    assert heads.shape == (3, K, N) and torch.isfinite(heads).all()
    delta, w, steps = finetune(model, theta, X, y, g, max_steps=4, ridge=ridge, weight=weight)
    assert w.shape == (3, K, N) and all(torch.isfinite(v).all() for v in delta.values())
    w0 = torch.zeros(K, N, dtype=F64)
    Xs, ys, Xq, yq, sw, qw = split_support(X, y, 2, g, weight=weight)
    config = MetaConfig("maml", inner_steps=1, inner_lr=0.5)
    loss, g_theta, g_w = meta_gradient(model, theta, w0, Xs, ys, Xq, yq, config, support_weight=sw, query_weight=qw)
    own = []
    for t in range(3):
        keep_s, keep_q = sw[t] > 0, qw[t] > 0
        own.append(meta_gradient(model, theta, w0, Xs[t][keep_s][None], ys[t][keep_s][None], Xq[t][keep_q][None], yq[t][keep_q][None], config))
    assert float(loss) == pytest.approx(sum(float(o[0]) for o in own) / 3, rel=1e-12)
    torch.testing.assert_close(g_w, sum(o[2] for o in own) / 3, rtol=1e-10, atol=1e-12)
    for n in theta:
        torch.testing.assert_close(g_theta[n], sum(o[1][n] for o in own) / 3, rtol=1e-10, atol=1e-12)
