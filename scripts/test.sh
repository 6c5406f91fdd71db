#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then runs the default suite (not slow, not gpu).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long cases.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
