"""Benchmark-format dataset readers (COCO, PASCAL VOC, NUS-WIDE) and the read helpers every reader shares.

Each ``read_<format>`` returns a :class:`RawIndex`: image ids, URIs, ground truth as indices into the dataset's own
ordered classes. :func:`cdul_ray.datasets.load_dataset` (the public entry, with the ``READERS`` registry, the
vocabulary override and the ``folder``/``manifest`` readers) picks the reader, applies ``limit`` and the vocabulary, and
turns the result into a :class:`cdul_ray.datasets.DatasetIndex`. Layouts are described on each reader; all I/O goes
through :mod:`cdul_ray.storage`, so local paths and ``s3://`` URIs behave the same.
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow.fs as pafs

from cdul_ray import storage

logger = logging.getLogger(__name__)

# PASCAL VOC's 20 classes in the standard order, as the annotation files spell them -> natural names for CLIP prompts.
VOC_CLASSES = (
    ("aeroplane", "aeroplane"),
    ("bicycle", "bicycle"),
    ("bird", "bird"),
    ("boat", "boat"),
    ("bottle", "bottle"),
    ("bus", "bus"),
    ("car", "car"),
    ("cat", "cat"),
    ("chair", "chair"),
    ("cow", "cow"),
    ("diningtable", "dining table"),
    ("dog", "dog"),
    ("horse", "horse"),
    ("motorbike", "motorbike"),
    ("person", "person"),
    ("pottedplant", "potted plant"),
    ("sheep", "sheep"),
    ("sofa", "sofa"),
    ("train", "train"),
    ("tvmonitor", "tv monitor"),
)
VOC_DEFAULT_SPLIT = "trainval"

NUSWIDE_SPLITS = ("train", "test")
NUSWIDE_DEFAULT_SPLIT = "train"

# Threads for reading many small annotation files (one request each on S3).
_IO_THREADS = 16

_T = TypeVar("_T")


@dataclass
class RawIndex:
    """What a reader found, before the vocabulary override, ``limit`` and conversion to Arrow."""

    image_ids: list[str]
    uris: list[str]
    gt: list[list[int]] | None  # indices into `classes`, or None for no ground truth
    classes: tuple[str, ...]
    root: str


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------


def dataset_error(message: str) -> ValueError:
    """A ``ConfigError`` naming the ``dataset`` field (imported lazily: the config module imports torch)."""
    from cdul_ray.config import ConfigError

    return ConfigError("dataset", message)


def require_exists(uri: str, endpoint_override: str | None) -> None:
    """Raises FileNotFoundError (naming ``uri``) when the dataset path does not exist."""
    if not storage.exists(uri, endpoint_override):
        raise FileNotFoundError(f"--dataset (config field `dataset`): {uri} does not exist")


def list_children(uri: str, endpoint_override: str | None, missing_ok: bool = False) -> dict[str, pafs.FileType]:
    """``{name: type}`` of the direct children of a directory or S3 prefix.

    Raises:
        FileNotFoundError: ``uri`` does not exist (unless ``missing_ok``, which gives ``{}``) or is a plain file.
    """
    fs, path = storage.filesystem(uri, endpoint_override)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=missing_ok))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--dataset (config field `dataset`): {uri} does not exist") from e
    except NotADirectoryError as e:  # a plain file: no children
        raise FileNotFoundError(f"--dataset (config field `dataset`): {uri} is not a directory") from e
    return {info.base_name: info.type for info in infos}


def read_text(uri: str, endpoint_override: str | None) -> str:
    """The UTF-8 text of a file (a leading byte-order mark dropped). Raises FileNotFoundError naming ``uri``."""
    try:
        data = storage.read_bytes(uri, endpoint_override)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri} not found") from e
    return data.decode("utf-8-sig")


def _parse_json(uri: str, endpoint_override: str | None) -> Any:
    data = read_text(uri, endpoint_override)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri} is not valid JSON: {e}") from e


def _join_rel(base: str, rel: str) -> str:
    """Join a ``/``-separated relative path onto a local directory or S3 prefix."""
    parts = [p for p in str(rel).replace("\\", "/").split("/") if p]
    return storage.join(base, *parts)


def _parallel_map(fn: Callable[[Any], _T], items: Iterable[Any], remote: bool) -> list[_T]:
    """``[fn(x) for x in items]`` in order, threaded on S3 where each call is a network round trip."""
    items = list(items)
    if not remote or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        return list(pool.map(fn, items))


# ---------------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------------


def read_coco(uri: str, split: str | None, endpoint_override: str | None) -> RawIndex:
    """Read a COCO instances file.

    Expects ``<root>/annotations/instances_<split>.json`` (official COCO 2014/2017 layout, also the project's
    synthetic set) with images under ``<root>/<split>/<file_name>``. Classes are the ``categories`` sorted by id with
    their names as given; ``image_id`` is the decimal string of COCO's integer id. Every annotation (crowd included)
    marks its category present; an image without annotations has ``gt_labels == []``. An instances file without an
    ``annotations`` key (test-style image lists) yields no ground truth.

    Raises:
        FileNotFoundError: ``uri`` or the split's instances file does not exist.
        ValueError: ``split`` is None and several instances files exist, or the file is not valid COCO JSON (the
            message names the file); a ``ConfigError`` for an annotation whose category id is not in ``categories``.
    """
    root = storage.absolute_uri(uri)
    require_exists(root, endpoint_override)
    ann_dir = storage.join(root, "annotations")
    available = coco_annotation_files(ann_dir, endpoint_override)
    if split is None:
        if not available:
            raise FileNotFoundError(f"No COCO annotation file {storage.join(ann_dir, 'instances_<split>.json')}")
        if len(available) > 1:
            raise ValueError(
                f"{ann_dir} holds several COCO annotation files ({', '.join(sorted(available))}): "
                f"set the `split` field to one of {sorted(available)}"
            )
        split = next(iter(available))
    ann_uri = storage.join(ann_dir, f"instances_{split}.json")
    if split not in available:
        raise FileNotFoundError(
            f"COCO annotation file {ann_uri} not found (`split`={split!r}; available splits: {sorted(available)})"
        )

    data = _parse_json(ann_uri, endpoint_override)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{ann_uri} is not a COCO instances file: no 'images' list")
    if not isinstance(data.get("categories"), list):
        raise ValueError(f"{ann_uri} is not a COCO instances file: no 'categories' list")
    try:
        categories = sorted(data["categories"], key=lambda c: c["id"])
        cat_index = {c["id"]: i for i, c in enumerate(categories)}
        classes = tuple(str(c["name"]).strip() for c in categories)
        image_dir = storage.join(root, split)
        image_ids = [str(img["id"]) for img in data["images"]]
        uris = [_join_rel(image_dir, img["file_name"]) for img in data["images"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ann_uri}: malformed COCO image or category entry ({e!r})") from e

    gt: list[list[int]] | None = None
    if "annotations" in data:
        present: dict[str, set[int]] = {i: set() for i in image_ids}
        orphans = 0
        for ann in data["annotations"]:
            try:
                img_id, cat_id = str(ann["image_id"]), ann["category_id"]
            except (KeyError, TypeError) as e:
                raise ValueError(f"{ann_uri}: malformed COCO annotation ({e!r})") from e
            if cat_id not in cat_index:
                raise dataset_error(
                    f"{ann_uri}: annotation {ann.get('id')!r} (image {img_id}) names category_id {cat_id!r}, which is "
                    f"not in the file's 'categories' (ids {sorted(cat_index, key=str)})"
                )
            if img_id in present:
                present[img_id].add(cat_index[cat_id])
            else:
                orphans += 1
        if orphans:
            logger.warning("%s: ignored %d annotations of image ids not in 'images'", ann_uri, orphans)
        gt = [sorted(present[i]) for i in image_ids]
    else:
        logger.warning("%s has no 'annotations': indexing without ground truth", ann_uri)
    return RawIndex(image_ids=image_ids, uris=uris, gt=gt, classes=classes, root=root)


def coco_annotation_files(ann_dir: str, endpoint_override: str | None) -> dict[str, str]:
    """``{split: uri}`` of the ``instances_<split>.json`` files directly in ``ann_dir`` (empty if it is missing)."""
    found = {}
    for name, kind in list_children(ann_dir, endpoint_override, missing_ok=True).items():
        m = re.fullmatch(r"instances_(.+)\.json", name)
        if m and kind == pafs.FileType.File:
            found[m.group(1)] = storage.join(ann_dir, name)
    return found


# ---------------------------------------------------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------------------------------------------------


def read_voc(
    uri: str, split: str | None, endpoint_override: str | None, limit: int | None, include_difficult: bool
) -> RawIndex:
    """Read a PASCAL VOC 2007/2012 split.

    Expects ``<root>/ImageSets/Main/<split>.txt`` (one image id per line), ``<root>/Annotations/<id>.xml`` and
    ``<root>/JPEGImages/<id>.jpg``. ``uri`` may also point at a ``VOCdevkit`` directory that holds exactly one
    ``VOC20xx`` directory. Classes are the 20 VOC classes in the standard order with natural names
    (``diningtable`` -> ``dining table``, ``pottedplant`` -> ``potted plant``, ``tvmonitor`` -> ``tv monitor``).
    Only the ``limit`` first images' annotations are read.

    Raises:
        FileNotFoundError: ``uri`` is not a VOC dataset, or the split's list or a listed annotation does not exist.
        ValueError: several ``VOC20xx`` directories, invalid XML, or an object class outside the 20 (file named).
    """
    root = _resolve_voc_root(storage.absolute_uri(uri), endpoint_override)
    split = split or VOC_DEFAULT_SPLIT
    list_uri = storage.join(root, "ImageSets", "Main", f"{split}.txt")
    if not storage.exists(list_uri, endpoint_override):
        main = storage.join(root, "ImageSets", "Main")
        choices = sorted(
            n[: -len(".txt")]
            for n in list_children(main, endpoint_override, missing_ok=True)
            if n.endswith(".txt") and "_" not in n
        )
        raise FileNotFoundError(f"VOC image list {list_uri} not found (`split`={split!r}; available: {choices})")
    image_ids = [line.split()[0] for line in read_text(list_uri, endpoint_override).splitlines() if line.strip()]
    if limit is not None:
        image_ids = image_ids[:limit]

    class_index = {raw: i for i, (raw, _) in enumerate(VOC_CLASSES)}
    ann_dir = storage.join(root, "Annotations")

    def parse(image_id: str) -> list[int]:
        xml_uri = storage.join(ann_dir, f"{image_id}.xml")
        try:
            tree = ET.fromstring(storage.read_bytes(xml_uri, endpoint_override))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"VOC annotation {xml_uri} (listed in {list_uri}) not found") from e
        except ET.ParseError as e:
            raise ValueError(f"VOC annotation {xml_uri} is not valid XML: {e}") from e
        present = set()
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip().lower()
            if name not in class_index:
                raise ValueError(
                    f"VOC annotation {xml_uri}: object class {name!r} is not one of the 20 VOC classes "
                    f"{[raw for raw, _ in VOC_CLASSES]}"
                )
            if not include_difficult and (obj.findtext("difficult") or "0").strip() == "1":
                continue
            present.add(class_index[name])
        return sorted(present)

    gt = _parallel_map(parse, image_ids, storage.is_s3(root))
    uris = [storage.join(root, "JPEGImages", f"{i}.jpg") for i in image_ids]
    classes = tuple(natural for _, natural in VOC_CLASSES)
    return RawIndex(image_ids=image_ids, uris=uris, gt=gt, classes=classes, root=root)


def _resolve_voc_root(root: str, endpoint_override: str | None) -> str:
    """``root`` itself, or its single ``VOC20xx`` child when ``root`` is a ``VOCdevkit`` directory."""
    children = list_children(root, endpoint_override)
    if "JPEGImages" in children or "Annotations" in children:
        return root
    dirs = [name for name, kind in children.items() if kind == pafs.FileType.Directory]
    years = sorted(d for d in dirs if re.fullmatch(r"VOC\d{4}", d))
    if len(years) == 1:
        return storage.join(root, years[0])
    if len(years) > 1:
        raise ValueError(
            f"{root} holds several VOC datasets ({', '.join(years)}); point the dataset `uri` at one of them"
        )
    raise FileNotFoundError(f"{root} is not a VOC dataset: no JPEGImages/Annotations directories")


# ---------------------------------------------------------------------------------------------------------------------
# NUS-WIDE
# ---------------------------------------------------------------------------------------------------------------------


def read_nuswide(uri: str, split: str | None, endpoint_override: str | None) -> RawIndex:
    """Read a NUS-WIDE split in the layout of the official distribution.

    Expects:

    - ``<root>/ImageList/TrainImagelist.txt`` or ``TestImagelist.txt``: one image per line, a path relative to
      ``<root>/Flickr`` with Windows separators (``actor\\0001_2124494179.jpg``); a leading drive and ``ImageData``
      directory (``C:\\ImageData\\...``, as in ``Imagelist.txt``) are stripped.
    - ``<root>/Concepts81.txt``: the 81 concept names, one per line, in class order.
    - ``<root>/TrainTestLabels/Labels_<concept>_<Train|Test>.txt``: one ``0``/``1`` per line, aligned with the image
      list.
    - Images under ``<root>/Flickr/<relative path>``.

    ``image_id`` is the relative path with ``/`` separators (``actor/0001_2124494179.jpg``), unique across the
    dataset. Images listed but missing from ``Flickr`` (many URLs of the original crawl are dead) are not checked
    here.

    Raises:
        FileNotFoundError: ``uri``, the concept list, the image list or a label file does not exist.
        ValueError: ``split`` not in :data:`NUSWIDE_SPLITS`, an empty concept list, or a label file whose length or
            values (``0``/``1``) do not match the image list (the message names the file).
    """
    root = storage.absolute_uri(uri)
    require_exists(root, endpoint_override)
    split = (split or NUSWIDE_DEFAULT_SPLIT).lower()
    if split not in NUSWIDE_SPLITS:
        raise ValueError(f"NUS-WIDE `split` must be one of {NUSWIDE_SPLITS}, got {split!r}")
    tag = split.capitalize()

    concepts_uri = storage.join(root, "Concepts81.txt")
    classes = tuple(c.strip() for c in read_text(concepts_uri, endpoint_override).splitlines() if c.strip())
    if not classes:
        raise ValueError(f"NUS-WIDE concept list {concepts_uri} is empty")

    list_uri = storage.join(root, "ImageList", f"{tag}Imagelist.txt")
    rel_paths = [_nuswide_rel(line) for line in read_text(list_uri, endpoint_override).splitlines() if line.strip()]
    image_dir = storage.join(root, "Flickr")
    uris = [_join_rel(image_dir, p) for p in rel_paths]

    def read_labels(concept: str) -> list[bool]:
        label_uri = storage.join(root, "TrainTestLabels", f"Labels_{concept}_{tag}.txt")
        values = [v.strip() for v in read_text(label_uri, endpoint_override).splitlines() if v.strip()]
        if len(values) != len(rel_paths):
            raise ValueError(f"NUS-WIDE label file {label_uri} has {len(values)} lines, {list_uri} {len(rel_paths)}")
        bad = next((v for v in values if v not in ("0", "1")), None)
        if bad is not None:
            raise ValueError(f"NUS-WIDE label file {label_uri}: expected 0 or 1 per line, found {bad!r}")
        return [v == "1" for v in values]

    columns = _parallel_map(read_labels, classes, storage.is_s3(root))
    gt = [[c for c, col in enumerate(columns) if col[n]] for n in range(len(rel_paths))]
    return RawIndex(image_ids=rel_paths, uris=uris, gt=gt, classes=classes, root=root)


def _nuswide_rel(line: str) -> str:
    """``C:\\ImageData\\actor\\0001_2.jpg`` or ``actor\\0001_2.jpg`` -> ``actor/0001_2.jpg``."""
    path = line.strip().replace("\\", "/")
    path = re.sub(r"^[A-Za-z]:/", "", path).lstrip("/")
    if path.startswith("ImageData/"):
        path = path[len("ImageData/") :]
    return path
