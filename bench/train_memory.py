"""Training memory benchmark: peak RSS of each Ray Train worker at N and 8N images with the same classes.

    .venv/bin/python bench/train_memory.py                          # 2,000 and 16,000 images, 600 classes
    .venv/bin/python bench/train_memory.py --sizes 1000 8000 --classes 80 --workers 2
    .venv/bin/python bench/train_memory.py --code /tmp/cdul-main    # the same benchmark on another checkout's code

Each size runs in its own driver process (its own local Ray cluster) on a generated folder of small PNGs without
ground truth and a synthetic labeling run (random soft labels for C classes, no CLIP): `cdul train` with label updates
in every epoch (`label_warmup_epochs=0`), the tiny `test_resnet` backbone, no held-out split, no CAMs. The training
function of the TorchTrainer is wrapped (in the driver, nothing changes in the package) so that every worker writes,
when it ends, its peak RSS (`getrusage` ru_maxrss: the process's lifetime maximum, shared object-store pages it
touched included) and the peak of its private memory (`RssAnon` of /proc/self/status, sampled every 0.1 s). Prints
a table and writes JSON (`--json`); the target (8N within 10% of N) and the recorded numbers are in
docs/performance.md ("Training memory").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _corpus(cache: Path, n: int, classes: int, image_size: int) -> tuple[Path, Path]:
    """(image folder, labeling run) of n images: generated once under ``cache``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images = cache / f"images_{n}"
    if len(list(images.glob("*.png"))) != n:
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(n)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, size=(image_size, image_size, 3), dtype=np.uint8)).save(
                images / f"{i:07d}.png")
    run = cache / f"labels_{n}_c{classes}"
    if not (run / "classes.json").exists():
        (run / "labels").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(classes)
        soft = rng.uniform(0.01, 0.99, size=(n, classes)).astype(np.float32)  # (N, C)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(soft.reshape(-1)), classes)
        pq.write_table(pa.table({"image_id": [f"{i:07d}.png" for i in range(n)], "soft_label": vec}),
                       run / "labels" / "part-0.parquet")
        (run / "run_config.json").write_text(json.dumps({"format": "folder"}))
        (run / "classes.json").write_text(json.dumps({"classes": [f"class {c}" for c in range(classes)]}))
    return images, run


def _measured(train_fn, rss_dir: str):
    """``train_fn`` (the TorchTrainer's per-worker function) wrapped to write this worker's peak memory on exit."""

    def measured_train_worker(loop):
        import resource
        import threading

        import ray.train

        peak = {"anon_kib": 0}
        stop = threading.Event()

        def sample() -> None:
            while True:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak["anon_kib"] = max(peak["anon_kib"], int(line.split()[1]))
                if stop.wait(0.1):
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            train_fn(loop)
        finally:
            stop.set()
            thread.join()
            rank = ray.train.get_context().get_world_rank()
            record = {"rank": rank, "pid": os.getpid(), "peak_rss_mib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_rss_at_start_mib": round(start_kib / 1024, 1),
                "peak_private_mib": round(peak["anon_kib"] / 1024, 1)}
            with open(os.path.join(rss_dir, f"rank{rank}-{os.getpid()}.json"), "w") as f:
                json.dump(record, f)

    return measured_train_worker


def _child(args: argparse.Namespace) -> dict:
    import tempfile

    import ray

    import cdul_ray.train.job as job
    from cdul_ray.train import TrainConfig, run_training

    images, run = _corpus(Path(args.cache), args.child, args.classes, args.image_size)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        rss_dir = os.path.join(tmp, "rss")
        os.makedirs(rss_dir)
        job.train_worker = _measured(job.train_worker, rss_dir)  # looked up by job.fit at call time
        start = time.time()
        summary = run_training(TrainConfig(
            labels=str(run), dataset=str(images), format="folder", output=os.path.join(tmp, "out"),
            backbone="test_resnet", pretrained_backbone="false", image_size=args.image_size, epochs=args.epochs,
            batch_size=args.batch_size, label_warmup_epochs=0, workers=args.workers, cpus_per_worker=0.5,
            decode_batch_size=64, cache_decoded=args.cache_decoded, cam_images=0, max_failures=0, seed=0))
        seconds = time.time() - start
        workers = sorted((json.load(open(os.path.join(rss_dir, f))) for f in os.listdir(rss_dir)),
                         key=lambda r: r["rank"])
    return {"images": args.child, "classes": args.classes, "workers": args.workers, "epochs": summary.epochs,
            "seconds": round(seconds, 1), "worker_memory": workers,
            "peak_rss_mib": max(w["peak_rss_mib"] for w in workers),
            "peak_private_mib": max(w["peak_private_mib"] for w in workers)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[2000, 16000], metavar=("N", "8N"))
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--cache-decoded", default="false", help="cdul train --cache-decoded (false: decode every epoch)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--cache", default=str(REPO / "data" / "bench_train_memory"), help="generated corpora")
    p.add_argument("--code", default=str(REPO), help="checkout whose cdul_ray is measured (PYTHONPATH)")
    p.add_argument("--json", default=str(REPO / "data" / "bench_train_memory" / "train_memory.json"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("classes", "workers", "epochs", "batch_size", "image_size", "cache_decoded", "cpus", "cache")]
        # Ray puts the driver's working directory first on its workers' sys.path: run the child in --code too.
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=args.code,
                              env={**os.environ, "PYTHONPATH": args.code})
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.stderr.write(done.stdout[-2000:] + done.stderr[-6000:])
            return 1
        rows.append(json.loads(line[0][len("RESULT "):]))
    print(f"code: {args.code}\n")
    print("| images | classes | workers | epochs | wall time | worker peak RSS | worker peak private (RssAnon) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']:,} | {r['classes']} | {r['workers']} | {r['epochs']} | {r['seconds']} s | "
              f"{r['peak_rss_mib']:,.1f} MiB | {r['peak_private_mib']:,.1f} MiB |")
    base, top = rows
    ratio = {k: round(top[k] / base[k], 3) for k in ("peak_rss_mib", "peak_private_mib")}
    print(f"\n8N / N: peak RSS {ratio['peak_rss_mib']}, peak private {ratio['peak_private_mib']} (target: <= 1.10)")
    result = {"code": args.code, "rows": rows, "ratio_largest_to_smallest": ratio}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
