"""Dataset readers: turn a dataset on local disk or S3 into an index of images and an ordered class list.

Every reader returns a :class:`DatasetIndex`: one row per image (``image_id``, ``uri``, ``gt_labels``, see
:data:`cdul_ray.schema.INDEX_SCHEMA`) in the dataset's own, deterministic order, plus the ordered natural class names
(``"dining table"``, not ``"diningtable"``) that every per-class vector downstream follows.

Supported layouts (``format=``):

- ``coco``: ``<root>/annotations/instances_<split>.json`` with images in ``<root>/<split>/<file_name>``.
- ``voc``: PASCAL VOC 2007/2012, ``<root>/{JPEGImages,Annotations,ImageSets/Main/<split>.txt}``.
- ``nuswide``: NUS-WIDE, ``<root>/{ImageList,TrainTestLabels,Flickr}`` and ``<root>/Concepts81.txt``.
- ``folder``: every image under a directory or S3 prefix (recursive), no ground truth.
- ``manifest``: a Parquet or CSV file listing image URIs, optionally with ids and labels.

All I/O goes through :mod:`cdul_ray.storage`, so ``/data/coco`` and ``s3://bucket/coco`` behave the same. Image files
themselves are never opened or stat'ed here: an image listed by the annotations but missing on storage is recorded by
the labeling pipeline in its errors table.

This module is the public entry (:func:`load_dataset`, the ``READERS`` registry, format detection, the vocabulary
override and the ``folder``/``manifest`` readers); the benchmark readers (``coco``, ``voc``, ``nuswide``) and the read
helpers they share live in :mod:`cdul_ray.readers`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cdul_ray import storage
from cdul_ray.readers import (
    RawIndex,
    coco_annotation_files,
    dataset_error,
    list_children,
    read_coco,
    read_nuswide,
    read_text,
    read_voc,
    require_exists,
)
from cdul_ray.schema import INDEX_SCHEMA

logger = logging.getLogger(__name__)

FORMATS = ("auto", "coco", "voc", "nuswide", "folder", "manifest")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # what cdul_ray.images opens
MANIFEST_SUFFIXES = (".parquet", ".csv")

# CSV manifests: every known column is text (numeric-looking ids must stay strings: "0001" != "1").
_MANIFEST_CSV_OPTIONS = pacsv.ConvertOptions(
    column_types={"uri": pa.string(), "image_id": pa.string(), "labels": pa.string()},
    strings_can_be_null=False,
)


@dataclass(frozen=True)
class DatasetIndex:
    """The images of a dataset and its ordered class list.

    Attributes:
        records: Table with :data:`cdul_ray.schema.INDEX_SCHEMA`: ``image_id`` (string), ``uri`` (absolute local path or
            ``s3://`` URI), ``gt_labels`` (indices into ``classes``; null when the dataset has no ground truth, an
            empty list when it has ground truth and no class is present). Rows keep the dataset's own order.
        classes: Ordered natural class names; the column order of every per-class vector downstream.
        has_ground_truth: Whether ``gt_labels`` is set (non-null) on every row.
        format: The reader that produced the index, one of ``coco``, ``voc``, ``nuswide``, ``folder``, ``manifest``.
        root: The dataset root (a directory or S3 prefix), or for ``manifest`` the manifest file itself.
    """

    records: pa.Table
    classes: tuple[str, ...]
    has_ground_truth: bool
    format: str
    root: str

    def __len__(self) -> int:
        return self.records.num_rows

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def excluding(self, uri: str) -> "DatasetIndex":
        """This index without the images under ``uri`` (a directory or S3 prefix; local paths are made absolute).

        A job's output inside its own folder dataset (``--dataset photos --output photos/run``) holds the report's
        PNGs, which the next run would otherwise list and label as images.
        """
        prefix = storage.absolute_uri(uri).rstrip("/") + "/"
        inside = pc.starts_with(self.records["uri"], prefix)
        if not pc.any(inside).as_py():
            return self
        return dataclasses.replace(self, records=self.records.filter(pc.invert(inside)))


@dataclass(frozen=True)
class _ReadRequest:
    """The arguments of :func:`load_dataset` that a reader may use."""

    uri: str
    split: str | None
    endpoint_override: str | None
    vocabulary: tuple[str, ...] | None
    limit: int | None
    voc_include_difficult: bool


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def load_dataset(
    uri: str,
    format: str = "auto",
    split: str | None = None,
    classes_file: str | Sequence[str] | None = None,
    endpoint_override: str | None = None,
    limit: int | None = None,
    *,
    voc_include_difficult: bool = True,
) -> DatasetIndex:
    """Index a dataset on local disk or S3.

    Args:
        uri: Dataset root (directory or ``s3://bucket/prefix``), or a ``.parquet``/``.csv`` manifest file.
        format: One of :data:`FORMATS`. ``auto`` detects the layout: ``annotations/instances_*.json`` -> ``coco``;
            ``JPEGImages`` + ``Annotations`` (or a ``VOCdevkit`` holding exactly one ``VOC20xx``) -> ``voc``;
            ``ImageList`` + ``Concepts81.txt`` -> ``nuswide``; a URI ending in ``.parquet``/``.csv`` -> ``manifest``;
            anything else -> ``folder``.
        split: Which part of the dataset. ``coco``: the ``<split>`` of ``instances_<split>.json`` (``train2014``,
            ``val2017``, ``train``...), required when several annotation files exist. ``voc``: an
            ``ImageSets/Main/<split>.txt`` list (default ``trainval``). ``nuswide``: ``train`` (default) or ``test``.
            Ignored (with a warning) by ``folder`` and ``manifest``.
        classes_file: Text file of class names, one per line (see :func:`read_class_vocabulary`), or the class
            names themselves (a list, e.g. a labeling run's classes.json; checked the same way). Required for
            ``folder`` (and for a ``manifest`` without labels). For datasets with their own classes it overrides
            them: ground truth is remapped by name (case-insensitive); ground-truth classes missing from the
            vocabulary are dropped (logged once with a count) and vocabulary classes absent from the dataset
            simply have no positives.
        endpoint_override: S3 endpoint such as ``http://127.0.0.1:9000``; defaults to ``AWS_ENDPOINT_URL``.
        limit: Keep only the first ``limit`` images (deterministic; used by ``--smoke-test``).
        voc_include_difficult: VOC objects flagged ``<difficult>1</difficult>`` still count as present (the
            object *is* in the image; CDUL scores presence, not detection). ``False`` ignores them.

    Returns:
        The dataset index.

    Raises:
        FileNotFoundError: The root, an annotation/list file, or ``classes_file`` does not exist.
        ValueError: Unknown ``format``, ambiguous or unknown ``split``, missing ``classes_file`` where one is required,
            malformed annotation files (the message names the file), or ``limit`` < 1.
        ConfigError: (a ValueError naming the ``dataset`` field) the dataset lists no image, lists an image id more
            than once (the ids are listed), or a COCO annotation names a category id missing from ``categories``
            (the message names the file and the id).
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown dataset format={format!r}; valid `format` values: {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be a positive number of images or None, got {limit!r}")
    vocabulary = _vocabulary(classes_file, endpoint_override)

    fmt = detect_format(uri, endpoint_override) if format == "auto" else format
    if format == "auto":
        logger.info("Detected dataset format %r for %s", fmt, storage.redact(uri))
    if split is not None and fmt in ("folder", "manifest"):
        logger.warning("`split`=%r is ignored by the %s reader", split, fmt)

    raw = READERS[fmt](_ReadRequest(uri, split, endpoint_override, vocabulary, limit, voc_include_difficult))

    if not raw.image_ids:
        raise dataset_error(f"{raw.root} ({fmt}) lists no images: nothing to label")
    if limit is not None and len(raw.image_ids) > limit:
        raw.image_ids, raw.uris = raw.image_ids[:limit], raw.uris[:limit]
        if raw.gt is not None:
            raw.gt = raw.gt[:limit]
    if vocabulary is not None and raw.classes != vocabulary:
        raw.gt = _remap(raw.gt, raw.classes, vocabulary, source=raw.root) if raw.gt is not None else None
        raw.classes = vocabulary
    _check_unique(raw.image_ids, raw.root)
    records = _to_table(raw)
    logger.info(
        "Indexed %d images, %d classes (%s, ground truth: %s) from %s",
        records.num_rows,
        len(raw.classes),
        fmt,
        raw.gt is not None,
        storage.redact(raw.root),
    )
    return DatasetIndex(
        records=records, classes=raw.classes, has_ground_truth=raw.gt is not None, format=fmt, root=raw.root
    )


def read_class_vocabulary(uri: str, endpoint_override: str | None = None) -> tuple[str, ...]:
    """Read a class vocabulary: a UTF-8 text file with one natural class name per line.

    Blank lines and lines starting with ``#`` are ignored; surrounding whitespace is stripped.

    Args:
        uri: Local path or ``s3://`` URI of the file.
        endpoint_override: S3 endpoint; defaults to ``AWS_ENDPOINT_URL``.

    Returns:
        The class names in file order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file lists no class, or lists a class twice (compared case-insensitively).
    """
    lines = read_text(uri, endpoint_override).splitlines()
    classes = [line.strip() for line in lines]
    return _check_vocabulary([c for c in classes if c and not c.startswith("#")], uri)


def _check_vocabulary(classes: Sequence[str], source: str) -> tuple[str, ...]:
    if not classes:
        raise ValueError(f"The class vocabulary {source} (`classes_file`) lists no class")
    dupes = sorted(name for name, n in Counter(_name_key(c) for c in classes).items() if n > 1)
    if dupes:
        raise ValueError(f"The class vocabulary {source} (--classes-file, config field `classes_file`) lists these "
                         f"classes more than once: {dupes}")
    return tuple(classes)


def _vocabulary(classes_file: str | Sequence[str] | None, endpoint_override: str | None) -> tuple[str, ...] | None:
    """The vocabulary override of :func:`load_dataset`: None, a file read with ``read_class_vocabulary``, or names."""
    if not classes_file:
        return None
    if isinstance(classes_file, str):
        return read_class_vocabulary(classes_file, endpoint_override)
    return _check_vocabulary([str(c).strip() for c in classes_file], "given as a list")


def detect_format(uri: str, endpoint_override: str | None = None) -> str:
    """Guess a dataset's format from its layout (the ``format="auto"`` rule of :func:`load_dataset`).

    Raises:
        FileNotFoundError: ``uri`` does not exist.
    """
    if uri.lower().rstrip("/").endswith(MANIFEST_SUFFIXES):
        return "manifest"
    root = storage.absolute_uri(uri)
    children = list_children(root, endpoint_override)
    dirs = {name for name, kind in children.items() if kind == pafs.FileType.Directory}
    files = {name for name, kind in children.items() if kind == pafs.FileType.File}
    if "annotations" in dirs and coco_annotation_files(storage.join(root, "annotations"), endpoint_override):
        return "coco"
    if {"JPEGImages", "Annotations"} <= dirs or any(re.fullmatch(r"VOC\d{4}", d) for d in dirs):
        return "voc"
    if "ImageList" in dirs and "Concepts81.txt" in files:
        return "nuswide"
    return "folder"


# ---------------------------------------------------------------------------------------------------------------------
# Folder and manifest (no fixed class list)
# ---------------------------------------------------------------------------------------------------------------------


def _read_folder(uri: str, endpoint_override: str | None, vocabulary: tuple[str, ...] | None) -> RawIndex:
    """Every image (``.jpg .jpeg .png .bmp .webp``, any case) under a directory or S3 prefix, recursively, sorted by
    path. ``image_id`` is the path relative to the root with ``/`` separators. No ground truth; the classes are the
    ``classes_file`` vocabulary (required)."""
    root = storage.absolute_uri(uri)
    require_exists(root, endpoint_override)
    if vocabulary is None:
        raise ValueError(
            f"The folder dataset {root} has no class list: pass --classes-file (config field `classes_file`: a text "
            "file, one class per line)"
        )
    uris = storage.list_files(root, IMAGE_SUFFIXES, endpoint_override)
    if not uris:
        raise dataset_error(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    image_ids = [_relative(u, root) for u in uris]
    return RawIndex(image_ids=image_ids, uris=uris, gt=None, classes=vocabulary, root=root)


def _read_manifest(uri: str, endpoint_override: str | None, vocabulary: tuple[str, ...] | None) -> RawIndex:
    """Read a Parquet or CSV manifest.

    Columns: ``uri`` (required; absolute local path, ``s3://`` URI, or a path relative to the manifest's directory),
    ``image_id`` (optional, defaults to ``uri`` as written), ``labels`` (optional class names: ``list<string>`` in
    Parquet, or a ``;``-separated string in CSV or Parquet; an empty or null value means no class present).
    Classes are ``classes_file`` if given, else the sorted union of all labels.
    """
    manifest = storage.absolute_uri(uri)
    require_exists(manifest, endpoint_override)
    fs, path = storage.filesystem(manifest, endpoint_override)
    try:
        if manifest.lower().endswith(".parquet"):
            with fs.open_input_file(path) as f:
                table = pq.read_table(f)
        elif manifest.lower().endswith(".csv"):
            with fs.open_input_stream(path) as f:
                table = pacsv.read_csv(f, convert_options=_MANIFEST_CSV_OPTIONS)
        else:
            raise ValueError(f"Manifest {manifest} must end in .parquet or .csv")
    except pa.ArrowInvalid as e:
        raise ValueError(f"Cannot read manifest {manifest}: {e}") from e
    if "uri" not in table.column_names:
        raise ValueError(f"Manifest {manifest} has no `uri` column (columns: {table.column_names})")

    written = _string_column(table, "uri", manifest)
    base = posixpath.dirname(manifest) if storage.is_s3(manifest) else os.path.dirname(manifest)
    uris = [_resolve_manifest_uri(base, u) for u in written]
    image_ids = _string_column(table, "image_id", manifest) if "image_id" in table.column_names else list(written)

    gt: list[list[int]] | None = None
    classes = vocabulary
    if "labels" in table.column_names:
        names = _manifest_labels(table.column("labels"), manifest)
        if classes is None:
            classes = tuple(sorted({n for row in names for n in row}))
            if not classes:
                raise ValueError(f"Manifest {manifest} has an empty `labels` column: pass --classes-file (config "
                                 "field `classes_file`)")
            gt = [sorted({classes.index(n) for n in row}) for row in names]
        else:
            # Remap by name now; `load_dataset` sees classes == vocabulary and does not remap again.
            union = tuple(sorted({n for row in names for n in row}))
            union_index = {n: i for i, n in enumerate(union)}
            gt = _remap([[union_index[n] for n in row] for row in names], union, classes, source=manifest)
    elif classes is None:
        raise ValueError(f"Manifest {manifest} has no `labels` column, so no class list: pass --classes-file "
                         "(config field `classes_file`)")
    return RawIndex(image_ids=image_ids, uris=uris, gt=gt, classes=classes, root=manifest)


def _string_column(table: pa.Table, name: str, manifest: str) -> list[str]:
    col = table.column(name)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = col.cast(pa.string())
    values = col.to_pylist()
    if any(v is None or v == "" for v in values):
        raise ValueError(f"Manifest {manifest}: column `{name}` has empty or null values")
    return values


def _manifest_labels(col: pa.ChunkedArray, manifest: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for value in col.to_pylist():
        if value is None:
            rows.append([])
        elif isinstance(value, str):
            rows.append([n.strip() for n in value.split(";") if n.strip()])
        elif isinstance(value, list):
            rows.append([str(n).strip() for n in value if n is not None and str(n).strip()])
        else:
            raise ValueError(
                f"Manifest {manifest}: column `labels` must be list<string> or a ';'-separated string, got {col.type}"
            )
    return rows


def _resolve_manifest_uri(base: str, value: str) -> str:
    if storage.is_s3(value):
        return value
    if value.startswith("file://"):
        return os.path.abspath(value[len("file://") :])
    if storage.is_s3(base):
        return "s3://" + posixpath.normpath(posixpath.join(base[len("s3://") :], value))
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------


def _name_key(name: str) -> str:
    """Class names match case-insensitively and with runs of whitespace collapsed."""
    return " ".join(name.split()).casefold()


def _remap(
    gt: list[list[int]], source_classes: Sequence[str], vocabulary: Sequence[str], source: str
) -> list[list[int]]:
    """Map ground-truth indices from ``source_classes`` to ``vocabulary`` by class name."""
    vocab_index = {_name_key(c): i for i, c in enumerate(vocabulary)}
    mapping = [vocab_index.get(_name_key(c)) for c in source_classes]
    dropped: Counter[str] = Counter()
    out = []
    for row in gt:
        mapped = set()
        for c in row:
            if mapping[c] is None:
                dropped[source_classes[c]] += 1
            else:
                mapped.add(mapping[c])
        out.append(sorted(mapped))
    if dropped:
        logger.warning(
            "%s: %d ground-truth labels of %d classes not in the vocabulary (`classes_file`) were dropped: %s",
            source,
            sum(dropped.values()),
            len(dropped),
            dict(sorted(dropped.items())),
        )
    return out


_MAX_LISTED = 20


def _check_unique(image_ids: list[str], root: str) -> None:
    """Raises ConfigError (field ``dataset``) listing the image ids that appear more than once (up to 20 of them)."""
    if len(set(image_ids)) != len(image_ids):
        dupes = [(i, n) for i, n in Counter(image_ids).items() if n > 1]
        listed = ", ".join(f"{i!r} ({n}x)" for i, n in dupes[:_MAX_LISTED])
        more = f" and {len(dupes) - _MAX_LISTED} more" if len(dupes) > _MAX_LISTED else ""
        raise dataset_error(
            f"{root}: {len(dupes)} `image_id` values appear more than once (ids must be unique): {listed}{more}"
        )


def _to_table(raw: RawIndex) -> pa.Table:
    gt = raw.gt if raw.gt is not None else [None] * len(raw.image_ids)
    return pa.Table.from_arrays(
        [
            pa.array(raw.image_ids, pa.string()),
            pa.array(raw.uris, pa.string()),
            pa.array(gt, pa.list_(pa.int32())),
        ],
        schema=INDEX_SCHEMA,
    )


def _relative(uri: str, root: str) -> str:
    rel = uri[len(root) :].lstrip("/\\")
    return rel.replace(os.sep, "/")


# The reader of each format (``FORMATS`` minus ``auto``): a new layout is one function and one entry here.
READERS: dict[str, Callable[[_ReadRequest], RawIndex]] = {
    "coco": lambda r: read_coco(r.uri, r.split, r.endpoint_override),
    "voc": lambda r: read_voc(r.uri, r.split, r.endpoint_override, r.limit, r.voc_include_difficult),
    "nuswide": lambda r: read_nuswide(r.uri, r.split, r.endpoint_override),
    "folder": lambda r: _read_folder(r.uri, r.endpoint_override, r.vocabulary),
    "manifest": lambda r: _read_manifest(r.uri, r.endpoint_override, r.vocabulary),
}
