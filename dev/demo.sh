#!/usr/bin/env bash
# The main job on the embedded default: set up .venv (dev/setup.sh), then run the offline demo (jobs/demo.py) on a
# local Ray cluster: synthetic benchmark (generated into data/synth if absent), bundled CLIP, Table 1 + ζ sweep,
# then Table 2: zero-shot CLIP, CDUL labels of the test images, the classifier on fixed / updated pseudo labels and on
# ground truth (test mAP and inference images/s).
# Extra arguments go to jobs/demo.py, e.g. `bash dev/demo.sh --no-train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/setup.sh
exec .venv/bin/python jobs/demo.py "$@"
