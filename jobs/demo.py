"""The offline demo: synthetic multi-object benchmark, bundled small CLIP, local Ray; prints the paper's Table 1
layout (and Table 2 once the classifier is trained). `python jobs/demo.py --help` for the options.
"""

import sys

from cdul_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
