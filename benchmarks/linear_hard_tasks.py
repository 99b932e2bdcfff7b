"""``linear-hard`` at its authors' settings (d = 30, k = 5, n = 100, eps = 1/6, sigma = 1) against the
number of source tasks T: how much of the opt block can any representation learned from T tasks hold?

For T in ``--tasks`` (25, 50, 100, 200) and seeds 0-4 this runs exactly what

    adaptrep run --setting linear-hard --dim 30 --rank 5 --tasks T --eps 0.1667 --noise 1 \\
        --methods adaptrep,frozenrep-ft,oracle-ft

runs (:func:`adaptrep.experiment.run_seed`: the same source tasks, adversarial targets and numbers),
plus two reference methods, fine-tuned like ``oracle-ft``: ``truth-pca``, the top-k principal subspace
of the source tasks' *true* parameters ``beta_t`` (noiseless, from the environment), and
``adaptrep-noiseless``, ADAPTREP's source objective (penalty ``NOISELESS_PENALTY``) on the same inputs
with noiseless labels ``y = X beta_t``. No estimate
from the samples sees more than ``beta_t`` itself, and every second-moment estimate of a subspace
(ERM, moments, ADAPTREP's small-penalty limit) targets that span: its share and risk say what T
tasks allow, whatever the estimator's penalty.

Also per T and seed, for ``adaptrep``: the ADAPTREP objective at the penalty it chose, from its
default restarts (``objective``) and from the true opt block itself (``objective_from_opt``, with the
share of that fit ``share_from_opt``). Equal objectives and shares: the fit is not a local minimum
that the restarts fall into; the objective's own minimiser is where it is. Printed, for the smallest
T: the mean share of fits at fixed penalties ``PENALTIES`` (FROZENREP down to 0.03) and radii
``RADII`` (the constrained form), each from the default restarts: is any penalty level the lever?
The same on noiseless labels (penalties ``NOISELESS_LEVELS``): is the noise?
And per T and seed, the smallest eigenvalue of ``sum_t a_t a_t^T`` over the opt parts ``a_t`` of the
true parameters against the largest over their delta parts: when it is smaller, the best k-dimensional
span of those tasks' parameters trades an opt direction for a delta direction.

Writes ``--csv`` (default ``docs/results/linear_hard_tasks.csv``): one row per method x T x seed with
``opt_block_share`` and the mean excess risk over the 20 adversarial targets for each m
(``risk_m10`` ... ``risk_m100``). ``docs/results.md`` builds its tables from it. Run from the
repository root (about four minutes with one thread)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/linear_hard_tasks.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from adaptrep import methods as registry
from adaptrep.data import Tasks
from adaptrep.experiment import keyed_generator, resolve_config, run_seed
from adaptrep.finetune import FineTune
from adaptrep.methods import Oracle
from adaptrep.metrics import block_share
from adaptrep.solvers import fit_source


def noiseless_statistics(source: Tasks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, c, q)`` of the source tasks' own inputs with noiseless labels ``y = X beta_t``."""
    assert source.beta is not None
    G = source.gram()[0]
    c = (G @ source.beta.unsqueeze(-1)).squeeze(-1)
    return G, c, (c * source.beta).sum(-1)


class Reference(Oracle):
    """A representation computed from the true parameters (:meth:`span`), fine-tuned like ``oracle-ft``."""

    def span(self, source: Tasks, k: int) -> torch.Tensor:
        raise NotImplementedError

    def _fit(self, source: Tasks) -> None:
        assert source.beta is not None and source.representation is not None
        k = source.representation.shape[1]
        self.representation = self.span(source, k)
        self._estimate_noise(source.gram(), source, k)
        self._learn_perturbation_variance(source, self.representation)
        self.info = {"noise_estimate": self.noise_estimate}


class TruthPCA(Reference):
    """The top-k eigenvectors of ``sum_t beta_t beta_t^T`` over the source tasks' true parameters."""

    def span(self, source: Tasks, k: int) -> torch.Tensor:
        assert source.beta is not None
        return torch.linalg.eigh(source.beta.T @ source.beta)[1][:, -k:]


class NoiselessAdaptRep(Reference):
    """ADAPTREP's source fit (penalty ``NOISELESS_PENALTY``) on the source tasks' own inputs with
    noiseless labels ``y = X beta_t``: the paper's objective without label noise."""

    def span(self, source: Tasks, k: int) -> torch.Tensor:
        return fit_source(*noiseless_statistics(source), k, penalty=NOISELESS_PENALTY).B


# so that configs (and run_seed) know the names
registry.METHODS["truth-pca"] = lambda: TruthPCA(finetune=FineTune())
registry.METHODS["adaptrep-noiseless"] = lambda: NoiselessAdaptRep(finetune=FineTune())
METHODS = ["adaptrep", "frozenrep-ft", "oracle-ft", "truth-pca", "adaptrep-noiseless"]
NOISELESS_PENALTY = 0.01
PENALTIES = [math.inf, 1.0, 0.5, 0.25, 0.1, 0.03]
RADII = [0.5, 1.0, 1.5, 2.0]
NOISELESS_LEVELS = [0.003, 0.01, 0.03, 0.1, 0.3]


def config(T: int, seeds: int = 5) -> Any:
    """The run config of ``adaptrep run --setting linear-hard --dim 30 --rank 5 --tasks T --eps 0.1667 --noise 1``."""
    return resolve_config({"setting": "linear-hard", "dim": 30, "rank": 5, "tasks": T, "eps": 0.1667, "noise": 1.0, "seeds": seeds, "methods": METHODS})


def block_energies(T: int, seed: int) -> str:
    """Smallest eigenvalue of the opt parts' second moment (sum over tasks) | largest of the delta parts'."""
    env = config(T).environment(seed)
    beta = env.sample_tasks(T, 100, keyed_generator(seed, 1)).beta
    assert beta is not None
    opt, delta = (torch.linalg.eigvalsh(part.T @ part) for part in (beta[:, :5], beta[:, -5:]))
    return f"{float(opt.min()):.1f} | {float(delta.max()):.1f}"


def fixed_levels(T: int, seeds: int, noiseless: bool = False) -> str:
    """Mean (and, noiseless, smallest and largest) opt-block share over the seeds of ADAPTREP fits at each
    fixed penalty and radius, from the default restarts; ``noiseless``: on labels ``y = X beta_t``, with
    the largest objective value over the seeds (0 when every task is fitted exactly)."""
    shares: dict[str, list[float]] = {}
    objectives: dict[str, list[float]] = {}
    for seed in range(seeds):
        env = config(T).environment(seed)
        source = env.sample_tasks(T, 100, keyed_generator(seed, 1))
        G, c, q = noiseless_statistics(source) if noiseless else source.gram()
        levels = [(f"mu={mu:g}", {"penalty": mu}) for mu in (NOISELESS_LEVELS if noiseless else PENALTIES)]
        levels += [(f"radius={r:g}", {"radius": r}) for r in RADII]
        for name, level in levels:
            fit = fit_source(G, c, q, 5, **level)
            shares.setdefault(name, []).append(block_share(fit.B, env.opt_block))
            objectives.setdefault(name, []).append(fit.objective)
    if not noiseless:
        return "  ".join(f"{name}: {sum(v) / len(v):.2f}" for name, v in shares.items())
    return "  ".join(f"{name}: {sum(v) / len(v):.2f} ({min(v):.2f}-{max(v):.2f}, objective <= {max(objectives[name]):.1e})" for name, v in shares.items())


def run(task_counts: list[int], seeds: int) -> pd.DataFrame:
    rows = []
    for T in task_counts:
        run_config = config(T, seeds)
        for seed in range(seeds):
            results = run_seed(run_config, seed)
            table = results.groupby(["method", "m"], sort=False)["excess_risk"].mean().unstack("m")
            shares = results.groupby("method", sort=False)["opt_block_share"].first()
            env = run_config.environment(seed)
            source = env.sample_tasks(T, run_config.samples, keyed_generator(seed, 1))  # run_seed's source tasks
            fitted = registry.make_method("adaptrep").fit(source)
            mu = fitted.info["source_penalty"]
            G, c, q = source.gram()
            from_opt = fit_source(G, c, q, 5, penalty=mu, inits=env.opt_block.unsqueeze(0), select_after=1)
            extra = {
                "objective": fitted.info["source_objective"],
                "objective_from_opt": from_opt.objective,
                "share_from_opt": block_share(from_opt.B, env.opt_block),
            }
            for method in table.index:
                row = {"tasks": T, "seed": seed, "method": method, "opt_block_share": float(shares[method])}
                row.update({f"risk_m{m}": float(table.loc[method, m]) for m in table.columns})
                row.update(extra if method == "adaptrep" else dict.fromkeys(extra, math.nan))
                rows.append(row)
            print(f"T = {T} seed {seed} done", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="25,50,100,200")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--csv", default="docs/results/linear_hard_tasks.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    frame = run([int(x) for x in args.tasks.split(",")], args.seeds)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.csv, index=False)
    columns = ["opt_block_share", *[c for c in frame.columns if c.startswith("risk_m")]]
    summary = frame.groupby(["tasks", "method"], sort=False)[columns].mean()
    with pd.option_context("display.width", 200):
        print(summary.round(3).to_string())
    check = frame.dropna(subset=["objective"])
    gap = (check.objective - check.objective_from_opt).abs().max()
    print(f"adaptrep objective, default restarts minus from the opt block (largest |difference|): {gap:.2e}")
    for T in (int(x) for x in args.tasks.split(",")):
        print(f"T = {T}, least opt-part energy | most delta-part energy, per seed:", "; ".join(block_energies(T, seed) for seed in range(args.seeds)))
    smallest = min(int(x) for x in args.tasks.split(","))
    print(f"T = {smallest}, mean opt-block share of fixed penalties and radii:", fixed_levels(smallest, args.seeds))
    print(f"T = {smallest}, noiseless labels, opt-block share of fixed penalties and radii:", fixed_levels(smallest, args.seeds, noiseless=True))


if __name__ == "__main__":
    main()
