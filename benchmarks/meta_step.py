"""Benchmark of one meta-step (meta-gradient + outer Adam update) of :mod:`adaptrep.meta`, eager and compiled,
ours alone (no peers needed) and on any device.

The problems, parameters and meta-batches are those of ``benchmarks/maml_throughput.py`` (its ``CASES``
and ``our_problem``, on ``benchmarks/peers.py``'s data): the 1-40-40-1 ReLU network on sinusoids
(meta-batch 25, 10 support + 10 query, inner lr 0.01; MAML and FOMAML, 1 and 5 inner steps) and the
linear representation problem (d = 50, k = 5, meta-batch 64, 25 + 25 samples, 5 inner steps; MAML
and ANIL).

For each: eager it/s (``torch.autograd.grad`` backend, the one :func:`meta_train` runs uncompiled),
then, unless ``--no-compile``, the seconds of the first compiled call (compilation; from inductor's
on-disk cache in a later process) and the compiled it/s. The step is timed on a fixed meta-batch
(the task sampling of :func:`meta_train` is not included), best of ``--repeats`` timings of
``--seconds`` seconds each. Reference numbers measured by others on this machine (learn2learn,
second order): sinusoid 12 it/s (5 steps), 46 it/s (1 step); linear 8.5-10 it/s MAML, 15 it/s ANIL.

Run from the repository root::

    .venv/bin/python benchmarks/meta_step.py                   # all, ~5 min with compilation
    .venv/bin/python benchmarks/meta_step.py --no-compile      # eager only
    .venv/bin/python benchmarks/meta_step.py --only sinusoid-maml-5 --fresh-cache --device cuda

``--fresh-cache`` points ``TORCHINDUCTOR_CACHE_DIR`` to a new temporary directory (a cold compile);
without it, the default cache (``~/.cache/adaptrep/inductor``) is used, so a second run shows the
warm-cache compile time. ``--threads`` defaults to 1: these steps are dispatch-bound, and on a
shared two-core machine a second thread mostly waits.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
from maml_throughput import CASES, our_problem  # also puts this checkout's src/ first on sys.path
from peers import make_batch

from adaptrep.meta import _grad_eager, _grad_func, _make_step, compile_step

L2L = {"sinusoid-maml-5": 12, "sinusoid-maml-1": 46, "linear-maml-5": 9, "linear-anil-5": 15}


def rate(step, state, data, seconds: float, repeats: int, sync) -> float:
    """Best it/s over ``repeats`` timings of about ``seconds`` each."""
    params, opt_state = state
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            loss, params, opt_state = step(params, opt_state, *data)
            count += 1
            if count % 10 == 0:
                sync()
                if time.perf_counter() - start >= seconds:
                    break
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--func-eager", action="store_true", help="also time the eager torch.func backend")
    parser.add_argument("--fresh-cache", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fresh_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="adaptrep-inductor-")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}")
    print(f"{'case':<20} {'eager it/s':>10} {'func it/s':>10} {'compile s':>10} {'compiled it/s':>14} {'x l2l eager':>12} {'x l2l comp':>11}")
    for name in args.only:
        case = CASES[name]
        model, names, params, config = our_problem(case, torch.float32)
        params = [p.to(args.device) for p in params]
        data = [x.to(args.device) for x in make_batch(case.problem)]
        state = (params, config.transform.init(params))
        eager = rate(_make_step(model, names, config, _grad_eager), state, data, args.seconds, args.repeats, sync)
        func = rate(_make_step(model, names, config, _grad_func), state, data, args.seconds, args.repeats, sync) if args.func_eager else math.nan
        compile_seconds, compiled = math.nan, math.nan
        if not args.no_compile:
            step = compile_step(model, names, config)
            start = time.perf_counter()
            step(*state, *data)
            sync()
            compile_seconds = time.perf_counter() - start
            compiled = rate(step, state, data, args.seconds, args.repeats, sync)
        ref = L2L.get(name, math.nan)
        print(f"{name:<20} {eager:10.0f} {func:10.0f} {compile_seconds:10.1f} {compiled:14.0f} {eager / ref:12.1f} {compiled / ref:11.1f}", flush=True)


if __name__ == "__main__":
    main()
