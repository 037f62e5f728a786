#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs, makes sure Postgres and Redis are up, runs
# pytest. Extra arguments go to pytest (e.g. `ops/test.sh -m "not slow"`, `ops/test.sh tests/test_scp.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
./ops/services.sh
mkdir -p test-output
exec .venv/bin/python -m pytest "$@"
