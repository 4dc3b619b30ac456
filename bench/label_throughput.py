"""Labeling throughput benchmark: images/s of the Ray Data pipeline (decode + snippets + CLIP) on a dataset.

    .venv/bin/python bench/label_throughput.py --dataset data/synth --split train --limit 500 \
        --model cdul-synth-rn --pretrained synth [--grid 3] [--batch-size 16] [--max-actors 1]

Prints one JSON line: images, seconds, images/s, peak driver RSS (MiB). Targets live here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

from cdul_ray.config import LabelConfig
from cdul_ray.pipeline import run_labeling


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--model", default="cdul-synth-rn")
    p.add_argument("--pretrained", default="synth")
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-actors", type=int, default=1)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cfg = LabelConfig(dataset=args.dataset, split=args.split, output=out, model=args.model,
                          pretrained=args.pretrained, grid=args.grid, batch_size=args.batch_size,
                          max_actors=args.max_actors, limit=args.limit, evaluate=False)
        start = time.time()
        summary = run_labeling(cfg)
        seconds = time.time() - start
    print(json.dumps({
        "images": summary.images, "labeled": summary.labeled, "seconds": round(seconds, 2),
        "images_per_second": round(summary.images / seconds, 2), "grid": args.grid, "batch_size": args.batch_size,
        "actors": args.max_actors, "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
