"""Generic source training (:func:`adaptrep.models.fit_shared`), eager against compiled: the seconds of
the first compiled call (Dynamo trace + inductor build; a fresh inductor cache unless ``--cache-dir``
names a used one) and the steady-state seconds per Adam step of each, on two source problems:

* ``relu-net``: the preset's source tasks (d = 20, k = 5, T = 200, n = 50, delta = 0.3, noise 0.1),
  the two-layer ReLU representation, float64;
* ``digits-cnn``: the 100 source tasks of ``load_digits`` (5-way, 100 images of 8x8 each) with the
  README's small CNN (conv 1->4, 3x3, max-pool, linear 64->16) as ``Model.from_module``, multiclass
  loss, float32.

ADAPTREP (``lam`` as ``AdaptRep``'s default, perturbations of every parameter) and FROZENREP
(``lam=None``); then fine-tuning (:func:`adaptrep.models.finetune`, 5 folds, ``max_steps`` 256) from the
random start on 20 targets (relu-net: m = 320, the preset's largest; digits: 20 novel 5-way tasks of 100
images). The steady state is ``(t(S steps) - t(0 steps)) / S`` (the head fit and the final
evaluation cancel), after a warm-up; the last column is the largest difference between the compiled
and the eager ``theta`` after ``S`` steps, relative to the largest entry.

With ``--methods``, also the ``relu-net`` preset's whole source fits of ``AdaptRep`` and ``FrozenRep`` (4
starts x 600 steps each), eager and compiled, in one process after the first compilation.

    OMP_NUM_THREADS=1 python benchmarks/compiled_source_training.py [--steps 200] [--problems relu-net,digits-cnn] [--methods]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="steps timed per fit (S)")
    parser.add_argument("--problems", default="relu-net,digits-cnn")
    parser.add_argument("--max-steps", type=int, default=256, help="fine-tuning's max_steps (finetune's default)")
    parser.add_argument("--methods", action="store_true", help="also time AdaptRep and FrozenRep's whole source fits on relu-net (seeds 0, 1)")
    parser.add_argument("--cache-dir", default=None, help="inductor cache directory (default: a fresh one, a cold compilation)")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="adaptrep-inductor-")

    import torch

    from adaptrep.datasets import load_digits
    from adaptrep.environments import ReluNetEnvironment
    from adaptrep.models import Model, finetune, fit_shared, relu_model

    def relu_net() -> tuple[Model, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
        env = ReluNetEnvironment(20, 5, delta=0.3, noise=0.1, seed=0, test_points=10)
        source = env.sample_tasks(200, 50, torch.Generator().manual_seed(1))
        targets = env.sample_tasks(20, 320, torch.Generator().manual_seed(3))  # the preset's 20 targets at its largest m
        theta = {"W": torch.randn(20, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}
        return relu_model(), theta, source.X, source.y, 20 * 5, targets.X, targets.y

    def digits_cnn() -> tuple[Model, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
        tasks = load_digits()
        source = tasks.subset(torch.arange(100))  # base-0 ... base-99
        targets = tasks.subset(torch.arange(100, 120))  # novel-0 ... novel-19
        X = source.X.reshape(100, 100, 1, 8, 8).float()
        torch.manual_seed(0)
        cnn = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU()
        )
        model, theta = Model.from_module(cnn, "multiclass", classes=5)
        parameters = sum(p.numel() for p in cnn.parameters())
        return model, theta, X, source.y.float(), parameters, targets.X.reshape(20, 100, 1, 8, 8).float(), targets.y.float()

    problems = {"relu-net": relu_net, "digits-cnn": digits_cnn}
    S = args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; S = {S} steps; inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    rows, tuned = [], []
    for name in args.problems.split(","):
        model, theta, X, y, p, X_target, y_target = problems[name]()
        T, n = y.shape
        sigma = 0.5 if model.loss == "multiclass" else 0.1  # AdaptRep's noise level: 1/2 for class labels, else (here) the true one
        lam_default = 2 * sigma * (math.sqrt(p / (n * T)) + math.sqrt(p / n))  # AdaptRep's default penalty
        for method, lam in (("adaptrep", lam_default), ("frozenrep", None)):
            rows.append((name, method, *measure(fit_shared, model, theta, X, y, lam, S)))
            print(f"  {name} {method}: done", flush=True)
        tuned.append((name, *measure_finetune(finetune, model, model.retract(theta), X_target, y_target, args.max_steps)))
        print(f"  {name} finetune: done", flush=True)
    print()
    print("| problem | method | first compiled call (s) | eager (ms/step) | compiled (ms/step) | speed-up | max rel. diff. of theta |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, method, compile_s, eager_ms, compiled_ms, ratio, difference in rows:
        print(f"| {name} | {method} | {compile_s:.1f} | {eager_ms:.2f} | {compiled_ms:.2f} | {ratio:.1f}x | {difference:.1e} |")
    print()
    print(f"Fine-tuning (finetune, 20 targets x 5 folds, max_steps = {args.max_steps}; a step: one of the folds' paths and one of the final path)")
    print()
    print("| problem | first compiled call (s) | eager (ms/step) | compiled (ms/step) | speed-up | same chosen steps | max rel. diff. of heads |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, compile_s, eager_ms, compiled_ms, ratio, same, difference in tuned:
        print(f"| {name} | {compile_s:.1f} | {eager_ms:.2f} | {compiled_ms:.2f} | {ratio:.1f}x | {same:.0%} | {difference:.1e} |")
    if args.methods:
        time_methods()


def measure(fit_shared, model, theta, X, y, lam, S: int) -> tuple[float, float, float, float, float]:
    """(first compiled call less one step (s), eager and compiled ms per step, their ratio, max relative difference of theta)."""

    def timed(steps: int, mode: str):
        start = time.perf_counter()
        result = fit_shared(model, theta, X, y, lam=lam, gamma=1e-4, steps=steps, compile=mode)
        return time.perf_counter() - start, result

    first, _ = timed(1, "always")  # compiles
    base_eager, _ = timed(0, "never")
    timed(5, "never")  # warm-up
    eager_s, eager = timed(S, "never")
    base_compiled, _ = timed(0, "always")
    compiled_s, compiled = timed(S, "always")
    per_eager, per_compiled = (eager_s - base_eager) / S, (compiled_s - base_compiled) / S
    difference = max(float((compiled.theta[k] - eager.theta[k]).abs().max() / eager.theta[k].abs().max()) for k in eager.theta)
    return first - per_compiled, per_eager * 1e3, per_compiled * 1e3, per_eager / per_compiled, difference


def measure_finetune(finetune, model, theta, X, y, max_steps: int) -> tuple[float, float, float, float, float, float]:
    """(first compiled call less a steady one (s), eager and compiled ms per step, their ratio, the share of
    targets with the same chosen steps, max relative difference of the heads)."""
    import torch

    def timed(steps: int, mode: str):
        start = time.perf_counter()
        result = finetune(model, theta, X, y, torch.Generator().manual_seed(4), max_steps=steps, ridge=1e-3, compile=mode)
        return time.perf_counter() - start, result

    first, _ = timed(max_steps, "always")  # compiles the folds' and the final path's steps
    base, _ = timed(0, "never")
    eager_s, (_, w_eager, steps_eager) = timed(max_steps, "never")
    compiled_s, (_, w_compiled, steps_compiled) = timed(max_steps, "always")
    per_eager, per_compiled = (eager_s - base) / max_steps, (compiled_s - base) / max_steps
    same = float((steps_eager == steps_compiled).double().mean())
    difference = float((w_compiled - w_eager).abs().max() / w_eager.abs().max())
    return first - compiled_s, per_eager * 1e3, per_compiled * 1e3, per_eager / per_compiled, same, difference


def time_methods() -> None:
    """The relu-net preset's source fits by the methods themselves (4 moment starts x 600 steps each), with
    fit_shared's default ``compile`` switched to "never" or "always" (the methods do not pass it); each
    mode twice per seed, after the first compilation."""
    from unittest import mock

    from adaptrep import models
    from adaptrep.experiment import keyed_generator, resolve_config
    from adaptrep.methods import make_method

    config = resolve_config({"setting": "relu-net"})
    print()
    print("| seed | compile | AdaptRep fit (s) | FrozenRep fit (s) | AdaptRep objective | FrozenRep objective |")
    print("|---|---|---:|---:|---:|---:|")
    for seed in (0, 1):
        source = config.environment(seed).sample_tasks(config.tasks, config.samples, keyed_generator(seed, 1))
        for index, mode in enumerate(("never", "always") * 2 if seed == 0 else ("never", "always")):
            times, objectives = [], []
            with mock.patch.dict(models.fit_shared.__kwdefaults__, compile=mode):
                for name in ("adaptrep", "frozenrep"):
                    method = make_method(name, config.method_options(seed))
                    start = time.perf_counter()
                    method.fit(source)
                    times.append(time.perf_counter() - start)
                    objectives.append(method.info["source_objective"])
            if seed == 0 and index < 2:
                continue  # the first compiled fits compile (and the eager ones warm up)
            print(f"| {seed} | {mode} | {times[0]:.2f} | {times[1]:.2f} | {objectives[0]:.15g} | {objectives[1]:.15g} |", flush=True)


if __name__ == "__main__":
    main()
