"""Labeling efficiency: the Ray Data pipeline vs the bare batched forward and a plain per-image loop (issue 11, 1a-1b).

    .venv/bin/python bench/label_efficiency.py                                   # bundled small CLIP (64 px)
    .venv/bin/python bench/label_efficiency.py --label-arg compile=true --sizes 1500 4500    # --compile
    .venv/bin/python bench/label_efficiency.py --model ViT-B-32 --pretrained none --sizes 8 24
    .venv/bin/python bench/label_efficiency.py --model RN50x64 --pretrained none --precision amp --peak-tflops 989

Same images (synthetic scenes, cached under --cache), same model, one process: each round measures bare, loop and
the pipeline at two sizes, interleaved, each with the load average (see bench/labelbench.py for the three modes).
The pipeline gets the same CPUs as the driver's own torch (``ray.init(num_cpus=os.cpu_count())``) and every
``cdul label`` default not overridden here. Prints a table and one JSON line. Targets (docs/performance.md): pipeline
>= 0.9x bare for a real-size architecture, >= 2x the loop for the bundled CLIP.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import labelbench as lb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = lb.parser(__doc__, sizes=(100, 400))
    p.add_argument("--loop-images", type=int, default=None, help="images of the bare forward and loop (default n1)")
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="images per CLIP batch (bare and pipeline)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "amp"))
    p.add_argument("--image-size", type=int, default=224, help="side of the generated scenes in pixels")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warm-up", type=int, default=1,
                   help="unrecorded pipeline runs of n1 images first (a process's first runs are slower)")
    p.add_argument("--driver-threads", type=int, nargs="+", default=None,
                   help="torch threads of the bare forward and the loop, each measured (default: 1 and all cores)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense matrix TFLOP/s of the device at this precision (prints the fraction used)")
    p.add_argument("--label-arg", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra LabelConfig field for the pipeline (repeatable), e.g. views=device")
    p.add_argument("--cache", default=str(lb.REPO / "data" / "bench_speed"))
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    n1, n2 = args.sizes
    n_loop = args.loop_images or n1

    import torch

    from cdul_ray.config import LabelConfig, _coerce

    extra = {}
    for item in args.label_arg:
        key, _, value = item.partition("=")
        extra[key] = _coerce(LabelConfig, key, value)
    root = lb.dataset(args.cache, n2, args.image_size)
    paths = lb.image_paths(root, n_loop)
    m = lb.Model(args.model, args.pretrained, lb.class_names(root), args.precision)
    flops = m.flops_per_view()
    views = lb.preprocess_views(m, paths, args.grid)
    lb.init_ray(os.cpu_count())
    overrides = {"model": args.model, "pretrained": args.pretrained, "grid": args.grid,
                 "batch_size": args.batch_size, "precision": args.precision, "max_actors": 1, **extra}
    threads = args.driver_threads or sorted({1, os.cpu_count() or 1})
    rows = []
    for i in range(args.warm_up):
        with lb.quiet_logs():
            t, _ = lb.pipeline_seconds(root, n1, **overrides)
        print(json.dumps({"warm_up": i + 1, "images": n1, "seconds": round(t, 2), "load": lb.load_average()}),
              flush=True)
    for r in range(args.rounds):
        for mode, fn in (("bare", lambda: lb.bare_forward(m, views, args.batch_size)),
                         ("loop", lambda: lb.per_image_loop(m, paths, args.grid))):
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                load = lb.load_average()
                t = fn()
                rows.append({"round": r, "mode": f"{mode} {n_threads}t", "images": n_loop, "seconds": round(t, 2),
                             "images_per_second": round(n_loop / t, 2), "load": load})
        with lb.quiet_logs():
            s = lb.steady_state(root, (n1, n2), **overrides)
        rows.append({"round": r, "mode": "pipeline", "images": f"{n2}-{n1}", "seconds": f"{s['t2']}-{s['t1']}",
                     "images_per_second": s["images_per_second"], "load": s["load"]})
        rows.append({"round": r, "mode": "pipeline in-run", "images": n2, "seconds": "first-last file",
                     "images_per_second": s["in_run_images_per_second"], "load": s["load"][1:]})
    views_per_image = 1 + args.grid ** 2
    for row in rows:
        if row["images_per_second"] is None:
            continue
        tflops = row["images_per_second"] * views_per_image * flops / 1e12
        row["model_tflop_per_s"] = round(tflops, 4)
        if args.peak_tflops:
            row["fraction_of_peak"] = round(tflops / args.peak_tflops, 4)

    def mean_rate(mode: str) -> float | None:
        rates = [row["images_per_second"] for row in rows if row["mode"] == mode and row["images_per_second"]]
        return sum(rates) / len(rates) if rates else None

    def best_rate(kind: str) -> float:  # the faster thread count of the driver's bare forward / loop
        return max(mean_rate(f"{kind} {t}t") for t in threads)

    ratios = {f"{name}_over_{kind}": round(mean_rate(mode) / best_rate(kind), 3) if mean_rate(mode) else None
              for name, mode in (("pipeline", "pipeline"), ("pipeline_in_run", "pipeline in-run"))
              for kind in ("bare", "loop")}
    print(f"\n{args.model}/{args.pretrained}, grid {args.grid}, batch {args.batch_size}, {args.precision}, "
          f"device {m.device}, {m.size[0]} px views, {flops / 1e9:.3f} GFLOP/view, cpus {os.cpu_count()}; "
          "ratios against the faster driver thread count\n")
    lb.print_table(rows, ["round", "mode", "images", "seconds", "images_per_second", "model_tflop_per_s"]
                   + (["fraction_of_peak"] if args.peak_tflops else []) + ["load"])
    print("\n" + "  ".join(f"{k} {v}" for k, v in ratios.items()))
    result = {"model": args.model, "pretrained": args.pretrained, "grid": args.grid, "batch_size": args.batch_size,
              "precision": args.precision, "device": str(m.device), "gflop_per_view": round(flops / 1e9, 4),
              "peak_tflops": args.peak_tflops, "label_args": args.label_arg, "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "ratios": ratios}
    return lb.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
