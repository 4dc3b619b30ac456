#!/usr/bin/env bash
# The main job on the embedded default: set up .venv (dev/setup.sh), then run the offline demo (jobs/demo.py) on a
# local Ray cluster: synthetic benchmark (generated into data/synth if absent), bundled CLIP, Table 1 + ζ sweep,
# then the classifier with and without label updates (Table 2).
# Extra arguments go to jobs/demo.py, e.g. `bash dev/demo.sh --no-train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
exec .venv/bin/python jobs/demo.py "$@"
