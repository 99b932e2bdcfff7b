#!/usr/bin/env bash
# Adds the JAX benchmark peer (benchmarks/jax_peer.py) to a peers' virtual environment, so that
#   VENV_DIR/bin/python benchmarks/maml_throughput.py --peers jax,learn2learn ...
#   VENV_DIR/bin/python benchmarks/peers.py --check --libraries jax
# run. JAX is never a dependency of adaptrep: it lives in this separate environment only.
#   usage: benchmarks/setup_jax_peer.sh VENV_DIR
# VENV_DIR is typically the environment built for learn2learn/higher/TorchOpt (see benchmarks/peers.py);
# if it does not exist yet, a bare one with torch (CPU) is created and only the JAX peer will import.
# Installs: jax[cpu] (CPU jaxlib; tested with jax 0.10.2 beside torch 2.13.0+cpu, Python 3.11) and
# adaptrep's own runtime dependencies (the benchmarks import adaptrep from this checkout's src/).
set -euo pipefail
V=${1:?usage: setup_jax_peer.sh VENV_DIR}
JAX_VERSION=${JAX_VERSION:-0.10.2}
if [ ! -x "$V/bin/python" ]; then
  python3 -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0 numpy
fi
"$V/bin/pip" install -q "jax[cpu]==$JAX_VERSION"
"$V/bin/pip" install -q pandas pyyaml pydantic typer rich matplotlib
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT/benchmarks"
"$V/bin/python" - <<'PY'
import peers
versions = peers.available_peers()
print("peers:", ", ".join(f"{k} {v}" for k, v in versions.items()))
assert not str(versions["jax"]).startswith("import failed"), versions["jax"]
PY
