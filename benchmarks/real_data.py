"""The real-data results of docs/real-data.md: run `adaptrep evaluate` on each bundled dataset, then
copy its results and figure into the docs.

    python benchmarks/real_data.py                    # every dataset below
    python benchmarks/real_data.py hsb82 digits-2way  # some of them

Each run goes to runs/real/<name> (rerunning resumes it) and its `results.csv` becomes
docs/results/<name>.csv, its query figure docs/figures/<name>_query.png; the page's tables are
generated from the CSV files when the docs are built (docs/gen_tables.py). Needs the data extra:
`pip install -e ".[data]"`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: name -> the `adaptrep evaluate` arguments (the datasets' own defaults otherwise).
RUNS: dict[str, list[str]] = {
    "hsb82": ["--dataset", "hsb82", "--seeds", "20"],
    "contraception": ["--dataset", "contraception", "--seeds", "20"],
    "digits-5way": ["--dataset", "digits"],
    "digits-2way": ["--dataset", "digits:ways=2"],
}


def run(name: str) -> None:
    out = ROOT / "runs" / "real" / name
    command = [str(Path(sys.executable).parent / "adaptrep"), "evaluate", *RUNS[name], "--out", str(out), "--retry-failed"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"{name}: {time.perf_counter() - start:.0f} s ({' '.join(command[1:])})", flush=True)
    shutil.copyfile(out / "results.csv", ROOT / "docs" / "results" / f"{name}.csv")
    (figure,) = (out / "figures").glob("*_query.png")  # named after the dataset (one evaluation per run)
    shutil.copyfile(figure, ROOT / "docs" / "figures" / f"{name}_query.png")


def main(names: list[str]) -> None:
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    for name in names or list(RUNS):
        run(name)


if __name__ == "__main__":
    main(sys.argv[1:])
