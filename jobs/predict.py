"""Label new images with a trained CDUL classifier: per-class probabilities as Parquet.

    ray job submit --working-dir . -- python jobs/predict.py --checkpoint <training output or checkpoint dir> \
        --dataset <folder, s3:// prefix, manifest or dataset root> --output <dir or s3://...>

All flags: `python jobs/predict.py --help` (same as `cdul predict`).
"""

import sys

from cdul_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
