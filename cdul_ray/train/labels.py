"""Latent labels Y of a training run (method.md §6) and its per-epoch history, on storage.

Layout (``cdul_ray.schema``): ``<output>/labels/v{e:04d}/*.parquet`` with ``LATENT_LABELS_SCHEMA`` (version 0 = the
labeling run's soft labels; version e = the labels after epoch e, exactly one row per training image), and
``<output>/history.csv`` with ``HISTORY_COLUMNS``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdul_ray import schema, storage


def version_uri(output: str, version: int) -> str:
    """``<output>/labels/v{version:04d}``."""
    return storage.join(output, schema.label_version_dir(version))


def label_table(image_ids: list[str], labels: np.ndarray, version: int) -> pa.Table:
    """Rows of one label version. labels: [n, C] float32 in [0, 1]."""
    n, c = labels.shape
    flat = pa.array(np.ascontiguousarray(labels, dtype=np.float32).reshape(-1))
    vectors = pa.FixedSizeListArray.from_arrays(flat, c).cast(pa.list_(pa.float32()))
    return pa.table({"image_id": pa.array(image_ids, pa.string()),
                     "version": pa.array(np.full(n, version, dtype=np.int32)),
                     "latent_label": vectors}, schema=schema.LATENT_LABELS_SCHEMA)



def versions_after(output: str, version: int, endpoint_override: str | None = None) -> list[int]:
    """Label versions > ``version`` present in ``<output>/labels``."""
    names = storage.list_dirs(storage.join(output, schema.LABELS_DIR), endpoint_override)
    return sorted(int(n[1:]) for n in names if re.fullmatch(r"v\d{4,}", n) and int(n[1:]) > version)


def read_label_version(output: str, version: int, endpoint_override: str | None = None) -> pa.Table:
    """All rows of ``labels/v{version:04d}`` (image_id, version, latent_label)."""
    return storage.read_parquet_dir(version_uri(output, version), endpoint_override)


def label_matrix(table: pa.Table, image_ids: list[str], num_classes: int) -> np.ndarray:
    """Label rows in the order of ``image_ids``.

    Returns:
        [N, C] float32.

    Raises:
        RuntimeError: a training image is missing or appears twice, or a row has the wrong length.
    """
    ids = table["image_id"].to_pylist()
    if len(ids) != len(image_ids) or len(set(ids)) != len(ids) or set(ids) != set(image_ids):
        raise RuntimeError(f"label version has {len(ids)} rows ({len(set(ids))} distinct ids) for "
                           f"{len(image_ids)} training images: some are missing or duplicated")
    flat = pc.list_flatten(table["latent_label"]).to_numpy(zero_copy_only=False)
    if flat.size != len(ids) * num_classes:
        raise RuntimeError(f"label vectors do not all have {num_classes} values")
    values = flat.reshape(len(ids), num_classes).astype(np.float32)
    position = {image_id: i for i, image_id in enumerate(ids)}
    return values[[position[i] for i in image_ids]]


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
