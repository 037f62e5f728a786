#!/usr/bin/env bash
# The demo from a fresh clone: installs what it needs, then sends a phantom study through the whole service.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
exec .venv/bin/triage demo "$@"
