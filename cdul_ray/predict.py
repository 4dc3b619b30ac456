"""Batch inference with a trained CDUL classifier on Ray Data (paper §3.3: inference uses the classifier alone).

Stages: index (any reader of :mod:`cdul_ray.datasets`: folder / S3 prefix / manifest / COCO / VOC / NUS-WIDE) ->
CPU decode + resize tasks (:func:`cdul_ray.classifier.decode_resized`) -> a ``Predictor`` actor pool (``map_batches``
with ``ActorPoolStrategy``, one GPU per actor on GPU clusters) -> Parquet.

Output directory (local path or ``s3://`` URI)::

    <output>/
      predictions/*.parquet   schema.predictions_schema(C): image_id, uri, probabilities (C values in [0, 1]:
                              sigmoid for a bce-trained classifier, softmax for kl), one row per readable image
      errors/*.parquet        ERRORS_SCHEMA: unreadable images (stage read | decode | predict)
      classes.json            the classifier's classes (column order of ``probabilities``)
      run_config.json         the full PredictConfig
      summary.json            images, predicted, errors, wall time, images/s, mAP when the dataset has ground truth
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from cdul_ray import schema, storage
from cdul_ray.batch_inference import Stage, count_rows, prepare_output, stream_to_parquet
from cdul_ray.config import SMOKE_IMAGES, check_actor_pool, check_dataset_input, gpu_option, option, to_dict
from cdul_ray.resources import actor_pool, cpu_threads, decode_batch_rows, decode_cpus

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class PredictConfig:
    """Config of the batch prediction job."""

    checkpoint: str = option("", "trained classifier: a training output dir, its model/ dir, or a checkpoint dir "
                             "(local or s3://)", required=True)
    dataset: str = option("", "images to label: folder, s3:// prefix, manifest (.parquet/.csv) or dataset root",
                      required=True)
    output: str = option("", "output directory: local path or s3:// URI", required=True)
    format: str = option("auto", "dataset format: auto, coco, voc, nuswide, folder, manifest")
    split: str | None = option(None, "dataset split (coco/voc/nuswide)")
    batch_size: int = option(64, "images per classifier batch")
    decode_batch_size: int | None = option(
        None, "images per CPU decode/resize task (default: blocks of about 32 MiB of resized images, 16-256 images)")
    min_actors: int = option(1, "classifier actor pool: minimum size")
    max_actors: int | None = option(None, "classifier actor pool: maximum size (default: GPUs incl. autoscaling, or 1 on CPU)")
    use_gpu: str = gpu_option("auto", "auto (GPU actors if the cluster has or can add GPUs), true, or false")
    cpus_per_actor: float = option(1.0, "CPUs reserved per classifier actor")
    limit: int | None = option(None, "predict only the first N images")
    s3_endpoint: str | None = option(None, "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS itself)")
    overwrite: bool = option(False, "delete the run in the output and start afresh (default: resume it, skipping done images)")
    evaluate: bool = option(True, "compute the mAP of the predictions when the dataset has ground truth")
    rows_per_file: int = option(
        1024, "minimum rows per output Parquet file (files close at a decode block): a killed job loses at most this "
              "plus one decode block; resume skips the rest")
    smoke_test: bool = option(False, f"a few images ({SMOKE_IMAGES}) on CPU")

    def validate(self) -> "PredictConfig":
        """Check every field; returns self. Raises ConfigError naming the first bad field."""
        check_dataset_input(self, "checkpoint", "dataset", "output")
        check_actor_pool(self)
        return self

    def effective(self) -> "PredictConfig":
        """``smoke_test`` shrinks the job to a few images and one CPU actor."""
        if not self.smoke_test:
            return self
        return dataclasses.replace(self, limit=min(self.limit or SMOKE_IMAGES, SMOKE_IMAGES), use_gpu="false",
                                   min_actors=1, max_actors=1, batch_size=min(self.batch_size, 8)).validate()

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


class Predictor:
    """Ray Data callable class: the classifier on a batch of decoded images.

    Heavy state (the model) is built once per actor. Input: ``image_id``, ``uri``, ``pixels`` [B, 3, S, S] uint8,
    ``error_stage``, ``error_reason``. Returns an Arrow table with ``predictions_schema(C)`` columns plus
    ``error_stage``/``error_reason``.
    """

    def __init__(self, model_dir: str, endpoint_override: str | None, actors: int = 1):
        import torch

        from cdul_ray.classifier import load_model_dir

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":  # Ray's OMP_NUM_THREADS=1 would leave the node's other cores idle
            torch.set_num_threads(cpu_threads(0, len(os.sched_getaffinity(0)), actors))
        self.model, self.meta = load_model_dir(model_dir, self.device, endpoint_override)
        self.num_classes = len(self.meta["classes"])
        self.out_schema = schema.predictions_schema(self.num_classes).append(
            pa.field("error_stage", pa.string())).append(pa.field("error_reason", pa.string()))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        torch = self.torch
        from cdul_ray.core.label_update import predict_proba
        from cdul_ray.classifier import model_input

        c = self.num_classes
        stage = np.array([str(s) for s in batch["error_stage"]], dtype=object)
        reason = np.array([str(s) for s in batch["error_reason"]], dtype=object)
        ok = stage == ""
        probs = np.zeros((len(stage), c), dtype=np.float32)  # (B, C)
        if ok.any():
            with torch.inference_mode():
                x = model_input(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])), self.meta, self.device)
                out = predict_proba(self.model(x), self.meta["loss"]).float().cpu().numpy()  # (B', C) in [0, 1]
            finite = np.isfinite(out).all(axis=1)
            probs[ok] = np.nan_to_num(out)
            bad = np.flatnonzero(ok)[~finite]
            stage[bad] = schema.PREDICT_STAGE
            reason[bad] = "non-finite classifier output (NaN/inf)"
        vec = pa.list_(pa.float32(), c)
        return pa.table({
            "image_id": pa.array([str(x) for x in batch["image_id"]], pa.string()),
            "uri": pa.array([str(x) for x in batch["uri"]], pa.string()),
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), c).cast(vec),
            "error_stage": pa.array(list(stage), pa.string()),
            "error_reason": pa.array(list(reason), pa.string()),
        }, schema=self.out_schema)


@dataclass(frozen=True)
class PredictSummary:
    """What a prediction run did (``predicted`` and ``errors``: this run; ``already_done``: earlier runs into the same
    output). ``map`` is the mAP (%) of every prediction in the output against the dataset's ground truth, when it has
    one."""

    output: str
    images: int
    already_done: int
    predicted: int
    errors: int
    classes: int
    seconds: float
    images_per_second: float
    map: float | None

    def render(self) -> str:
        lines = [
            "CDUL prediction finished",
            f"  images in      {self.images}",
            f"  already done   {self.already_done}" + ("  (earlier runs into this output; skipped)"
                                                        if self.already_done else ""),
            f"  predicted now  {self.predicted}",
            f"  errors         {self.errors}" + (f"  (see {storage.join(self.output, schema.ERRORS_DIR)})"
                                                 if self.errors else ""),
            f"  classes        {self.classes}",
            f"  wall time      {self.seconds:.1f} s  ({self.images_per_second:.2f} images/s)",
            f"  predictions    {storage.join(self.output, schema.PREDICTIONS_DIR)}",
        ]
        if self.map is not None:
            lines.append(f"  mAP            {self.map:.2f}")
        return "\n".join(lines)


# Fields that define a prediction run's values: a run into an output made by another classifier is refused.
PREDICT_DEFINING_FIELDS = ("checkpoint", "classes")


def _index(cfg: PredictConfig, classes: list[str], endpoint: str | None):
    """The dataset indexed with the classifier's classes as vocabulary (ground truth, if any, remapped by name)."""
    from cdul_ray.datasets import load_dataset

    return load_dataset(cfg.dataset, cfg.format, cfg.split, classes, endpoint, cfg.limit).excluding(cfg.output)


def _map(predictions: pa.Table, records: pa.Table, num_classes: int) -> float | None:
    from cdul_ray.core.metrics import mean_average_precision, multi_hot

    gt = dict(zip(records["image_id"].to_pylist(), records["gt_labels"].to_pylist()))
    predictions = predictions.filter(pa.compute.is_in(predictions["image_id"], value_set=records["image_id"]))
    ids = predictions["image_id"].to_pylist()  # earlier runs into the output may hold images no longer indexed
    if not ids:
        return None
    probs = np.asarray(predictions["probabilities"].to_pylist(), dtype=np.float32)  # (N, C)
    result = mean_average_precision(probs, multi_hot([gt[i] for i in ids], num_classes)).map
    return None if math.isnan(result) else result


def run_prediction(cfg: PredictConfig) -> PredictSummary:
    """Predict per-class probabilities for every image of a dataset with a trained classifier.

    Fails fast (before any Ray work) on the config, the classifier files, the dataset index and the output directory.

    Raises:
        ConfigError, FileNotFoundError, OutputExistsError (cdul_ray.batch_inference).
    """
    import ray

    from cdul_ray.classifier import decode_resized, resolve_model_dir
    from cdul_ray.storage import absolute_uri

    cfg = cfg.validate().effective()
    start = time.time()
    endpoint = cfg.s3_endpoint or storage.s3_endpoint_from_env()
    # Ray workers may run in another working directory: local paths must be absolute.
    cfg = dataclasses.replace(cfg, s3_endpoint=endpoint, checkpoint=absolute_uri(cfg.checkpoint),
                              dataset=absolute_uri(cfg.dataset), output=absolute_uri(cfg.output))
    try:
        model_dir = resolve_model_dir(cfg.checkpoint, endpoint)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config field `checkpoint`: {e}") from e
    meta = storage.read_json(storage.join(model_dir, schema.MODEL_META), endpoint)
    classes = list(meta["classes"])
    index = _index(cfg, classes, endpoint)
    run_config = {"kind": "predict", **cfg.to_dict(), "classes": classes}
    prepare_output(cfg.output, endpoint, cfg.overwrite, run_config, PREDICT_DEFINING_FIELDS, "predict")
    n_images = len(index)
    logger.info("%d images, classifier %s (%s, %d classes)", n_images, model_dir, meta["backbone"], len(classes))

    if not ray.is_initialized():
        ray.init()
    use_gpu, min_actors, max_actors = actor_pool(cfg)
    storage.write_json(storage.join(cfg.output, schema.CLASSES_FILE), {"classes": classes}, endpoint)
    storage.write_json(storage.join(cfg.output, schema.RUN_CONFIG_FILE), run_config, endpoint)

    size = int(meta["image_size"])
    decode = Stage(decode_resized, decode_batch_rows(cfg.decode_batch_size, 3 * size * size),
                   {"image_size": size, "endpoint_override": endpoint},
                   num_cpus=decode_cpus(cfg.cpus_per_actor))  # not fused into the classifier actor
    classify = Stage(Predictor, cfg.batch_size,
                     {"model_dir": model_dir, "endpoint_override": endpoint, "actors": max_actors or 1},
                     num_cpus=cfg.cpus_per_actor, num_gpus=1 if use_gpu else 0, actors=(min_actors, max_actors))
    written = stream_to_parquet(index.records, cfg.output, endpoint, schema.PREDICTIONS_DIR, (decode, classify),
                                cfg.rows_per_file)

    map_value = None
    if cfg.evaluate and index.has_ground_truth and count_rows(cfg.output, endpoint, schema.PREDICTIONS_DIR):
        fs, path = storage.filesystem(storage.join(cfg.output, schema.PREDICTIONS_DIR), endpoint)
        table = pq.read_table(path, filesystem=fs, columns=["image_id", "probabilities"])
        map_value = _map(table, index.records, len(classes))
    seconds = time.time() - start
    summary = PredictSummary(output=cfg.output, images=n_images, already_done=n_images - written.results - written.errors,
                             predicted=written.results, errors=written.errors, classes=len(classes), seconds=seconds,
                             images_per_second=(written.results + written.errors) / seconds if seconds else 0.0,
                             map=map_value)
    storage.write_json(storage.join(cfg.output, schema.SUMMARY_FILE), dataclasses.asdict(summary), endpoint)
    return summary
