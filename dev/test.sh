#!/usr/bin/env bash
# The test command: set up .venv (dev/setup.sh) and run the whole suite in one pytest process, slow end-to-end tests
# included. Extra arguments go to pytest, e.g. `bash dev/test.sh -m "not slow"` for the fast unit tests only.
# The `ray start --head` / `ray job submit` tests run beside the suite's shared Ray cluster: their head has its own
# ports, temp dir and process group, and their teardown stops only that head.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
exec .venv/bin/python -m pytest tests/ "$@"
