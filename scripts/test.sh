#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then runs the default suite (not slow, not gpu).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long cases.
# Two pytest workers (HETGRAPH_TEST_WORKERS), a test file per worker at a time: most of a test's time
# is compiling, which leaves one core idle in a single process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q -n "${HETGRAPH_TEST_WORKERS:-2}" --dist loadfile "$@"
