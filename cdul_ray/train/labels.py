"""Latent labels Y of a training run (method.md §6) and its per-epoch history, on storage.

Layout (``cdul_ray.schema``): ``<output>/labels/v{e:04d}/*.parquet`` with ``LATENT_LABELS_SCHEMA`` (version 0 = the
labeling run's soft labels; version e = the labels after epoch e, exactly one row per training image, keyed by
``row``, the image's index in the training order) and ``_complete.json``, written last; ``<output>/history.csv`` with
``HISTORY_COLUMNS``.

No function here holds all N × C labels at once except :func:`label_matrix` (tests and inspection): the workers write
their rows a row group at a time (:class:`VersionPartWriter`), readers take row ranges (:func:`read_version_range`),
and rank 0's checks read the ``row`` column (:func:`complete_version`) or one block of classes at a time
(:func:`version_label_map`).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdul_ray import schema, storage

LABEL_ROW_GROUP_BYTES = 1 << 20  # label bytes per Parquet row group: what a range read reads beyond its range
LABEL_READ_BYTES = 16 << 20  # label bytes per streamed batch or range read


def version_uri(output: str, version: int) -> str:
    """``<output>/labels/v{version:04d}``."""
    return storage.join(output, schema.label_version_dir(version))


def rows_per(budget_bytes: int, num_classes: int, minimum: int = 256) -> int:
    """Label rows that fit ``budget_bytes`` (4 bytes a class plus ~32 bytes of id, row and version)."""
    return max(minimum, budget_bytes // (4 * num_classes + 32))


def label_table(image_ids: list[str], rows: np.ndarray, labels: np.ndarray, version: int) -> pa.Table:
    """Rows of one label version. rows: [n] int64 row indices; labels: [n, C] float32 in [0, 1]."""
    n, c = labels.shape
    flat = pa.array(np.ascontiguousarray(labels, dtype=np.float32).reshape(-1))
    vectors = pa.FixedSizeListArray.from_arrays(flat, c).cast(pa.list_(pa.float32()))
    return pa.table({"image_id": pa.array(image_ids, pa.string()), "row": pa.array(rows, pa.int64()),
                     "version": pa.array(np.full(n, version, dtype=np.int32)),
                     "latent_label": vectors}, schema=schema.LATENT_LABELS_SCHEMA)


def label_values(table: pa.Table | pa.RecordBatch, num_classes: int) -> np.ndarray:
    """The ``latent_label`` column as [n, C] float32.

    Raises:
        RuntimeError: a vector does not have ``num_classes`` values.
    """
    column = table.column("latent_label")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    if flat.size != len(column) * num_classes or pc.any(pc.not_equal(pc.list_value_length(column),
                                                                      num_classes)).as_py():
        raise RuntimeError(f"label vectors do not all have {num_classes} values")
    return flat.reshape(len(column), num_classes).astype(np.float32, copy=False)


def mark_complete(output: str, version: int, rows: int, endpoint_override: str | None = None) -> None:
    """Write ``_complete.json`` into a version: from now on readers may take it."""
    storage.write_json(storage.join(version_uri(output, version), schema.LABEL_VERSION_COMPLETE_FILE),
                       {"version": version, "rows": rows}, endpoint_override)


def write_initial_version(output: str, image_ids: list[str], labels: np.ndarray,
                          endpoint_override: str | None = None) -> None:
    """``labels/v0000``: Y0 in row order (labels: [N, C]), then its ``_complete.json``."""
    n, c = labels.shape
    storage.write_table(storage.join(version_uri(output, 0), schema.INITIAL_LABELS_FILE),
                        label_table(image_ids, np.arange(n, dtype=np.int64), labels, 0), endpoint_override,
                        row_group_size=rows_per(LABEL_ROW_GROUP_BYTES, c))
    mark_complete(output, 0, n, endpoint_override)


class VersionPartWriter:
    """One worker's rows of a version, ``part-{rank:05d}.parquet``, written a row group at a time: rows are buffered
    until a row group's worth (:data:`LABEL_ROW_GROUP_BYTES`) and written sorted by ``row``, so that the statistics of
    each row group bound a narrow row range and range reads skip the others."""

    def __init__(self, output: str, version: int, rank: int, num_classes: int, endpoint_override: str | None = None):
        self.version = version
        self.group_rows = rows_per(LABEL_ROW_GROUP_BYTES, num_classes)
        self.rows_written = 0
        self._file = storage.ParquetStreamWriter(storage.join(version_uri(output, version),
                                                              schema.worker_labels_file(rank)),
                                                 schema.LATENT_LABELS_SCHEMA, endpoint_override)
        self._ids: list[str] = []
        self._rows: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._buffered = 0

    def add(self, image_ids: list[str], rows: np.ndarray, labels: np.ndarray) -> None:
        """rows: [B] int64; labels: [B, C] float32."""
        self._ids += image_ids
        self._rows.append(np.asarray(rows, dtype=np.int64))
        self._labels.append(np.asarray(labels, dtype=np.float32))
        self._buffered += len(rows)
        if self._buffered >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        rows, labels = np.concatenate(self._rows), np.concatenate(self._labels)
        order = np.argsort(rows, kind="stable")
        self._file.write(label_table([self._ids[i] for i in order], rows[order], labels[order], self.version))
        self.rows_written += self._buffered
        self._ids, self._rows, self._labels, self._buffered = [], [], [], 0

    def close(self) -> int:
        """Write what is buffered and finish the file; returns the rows written."""
        self._flush()
        self._file.close()
        return self.rows_written


def versions_after(output: str, version: int, endpoint_override: str | None = None) -> list[int]:
    """Label versions > ``version`` present in ``<output>/labels`` (complete or not)."""
    names = storage.list_dirs(storage.join(output, schema.LABELS_DIR), endpoint_override)
    return sorted(int(n[1:]) for n in names if re.fullmatch(r"v\d{4,}", n) and int(n[1:]) > version)


def newest_complete_version(output: str, endpoint_override: str | None = None) -> tuple[int, int] | None:
    """(version, rows) of the newest version with ``_complete.json``, or None."""
    for version in reversed(versions_after(output, -1, endpoint_override)):
        marker = storage.join(version_uri(output, version), schema.LABEL_VERSION_COMPLETE_FILE)
        if storage.exists(marker, endpoint_override):
            return version, int(storage.read_json(marker, endpoint_override)["rows"])
    return None


def read_version_range(output: str, version: int, lo: int, hi: int, columns: list[str] | None = None,
                       endpoint_override: str | None = None) -> pa.Table:
    """The rows ``lo <= row < hi`` of a version, sorted by ``row``.

    Raises:
        RuntimeError: a row of the range is missing or appears more than once.
    """
    table = storage.read_parquet_ranges(version_uri(output, version), "row", [(lo, hi)], columns,
                                        endpoint_override).sort_by("row")
    rows = table["row"].to_numpy()
    if len(rows) != hi - lo or (len(rows) and (rows[0] != lo or rows[-1] != hi - 1 or (np.diff(rows) != 1).any())):
        raise RuntimeError(f"label version {version}: rows [{lo}, {hi}) are not each there exactly once "
                           f"({len(rows)} rows, {len(np.unique(rows))} distinct)")
    return table


def complete_version(output: str, version: int, num_rows: int, endpoint_override: str | None = None) -> int:
    """Rank 0, after every worker wrote its part: check that no row is there twice, carry the rows no worker wrote
    over from version − 1 (``part-carry.parquet``), then mark the version complete. Holds the [N] ``row`` column,
    never the labels of all rows.

    Returns:
        The rows carried over.

    Raises:
        RuntimeError: a row is written twice or lies outside [0, N).
    """
    vuri = version_uri(output, version)
    rows = storage.read_parquet_dir(vuri, endpoint_override, columns=["row"])["row"].to_numpy()  # (n,)
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise RuntimeError(f"label version {version}: rows outside [0, {num_rows})")
    counts = np.bincount(rows, minlength=num_rows)  # (N,)
    if (counts > 1).any():
        raise RuntimeError(f"label version {version}: {int((counts > 1).sum())} images written by several workers")
    missing = np.flatnonzero(counts == 0)
    del rows, counts
    if len(missing):
        carried = storage.read_parquet_ranges(version_uri(output, version - 1), "row",
                                              [(int(r), int(r) + 1) for r in missing], None,
                                              endpoint_override).sort_by("row")
        if carried.num_rows != len(missing):
            raise RuntimeError(f"label version {version - 1} lacks {len(missing) - carried.num_rows} rows to carry")
        carried = carried.set_column(carried.schema.get_field_index("version"),
                                     schema.LATENT_LABELS_SCHEMA.field("version"),
                                     pa.array(np.full(carried.num_rows, version, dtype=np.int32)))
        storage.write_table(storage.join(vuri, schema.CARRY_LABELS_FILE), carried, endpoint_override)
    mark_complete(output, version, num_rows, endpoint_override)
    return len(missing)


def read_label_version(output: str, version: int, endpoint_override: str | None = None) -> pa.Table:
    """All rows of ``labels/v{version:04d}`` (image_id, row, version, latent_label): for tests and inspection."""
    return storage.read_parquet_dir(version_uri(output, version), endpoint_override)


def label_matrix(table: pa.Table, image_ids: list[str], num_classes: int) -> np.ndarray:
    """Label rows in the order of ``image_ids`` (tests and inspection: [N, C] in memory).

    Returns:
        [N, C] float32.

    Raises:
        RuntimeError: a training image is missing or appears twice, or a row has the wrong length.
    """
    ids = table["image_id"].to_pylist()
    if len(ids) != len(image_ids) or len(set(ids)) != len(ids) or set(ids) != set(image_ids):
        raise RuntimeError(f"label version has {len(ids)} rows ({len(set(ids))} distinct ids) for "
                           f"{len(image_ids)} training images: some are missing or duplicated")
    values = label_values(table, num_classes)
    position = {image_id: i for i, image_id in enumerate(ids)}
    return values[[position[i] for i in image_ids]]


@dataclass(frozen=True)
class GroundTruth:
    """Multi-hot ground truth of N rows as sparse label sets (CSR): ``indices[indptr[i]:indptr[i+1]]`` are the
    classes of row i. Shapes: indptr [N + 1] int64, indices [nnz] int32."""

    indptr: np.ndarray
    indices: np.ndarray
    num_classes: int

    @classmethod
    def from_lists(cls, gt_labels: list[list[int]], num_classes: int) -> "GroundTruth":
        lengths = np.array([len(g) for g in gt_labels], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        indices = np.fromiter((c for g in gt_labels for c in g), dtype=np.int32, count=int(indptr[-1]))
        if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
            raise ValueError(f"class index outside [0, {num_classes})")
        return cls(indptr=indptr, indices=indices, num_classes=num_classes)

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    def dense(self, c0: int, c1: int) -> np.ndarray:
        """Classes [c0, c1) as a multi-hot [N, c1 − c0] uint8 matrix."""
        out = np.zeros((self.num_rows, c1 - c0), dtype=np.uint8)
        rows = np.repeat(np.arange(self.num_rows), np.diff(self.indptr))  # (nnz,)
        keep = (self.indices >= c0) & (self.indices < c1)
        out[rows[keep], self.indices[keep] - c0] = 1
        return out


def version_label_map(output: str, version: int, truth: GroundTruth, endpoint_override: str | None = None,
                      budget_bytes: int = 256 << 20) -> float:
    """mAP (%) of a label version against the training ground truth (rank 0), one block of classes at a time so
    that at most ``budget_bytes`` of scores are held: [N, block] instead of [N, C]."""
    from cdul_ray.core.metrics import MAPResult, mean_average_precision

    n, c = truth.num_rows, truth.num_classes
    block = max(1, min(c, budget_bytes // (8 * max(n, 1))))  # float64 inside mean_average_precision
    batch = rows_per(LABEL_READ_BYTES, c)
    ap = []
    for c0 in range(0, c, block):
        c1 = min(c, c0 + block)
        scores = np.zeros((n, c1 - c0), dtype=np.float32)  # (N, block)
        for part in storage.iter_parquet_batches(version_uri(output, version), ["row", "latent_label"], batch,
                                                 endpoint_override):
            scores[part.column("row").to_numpy()] = label_values(part, c)[:, c0:c1]
        ap.append(mean_average_precision(scores, truth.dense(c0, c1)).ap)
    return MAPResult.from_ap(np.concatenate(ap)).map


def _csv_value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def history_csv(history: list[dict[str, Any]]) -> str:
    """The history rows as CSV text (columns ``HISTORY_COLUMNS``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(schema.HISTORY_COLUMNS)
    for row in history:
        writer.writerow([_csv_value(row.get(c, float("nan"))) for c in schema.HISTORY_COLUMNS])
    return buf.getvalue()


def read_history(output: str, endpoint_override: str | None = None) -> list[dict[str, float]]:
    """``<output>/history.csv`` as a list of rows (numbers as float, ``epoch``/``label_version`` as int)."""
    text = storage.read_bytes(storage.join(output, schema.HISTORY_FILE), endpoint_override).decode()
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        parsed: dict[str, float] = {k: float(v) for k, v in row.items()}
        for k in ("epoch", "label_version", "label_updated", "images"):
            parsed[k] = int(parsed[k])
        rows.append(parsed)
    return rows
