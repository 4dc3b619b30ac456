#!/usr/bin/env bash
# The test command: set up .venv (dev/setup.sh) and run the whole suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. `bash dev/test.sh -m "not slow"` for the fast unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
exec .venv/bin/python -m pytest "$@"
