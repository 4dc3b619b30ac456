"""The offline demo and benchmark: the paper's Table 1 in miniature, on one command, without internet.

1. Generate the synthetic multi-object world (COCO format, train/val/test) if absent (``cdul_ray.synthetic``).
2. Label its train split with the bundled small CLIP (``cdul-synth-rn``/``synth``, trained on single-object images
   only) on a local Ray cluster, exactly as any COCO dataset (``cdul_ray.pipeline.run_labeling``).
3. Print the pseudo-label mAP table (global / avg / max / cdul) and a ζ sweep; write a visual report.
4. When ``train`` is on, the paper's Table 2 on the test split (``cdul_ray.table2``): zero-shot global CLIP, CDUL soft
   labels of the test images, and the classifier trained on fixed pseudo labels, with gradient-alignment label updates
   and on ground truth, each with its test mAP and inference images/s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from cdul_ray import schema, storage, table2
from cdul_ray.config import DEFAULT_THRESHOLD, SMOKE_MODEL, LabelConfig, option

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Config of the demo (``cdul demo``, ``jobs/demo.py``)."""

    data: str = option("data/synth", "where the synthetic benchmark is (generated when absent)")
    output: str = option("out/demo", "demo output directory (replaced on every run)")
    seed: int = option(0, "generation seed of the synthetic benchmark")
    train_images: int = option(2000, "synthetic train scenes")
    val_images: int = option(500, "synthetic val scenes")
    test_images: int = option(1000, "synthetic test scenes")
    threshold: float = option(DEFAULT_THRESHOLD, "cdul threshold ζ")
    batch_size: int = option(32, "images per CLIP batch")
    max_actors: int = option(1, "CLIP actors (CPU)")
    train: bool = option(True, "also train the classifier (fixed pseudo labels, label updates, ground truth) and "
                               "print Table 2")
    train_epochs: int = option(6, "classifier epochs")
    backbone: str = option("open_clip:cdul-synth-rn", "classifier backbone: a timm name (random init offline) or "
                                                  "open_clip:<name>, the CLIP image trunk")
    pretrained_backbone: str = option("synth", "backbone weights (for open_clip: a pretrained tag or file)")
    freeze_backbone: bool = option(False, "train only the classifier head on the frozen backbone (a linear probe); "
                                                "off: fine-tune the trunk (docs/benchmark.md, Table 2)")
    train_lr: float = option(3e-3, "classifier AdamW learning rate")
    image_size: int = option(128, "classifier input side in pixels")
    report: bool = option(True, "write the PNG report next to the labels")

    def validate(self) -> "DemoConfig":
        from cdul_ray.config import ConfigError, check_at_least, check_output_location

        check_at_least(self, 1, "train_images", "test_images", "batch_size", "max_actors", "train_epochs")
        check_at_least(self, 0, "val_images")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        check_output_location("output", self.output)
        return self


def label_split(cfg: DemoConfig, split: str, evaluate: bool = True) -> Any:
    """Label one split of the synthetic benchmark with the bundled CLIP; returns the LabelSummary."""
    from cdul_ray.pipeline import run_labeling

    return run_labeling(
        LabelConfig(
            dataset=cfg.data, format="coco", split=split, output=storage.join(cfg.output, f"labels-{split}"),
            model=SMOKE_MODEL[0], pretrained=SMOKE_MODEL[1], threshold=cfg.threshold, batch_size=cfg.batch_size,
            max_actors=cfg.max_actors, use_gpu="false", overwrite=True, evaluate=evaluate,
        )
    )


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns {"table1": evaluation of the train split, "table2": classifier results or None}.

    The console shows one line per step and Ray's progress while it runs (bars on a terminal, periodic lines
    otherwise); the tables and the path of every output are printed once, at the end, after Ray is disconnected (when
    the demo connected it), so no forwarded worker line lands after them.
    """
    import ray

    from cdul_ray.synthetic.generate import generate

    cfg = cfg.validate()
    steps = 3 + (3 if cfg.train else 0)
    _step(1, steps, f"synthetic benchmark in {cfg.data} (generated if absent)")
    generate(cfg.data, seed=cfg.seed, counts={"train": cfg.train_images, "val": cfg.val_images,
                                              "test": cfg.test_images}, workers=2)
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init()
    _step(2, steps, f"labeling the train split ({cfg.train_images} scenes) with the bundled CLIP")
    summary = label_split(cfg, "train")
    table1 = summary.evaluation
    report = None
    if cfg.report:
        from cdul_ray.report import write_report

        _step(3, steps, "writing the report")
        report = write_report(summary.output, table1)
    result: dict[str, Any] = {"table1": table1, "table2": None}
    trained: list[str] = []
    if cfg.train:
        result["table2"], trained = _table2(cfg, summary, steps)
    saved = {**result, "table2": table2.as_dict(result["table2"]) if result["table2"] else None}
    storage.write_json(storage.join(cfg.output, schema.DEMO_FILE), {"config": dataclasses.asdict(cfg), **saved})
    if connected_here:
        ray.shutdown()  # stops the forwarding of worker logs: nothing prints after the tables
    print(render_results(cfg, summary, result, report, trained), flush=True)
    return result


def _step(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", flush=True)


def render_results(cfg: DemoConfig, summary: Any, result: dict[str, Any], report: str | None,
                   trained: list[str]) -> str:
    """The demo's final screen: Table 1, the ζ sweep, Table 2 (when trained) and the path of every output."""
    from cdul_ray.evaluate import render_table

    lines = ["", "Table 1 layout: initial soft pseudo labels on the train split (train ground truth)", "",
             render_table(result["table1"]), ""]
    if result["table2"]:
        lines += ["Table 2 layout: test mAP and inference images/s of each way to label a new image", "",
                  table2.render(result["table2"], "test", cfg.test_images), ""]
    lines += [f"Labeling: {summary.images} images, {summary.errors} errors, {summary.seconds:.0f} s",
              "", "Outputs:"]
    outputs = [
        (storage.join(summary.output, schema.LABELS_DIR), "soft pseudo labels of the train split (Parquet)"),
        (storage.join(summary.output, schema.EVALUATION_MD), "Table 1 and the ζ sweep"),
    ]
    if report is not None:
        from cdul_ray.report import report_files

        outputs.append((report, "visual report: label sets per image, how their thresholds were chosen"))
        outputs += [(f, "") for f in report_files(summary.output) if f.endswith(".png")]
    if trained:
        outputs.append((storage.join(cfg.output, "labels-test", schema.LABELS_DIR),
                        "CLIP scores of the test split (rows 1-2 of Table 2)"))
    for run in trained:
        outputs += [(storage.join(run, schema.MODEL_DIR), "trained classifier (input of `cdul predict --checkpoint`)"),
                    (storage.join(run, schema.HISTORY_FILE), "loss and mAP per epoch"),
                    (storage.join(run, schema.CAM_DIR), "class activation maps (PNG) per epoch")]
    outputs.append((storage.join(cfg.output, schema.DEMO_FILE), "all the numbers above"))
    outputs = [(_shown(p), what) for p, what in outputs]
    width = max(len(p) for p, _ in outputs)
    lines += [f"  {p.ljust(width)}  {what}".rstrip() for p, what in outputs]
    return "\n".join(lines)


def _shown(path: str) -> str:
    """A local path under the working directory as a relative path (as the user typed ``--output``), else as is."""
    if storage.is_s3(path):
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


# (run directory, Table 2 method, TrainConfig overrides) of the three classifier rows
TRAINING_RUNS = (
    ("train-fixed", "classifier, fixed CDUL pseudo labels", {"label_update": False}),
    ("train-update", "classifier, gradient-alignment label updates", {"label_update": True}),
    ("train-supervised", "classifier, ground-truth labels (fully supervised ceiling)",
     {"label_update": False, "supervision": "ground_truth"}),
)
THROUGHPUT_IMAGES = 192  # test images timed per row and pass (plus one warm-up batch)


def _table2(cfg: DemoConfig, train_summary: Any, steps: int) -> tuple[list[Any], list[str]]:
    """The five rows of Table 2 on the test split (``cdul_ray.table2``): zero-shot global CLIP, CDUL soft labels on
    the test images, and the classifier trained on fixed pseudo labels, with label updates, and on ground truth.

    Returns the rows and the training output directories.
    """
    from cdul_ray.train import TrainConfig, run_training

    _step(4, steps, f"scoring the test split ({cfg.test_images} scenes) with the bundled CLIP (Table 2, rows 1-2)")
    test = label_split(cfg, "test", evaluate=False)
    global_map, cdul_map = table2.clip_maps(test.output)
    _step(5, steps, f"training the classifier three times ({cfg.train_epochs} epochs each, Ray Train): fixed pseudo "
                    "labels, gradient-alignment label updates, ground truth")
    maps, runs = [], []
    for name, _, overrides in TRAINING_RUNS:
        summary = run_training(TrainConfig(
            labels=train_summary.output, dataset=cfg.data, format="coco", split="train", eval_split="test",
            output=storage.join(cfg.output, name), backbone=cfg.backbone,
            pretrained_backbone=cfg.pretrained_backbone, freeze_backbone=cfg.freeze_backbone,
            image_size=cfg.image_size, epochs=cfg.train_epochs, batch_size=32, lr=cfg.train_lr, cam_images=4,
            seed=cfg.seed, overwrite=True, **overrides,
        ))
        maps.append(summary.eval_map)
        runs.append(summary.output)
    uris = sorted(storage.read_parquet_dir(storage.join(test.output, schema.LABELS_DIR), None,
                                           columns=["uri"])["uri"].to_pylist())[:THROUGHPUT_IMAGES + table2.BATCH]
    _step(6, steps, f"timing inference of each row on {len(uris) - table2.BATCH} test images after a "
                    f"{table2.BATCH}-image warm-up (this process, all cores, best of 3)")
    global_step, cdul_step = table2.clip_steps(test.output)
    timed = {"global": global_step, "cdul": cdul_step}
    timed.update({run: table2.classifier_step(storage.join(run, schema.MODEL_DIR)) for run in runs})
    rate = table2.images_per_second(timed, uris)
    rows = [table2.Table2Row("CLIP zero-shot, global alignment only", "1 CLIP forward", global_map, rate["global"]),
            table2.Table2Row("CDUL soft pseudo labels of the test images (no classifier)",
                             f"{table2.clip_forwards(test.output)} CLIP forwards", cdul_map, rate["cdul"])]
    rows += [table2.Table2Row(method, "1 classifier forward", test_map, rate[run])
             for (_, method, _), test_map, run in zip(TRAINING_RUNS, maps, runs)]
    return rows, runs
