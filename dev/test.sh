#!/usr/bin/env bash
# The test command: set up .venv (dev/setup.sh) and run the whole suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. `bash dev/test.sh -m "not slow"` for the fast unit tests only.
# The `ray start --head` / `ray job submit` tests run in their own pytest process first: their teardown
# (`ray stop --force`) ends every Ray cluster on the machine, which must not include the suite's shared one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
.venv/bin/python -m pytest tests/test_job_submit.py "$@" || [ $? -eq 5 ]  # 5: all deselected (-m "not slow")
exec .venv/bin/python -m pytest --ignore=tests/test_job_submit.py "$@"
