"""The training job (driver): fail-fast set-up, then a Ray Train ``TorchTrainer`` over :mod:`cdul_ray.train.worker`.

``run_training`` checks everything it can before any Ray work (config, backbone and weights, the labeling run, the
dataset splits and their image ids, the output directory), writes the initial label version ``labels/v0000`` and
``run_config.json``, streams the decoded images, zipped with their latent labels (re-read from the newest label
version every epoch, :mod:`cdul_ray.train.label_source`), through Ray Data into the workers and returns a
:class:`TrainSummary` (also ``summary.json``). The output layout is in :mod:`cdul_ray.schema`.

Resume: every epoch ends with ``ray.train.report(metrics, checkpoint=...)``. Ray Train keeps a snapshot of the
reported checkpoints in ``<output>/checkpoints``; a run with the same output (a worker crash retried through
``max_failures``, or the same command submitted again) gets the latest one from ``ray.train.get_checkpoint()`` and
continues at the next epoch with the model, optimizer, history and label version of that checkpoint.
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
import pyarrow.compute as pc
import torch

from cdul_ray import schema, storage
from cdul_ray.batch_inference import OutputExistsError
from cdul_ray.classifier import check_backbone, checkpoint_dirs, create_classifier, decode_resized, normalisation, \
    resolve_backbone_weights
from cdul_ray.config import ConfigError
from cdul_ray.resources import gpu_capacity, plan_train_workers, wait_for_free_cpu
from cdul_ray.train.config import RESUME_MUTABLE, TrainConfig
from cdul_ray.train.labels import GroundTruth, read_history, write_initial_version
from cdul_ray.train.worker import CRASH_ENV, WorkerInputs, train_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSummary:
    """What a training run did. Metrics are those of the last epoch (NaN when not measured)."""

    output: str
    images: int
    skipped: int
    eval_images: int
    classes: int
    epochs: int
    resumed_from_epoch: int
    label_version: int
    train_loss: float
    eval_map: float
    label_map: float
    initial_label_map: float
    backbone: str
    backbone_weights: str
    seconds: float

    def render(self) -> str:
        def fmt(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{v:.2f}"

        resumed = f" (resumed after epoch {self.resumed_from_epoch})" if self.resumed_from_epoch else ""
        return "\n".join([
            "CDUL training finished",
            f"  training images  {self.images}" + (f"  ({self.skipped} without a pseudo label, see errors/)"
                                                   if self.skipped else ""),
            f"  eval images      {self.eval_images}",
            f"  classes          {self.classes}",
            f"  backbone         {self.backbone}: {self.backbone_weights}",
            f"  epochs           {self.epochs}{resumed}",
            f"  train loss       {fmt(self.train_loss)}",
            f"  eval mAP         {fmt(self.eval_map)}",
            f"  label mAP        {fmt(self.initial_label_map)} (initial) -> {fmt(self.label_map)} "
            f"(version {self.label_version})",
            f"  wall time        {self.seconds:.1f} s",
            f"  history          {storage.join(self.output, schema.HISTORY_FILE)}",
            f"  classifier       {storage.join(self.output, schema.MODEL_DIR)}",
        ])


@dataclass
class TrainingSet:
    """The training images of a run: index rows joined with the labeling run's soft labels."""

    records: pa.Table  # image_id, uri, row (rows 0..N-1 in a seeded order)
    image_ids: list[str]
    initial: np.ndarray  # (N, C) float32
    targets: np.ndarray | None  # (N, C) uint8
    truth: GroundTruth | None  # the same ground truth as sparse label sets (what rank 0 measures the labels with)
    skipped: pa.Table  # ERRORS_SCHEMA rows of index images without a pseudo label
    gt: dict[str, list[int]]


def read_labeling_run(labels: str, endpoint: str | None) -> tuple[list[str], pa.Table, pa.Table, dict[str, Any]]:
    """(classes, labels table [image_id, soft_label], errors table, run_config) of a labeling run.

    Raises:
        FileNotFoundError: ``labels`` is not a labeling run's output. ValueError: it labeled no image.
    """
    classes_uri = storage.join(labels, schema.CLASSES_FILE)
    labels_uri = storage.join(labels, schema.LABELS_DIR)
    for uri in (classes_uri, labels_uri):
        if not storage.exists(uri, endpoint):
            raise FileNotFoundError(f"config field `labels`: {uri} does not exist; `labels` must be the output "
                                    "directory of a labeling run (cdul label)")
    classes = list(storage.read_json(classes_uri, endpoint)["classes"])
    table = storage.read_parquet_dir(labels_uri, endpoint, columns=["image_id", schema.SOFT_LABEL])
    if table.num_rows == 0:
        raise ValueError(f"config field `labels`: {labels_uri} holds no labeled image")
    errors = schema.ERRORS_SCHEMA.empty_table()
    errors_uri = storage.join(labels, schema.ERRORS_DIR)
    if storage.exists(errors_uri, endpoint):
        errors = storage.read_parquet_dir(errors_uri, endpoint)
    run_config_uri = storage.join(labels, schema.RUN_CONFIG_FILE)
    run_config = storage.read_json(run_config_uri, endpoint) if storage.exists(run_config_uri, endpoint) else {}
    return classes, table, errors, run_config


def load_index(cfg: TrainConfig, split: str | None, classes: list[str], endpoint: str | None, field: str):
    """A dataset split indexed with the labeling run's class list as vocabulary (ground truth remapped by name).

    Raises:
        ConfigError (naming ``field``), FileNotFoundError.
    """
    from cdul_ray.datasets import load_dataset

    try:
        return load_dataset(cfg.dataset, cfg.format, split, classes, endpoint, cfg.limit)
    except ValueError as e:
        raise ConfigError(field, str(e)) from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config field `{field}`: {e}") from e


def join_labels(index, classes: list[str], table: pa.Table, errors: pa.Table, cfg: TrainConfig) -> TrainingSet:
    """Training images = index images with a pseudo label; the rest are recorded as skipped.

    The initial latent labels Y0 are the pseudo labels, or the images' multi-hot ground truth with
    ``supervision="ground_truth"`` (same images, so the two runs differ only in their targets).

    Raises:
        ConfigError: no image matches, the labels come from another split, fewer images than workers, or ground-truth
        supervision on a split without ground truth.
    """
    from cdul_ray.core.metrics import multi_hot

    c = len(classes)
    label_ids = table["image_id"].to_pylist()
    values = pc.list_flatten(table[schema.SOFT_LABEL]).to_numpy(zero_copy_only=False).reshape(-1, c)
    by_id = {image_id: i for i, image_id in enumerate(label_ids)}
    ids = index.records["image_id"].to_pylist()
    uris = index.records["uri"].to_pylist()
    gts = index.records["gt_labels"].to_pylist()
    keep = [i for i, image_id in enumerate(ids) if image_id in by_id]
    if not keep:
        raise ConfigError("split", f"none of the {len(label_ids)} images of the labeling run {cfg.labels} is in "
                                   f"{cfg.dataset} (split {cfg.split!r}); image ids must match")
    extra = len(set(label_ids) - set(ids))
    if extra and cfg.limit is None:
        raise ConfigError("split", f"{extra} images of the labeling run {cfg.labels} are not in {cfg.dataset} "
                                   f"(split {cfg.split!r}): the labels were made from another dataset or split")
    if len(keep) < cfg.workers:
        raise ConfigError("workers", f"{len(keep)} training images cannot feed {cfg.workers} workers")
    # Images the labeling run could not label: reuse its reasons.
    reasons = {r["image_id"]: r for r in errors.to_pylist()}
    missing = [i for i, image_id in enumerate(ids) if image_id not in by_id]
    skipped_rows = []
    for i in missing:
        r = reasons.get(ids[i])
        skipped_rows.append((ids[i], uris[i], r["stage"] if r else schema.NO_LABEL_STAGE,
                             r["reason"] if r else f"no pseudo label in the labeling run {cfg.labels}"))
    order = np.random.default_rng(cfg.seed).permutation(len(keep))
    keep = [keep[i] for i in order]
    image_ids = [ids[i] for i in keep]
    records = pa.table({"image_id": pa.array(image_ids, pa.string()),
                        "uri": pa.array([uris[i] for i in keep], pa.string()),
                        "row": pa.array(np.arange(len(keep), dtype=np.int64))})
    initial = values[[by_id[i] for i in image_ids]].astype(np.float32)
    targets = multi_hot([gts[i] for i in keep], c) if index.has_ground_truth else None
    truth = GroundTruth.from_lists([gts[i] for i in keep], c) if index.has_ground_truth else None
    if cfg.supervision == "ground_truth":  # the fully supervised ceiling: the same images, their annotations
        if targets is None:
            raise ConfigError("supervision", f"split {cfg.split!r} of {cfg.dataset} has no ground truth to train on")
        initial = targets.astype(np.float32)
    return TrainingSet(records=records, image_ids=image_ids, initial=initial, targets=targets, truth=truth,
                       skipped=schema.errors_table(skipped_rows), gt={ids[i]: gts[i] for i in keep})


def prepare_output(cfg: TrainConfig, endpoint: str | None) -> bool:
    """Fresh run (False) or resume of a compatible run in ``output`` (True).

    Raises:
        ConfigError: ``output`` holds a training run with a different value of a field that cannot change on resume.
        OutputExistsError: ``output`` holds something else (and ``overwrite`` is off).
    """
    from pyarrow.fs import FileSelector, FileType

    fs, path = storage.filesystem(cfg.output, endpoint)
    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        return False
    if info.type != FileType.Directory:
        raise OutputExistsError(f"{cfg.output} exists and is not a directory")
    if not fs.get_file_info(FileSelector(path, allow_not_found=True)):
        return False
    run_config_uri = storage.join(cfg.output, schema.RUN_CONFIG_FILE)
    previous = storage.read_json(run_config_uri, endpoint) if storage.exists(run_config_uri, endpoint) else None
    if cfg.overwrite:
        if not previous:  # --overwrite replaces a cdul run, never an arbitrary directory (`--output ~ --overwrite`)
            raise OutputExistsError(f"{cfg.output} is not empty and holds no cdul run "
                                    f"({schema.RUN_CONFIG_FILE}); refusing to delete it even with --overwrite")
        fs.delete_dir_contents(path)
        return False
    if not previous:
        raise OutputExistsError(f"{cfg.output} is not empty and holds no cdul run; choose "
                                "another output")
    if "label_lr" not in previous:
        raise OutputExistsError(f"{cfg.output} holds a cdul run that is not a training run; "
                                "pass --overwrite to replace it or choose another output")
    current = cfg.to_dict()
    for name, value in current.items():
        if name not in RESUME_MUTABLE and previous.get(name) != value:
            raise ConfigError(name, f"{cfg.output} holds a training run with {name}={previous.get(name)!r}, not "
                                    f"{value!r}; resuming it needs the same value (or pass --overwrite, or another "
                                    "--output)")
    return True


def latest_checkpoint(output: str, endpoint: str | None) -> tuple[int, str | None]:
    """(epoch, directory) of the newest complete checkpoint in ``output``, or (0, None)."""
    root = storage.join(output, schema.CHECKPOINTS_DIR)
    if not storage.exists(root, endpoint):
        return 0, None
    for d in reversed(checkpoint_dirs(root, endpoint)):
        files = (schema.TRAIN_STATE, schema.MODEL_WEIGHTS, schema.MODEL_META)
        if all(storage.exists(storage.join(d, f), endpoint) for f in files):
            return int(storage.read_json(storage.join(d, schema.TRAIN_STATE), endpoint)["epoch"]), d
    return 0, None


def image_dataset(records: pa.Table, cfg: TrainConfig, endpoint: str | None, cache: bool, labels: Any = None):
    """Index rows -> Ray Dataset of decoded, resized images (materialised once when ``cache``), zipped with
    ``labels`` (a :func:`~cdul_ray.train.label_source.latent_label_dataset`) when given.

    Ray 2.60's zip holds both of its inputs in the object store before its first output. Decoded every epoch, the
    index rows are zipped with the labels *before* decoding, so no decoded image waits in the zip; cached, the
    materialised images are zipped with the labels each epoch.
    """
    import ray.data

    step = max(cfg.decode_batch_size, -(-records.num_rows // 2000))  # at most 2000 input blocks
    ds = ray.data.from_arrow([records.slice(i, step) for i in range(0, records.num_rows, step)])
    ds.context.execution_options.preserve_order = True  # the cached blocks keep the (seeded) row order
    if labels is not None and not cache:
        ds = _zip(ds, labels).repartition(target_num_rows_per_block=cfg.decode_batch_size)
    ds = ds.map_batches(decode_resized, fn_kwargs={"image_size": cfg.image_size, "endpoint_override": endpoint},
                        batch_size=cfg.decode_batch_size, num_cpus=1)
    if cache:
        wait_for_free_cpu()
        ds = ds.materialize()  # progress shown on the driver (bars on a TTY, periodic lines otherwise)
        if labels is not None:
            ds = _zip(ds, labels)
    # Consumed inside Ray Train (split coordinator, workers): their tqdm bars would be forwarded to the driver's
    # console as hundreds of redraws; the epoch lines of the training loop report progress instead.
    ds.context.enable_progress_bars = False
    return ds


def _zip(left, right):
    """``left.zip(right)`` without Ray 2.60's deprecation warning, which a user cannot act on (docs/architecture.md,
    "Training data flow", says why zip and what replaces it before Ray 2.64)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*`Dataset.zip` is deprecated")
        return left.zip(right)


def cache_decoded(cfg: TrainConfig, n_images: int) -> bool:
    if cfg.cache_decoded != "auto":
        return cfg.cache_decoded == "true"
    import ray

    decoded = n_images * 3 * cfg.image_size ** 2
    budget = ray.cluster_resources().get("object_store_memory", 0) / 4
    logger.info("decoded images: %.2f GiB, %s in the object store", decoded / 2 ** 30,
                "cached" if decoded <= budget else "decoded every epoch, not cached")
    return decoded <= budget



@dataclass
class TrainingPlan:
    """What the fail-fast set-up of ``run_training`` found, before any Ray work."""

    cfg: TrainConfig  # effective, with absolute URIs, the endpoint, and split/format from the labeling run
    endpoint: str | None
    classes: list[str]
    data: TrainingSet
    eval_index: Any  # DatasetIndex of eval_split, or None
    weights: str | None  # backbone weights source (see resolve_backbone_weights)
    weights_note: str
    resume: bool
    resumed_from: int  # epoch of the latest complete checkpoint (0: none)
    last_checkpoint: str | None


def plan_training(cfg: TrainConfig) -> TrainingPlan:
    """Validate everything that can fail fast: config, backbone and weights, labeling run, dataset splits, output.

    Raises:
        ConfigError, FileNotFoundError, OutputExistsError, BackboneWeightsError.
    """
    cfg = cfg.validate().effective()
    endpoint = cfg.s3_endpoint or storage.s3_endpoint_from_env()
    # Ray Train workers run in their own working directory: local paths must be absolute.
    cfg = dataclasses.replace(cfg, **{k: storage.absolute_uri(getattr(cfg, k)) for k in ("labels", "dataset",
                                                                                         "output")})
    check_backbone(cfg.backbone)
    classes, label_rows, label_errors, label_run = read_labeling_run(cfg.labels, endpoint)
    cfg = dataclasses.replace(cfg, s3_endpoint=endpoint, split=cfg.split or label_run.get("split"))
    if cfg.format == "auto" and label_run.get("format") not in (None, "auto"):
        cfg = dataclasses.replace(cfg, format=label_run["format"])
    train_index = load_index(cfg, cfg.split, classes, endpoint, "split")
    data = join_labels(train_index, classes, label_rows, label_errors, cfg)
    eval_index = load_index(cfg, cfg.eval_split, classes, endpoint, "eval_split") if cfg.eval_split else None
    if eval_index is not None and not eval_index.has_ground_truth:
        raise ConfigError("eval_split", f"split {cfg.eval_split!r} of {cfg.dataset} has no ground truth to measure")
    weights, weights_note = resolve_backbone_weights(cfg.backbone, cfg.pretrained_backbone, endpoint, cfg.cache_dir)
    resume = prepare_output(cfg, endpoint)
    resumed_from, last_checkpoint = latest_checkpoint(cfg.output, endpoint) if resume else (0, None)
    logger.info("%d training images (%d skipped), %s eval images, %d classes; %s run",
                len(data.image_ids), data.skipped.num_rows, len(eval_index) if eval_index else 0, len(classes),
                f"resuming after epoch {resumed_from}" if resume else "fresh")
    return TrainingPlan(cfg=cfg, endpoint=endpoint, classes=classes, data=data, eval_index=eval_index,
                        weights=weights, weights_note=weights_note, resume=resume, resumed_from=resumed_from,
                        last_checkpoint=last_checkpoint)


def write_initial_state(plan: TrainingPlan) -> None:
    """A fresh run: classes.json, labels/v0000 (Y0, with its ``row`` index and ``_complete.json``) and
    errors/labeling.parquet; then run_config.json, written last: its presence marks a complete set-up that a
    resubmission can resume."""
    cfg, endpoint, data = plan.cfg, plan.endpoint, plan.data
    if not plan.resume:
        storage.write_json(storage.join(cfg.output, schema.CLASSES_FILE), {"classes": plan.classes}, endpoint)
        write_initial_version(cfg.output, data.image_ids, data.initial, endpoint)
        storage.write_table(storage.join(cfg.output, schema.ERRORS_DIR, schema.LABELING_ERRORS_FILE), data.skipped,
                            endpoint)
    storage.write_json(storage.join(cfg.output, schema.RUN_CONFIG_FILE), cfg.to_dict(), endpoint)


def export_finished_model(plan: TrainingPlan) -> None:
    """A run resumed with nothing left to train: make sure ``model/`` exists (a crash between the last report and
    the export leaves only the checkpoint)."""
    cfg, endpoint = plan.cfg, plan.endpoint
    logger.info("%s already holds %d trained epochs (epochs=%d): nothing to train", cfg.output, plan.resumed_from,
                cfg.epochs)
    model_dir = storage.join(cfg.output, schema.MODEL_DIR)
    if not storage.exists(storage.join(model_dir, schema.MODEL_META), endpoint):
        for name in (schema.MODEL_WEIGHTS, schema.MODEL_META):
            storage.write_bytes(storage.join(model_dir, name),
                                storage.read_bytes(storage.join(plan.last_checkpoint, name), endpoint), endpoint)


def worker_inputs(plan: TrainingPlan, model_state: dict[str, torch.Tensor], meta: dict[str, Any]):
    """(WorkerInputs, Ray Datasets) of the TorchTrainer: the decoded train (and eval) images and the shared arrays."""
    import ray

    from cdul_ray.core.metrics import multi_hot
    from cdul_ray.train.label_source import latent_label_dataset

    cfg, endpoint, data, eval_index = plan.cfg, plan.endpoint, plan.data, plan.eval_index
    cam_source = eval_index.records if eval_index is not None else data.records
    cam = [{"image_id": r["image_id"], "uri": r["uri"], "gt": r.get("gt_labels", data.gt.get(r["image_id"]))}
           for r in cam_source.slice(0, cfg.cam_images).to_pylist()]
    n_eval = len(eval_index) if eval_index is not None else 0
    cache = cache_decoded(cfg, len(data.image_ids) + n_eval)
    # Each batch carries its images' latent labels, re-read from the newest complete version every epoch.
    labels = latent_label_dataset(cfg.output, data.records.num_rows, len(plan.classes), endpoint)
    datasets = {"train": image_dataset(data.records, cfg, endpoint, cache, labels)}
    eval_targets = None
    if eval_index is not None:
        eval_records = pa.table({"image_id": eval_index.records["image_id"], "uri": eval_index.records["uri"],
                                 "row": pa.array(np.arange(len(eval_index), dtype=np.int64))})
        datasets["eval"] = image_dataset(eval_records, cfg, endpoint, cache)
        eval_targets = multi_hot(eval_index.records["gt_labels"].to_pylist(), len(plan.classes))
    crash = os.environ.get(CRASH_ENV)
    inputs = WorkerInputs(
        cfg=cfg, classes=plan.classes, meta=meta, num_rows=data.records.num_rows, train_truth=ray.put(data.truth),
        eval_targets=ray.put(eval_targets),
        init_state=ray.put({k: v.detach().clone() for k, v in model_state.items()}), has_eval=eval_index is not None,
        cam=cam, crash_after_epoch=int(crash) if crash else None,
    )
    return inputs, datasets


def fit(plan: TrainingPlan, inputs: WorkerInputs, datasets: dict[str, Any]) -> None:
    """Run the TorchTrainer: ``workers`` DDP processes, checkpoints under ``<output>/checkpoints``."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    cfg = plan.cfg
    fs, path = storage.filesystem(cfg.output, plan.endpoint)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=inputs.loop_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu == "true",
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=schema.CHECKPOINTS_DIR, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        # Eval is not split (rank 0 measures the whole split); ordered execution keeps runs reproducible.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    trainer.fit()


def run_training(cfg: TrainConfig) -> TrainSummary:
    """Train a classifier with gradient alignment (method.md §6) on a Ray cluster; resume a run in ``output``.

    Everything that can fail fast does so before any Ray work (``plan_training``).

    Raises:
        ConfigError, FileNotFoundError, OutputExistsError, BackboneWeightsError; ``ray.train.TrainingFailedError``
        when training fails more than ``max_failures`` times.
    """
    import ray

    start = time.time()
    plan = plan_training(cfg)
    cfg, endpoint = plan.cfg, plan.endpoint
    torch.manual_seed(cfg.seed)
    model = create_classifier(cfg.backbone, len(plan.classes), plan.weights, cfg.freeze_backbone, endpoint,
                              cfg.cache_dir)
    mean, std = normalisation(model)
    meta = {"backbone": cfg.backbone, "classes": plan.classes, "image_size": cfg.image_size, "loss": cfg.loss,
            "mean": mean, "std": std, "backbone_weights": plan.weights_note}
    write_initial_state(plan)
    if plan.last_checkpoint is not None and plan.resumed_from >= cfg.epochs:
        export_finished_model(plan)
        return write_summary(plan, start)

    if not ray.is_initialized():
        ray.init()
    if cfg.use_gpu != "false":  # resolved once here, GPUs the autoscaler can add included: workers see true/false
        gpu, reason = plan_train_workers(cfg.use_gpu, cfg.workers, gpu_capacity())
        logger.info("%s", reason)
        plan.cfg = cfg = dataclasses.replace(cfg, use_gpu="true" if gpu else "false")
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not storage.is_s3(cfg.output):
        logger.warning("%d-node cluster but output %s is a local path: every worker writes label versions and rank 0 "
                       "checkpoints there, so it must be shared storage (NFS) on all nodes; prefer s3://", nodes,
                       cfg.output)
    inputs, datasets = worker_inputs(plan, model.state_dict(), meta)
    fit(plan, inputs, datasets)
    return write_summary(plan, start)


def write_summary(plan: TrainingPlan, start: float) -> TrainSummary:
    """The summary of a run from its history.csv; also written as summary.json."""
    cfg, data, eval_index = plan.cfg, plan.data, plan.eval_index
    history = read_history(cfg.output, plan.endpoint)
    last = history[-1]
    summary = TrainSummary(
        output=cfg.output, images=len(data.image_ids), skipped=data.skipped.num_rows,
        eval_images=len(eval_index) if eval_index is not None else 0, classes=data.initial.shape[1],
        epochs=int(last["epoch"]), resumed_from_epoch=plan.resumed_from, label_version=int(last["label_version"]),
        train_loss=last["train_loss"], eval_map=last["eval_map"], label_map=last["label_map"],
        initial_label_map=history[0]["label_map"], backbone=cfg.backbone, backbone_weights=plan.weights_note,
        seconds=time.time() - start,
    )
    storage.write_json(storage.join(cfg.output, schema.SUMMARY_FILE),
                       {k: (None if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in dataclasses.asdict(summary).items()}, plan.endpoint)
    return summary
