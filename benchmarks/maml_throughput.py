"""MAML throughput: meta-iterations/s, peak memory and meta-gradient agreement of ``adaptrep.meta`` (eager and
compiled) against learn2learn, higher and TorchOpt, on the same problems, parameters and meta-batch.

Cases (float32, CPU; problems, parameters and data from ``benchmarks/peers.py``):

- ``sinusoid``: 1-40-40-1 ReLU MLP, meta-batch 25, 10 support + 10 query samples, inner lr 0.01;
  1 and 5 inner steps, MAML (second order) and FOMAML (first order);
- ``linear``: ``f(x) = w^T B^T x`` with d = 50, k = 5, meta-batch 64, 25 + 25 samples, 5 inner steps,
  inner lr 0.01 (``peers.PROBLEMS``), second order, MAML and ANIL.

The JAX peer (``--peers jax``; ``benchmarks/jax_peer.py``, installed into the peers' environment by
``benchmarks/setup_jax_peer.sh``) is the peer of ours compiled: the same iteration (the meta-gradient and
Adam, ``torch.optim.Adam``'s formula) as one ``jax.jit`` of ``jax.vmap`` over tasks, its state carried
between calls; its target is ours compiled >= 0.8x its it/s (sinusoid MAML 5-step, linear MAML and ANIL).
It runs with XLA's own CPU threads (``--threads`` sets torch's only); its memory is not measured.

One iteration = one outer step on a fixed meta-batch: the meta-gradient of the mean query loss over the
meta-batch (all inner loops and the backward pass) plus one Adam update of the meta-parameters (lr 1e-3).
Ours runs the step :func:`adaptrep.meta.meta_train` runs (``_make_step``: the eager ``torch.autograd``
backend, or :func:`adaptrep.meta.compile_step`, which includes its functional Adam); each peer runs its own
documented MAML loop (``peers.make_peer_step``: per-task loop, ``backward()`` per task) followed by
``torch.optim.Adam.step()``. Task sampling is not included for anyone.

Timings are interleaved: in each repeat every implementation is timed once (ours eager, ours compiled,
then each peer; the order reversed on every other repeat), and the median over repeats is reported, so
background load hits all sides alike. Compilation is timed separately: the first compiled call in this
process, with an inductor cache that is fresh at the start of the run unless ``--cache-dir`` (cold; later
cases may reuse kernels cached by earlier ones, and the process's compiler state is warm after the first),
and again in a second process that reuses that cache (warm; includes that process's start-up of Dynamo).

Peak memory: the same procedure for every implementation, each in a fresh process
(``peers.measure_memory``): a warm-up (the plain reference step on one task, then the implementation's own
step on one task; for ours compiled the first full call, which loads the compiled step from the warm
cache), then 5 iterations on the full meta-batch and one more under the PyTorch profiler. ``tensor MiB``
is the peak of live CPU tensor bytes during that iteration (above those alive when it starts) and is the
number the targets use; ``RSS MiB`` the growth of the peak resident set over the 5 iterations (for ours
compiled the first full-size call precedes the baseline, so its RSS growth is not comparable and is not
shown). Our batched step holds the graph of the whole meta-batch at once; the peers free each task's
graph after its ``backward()``. ``--chunk c`` runs ours in chunks of ``c`` tasks (``MetaConfig.chunk``:
eager, a Python loop over chunks; compiled, one ``while_loop`` in a C++-driven step), so that ours also
holds ``c`` tasks' graphs at a time.

Meta-gradient error: ``||g_ours - g_peer|| / ||g_peer||`` over all parameters, at the same parameters on
the same meta-batch, in float32 (ours eager: :func:`adaptrep.meta.meta_gradient`; ours compiled: from the
compiled step's first Adam moment, ``m_1 = (1 - beta1) g``) and in float64 (eager) as a check; ours is
also compared with the plain-autograd reference of ``peers.py`` (no peer needed).

Run from the repository root (peers live in their own environment, ``PEERS`` as in ``benchmarks/peers.py``,
and are skipped when not importable)::

    PEERS/bin/python benchmarks/maml_throughput.py --json maml.json   # all, several minutes
    .venv/bin/python benchmarks/maml_throughput.py --quick --no-compile           # smoke test, ours only
    PEERS/bin/python benchmarks/maml_throughput.py --chunk 1 --peers learn2learn --cases sinusoid-maml-5
    PEERS/bin/python benchmarks/maml_throughput.py --threads 2 --peers jax,learn2learn --no-memory \
        --cases sinusoid-maml-5 linear-maml-5 linear-anil-5                    # ours compiled against JAX

The ``src/`` next to this file is put first on ``sys.path``, so the checkout the script lives in is benchmarked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir():
    sys.path.insert(0, str(_SRC))

import peers  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from adaptrep.meta import ADAM_BETAS, MetaConfig, _grad_eager, _make_step, compile_step, meta_gradient  # noqa: E402
from adaptrep.models import linear_model, mlp_model  # noqa: E402

OUTER_LR = 1e-3
#: ``MetaConfig.chunk`` of ours (``--chunk``): ``None`` computes a meta-batch as one batch
CHUNK: int | None = None
PEERS = ("learn2learn", "higher", "torchopt", "jax")
OURS = ("ours eager", "ours compiled")
GRAD_TOLERANCE = 1e-5  # float32 relative meta-gradient error, ours against each peer
MEMORY_STEPS = 5


@dataclass(frozen=True)
class Case:
    name: str
    problem: str
    algorithm: str  # ours: maml, fomaml or anil
    steps: int
    compiled_target: float | None = None  # ours compiled / learn2learn it/s
    eager_target: float | None = None  # ours eager / learn2learn it/s
    jax_target: float | None = None  # ours compiled / the JAX peer's it/s

    @property
    def peer_algorithm(self) -> str:
        return "anil" if self.algorithm == "anil" else "maml"

    @property
    def first_order(self) -> bool:
        return self.algorithm == "fomaml"

    def describe(self) -> str:
        c = peers.PROBLEMS[self.problem]
        net = "1-40-40-1 ReLU MLP" if self.problem == "sinusoid" else f"linear representation d={c['dim']}, k={c['rank']}"
        order = "first order" if self.first_order else "second order"
        return (
            f"{net}, {self.algorithm.upper()} ({order}), {self.steps} inner step{'s' if self.steps > 1 else ''}, "
            f"meta-batch {c['meta_batch']} x ({c['support']} support + {c['query']} query), inner lr {c['inner_lr']:g}"
        )


CASES = {
    c.name: c
    for c in (
        Case("sinusoid-maml-5", "sinusoid", "maml", 5, compiled_target=30, eager_target=10, jax_target=0.8),
        Case("sinusoid-fomaml-5", "sinusoid", "fomaml", 5),
        Case("sinusoid-maml-1", "sinusoid", "maml", 1, compiled_target=20, eager_target=10),
        Case("sinusoid-fomaml-1", "sinusoid", "fomaml", 1),
        Case("linear-maml-5", "linear", "maml", 5, compiled_target=40, jax_target=0.8),
        Case("linear-anil-5", "linear", "anil", 5, compiled_target=40, jax_target=0.8),
    )
}


# ----------------------------------------------------------------------------------------------------
# the implementations: each is a callable (Xs, ys, Xq, yq) -> loss doing one full iteration


def our_problem(case: Case, dtype: torch.dtype):
    """``(model, names, params list [theta..., w], config)`` at ``peers.init_params`` (same values as the peers)."""
    p = peers.init_params(case.problem, dtype)
    model = mlp_model((1, 40, 40)) if case.problem == "sinusoid" else linear_model()
    names = [k for k in p if k != "w"]
    c = peers.PROBLEMS[case.problem]
    config = MetaConfig(
        case.algorithm, inner_steps=case.steps, inner_lr=c["inner_lr"], outer_lr=OUTER_LR, optimizer="adam", meta_batch=c["meta_batch"], chunk=CHUNK
    )
    return model, names, [*(p[k] for k in names), p["w"]], config


class OurIteration:
    """Our meta-step (meta-gradient + functional Adam) with its state, as :func:`adaptrep.meta.meta_train` drives it."""

    def __init__(self, step, params: list[Tensor], transform):
        self.step, self.transform, self.params = step, transform, [p.clone() for p in params]
        self.state = transform.init(self.params)  # Adam's (t, m, v)

    def __call__(self, Xs: Tensor, ys: Tensor, Xq: Tensor, yq: Tensor) -> Tensor:
        loss, self.params, self.state = self.step(self.params, self.state, Xs, ys, Xq, yq)
        return loss


def our_iteration(case: Case, compiled: bool) -> OurIteration:
    model, names, params, config = our_problem(case, torch.float32)
    step = compile_step(model, names, config) if compiled else _make_step(model, names, config, _grad_eager)
    return OurIteration(step, params, config.transform)


def peer_iteration(library: str, case: Case, dtype: torch.dtype = torch.float32):
    """The peer's meta-gradient step followed by ``torch.optim.Adam.step()`` on its module (JAX: its own jitted
    meta-step with Adam, ``jax_peer.make_iteration``)."""
    c = peers.PROBLEMS[case.problem]
    if library == "jax":
        import jax_peer

        params = peers.init_params(case.problem, dtype)
        return jax_peer.make_iteration(case.problem, case.peer_algorithm, case.steps, case.first_order, params, c["inner_lr"], OUTER_LR)
    step = peers.make_peer_step(library, case.problem, case.peer_algorithm, case.steps, case.first_order, peers.init_params(case.problem, dtype), c["inner_lr"])
    optimizer = torch.optim.Adam(step.module.parameters(), lr=OUTER_LR)

    def iterate(Xs: Tensor, ys: Tensor, Xq: Tensor, yq: Tensor) -> Tensor:
        loss, _ = step(Xs, ys, Xq, yq)
        optimizer.step()
        return loss

    return iterate


# ----------------------------------------------------------------------------------------------------
# memory (fresh process per implementation)


def _memory_child(spec: dict) -> dict:
    global CHUNK
    CHUNK = spec["chunk"]
    torch.set_num_threads(spec["threads"])
    case = CASES[spec["case"]]
    kind = spec["kind"]
    c = peers.PROBLEMS[case.problem]
    if kind in PEERS:
        peers._import(kind)
    batch = peers.make_batch(case.problem, torch.float32)
    one_task = tuple(x[:1] for x in batch)
    # the common warm-up of peers.peak_memory: the plain reference step on one task pays one-off costs
    peers.reference_step(case.problem, case.peer_algorithm, case.steps, case.first_order, peers.init_params(case.problem), c["inner_lr"])(*one_task)
    out: dict = {}
    if kind == "ours compiled":
        iterate = our_iteration(case, compiled=True)
        start = time.perf_counter()
        iterate(*batch)  # static shapes: the warm-up must be at full size (loads the step from the warm cache)
        out["warm_compile_s"] = time.perf_counter() - start
    else:
        iterate = our_iteration(case, compiled=False) if kind == "ours eager" else peer_iteration(kind, case)
        iterate(*one_task)
    out.update(peers.measure_memory(lambda: iterate(*batch), spec["steps"]))
    return out


def measure_memory(kind: str, case: Case, threads: int) -> dict:
    spec = dict(kind=kind, case=case.name, threads=threads, steps=MEMORY_STEPS, chunk=CHUNK)
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)], capture_output=True, text=True)
    if run.returncode != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {run.returncode}: {tail[0]}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# meta-gradient agreement


def _flat(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[k].reshape(-1).double() for k in names])


def relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    names = list(want)
    a, b = _flat(got, names), _flat(want, names)
    return float((a - b).norm() / b.norm())


def gradients(case: Case, libraries: list[str], dtype: torch.dtype) -> dict[str, dict[str, Tensor]]:
    """Meta-gradients (our layout) at ``peers.init_params`` on ``peers.make_batch``: ours eager, the reference, each peer."""
    model, names, params, config = our_problem(case, dtype)
    batch = peers.make_batch(case.problem, dtype)
    theta = dict(zip(names, params[:-1], strict=True))
    _, g_theta, g_w = meta_gradient(model, theta, params[-1], *batch, config)
    out = {"ours eager": {**g_theta, "w": g_w}}
    lr = peers.PROBLEMS[case.problem]["inner_lr"]
    for lib in ["reference", *libraries]:
        step = peers.make_peer_step(lib, case.problem, case.peer_algorithm, case.steps, case.first_order, peers.init_params(case.problem, dtype), lr)
        out[lib] = step(*batch)[1]
    return out


# ----------------------------------------------------------------------------------------------------
# the run


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_case(case: Case, libraries: list[str], args) -> dict:
    threads = torch.get_num_threads()
    batch = peers.make_batch(case.problem, torch.float32)
    impls = {"ours eager": our_iteration(case, compiled=False)}
    result: dict = {"case": asdict(case), "description": case.describe(), "rates": {}, "memory": {}, "compile": {}, "grad_error": {}}
    compiled_grad = None
    if not args.no_compile:
        torch._dynamo.reset()
        try:
            iterate = our_iteration(case, compiled=True)
            params0 = [p.clone() for p in iterate.params]
            start = time.perf_counter()
            iterate(*batch)  # t = 1 from m = 0: the first moment is (1 - beta1) * meta-gradient
            result["compile"]["cold_s"] = time.perf_counter() - start
            _, names, _, _ = our_problem(case, torch.float32)
            scale = 1 - ADAM_BETAS[0]
            compiled_grad = {name: m / scale for name, m in zip([*names, "w"], iterate.state[1], strict=True)}
            iterate.params, iterate.state = params0, iterate.transform.init(params0)
            impls["ours compiled"] = iterate
        except Exception as error:  # noqa: BLE001 - report and go on with eager
            result["compile"]["error"] = f"{type(error).__name__}: {error}"
            print(f"  torch.compile failed ({result['compile']['error'][:200]}); ours compiled skipped", flush=True)
    for lib in libraries:
        impls[lib] = peer_iteration(lib, case)
    # interleaved timings: every implementation once per repeat, order reversed on odd repeats
    rates: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            rates[name].append(peers.time_step(impls[name], batch, args.seconds, warmup=args.warmup, clock=args.clock))
    result["rates"] = rates
    del impls
    # meta-gradients: float32 (the timed precision) and float64 (the check)
    g32, g64 = gradients(case, libraries, torch.float32), gradients(case, libraries, torch.float64)
    for other in ["reference", *libraries]:
        errors = {"eager_f32": relative_error(g32["ours eager"], g32[other]), "eager_f64": relative_error(g64["ours eager"], g64[other])}
        if compiled_grad is not None:
            errors["compiled_f32"] = relative_error(compiled_grad, g32[other])
        result["grad_error"][other] = errors
    # memory, each in a fresh process
    if not args.no_memory and not (args.quick and args.memory_done):
        args.memory_done = True
        for kind in [*(k for k in OURS if k in rates), *(lib for lib in libraries if lib != "jax")]:  # JAX's memory: not torch's profiler's
            result["memory"][kind] = memory = measure_memory(kind, case, threads)
            if "warm_compile_s" in memory:
                result["compile"]["warm_s"] = memory["warm_compile_s"]
    return result


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def report(result: dict, libraries: list[str], checks: list[dict]) -> None:
    case = Case(**result["case"])
    rates, memory, compile_, errors = result["rates"], result["memory"], result["compile"], result["grad_error"]
    print(f"\n{case.name}: {result['description']}")
    head = f"  {'implementation':<16} {'it/s median [min-max]':>26} {'tensor MiB':>11} {'RSS MiB':>8}"
    print(f"{head}  {'compile s cold/warm':>20}  {'grad err vs reference f32/f64':>30}")
    for name in [*(k for k in OURS if k in rates), *libraries]:
        r = rates[name]
        m = memory.get(name, {})
        tensor = f"{m['tensor_kib'] / 1024:.2f}" if "tensor_kib" in m else ("failed" if "error" in m else "-")
        rss = f"{m['rss_kib'] / 1024:.1f}" if "rss_kib" in m and name != "ours compiled" else "-"
        comp = f"{compile_.get('cold_s', float('nan')):.1f} / {compile_.get('warm_s', float('nan')):.1f}" if name == "ours compiled" else ""
        if name == "ours eager":
            err = f"{errors['reference']['eager_f32']:.1e} / {errors['reference']['eager_f64']:.1e}"
        elif name == "ours compiled":
            err = f"{errors['reference'].get('compiled_f32', float('nan')):.1e} / -"
        else:
            err = ""
        print(f"  {name:<16} {f'{median(r):9.2f} [{min(r):.2f}-{max(r):.2f}]':>26} {tensor:>11} {rss:>8}  {comp:>20}  {err:>30}")
        if "error" in m:
            print(f"    memory measurement failed: {m['error'][:200]}")
    if not libraries:
        return
    print(f"  {'ours / peer':<16} {'eager it/s':>22} {'compiled it/s':>22} {'tensor MiB eager/compiled':>26}  {'grad rel err f32 eager/compiled, f64':>36}")
    for lib in libraries:
        cells = []
        for ours, target in (("ours eager", case.eager_target), ("ours compiled", case.compiled_target)):
            if ours not in rates:
                cells.append("-")
                continue
            ratio = median(rates[ours]) / median(rates[lib])
            cell = f"{ratio:.1f}x"
            if lib == "learn2learn" and target is not None:
                ok = ratio >= target
                cell += f" (>={target:g}x {_verdict(ok)})"
                checks.append(dict(case=case.name, check=f"{ours} / learn2learn it/s", value=ratio, target=f">= {target:g}", ok=ok))
            if lib == "jax" and ours == "ours compiled" and case.jax_target is not None:
                ok = ratio >= case.jax_target
                cell += f" (>={case.jax_target:g}x {_verdict(ok)})"
                checks.append(dict(case=case.name, check="ours compiled / JAX (jit) it/s", value=ratio, target=f">= {case.jax_target:g}", ok=ok))
            cells.append(cell)
        mem = []
        for ours in OURS:
            a, b = memory.get(ours, {}).get("tensor_kib"), memory.get(lib, {}).get("tensor_kib")
            if a is None or b is None:
                mem.append("-")
                continue
            mem.append(f"{a / b:.1f}x")
            if lib == "learn2learn":
                checks.append(dict(case=case.name, check=f"{ours} peak tensor memory / learn2learn's", value=a / b, target="<= 1", ok=a <= b))
        e = errors[lib]
        compiled_f32 = f"{e['compiled_f32']:.1e}" if "compiled_f32" in e else "-"
        err = f"{e['eager_f32']:.1e} / {compiled_f32}, {e['eager_f64']:.1e}"
        for key in ("eager_f32", "compiled_f32"):
            if key in e:
                check = f"ours {key[:-4]} grad rel err vs {lib} (float32)"
                checks.append(dict(case=case.name, check=check, value=e[key], target=f"<= {GRAD_TOLERANCE:g}", ok=e[key] <= GRAD_TOLERANCE))
        mem_cell = " / ".join(mem) + (" (<=1x)" if lib == "learn2learn" else "")
        print(f"  {lib:<16} {cells[0]:>22} {cells[1]:>22} {mem_cell:>26}  {err:>36}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timings (smoke test): 0.3 s per measurement, 3 repeats")
    parser.add_argument("--no-compile", action="store_true", help="time ours eager only")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (--quick: first case only)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--problems", nargs="+", choices=tuple(peers.PROBLEMS), default=list(peers.PROBLEMS))
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=None, help="only these cases (default: every case of --problems)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 2, --quick 0.3)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, --quick 3)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or this process's CPU time")
    parser.add_argument("--cache-dir", default=None, help="inductor cache to use (default: a fresh temporary one, so the first compile is cold)")
    parser.add_argument("--chunk", type=int, default=None, help="ours: tasks per chunk of a meta-batch (MetaConfig.chunk; default: all at once)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(_memory_child(json.loads(args.memory_child))))
        return
    global CHUNK
    CHUNK = args.chunk
    args.seconds = args.seconds or (0.3 if args.quick else 2.0)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.warmup = 1 if args.quick else 2
    args.memory_done = False  # --quick measures memory for the first case only (one process per implementation costs seconds)
    if args.threads:
        torch.set_num_threads(args.threads)
    temporary = None
    if not args.no_compile:
        if args.cache_dir is None:
            args.cache_dir = temporary = tempfile.mkdtemp(prefix="adaptrep-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir  # inherited by the memory processes: the warm cache

    import adaptrep

    wanted = [lib for lib in args.peers.split(",") if lib]
    found = {lib: version for lib, version in peers.available_peers().items() if lib in wanted}
    libraries = [lib for lib, version in found.items() if not str(version).startswith("import failed")]
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"adaptrep from {Path(adaptrep.__file__).parent}")
    for lib, version in found.items():
        print(f"  {lib}: {version}" if lib in libraries else f"  {lib}: SKIPPED ({version})")
    if not libraries:
        print("  no peer library imports here: timing ours only (run with the peers' environment, see the docstring)")
    print(
        "one iteration = meta-gradient of one meta-batch (inner loops + backward) + one Adam update (lr 1e-3), fixed batch;\n"
        "ours: adaptrep.meta's step (eager autograd / torch.compile'd); peers: their MAML loop + torch.optim.Adam.step()."
        + (f"\nours with chunk={CHUNK}: each meta-batch in chunks of {CHUNK} task(s), gradients added up (less memory)" if CHUNK else "")
    )
    print(
        f"timings ({args.clock} clock): {args.seconds:g} s per measurement, {args.repeats} repeats interleaved (ours eager, ours compiled, "
        "each peer; order reversed every other repeat) so load hits all alike; median [min-max]."
    )
    print(
        f"memory: fresh process each, same procedure for all; tensor MiB = profiler peak of live tensors in one iteration "
        f"(after warm-up and {MEMORY_STEPS} iterations), RSS MiB = peak-RSS growth over those iterations."
    )
    if args.quick and not args.no_memory:
        print("  (--quick: memory measured for the first case only)")
    if torch.get_num_threads() > 1 and load[0] > (os.cpu_count() or 1) / 2:
        print(
            f"note: {torch.get_num_threads()} threads with load {load[0]:.1f}: these small dispatch-bound steps slow down a lot "
            "when cores are busy; try --threads 1"
        )
    if not args.no_compile:
        print(
            f"compile: cold = first call in this process (inductor cache {args.cache_dir}, fresh at the start: later cases may reuse "
            "earlier cases' kernels), warm = first call in a second process"
        )
    results, checks = [], []
    start = time.perf_counter()
    try:
        for case in CASES.values():
            if case.problem not in args.problems or (args.cases and case.name not in args.cases):
                continue
            result = run_case(case, libraries, args)
            report(result, libraries, checks)
            results.append(result)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    print("\nacceptance targets (learn2learn is the baseline; FOMAML rows have no speed target):")
    if not checks:
        print("  none checkable here (needs learn2learn)")
    for c in checks:
        value = f"{c['value']:.2e}" if "err" in c["check"] else f"{c['value']:.2f}"
        print(f"  {_verdict(c['ok']):4} {c['case']:<18} {c['check']:<52} {value:>9}  target {c['target']}")
    load = os.getloadavg()
    print(f"total {time.perf_counter() - start:.0f} s; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), peers=found, clock=args.clock, seconds=args.seconds, repeats=args.repeats)
        meta.update(quick=args.quick, compiled=not args.no_compile, load_average_end=load, outer_lr=OUTER_LR)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "checks": checks}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
