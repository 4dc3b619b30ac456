"""Labeling memory benchmark: peak driver RSS and object-store bytes at 1x and 16x the images (streamed output).

    .venv/bin/python bench/label_memory.py                     # 1,000 and 16,000 images, bundled small CLIP
    .venv/bin/python bench/label_memory.py --sizes 500 8000 --model local-dir:/path --pretrained none

Each size runs in its own driver process (its own local Ray cluster, 2 CPUs) over a folder of generated 64x64 JPEGs
without ground truth (the product's main input). Driver peak RSS: its lifetime maximum (getrusage). Object store: a
thread samples the raylet's store stats (what `ray memory --stats-only` prints) every 0.25 s. Prints a table and
one JSON line; the target (peaks at 16x within 10% of 1x) and the recorded numbers are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(have)
    for i in range(have, n):
        Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg")


def _child(args: argparse.Namespace) -> dict:
    import resource

    import ray

    from cdul_ray.config import LabelConfig
    from cdul_ray.pipeline import run_labeling

    folder = Path(args.cache) / f"images_{args.child}"
    _images(folder, args.child)
    classes = Path(args.cache) / "classes.txt"
    classes.write_text("circle\nsquare\ntriangle\nstar\nhexagon\ncross\n")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    peak = {"store": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["store"] = max(peak["store"], get_memory_info_reply(state).store_stats.object_store_bytes_used)
            stop.wait(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        summary = run_labeling(LabelConfig(dataset=str(folder), format="folder", classes_file=str(classes),
                                           output=out, model=args.model, pretrained=args.pretrained,
                                           max_actors=1, use_gpu="false"))
        seconds = time.time() - start
    stop.set()
    thread.join()
    peak["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; the driver's lifetime peak
    return {"images": args.child, "labeled": summary.labeled, "seconds": round(seconds, 1),
            "peak_driver_rss_mib": round(peak["rss"] / 2**20, 1), "peak_object_store_mib": round(peak["store"] / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 16000])
    p.add_argument("--model", default="cdul-synth-rn")
    p.add_argument("--pretrained", default="synth")
    p.add_argument("--cache", default=str(REPO / "data" / "bench_memory"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--model", args.model, "--pretrained", args.pretrained,
               "--cache", args.cache]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.stderr.write(done.stderr[-4000:])
            return 1
        rows.append(json.loads(line[0][len("RESULT "):]))
    print(f"{'images':>8} {'seconds':>8} {'driver RSS MiB':>15} {'object store MiB':>17}")
    for r in rows:
        print(f"{r['images']:>8} {r['seconds']:>8} {r['peak_driver_rss_mib']:>15} {r['peak_object_store_mib']:>17}")
    base, top = rows[0], rows[-1]
    ratio = {k: round(top[k] / base[k], 3) if base[k] else None for k in ("peak_driver_rss_mib", "peak_object_store_mib")}
    print(json.dumps({"rows": rows, "ratio_largest_to_smallest": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
