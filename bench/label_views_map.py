"""Pseudo-label mAP with views cut on the device (torch) vs the exact open_clip PIL views (issue 11: within 0.5 points).

    .venv/bin/python bench/label_views_map.py                       # 1,000 synthetic train scenes, bundled CLIP
    .venv/bin/python bench/label_views_map.py --images 2000         # the demo's train split size

Labels the same synthetic benchmark split twice with ``run_labeling`` (``--views exact`` and ``--views device``, on
the CPU here: the device path is the same torch code on a GPU), evaluates both against the ground truth and prints
the Table 1 mAPs side by side, the largest absolute difference, and the largest per-image score difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import labelbench as lb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--model", default="cdul-synth-rn")
    p.add_argument("--pretrained", default="synth")
    p.add_argument("--cache", default=str(lb.REPO / "data" / "bench_speed"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import numpy as np

    from cdul_ray.config import LabelConfig
    from cdul_ray.evaluate import read_label_scores
    from cdul_ray.pipeline import run_labeling

    root = lb.dataset(args.cache, args.images, 224)
    lb.init_ray(os.cpu_count())
    tables, scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for views in ("exact", "device"):
            out = os.path.join(tmp, views)
            with lb.quiet_logs():
                summary = run_labeling(LabelConfig(dataset=root, format="coco", split="train", output=out,
                                                   model=args.model, pretrained=args.pretrained, views=views))
            tables[views] = summary.evaluation
            scores[views] = read_label_scores(out)
    ex, dv = tables["exact"], tables["device"]
    rows = [{"aggregator": k, "exact": round(ex["map"][k], 2), "device": round(dv["map"][k], 2),
             "difference": round(dv["map"][k] - ex["map"][k], 2)} for k in ex["map"]]
    score_diff = max(float(np.abs(getattr(scores["exact"], f) - getattr(scores["device"], f)).max())
                     for f in ("global_score", "alpha", "beta", "mean"))
    print(f"\n{args.model}/{args.pretrained}, {ex['images']} synthetic train scenes, pseudo-label mAP (%)\n")
    lb.print_table(rows, ["aggregator", "exact", "device", "difference"])
    worst = max(abs(r["difference"]) for r in rows)
    print(f"\nlargest mAP difference {worst:.2f} points (target <= 0.5); largest score difference {score_diff:.4f}")
    result = {"model": args.model, "pretrained": args.pretrained, "images": ex["images"], "rows": rows,
              "max_map_difference": worst, "max_score_difference": score_diff}
    return lb.emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
