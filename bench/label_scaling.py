"""Labeling scaling: pipeline steady state over snippet grids, CLIP actors and batch sizes (issue 11, 1c).

    .venv/bin/python bench/label_scaling.py                                     # bundled small CLIP
    .venv/bin/python bench/label_scaling.py --model ViT-B-32 --pretrained none --sizes 8 24 --grids 2 3

For each grid K the bare batched forward (same images, in this process) and the pipeline's steady state are
measured; seconds per image should follow 1 + K² (the views per image) when CLIP dominates: the table prints the
measured time ratio to grid 3 beside the ratio of views. Then 1 vs 2 CLIP actors and a few batch sizes at grid 3.
A first, unrecorded pipeline run warms the process up (on a quiet machine the first pipeline runs of a process were
3-4x slower than later runs of the same configuration), and every configuration runs ``--repeats`` times, in rounds
(2 3 4 2 3 4 ...); the table gives each run and the ratios use the median per configuration.
Every number carries the load average; prints a table and one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import labelbench as lb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = lb.parser(__doc__, sizes=(100, 300))
    p.add_argument("--grids", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--actors", type=int, nargs="*", default=[1, 2], help="CLIP actor counts (none: skip)")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 16, 32], help="CLIP batch sizes (none: skip)")
    p.add_argument("--batch-size", type=int, default=16, help="CLIP batch size of the grid and actor runs")
    p.add_argument("--precision", default="fp32", choices=("fp32", "amp"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--label-arg", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra LabelConfig field for the pipeline (repeatable), e.g. views=device")
    p.add_argument("--cache", default=str(lb.REPO / "data" / "bench_speed"))
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration, in rounds (the median is used)")
    p.add_argument("--warm-up", type=int, default=1, help="unrecorded pipeline runs of the grid-3 configuration first")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    n1, n2 = args.sizes

    from cdul_ray.config import LabelConfig, _coerce

    extra = {k: _coerce(LabelConfig, k, v) for k, _, v in (a.partition("=") for a in args.label_arg)}
    root = lb.dataset(args.cache, n2, args.image_size)
    paths = lb.image_paths(root, n1)
    m = lb.Model(args.model, args.pretrained, lb.class_names(root), args.precision)
    lb.init_ray(os.cpu_count())
    base = {"model": args.model, "pretrained": args.pretrained, "precision": args.precision, "grid": 3,
            "batch_size": args.batch_size, "max_actors": 1, **extra}
    rows = []

    def run(kind: str, value: int, round_: int, **over) -> dict:
        cfg = {**base, **over}
        views = lb.preprocess_views(m, paths, cfg["grid"])
        load = lb.load_average()
        bare = n1 / lb.bare_forward(m, views, cfg["batch_size"])
        with lb.quiet_logs():
            s = lb.steady_state(root, (n1, n2), **cfg)
        row = {"vary": kind, "value": value, "round": round_, "grid": cfg["grid"], "actors": cfg["max_actors"],
               "batch_size": cfg["batch_size"], "bare_images_per_second": round(bare, 2),
               "pipeline_images_per_second": s["images_per_second"],
               "pipeline_in_run_images_per_second": s["in_run_images_per_second"], "bare_load": load, "pipeline_load": s["load"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    with lb.quiet_logs():
        for i in range(args.warm_up):
            t, _ = lb.pipeline_seconds(root, n1, **base)
            print(json.dumps({"warm_up": i + 1, "images": n1, "seconds": round(t, 2), "load": lb.load_average()}),
                  flush=True)
    for r in range(1, args.repeats + 1):
        for k in args.grids:
            run("grid", k, r, grid=k)
    for r in range(1, args.repeats + 1):
        for a in args.actors:
            # 0.5 CPU per actor beyond one: 2 actors of 1 CPU on a 2-CPU machine leave the decode tasks no CPU (refused)
            run("actors", a, r, max_actors=a, min_actors=a, cpus_per_actor=1.0 if a == 1 else 0.5)
    for r in range(1, args.repeats + 1):
        for b in args.batch_sizes:
            run("batch_size", b, r, batch_size=b)

    modes = ("bare", "pipeline", "pipeline_in_run")
    summary = []  # one row per configuration: the median of its runs
    for kind, value in dict.fromkeys((r["vary"], r["value"]) for r in rows):
        runs = [r for r in rows if (r["vary"], r["value"]) == (kind, value)]
        med = {"vary": kind, "value": value, "grid": runs[0]["grid"], "runs": len(runs)}
        for mode in modes:
            vals = [r[f"{mode}_images_per_second"] for r in runs if r[f"{mode}_images_per_second"]]
            med[f"{mode}_images_per_second"] = round(statistics.median(vals), 2) if vals else None
        summary.append(med)
    ref = next((r for r in summary if r["vary"] == "grid" and r["grid"] == 3), None)
    for r in summary:
        if r["vary"] == "grid" and ref:
            r["views_ratio"] = round((1 + r["grid"] ** 2) / 10, 3)
            for mode in modes:
                a, b = ref[f"{mode}_images_per_second"], r[f"{mode}_images_per_second"]
                r[f"{mode}_time_ratio"] = round(a / b, 3) if a and b else None
    print(f"\n{args.model}/{args.pretrained}, {args.precision}, device {m.device}, cpus {os.cpu_count()}, "
          f"pipeline sizes {n1}/{n2}; time ratios are seconds per image relative to grid 3\n")
    lb.print_table(rows, ["vary", "value", "round", "bare_images_per_second", "pipeline_images_per_second",
                          "pipeline_in_run_images_per_second", "bare_load", "pipeline_load"])
    print("\nmedian per configuration\n")
    lb.print_table(summary, ["vary", "value", "runs", "bare_images_per_second", "pipeline_images_per_second",
                             "pipeline_in_run_images_per_second", "views_ratio", "bare_time_ratio",
                             "pipeline_time_ratio", "pipeline_in_run_time_ratio"])
    result = {"model": args.model, "pretrained": args.pretrained, "precision": args.precision,
              "device": str(m.device), "label_args": args.label_arg, "cpus": os.cpu_count(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, "median": summary}
    return lb.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
