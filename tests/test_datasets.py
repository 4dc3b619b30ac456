"""Dataset readers on tiny hand-made datasets of every supported layout, locally and on a real (moto) S3 server."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdul_ray.datasets import FORMATS, DatasetIndex, detect_format, load_dataset, read_class_vocabulary
from cdul_ray.schema import INDEX_SCHEMA
from tests.s3_fixtures import make_bucket, s3_env, s3_server, upload_dir  # noqa: F401

FAKE_JPEG = b"\xff\xd8\xff\xe0not-really-a-jpeg"


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _rows(index: DatasetIndex) -> list[dict]:
    return index.records.to_pylist()


# ---------------------------------------------------------------------------------------------------------------------
# Tiny datasets
# ---------------------------------------------------------------------------------------------------------------------

COCO_CATEGORIES = [  # deliberately out of id order
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 67, "name": "dining table", "supercategory": "furniture"},
]


def make_coco(root: Path, split: str = "train2014", with_images: bool = True) -> Path:
    """3 images: 42 -> person+dog (two dog boxes), 7 -> dining table (crowd), 99 -> no annotations."""
    images = [
        {"id": 42, "file_name": "COCO_train_000042.jpg", "width": 8, "height": 8},
        {"id": 7, "file_name": "COCO_train_000007.jpg", "width": 8, "height": 8},
        {"id": 99, "file_name": "COCO_train_000099.jpg", "width": 8, "height": 8},
    ]
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 18, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 0},
        {"id": 3, "image_id": 42, "category_id": 18, "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 67, "iscrowd": 1},
    ]
    data = {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}
    _write(root / "annotations" / f"instances_{split}.json", json.dumps(data))
    if with_images:
        for img in images:
            _write(root / split / img["file_name"], FAKE_JPEG)
    return root


VOC_XML = """<annotation>
  <folder>VOC2012</folder><filename>{image_id}.jpg</filename>
  <size><width>8</width><height>8</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = (
    "<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
    "<difficult>{difficult}</difficult></object>"
)


def make_voc(root: Path) -> Path:
    """trainval = 3 images; 2008_000002 has a difficult pottedplant, 2008_000003 has no object."""
    objects = {
        "2008_000001": [("diningtable", 0), ("tvmonitor", 0), ("person", 0), ("person", 0)],
        "2008_000002": [("aeroplane", 0), ("pottedplant", 1)],
        "2008_000003": [],
    }
    for image_id, objs in objects.items():
        body = "\n".join(VOC_OBJECT.format(name=n, difficult=d) for n, d in objs)
        _write(root / "Annotations" / f"{image_id}.xml", VOC_XML.format(image_id=image_id, objects=body))
        _write(root / "JPEGImages" / f"{image_id}.jpg", FAKE_JPEG)
    _write(root / "ImageSets" / "Main" / "trainval.txt", "2008_000001\n2008_000002\n2008_000003\n")
    _write(root / "ImageSets" / "Main" / "train.txt", "2008_000002\n")
    _write(root / "ImageSets" / "Main" / "dog_trainval.txt", "2008_000001 -1\n")  # per-class lists are not splits
    return root


NUS_CONCEPTS = ("animal", "sky", "water")


def make_nuswide(root: Path) -> Path:
    """Train: 3 images; Test: 2 images (one with a C:\\ImageData\\ prefix)."""
    _write(root / "Concepts81.txt", "animal\r\nsky\r\nwater\r\n")
    train = ["actor\\0001_2124494179.jpg", "beach\\0002_11111.jpg", "beach\\0003_22222.jpg"]
    test = ["C:\\ImageData\\zebra\\0004_33333.jpg", "actor\\0005_44444.jpg"]
    _write(root / "ImageList" / "TrainImagelist.txt", "\r\n".join(train) + "\r\n")
    _write(root / "ImageList" / "TestImagelist.txt", "\n".join(test) + "\n")
    train_labels = {"animal": "1\n0\n0\n", "sky": "0\n1\n1\n", "water": "0 \n1 \n0 \n"}
    test_labels = {"animal": "1\n0\n", "sky": "1\n0\n", "water": "0\n0\n"}
    for concept in NUS_CONCEPTS:
        _write(root / "TrainTestLabels" / f"Labels_{concept}_Train.txt", train_labels[concept])
        _write(root / "TrainTestLabels" / f"Labels_{concept}_Test.txt", test_labels[concept])
    for rel in train + ["zebra\\0004_33333.jpg", test[1]]:
        _write(root / "Flickr" / rel.replace("\\", "/"), FAKE_JPEG)
    return root


def make_folder(root: Path) -> Path:
    for rel in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "e.bmp", "notes.txt", "sub/f.gif"]:
        _write(root / rel, FAKE_JPEG)
    return root


def make_vocabulary(path: Path, names: list[str]) -> str:
    _write(path, "# my vocabulary\n\n" + "\n".join(names) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------------


def test_coco_reader(tmp_path):
    root = make_coco(tmp_path / "coco")
    index = load_dataset(str(root), format="coco")
    assert index.format == "coco"
    assert index.records.schema == INDEX_SCHEMA
    assert index.classes == ("person", "dog", "dining table")  # sorted by category id
    assert index.has_ground_truth
    assert index.root == str(root)
    assert _rows(index) == [
        {"image_id": "42", "uri": str(root / "train2014" / "COCO_train_000042.jpg"), "gt_labels": [0, 1]},
        {"image_id": "7", "uri": str(root / "train2014" / "COCO_train_000007.jpg"), "gt_labels": [2]},
        {"image_id": "99", "uri": str(root / "train2014" / "COCO_train_000099.jpg"), "gt_labels": []},
    ]
    assert len(index) == 3 and index.num_classes == 3


def test_coco_split_selection(tmp_path):
    root = make_coco(tmp_path / "coco", split="train")
    make_coco(root, split="val")
    with pytest.raises(ValueError, match="`split`") as err:
        load_dataset(str(root), format="coco")
    assert "train" in str(err.value) and "val" in str(err.value)
    index = load_dataset(str(root), format="coco", split="val")
    assert index.records.column("uri")[0].as_py() == str(root / "val" / "COCO_train_000042.jpg")
    with pytest.raises(FileNotFoundError, match="instances_test.json") as err:
        load_dataset(str(root), format="coco", split="test")
    assert "split" in str(err.value)


def test_coco_missing_image_files_are_not_checked(tmp_path):
    root = make_coco(tmp_path / "coco", with_images=False)
    assert len(load_dataset(str(root))) == 3


def test_coco_invalid_json_names_the_file(tmp_path):
    root = tmp_path / "coco"
    bad = _write(root / "annotations" / "instances_train.json", '{"images": [')
    with pytest.raises(ValueError, match="instances_train.json") as err:
        load_dataset(str(root), format="coco")
    assert str(bad) in str(err.value)


def test_coco_without_annotations_key_has_no_ground_truth(tmp_path):
    root = tmp_path / "coco"
    data = {"images": [{"id": 1, "file_name": "x.jpg"}], "categories": COCO_CATEGORIES}
    _write(root / "annotations" / "instances_test2017.json", json.dumps(data))
    index = load_dataset(str(root))
    assert not index.has_ground_truth
    assert _rows(index) == [{"image_id": "1", "uri": str(root / "test2017" / "x.jpg"), "gt_labels": None}]


# ---------------------------------------------------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------------------------------------------------


def test_voc_reader_natural_names_and_difficult(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    index = load_dataset(str(root), format="voc")
    assert index.format == "voc" and index.has_ground_truth
    assert len(index.classes) == 20
    assert index.classes[0] == "aeroplane" and index.classes[13] == "motorbike"
    names = ("dining table", "tv monitor", "person", "potted plant")
    dining, tv, person, plant = (index.classes.index(c) for c in names)
    assert (dining, plant, tv) == (10, 15, 19)
    assert not {"diningtable", "tvmonitor", "pottedplant"} & set(index.classes)
    assert _rows(index) == [
        {
            "image_id": "2008_000001",
            "uri": str(root / "JPEGImages" / "2008_000001.jpg"),
            "gt_labels": sorted([dining, tv, person]),
        },
        {"image_id": "2008_000002", "uri": str(root / "JPEGImages" / "2008_000002.jpg"), "gt_labels": [0, plant]},
        {"image_id": "2008_000003", "uri": str(root / "JPEGImages" / "2008_000003.jpg"), "gt_labels": []},
    ]
    strict = load_dataset(str(root), format="voc", voc_include_difficult=False)
    assert strict.records.column("gt_labels")[1].as_py() == [0]


def test_voc_split_and_devkit_root(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    make_voc(devkit / "VOC2012")
    index = load_dataset(str(devkit), split="train")
    assert index.format == "voc"
    assert index.root == str(devkit / "VOC2012")
    assert index.records.column("image_id").to_pylist() == ["2008_000002"]
    with pytest.raises(FileNotFoundError, match="`split`") as err:
        load_dataset(str(devkit), format="voc", split="val")
    assert "train" in str(err.value) and "dog_trainval" not in str(err.value)
    make_voc(devkit / "VOC2007")
    with pytest.raises(ValueError, match="VOC2007, VOC2012"):
        load_dataset(str(devkit), format="voc")


def test_voc_invalid_xml_names_the_file(tmp_path):
    root = make_voc(tmp_path / "voc")
    bad = _write(root / "Annotations" / "2008_000002.xml", "<annotation><object>")
    with pytest.raises(ValueError, match="not valid XML") as err:
        load_dataset(str(root), format="voc")
    assert str(bad) in str(err.value)


def test_voc_limit_reads_only_the_first_annotations(tmp_path):
    root = make_voc(tmp_path / "voc")
    (root / "Annotations" / "2008_000003.xml").write_text("<broken")  # never read with limit=2
    index = load_dataset(str(root), limit=2)
    assert index.records.column("image_id").to_pylist() == ["2008_000001", "2008_000002"]


# ---------------------------------------------------------------------------------------------------------------------
# NUS-WIDE
# ---------------------------------------------------------------------------------------------------------------------


def test_nuswide_reader(tmp_path):
    root = make_nuswide(tmp_path / "nus")
    train = load_dataset(str(root), format="nuswide")
    assert train.format == "nuswide" and train.has_ground_truth
    assert train.classes == NUS_CONCEPTS
    assert _rows(train) == [
        {
            "image_id": "actor/0001_2124494179.jpg",
            "uri": str(root / "Flickr" / "actor" / "0001_2124494179.jpg"),
            "gt_labels": [0],
        },
        {
            "image_id": "beach/0002_11111.jpg",
            "uri": str(root / "Flickr" / "beach" / "0002_11111.jpg"),
            "gt_labels": [1, 2],
        },
        {
            "image_id": "beach/0003_22222.jpg",
            "uri": str(root / "Flickr" / "beach" / "0003_22222.jpg"),
            "gt_labels": [1],
        },
    ]
    test = load_dataset(str(root), format="nuswide", split="Test")
    assert test.records.column("image_id").to_pylist() == ["zebra/0004_33333.jpg", "actor/0005_44444.jpg"]
    assert test.records.column("uri")[0].as_py() == str(root / "Flickr" / "zebra" / "0004_33333.jpg")
    assert test.records.column("gt_labels").to_pylist() == [[0, 1], []]
    for row in _rows(train) + _rows(test):
        assert os.path.exists(row["uri"])


def test_nuswide_errors(tmp_path):
    root = make_nuswide(tmp_path / "nus")
    with pytest.raises(ValueError, match="`split`"):
        load_dataset(str(root), format="nuswide", split="val")
    bad = _write(root / "TrainTestLabels" / "Labels_sky_Train.txt", "0\n1\n")
    with pytest.raises(ValueError, match="2 lines") as err:
        load_dataset(str(root), format="nuswide")
    assert str(bad) in str(err.value)
    (root / "TrainTestLabels" / "Labels_sky_Train.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Labels_sky_Train.txt"):
        load_dataset(str(root), format="nuswide")


# ---------------------------------------------------------------------------------------------------------------------
# Folder and manifest
# ---------------------------------------------------------------------------------------------------------------------


def test_folder_reader(tmp_path):
    root = make_folder(tmp_path / "imgs")
    vocab = make_vocabulary(tmp_path / "classes.txt", ["cat", "dining table"])
    index = load_dataset(str(root), classes_file=vocab)
    assert index.format == "folder"
    assert not index.has_ground_truth
    assert index.classes == ("cat", "dining table")
    assert index.records.schema == INDEX_SCHEMA
    assert index.records.column("image_id").to_pylist() == [
        "a.PNG",
        "b.jpg",
        "e.bmp",
        "sub/c.jpeg",
        "sub/deeper/d.webp",
        "sub/f.gif",  # GIF and TIFF are listed too (first frame, cdul_ray.images); notes.txt is not
    ]
    ids = index.records.column("image_id").to_pylist()
    assert index.records.column("uri").to_pylist() == [str(root / r) for r in ids]
    assert index.records.column("gt_labels").to_pylist() == [None] * 6
    limited = load_dataset(str(root), format="folder", classes_file=vocab, limit=2)
    assert limited.records.column("image_id").to_pylist() == ["a.PNG", "b.jpg"]


def test_folder_requires_classes_file(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match="`classes_file`"):
        load_dataset(str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No images"):
        load_dataset(str(empty), classes_file=make_vocabulary(tmp_path / "c.txt", ["cat"]))


def test_manifest_parquet(tmp_path):
    (tmp_path / "imgs").mkdir()
    table = pa.table(
        {
            "uri": ["imgs/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg"],
            "labels": pa.array([["dog", "cat"], [], None], pa.list_(pa.string())),
        }
    )
    manifest = tmp_path / "sub" / "manifest.parquet"
    manifest.parent.mkdir()
    pq.write_table(table, manifest)
    index = load_dataset(str(manifest))
    assert index.format == "manifest"
    assert index.root == str(manifest)
    assert index.classes == ("cat", "dog")  # sorted union
    assert index.has_ground_truth
    assert _rows(index) == [
        {"image_id": "imgs/a.jpg", "uri": str(tmp_path / "sub" / "imgs" / "a.jpg"), "gt_labels": [0, 1]},
        {"image_id": "/abs/b.jpg", "uri": "/abs/b.jpg", "gt_labels": []},
        {"image_id": "s3://bucket/c.jpg", "uri": "s3://bucket/c.jpg", "gt_labels": []},
    ]


def test_manifest_csv(tmp_path):
    manifest = _write(
        tmp_path / "list.csv",
        "image_id,uri,labels\n0001,a.jpg,dog;cat\n0002,../b.jpg,\n0003,s3://bucket/x/c.png, dog ; bird \n",
    )
    index = load_dataset(str(manifest), format="manifest")
    assert index.classes == ("bird", "cat", "dog")
    assert _rows(index) == [
        {"image_id": "0001", "uri": str(tmp_path / "a.jpg"), "gt_labels": [1, 2]},
        {"image_id": "0002", "uri": str(tmp_path.parent / "b.jpg"), "gt_labels": []},
        {"image_id": "0003", "uri": "s3://bucket/x/c.png", "gt_labels": [0, 2]},
    ]


def test_manifest_errors(tmp_path):
    no_uri = _write(tmp_path / "no_uri.csv", "path\na.jpg\n")
    with pytest.raises(ValueError, match="`uri`"):
        load_dataset(str(no_uri))
    no_labels = _write(tmp_path / "no_labels.csv", "uri\na.jpg\nb.jpg\n")
    with pytest.raises(ValueError, match="`classes_file`"):
        load_dataset(str(no_labels))
    vocab = make_vocabulary(tmp_path / "classes.txt", ["cat", "dog"])
    index = load_dataset(str(no_labels), classes_file=vocab)
    assert index.classes == ("cat", "dog") and not index.has_ground_truth
    assert index.records.column("image_id").to_pylist() == ["a.jpg", "b.jpg"]
    dupes = _write(tmp_path / "dupes.csv", "image_id,uri\nx,a.jpg\nx,b.jpg\n")
    with pytest.raises(ValueError, match="`image_id`"):
        load_dataset(str(dupes), classes_file=vocab)


def test_manifest_labels_with_vocabulary(tmp_path, caplog):
    manifest = _write(tmp_path / "m.csv", "uri,labels\na.jpg,dog;zebra\nb.jpg,cat\n")
    vocab = make_vocabulary(tmp_path / "classes.txt", ["person", "Dog", "cat"])
    with caplog.at_level(logging.WARNING, logger="cdul_ray.datasets"):
        index = load_dataset(str(manifest), classes_file=vocab)
    assert index.classes == ("person", "Dog", "cat")
    assert index.records.column("gt_labels").to_pylist() == [[1], [2]]
    assert "zebra" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary override, auto-detection, limits and errors
# ---------------------------------------------------------------------------------------------------------------------


def test_read_class_vocabulary(tmp_path):
    path = _write(tmp_path / "v.txt", "\ufeff# comment\ncat\n\n  dining table  \n   # indented comment\ntv monitor\n")
    assert read_class_vocabulary(str(path)) == ("cat", "dining table", "tv monitor")
    dup = _write(tmp_path / "dup.txt", "cat\ndog\nCat\n")
    with pytest.raises(ValueError, match="more than once"):
        read_class_vocabulary(str(dup))
    empty = _write(tmp_path / "empty.txt", "# nothing\n\n")
    with pytest.raises(ValueError, match="`classes_file`"):
        read_class_vocabulary(str(empty))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_class_vocabulary(str(tmp_path / "missing.txt"))


def test_vocabulary_override_remaps_ground_truth(tmp_path, caplog):
    root = make_coco(tmp_path / "coco")
    vocab = make_vocabulary(tmp_path / "classes.txt", ["cat", "Dining Table", "dog"])
    with caplog.at_level(logging.WARNING, logger="cdul_ray.datasets"):
        index = load_dataset(str(root), classes_file=vocab)
    assert index.classes == ("cat", "Dining Table", "dog")
    assert index.has_ground_truth
    # 42: person (dropped) + dog -> [2]; 7: dining table -> [1]; 99: [] ; "cat" has no positives.
    assert index.records.column("gt_labels").to_pylist() == [[2], [1], []]
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1  # logged once, with a count
    assert "1 ground-truth labels" in dropped[0].getMessage() and "person" in dropped[0].getMessage()


def test_vocabulary_override_voc(tmp_path):
    root = make_voc(tmp_path / "voc")
    vocab = make_vocabulary(tmp_path / "classes.txt", ["tv monitor", "dining table"])
    index = load_dataset(str(root), classes_file=vocab)
    assert index.records.column("gt_labels").to_pylist() == [[0, 1], [], []]


def test_auto_detection(tmp_path):
    vocab = make_vocabulary(tmp_path / "classes.txt", ["cat"])
    cases = {
        "coco": make_coco(tmp_path / "coco"),
        "voc": make_voc(tmp_path / "voc"),
        "nuswide": make_nuswide(tmp_path / "nus"),
        "folder": make_folder(tmp_path / "folder"),
    }
    for fmt, root in cases.items():
        assert detect_format(str(root)) == fmt
        assert load_dataset(str(root), classes_file=vocab if fmt == "folder" else None).format == fmt
    devkit = tmp_path / "VOCdevkit"
    make_voc(devkit / "VOC2007")
    assert detect_format(str(devkit)) == "voc"
    assert detect_format(str(tmp_path / "x" / "m.parquet")) == "manifest"
    assert detect_format(str(tmp_path / "m.CSV")) == "manifest"
    (tmp_path / "annotations_only" / "annotations").mkdir(parents=True)  # no instances_*.json: not COCO
    assert detect_format(str(tmp_path / "annotations_only")) == "folder"


def test_limit(tmp_path):
    coco = make_coco(tmp_path / "coco")
    assert load_dataset(str(coco), limit=2).records.column("image_id").to_pylist() == ["42", "7"]
    assert len(load_dataset(str(coco), limit=100)) == 3
    nus = make_nuswide(tmp_path / "nus")
    assert load_dataset(str(nus), limit=1).records.column("gt_labels").to_pylist() == [[0]]
    with pytest.raises(ValueError, match="`limit`"):
        load_dataset(str(coco), limit=0)


def test_missing_root_and_bad_format(tmp_path):
    missing = tmp_path / "nope"
    for fmt in FORMATS:
        with pytest.raises(FileNotFoundError, match=str(missing)):
            load_dataset(str(missing), format=fmt, classes_file=None)
    with pytest.raises(FileNotFoundError, match="m.parquet"):
        load_dataset(str(tmp_path / "m.parquet"))
    with pytest.raises(ValueError, match="`format`") as err:
        load_dataset(str(tmp_path), format="imagenet")
    assert "coco" in str(err.value)
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        load_dataset(str(make_folder(tmp_path / "f")), classes_file=str(tmp_path / "classes.txt"))


def test_file_uri_and_relative_root(tmp_path, monkeypatch):
    root = make_coco(tmp_path / "coco")
    monkeypatch.chdir(tmp_path)
    assert load_dataset("coco").root == str(root)
    assert load_dataset(f"file://{root}").records.column("uri")[0].as_py().startswith(str(root) + os.sep)


# ---------------------------------------------------------------------------------------------------------------------
# S3 (a real moto server; the storage layer is not patched)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("s3_env")
def test_s3_coco_and_folder(tmp_path):
    client = make_bucket(os.environ["AWS_ENDPOINT_URL"], "cdul-test")
    upload_dir(client, make_coco(tmp_path / "coco"), "cdul-test", "coco")
    upload_dir(client, make_folder(tmp_path / "folder"), "cdul-test", "raw/images")
    client.put_object(Bucket="cdul-test", Key="vocab/classes.txt", Body=b"dog\nperson\n")

    index = load_dataset("s3://cdul-test/coco/")
    assert index.format == "coco"
    assert index.root == "s3://cdul-test/coco"
    assert index.classes == ("person", "dog", "dining table")
    assert _rows(index) == [
        {"image_id": "42", "uri": "s3://cdul-test/coco/train2014/COCO_train_000042.jpg", "gt_labels": [0, 1]},
        {"image_id": "7", "uri": "s3://cdul-test/coco/train2014/COCO_train_000007.jpg", "gt_labels": [2]},
        {"image_id": "99", "uri": "s3://cdul-test/coco/train2014/COCO_train_000099.jpg", "gt_labels": []},
    ]

    folder = load_dataset("s3://cdul-test/raw/images", classes_file="s3://cdul-test/vocab/classes.txt")
    assert folder.format == "folder" and folder.classes == ("dog", "person")
    assert folder.records.column("image_id").to_pylist() == [
        "a.PNG",
        "b.jpg",
        "e.bmp",
        "sub/c.jpeg",
        "sub/deeper/d.webp",
        "sub/f.gif",  # GIF and TIFF are listed too (first frame, cdul_ray.images); notes.txt is not
    ]
    assert folder.records.column("uri")[3].as_py() == "s3://cdul-test/raw/images/sub/c.jpeg"

    with pytest.raises(FileNotFoundError, match="s3://cdul-test/missing"):
        load_dataset("s3://cdul-test/missing", format="coco")


def test_vocabulary_as_a_list_equals_the_same_vocabulary_as_a_file(tmp_path):
    manifest = _write(tmp_path / "m.csv", "uri,labels\na.jpg,dog;zebra\nb.jpg,cat\n")
    vocab = make_vocabulary(tmp_path / "classes.txt", ["person", "Dog", "cat"])
    from_file = load_dataset(str(manifest), classes_file=vocab)
    from_list = load_dataset(str(manifest), classes_file=["person", "Dog", "cat"])
    assert from_list.classes == from_file.classes == ("person", "Dog", "cat")
    assert from_list.records.equals(from_file.records)
    with pytest.raises(ValueError, match="more than once"):
        load_dataset(str(manifest), classes_file=["cat", "Cat"])


def test_every_format_has_one_reader():
    from cdul_ray.datasets import FORMATS, READERS

    assert set(READERS) == set(FORMATS) - {"auto"}
