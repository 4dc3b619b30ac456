"""The one place that knows cdul-ray's on-disk layout and Parquet schemas (labeling, training, prediction).

Output directory of a labeling run (local path or ``s3://`` URI)::

    <output>/
      labels/*.parquet      LABELS_SCHEMA, one row per readable image
      errors/*.parquet      ERRORS_SCHEMA, one row per image that could not be labeled
      classes.json          {"classes": [...], "templates": [...]}  (column order of every per-class vector)
      run_config.json       the full LabelConfig of the run
      evaluation.json/.md   pseudo-label mAP table (only when ground truth exists)
      summary.json          images, already done, labeled now, errors, wall time, images/s
      _index/, _checkpoint/ the latest run's corpus index and Ray Data's checkpoint (resume and incremental runs)
      report/               report.md, ap_<method>.png, scenes.png (``cdul demo`` / ``write_report`` only)

Output directory of a training run (``cdul train``; written by cdul_ray.train.job and cdul_ray.train.worker)::

    <output>/
      run_config.json          the effective TrainConfig (a resubmission with the same output resumes)
      classes.json             {"classes": [...]}, the labeling run's class order
      labels/v0000/            initial latent labels Y0 = the labeling run's soft_label (LATENT_LABELS_SCHEMA):
                               part-initial.parquet and _complete.json
      labels/v{e:04d}/         latent labels after epoch e, one row per training image (``row`` = its index in the
                               training order): part-{rank:05d}.parquet (the rows a worker received that epoch,
                               sorted by row within each row group), part-carry.parquet (rows no worker received,
                               carried over unchanged) and _complete.json (written last: the version is complete)
      checkpoints/             Ray Train run directory: checkpoint_epoch{e:04d}/ (model.pt, optimizer.pt, model.json,
                               state.json) and Ray's checkpoint_manager_snapshot.json
      history.csv              HISTORY_COLUMNS, one row per epoch (epoch 0 = the initial labels)
      cam/epoch{e:03d}_<id>.png class activation maps of a few fixed images after each epoch
      errors/labeling.parquet  training images without a pseudo label (stage of the labeling run, or ``labels``)
      errors/train-decode.parquet, errors/eval-decode.parquet   images that failed to read/decode in training
      model/                   the final classifier (model.pt + model.json), input of ``cdul predict``
      summary.json             what the run did (cdul_ray.train.job.TrainSummary)

Output directory of a prediction run (``cdul predict``; cdul_ray.predict)::

    <output>/
      predictions/*.parquet    predictions_schema(C), one row per readable image
      errors/*.parquet         ERRORS_SCHEMA (stage read | decode | predict)
      classes.json, run_config.json, summary.json

The demo (``cdul demo``) writes labels-train/, labels-test/, train-fixed/, train-update/ and demo.json under its
output.

Per-class vectors are ``fixed_size_list<float32>[C]`` columns whose order is ``classes.json``.
Scores are CLIP softmax probabilities in [0, 1] (method.md §2-§5).
"""

from __future__ import annotations

import pyarrow as pa

LABELS_DIR = "labels"
ERRORS_DIR = "errors"
CLASSES_FILE = "classes.json"
RUN_CONFIG_FILE = "run_config.json"
EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
SUMMARY_FILE = "summary.json"
INDEX_DIR = "_index"  # the corpus index of the latest run (Parquet), read by the streamed pipeline
CHECKPOINT_DIR = "_checkpoint"  # Ray Data checkpoint: image ids of every committed write task (resume, incremental)
REPORT_DIR = "report"
REPORT_FILE = "report.md"
REPORT_THRESHOLDS_FILE = "thresholds.json"  # in report/: the label-set threshold of every class
DEMO_FILE = "demo.json"
EMPTY_ERRORS_FILE = "empty.parquet"  # an empty ERRORS_SCHEMA table when a run had no error

# Training run (cdul_ray.train)
CHECKPOINTS_DIR = "checkpoints"  # RunConfig(name=...) under <output>
CHECKPOINT_PREFIX = "checkpoint_epoch"  # checkpoint_epoch{e:04d}
HISTORY_FILE = "history.csv"
CAM_DIR = "cam"
MODEL_DIR = "model"
MODEL_WEIGHTS = "model.pt"  # state dict of cdul_ray.classifier.Classifier
MODEL_META = "model.json"  # backbone, classes, image size, loss, normalisation
OPTIMIZER_STATE = "optimizer.pt"
TRAIN_STATE = "state.json"  # epoch, label version, history
INITIAL_LABELS_FILE = "part-initial.parquet"  # in labels/v0000/
CARRY_LABELS_FILE = "part-carry.parquet"  # in labels/v{e:04d}/
# In labels/v{e:04d}/, written last (after the exactness check): {"version": e, "rows": N}. Readers take the newest
# version that has it; the leading underscore keeps Parquet dataset discovery from reading it as data.
LABEL_VERSION_COMPLETE_FILE = "_complete.json"
LABELING_ERRORS_FILE = "labeling.parquet"  # in errors/
TRAIN_DECODE_ERRORS_FILE = "train-decode.parquet"  # in errors/
EVAL_DECODE_ERRORS_FILE = "eval-decode.parquet"  # in errors/

# Prediction run (cdul_ray.predict)
PREDICTIONS_DIR = "predictions"


def label_version_dir(version: int) -> str:
    """``labels/v{version:04d}``: a latent label version of a training run, relative to its output."""
    return f"{LABELS_DIR}/v{version:04d}"


def worker_labels_file(rank: int) -> str:
    """The latent label rows one training worker writes into a version directory."""
    return f"part-{rank:05d}.parquet"


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


HISTORY_COLUMNS = (
    "epoch",  # 0 = the initial labels, before training
    "label_version",  # the labels/v{...} written at the end of the epoch
    "label_updated",  # 1 if the epoch updated the labels (method.md §6 schedule)
    "train_loss",  # mean network loss over the epoch's training images
    "eval_map",  # classifier mAP (%) on eval_split (NaN without one)
    "label_map",  # mAP (%) of the latent labels against the training ground truth (NaN without one)
    "label_change",  # mean |Y_e - Y_{e-1}| over all training images and classes
    "images",  # training images processed in the epoch (all workers)
    "seconds",  # wall time of the epoch
)

# Index rows produced by every dataset reader (cdul_ray.datasets) and consumed by the pipelines.
INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        # Indices into the class list of the images' ground-truth classes; null when the dataset has no ground truth.
        pa.field("gt_labels", pa.list_(pa.int32()), nullable=True),
    ]
)

# Per-class score columns of the labels table, in the order they are written.
GLOBAL_SCORE = "global_score"  # S_global, softmax over classes of the whole image (§2)
LOCAL_MAX = "local_max"  # alpha, max over snippets (§4)
LOCAL_MIN = "local_min"  # beta, min over snippets (§4)
LOCAL_MEAN = "local_mean"  # mean over snippets (the `avg` aggregator, §4)
SOFT_LABEL = "soft_label"  # Y0 = (S_global + S_agg) / 2 with the run's aggregator and threshold (§5)
SCORE_COLUMNS = (GLOBAL_SCORE, LOCAL_MAX, LOCAL_MIN, LOCAL_MEAN, SOFT_LABEL)

# Where an image failed: read (storage), decode (PIL / too small), clip (non-finite CLIP scores, labeling), labels
# (no pseudo label in the labeling run, training), predict (non-finite classifier output, prediction).
ERROR_STAGES = ("read", "decode", "clip", "labels", "predict")
NO_LABEL_STAGE = "labels"  # training: an index image without a pseudo label in the labeling run
PREDICT_STAGE = "predict"  # prediction: non-finite classifier output


def labels_schema(num_classes: int) -> pa.Schema:
    """Schema of ``<output>/labels``: one row per readable image.

    Args:
        num_classes: C, length of every per-class vector.
    """
    vec = pa.list_(pa.float32(), num_classes)
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),  # pixels, of the decoded image upright (EXIF applied)
            pa.field("height", pa.int32(), nullable=False),
            pa.field("gt_labels", pa.list_(pa.int32()), nullable=True),
        ]
        + [pa.field(name, vec, nullable=False) for name in SCORE_COLUMNS]
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # one of ERROR_STAGES
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def errors_table(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    """``ERRORS_SCHEMA`` rows from (image_id, uri, stage, reason) tuples, deduplicated and sorted."""
    unique = sorted(set(rows))
    return pa.table({"image_id": [r[0] for r in unique], "uri": [r[1] for r in unique],
                     "stage": [r[2] for r in unique], "reason": [r[3] for r in unique]}, schema=ERRORS_SCHEMA)


# Latent label versions written by gradient-alignment training (method.md §6): <train output>/labels/v{round:04d}/
LATENT_LABELS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),  # the image's index in the run's (seeded) training order
        pa.field("version", pa.int32(), nullable=False),
        pa.field("latent_label", pa.list_(pa.float32()), nullable=False),
    ]
)

# Batch prediction output (jobs/predict.py).
def predictions_schema(num_classes: int) -> pa.Schema:
    """Schema of ``<predict output>/predictions``: per-class sigmoid probabilities in [0, 1]."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("probabilities", pa.list_(pa.float32(), num_classes), nullable=False),
        ]
    )
