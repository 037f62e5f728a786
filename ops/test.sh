#!/usr/bin/env bash
# The test suite from a fresh clone: installs what it needs, makes sure Postgres and Redis are up, runs pytest.
# Extra arguments go to pytest (e.g. `ops/test.sh tests/unit`, `ops/test.sh -m "not slow"`,
# `ops/test.sh tests/integration/test_scp.py`). With only tests/unit paths it starts no service: those tests
# need none (tests/conftest.py refuses a needs_* marker there).
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
# Services are skipped only when every path argument is under tests/unit (the values of pytest's -m, -k, -p,
# -o and --timeout are not paths; any other argument that is not an option counts as a path).
unit_only=0
skip_value=0
for argument in "$@"; do
    if [ "$skip_value" = 1 ]; then skip_value=0; continue; fi
    case "$argument" in
        -m | -k | -p | -o | --timeout) skip_value=1 ;;
        tests/unit | tests/unit/*) unit_only=1 ;;
        -*) ;;
        *) unit_only=0; break ;;
    esac
done
if [ "$unit_only" = 0 ]; then
    ./ops/services.sh
fi
mkdir -p test-output
exec .venv/bin/python -m pytest "$@"
