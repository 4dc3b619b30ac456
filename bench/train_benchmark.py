"""Classifier benchmark (paper Table 2 layout): initial pseudo labels vs. classifiers trained on ground truth (the
fully supervised ceiling) and on pseudo labels with and without gradient-alignment label updates, on the same data,
seed and config.

    .venv/bin/python bench/train_benchmark.py --labels out/synth-labels --dataset data/synth --eval-split test \
        --output out/bench-train --backbone resnet18 --image-size 112 --epochs 6 --batch-size 32 --lr 1e-3

Every `cdul train` flag is accepted (except --label-update and --supervision, which the benchmark sets);
``--psi-sweep`` adds one run per extra ψ, ``--eta-sweep`` one per extra η. Runs land in
``<output>/{supervised,fixed,update,...}`` and resume if interrupted. Prints a markdown table (train-split label mAP
and test-split classifier mAP, last epoch and best epoch) and the command that made it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shlex
import sys
import time

import numpy as np

from cdul_ray import config as config_mod
from cdul_ray import schema, storage
from cdul_ray.train import TrainConfig, run_training
from cdul_ray.train.labels import read_history


def _initial_label_map(labels: str, endpoint: str | None) -> dict[str, float]:
    """The labeling run's own Table 1 numbers (train split), if it evaluated itself."""
    uri = storage.join(labels, schema.EVALUATION_JSON)
    return storage.read_json(uri, endpoint)["map"] if storage.exists(uri, endpoint) else {}


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    config_mod.add_arguments(p, TrainConfig)
    p.add_argument("--psi-sweep", nargs="*", default=[], help="extra label-update runs with these psi values")
    p.add_argument("--eta-sweep", nargs="*", type=float, default=[],
                   help="extra label-update runs with these label step sizes eta (--label-lr)")
    args = p.parse_args(argv)
    if args.label_update is not None or args.supervision is not None:
        p.error("--label-update and --supervision are set by the benchmark (every setting is run)")
    base = config_mod.from_args(TrainConfig, args)
    if not base.eval_split:
        p.error("--eval-split (the held-out test split) is required")
    start = time.time()
    runs = [("ground-truth labels (fully supervised ceiling)", "supervised",
             {"label_update": False, "supervision": "ground_truth"}),
            ("fixed pseudo labels (no label update)", "fixed", {"label_update": False}),
            (f"gradient-alignment label updates (ψ={base.psi}, η={base.label_lr:g})", "update",
             {"label_update": True})]
    runs += [(f"gradient-alignment label updates (ψ={psi}, η={base.label_lr:g})", f"update-{psi}",
              {"label_update": True, "psi": psi}) for psi in args.psi_sweep if psi != base.psi]
    runs += [(f"gradient-alignment label updates (ψ={base.psi}, η={eta:g})", f"update-eta{eta:g}",
              {"label_update": True, "label_lr": eta}) for eta in args.eta_sweep if eta != base.label_lr]
    results = []
    for title, sub, overrides in runs:
        cfg = dataclasses.replace(base, output=storage.join(base.output, sub), **overrides)
        summary = run_training(cfg)
        history = read_history(cfg.output, cfg.s3_endpoint)
        best = max(history[1:], key=lambda h: h["eval_map"])
        results.append((title, summary, history, best))
    initial = _initial_label_map(base.labels, base.s3_endpoint)

    first = results[1][1]
    lines = [
        f"Classifier mAP (%) on the `{base.eval_split}` split ({first.eval_images} images) and label mAP (%) on the "
        f"training split ({first.images} images), {first.classes} classes; backbone {base.backbone} "
        f"({first.backbone_weights}), {base.image_size} px, {base.epochs} epochs, seed {base.seed}, "
        f"{base.workers} worker(s).",
        "",
        "| labels / classifier | train label mAP (initial → final) | test mAP, last epoch | test mAP, best epoch |",
        "|---|---:|---:|---:|",
        f"| initial CDUL pseudo labels Y⁰ (labeling run: global {_fmt(initial.get('global'))}, "
        f"cdul {_fmt(initial.get('cdul'))}) | {_fmt(first.initial_label_map)} | — | — |",
    ]
    for title, summary, _, best in results:
        lines.append(f"| classifier, {title} | {_fmt(summary.initial_label_map)} → {_fmt(summary.label_map)} | "
                     f"{_fmt(summary.eval_map)} | {_fmt(best['eval_map'])} (epoch {best['epoch']}) |")
    lines += ["", "Per-epoch test mAP:", "", "| epoch | " + " | ".join(sub for _, sub, _ in runs) + " |",
              "|---:|" + "---:|" * len(runs)]
    for e in range(1, len(results[0][2])):
        lines.append(f"| {e} | " + " | ".join(_fmt(r[2][e]["eval_map"]) if e < len(r[2]) else "—"
                                               for r in results) + " |")
    command = shlex.join([".venv/bin/python", "bench/train_benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    lines += ["", f"Command: `{command}`", f"Wall time: {time.time() - start:.0f} s (all runs)."]
    print("\n".join(lines))
    storage.write_json(storage.join(base.output, "benchmark.json"), {
        "command": command,
        "initial": initial,
        "runs": [{"title": t, "summary": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                          for k, v in dataclasses.asdict(s).items()},
                  "history": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in h.items()}
                              for h in hist]} for t, s, hist, _ in results],
    }, base.s3_endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
