"""Label a PASCAL VOC dataset with CDUL soft pseudo labels.

    ray job submit --working-dir . -- python jobs/label_voc.py --dataset <root or s3://...> --output <dir or s3://...>

All flags: `python jobs/label_voc.py --help` (same as `cdul label`, with --format voc).
"""

import sys

from cdul_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", "--format", "voc", *sys.argv[1:]]))
