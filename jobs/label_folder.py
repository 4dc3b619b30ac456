"""Label a plain folder or S3 prefix of images with CDUL soft pseudo labels.

    ray job submit --working-dir . -- python jobs/label_folder.py --dataset <root or s3://...> --output <dir or s3://...>

All flags: `python jobs/label_folder.py --help` (same as `cdul label`, with --format folder).
"""

import sys

from cdul_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", "--format", "folder", *sys.argv[1:]]))
