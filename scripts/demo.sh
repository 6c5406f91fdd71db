#!/usr/bin/env bash
# The main job: sets up .venv, builds a small heterogeneous model, compiles it with backend="hetgraph",
# and prints per-layer results and speed against eager and plain Inductor.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m hetgraph demo "$@"
