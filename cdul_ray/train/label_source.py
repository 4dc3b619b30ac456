"""The latent labels of a training run as a Ray Data source whose every execution reads the newest label version.

The training dataset is ``images.zip(latent_label_dataset(...))`` (:func:`cdul_ray.train.job.train_dataset`): every
batch a worker receives carries its images' current labels, so no worker holds the labels of the whole corpus.

Why each epoch sees the version of the epoch before (checked against Ray 2.60's source):

- Ray Train's ``SplitCoordinator`` (``ray/data/_internal/iterator/stream_split_iterator.py``) re-executes the
  dataset's plan at the start of every epoch, once all workers asked for it (``start_epoch`` is a barrier of the
  workers; ``_try_start_new_epoch`` builds a new executor from the logical plan).
- The physical plan of a Read builds its input lazily: ``plan_read_op`` gives the ``InputDataBuffer`` an
  ``input_data_factory`` that calls :meth:`LatentLabelSource.get_read_tasks` when the executor starts. The calls at
  dataset creation and in the optimiser (``read_api.read_datasource``, ``SetReadParallelismRule``) only size the read.
- So :meth:`~LatentLabelSource.get_read_tasks` runs after every worker finished the previous epoch, and rank 0
  marks a version complete (``_complete.json``) before it asks for the next epoch: the newest complete version at
  that moment is the previous epoch's. Workers check it on every batch (``label_version``, ``label_row``).

Zip in Ray 2.60 is a bulk operator (``ZipOperator``: it holds both inputs in the object store before its first
output), so an epoch's labels (N × C float32) pass through the object store, not through any worker's heap.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from cdul_ray import schema
from cdul_ray.train.labels import LABEL_READ_BYTES, label_values, newest_complete_version, read_version_range, \
    rows_per

# Column names of the label side of the zip (the image side has image_id, uri, row, pixels, error_*).
LABEL_ROW, LABEL_VERSION, LABEL_IMAGE_ID, LATENT_LABEL = "label_row", "label_version", "label_image_id", "latent_label"


def _read_range(output: str, version: int, lo: int, hi: int, num_classes: int, endpoint: str | None) -> list[Any]:
    """Read task: rows [lo, hi) of a version, sorted by row, as one block (``latent_label`` a [n, C] tensor)."""
    table = read_version_range(output, version, lo, hi, ["image_id", "row", "version", "latent_label"], endpoint)
    return [BlockAccessor.batch_to_block({
        LABEL_ROW: table["row"].to_numpy(),  # (n,) int64
        LABEL_VERSION: table["version"].to_numpy(),  # (n,) int32
        LABEL_IMAGE_ID: np.asarray(table["image_id"].to_pylist(), dtype=object),  # (n,)
        LATENT_LABEL: label_values(table, num_classes),  # (n, C) float32
    })]


class LatentLabelSource(Datasource):
    """Rows 0..N-1 of the newest complete label version, one read task per row range, in row order."""

    def __init__(self, output: str, num_rows: int, num_classes: int, endpoint_override: str | None = None,
                 rows_per_task: int | None = None):
        super().__init__()
        self.output, self.num_rows, self.num_classes = output, num_rows, num_classes
        self.endpoint_override = endpoint_override
        self.rows_per_task = rows_per_task or rows_per(LABEL_READ_BYTES, num_classes, minimum=1024)
        self.row_bytes = 4 * num_classes + 32

    def get_name(self) -> str:
        return "LatentLabels"

    def estimate_inmemory_data_size(self) -> int:
        return self.num_rows * self.row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """Read tasks over the version that is the newest complete one *now* (Ray calls this when an execution
        starts).

        Raises:
            RuntimeError: no complete version, or one with another number of rows.
        """
        found = newest_complete_version(self.output, self.endpoint_override)
        if found is None:
            raise RuntimeError(f"no complete label version ({schema.LABEL_VERSION_COMPLETE_FILE}) under "
                               f"{self.output}/labels: a training run of an older cdul-ray cannot be resumed, pass "
                               "--overwrite or another --output")
        version, rows = found
        if rows != self.num_rows:
            raise RuntimeError(f"label version {version} has {rows} rows, the training set {self.num_rows}")
        tasks = []
        for lo in range(0, self.num_rows, self.rows_per_task):
            hi = min(self.num_rows, lo + self.rows_per_task)
            read = functools.partial(_read_range, self.output, version, lo, hi, self.num_classes,
                                     self.endpoint_override)
            meta = BlockMetadata(num_rows=hi - lo, size_bytes=(hi - lo) * self.row_bytes, input_files=None,
                                 exec_stats=None)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def latent_label_dataset(output: str, num_rows: int, num_classes: int, endpoint_override: str | None = None,
                         rows_per_task: int | None = None):
    """A Ray Dataset of the latent labels (columns :data:`LABEL_ROW`, :data:`LABEL_VERSION`, :data:`LABEL_IMAGE_ID`,
    :data:`LATENT_LABEL` [C]) whose every execution reads the newest complete version under ``output``."""
    import ray.data

    source = LatentLabelSource(output, num_rows, num_classes, endpoint_override, rows_per_task)
    return ray.data.read_datasource(source)
