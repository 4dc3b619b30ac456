"""Train a CDUL classifier on the soft pseudo labels of a labeling run, with gradient-alignment label updates.

    ray job submit --working-dir . -- python jobs/train.py --labels <labeling output dir or s3://...> \
        --dataset <root or s3://...> --eval-split test --output <dir or s3://...> --workers 8 --use-gpu

Submitting the same command again (same --output) resumes from the last checkpoint.
All flags: `python jobs/train.py --help` (same as `cdul train`).
"""

import sys

from cdul_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
