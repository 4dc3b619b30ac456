"""The one place that knows cdul-ray's on-disk layout and Parquet schemas.

Output directory of a labeling run (local path or ``s3://`` URI)::

    <output>/
      labels/*.parquet      LABELS_SCHEMA, one row per readable image
      errors/*.parquet      ERRORS_SCHEMA, one row per image that could not be labeled
      classes.json          {"classes": [...], "templates": [...]}  (column order of every per-class vector)
      run_config.json       the full LabelConfig of the run
      evaluation.json/.md   pseudo-label mAP table (only when ground truth exists)
      summary.json          images, already done, labeled now, errors, wall time, images/s
      _index/, _checkpoint/ the latest run's corpus index and Ray Data's checkpoint (resume and incremental runs)

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

ERROR_STAGES = ("read", "decode", "clip")


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
            pa.field("width", pa.int32(), nullable=False),  # pixels, of the decoded image
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

# Latent label versions written by gradient-alignment training (method.md §6): <train output>/labels/v{round:04d}/
LATENT_LABELS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
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
