"""Label a COCO dataset with CDUL soft pseudo labels.

    ray job submit --working-dir . -- python jobs/label_coco.py --dataset <root or s3://...> --output <dir or s3://...>

All flags: `python jobs/label_coco.py --help` (same as `cdul label`, with --format coco).
"""

import sys

from cdul_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", "--format", "coco", *sys.argv[1:]]))
