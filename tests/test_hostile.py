"""Hostile input (issue 9, item 3): every bad file ends as an error row with a readable reason, every bad dataset as a
fast error naming the `dataset` field, and every other image is labeled (upright)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from cdul_ray import schema, storage
from cdul_ray.config import ConfigError, LabelConfig
from cdul_ray.datasets import load_dataset
from cdul_ray.images import decode_image
from cdul_ray.pipeline import run_labeling
from tests import hostile
from tests.helpers import CLASSES


def _labeling(dataset, output, clip, **kw) -> LabelConfig:
    base = dict(dataset=str(dataset), output=str(output), model=f"local-dir:{clip}", pretrained="none",
                batch_size=4, decode_batch_size=4, max_actors=1)
    base.update(kw)
    return LabelConfig(**base)


def _write_coco(root, images, annotations, categories=None):
    (root / "annotations").mkdir(parents=True)
    cats = categories or [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Dataset-level: fast errors naming the field (no Ray, no image opened)


def test_duplicate_manifest_ids_fail_fast_listing_every_duplicate(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,uri\na,1.jpg\nb,2.jpg\na,3.jpg\nc,4.jpg\nb,5.jpg\na,6.jpg\n")
    classes = hostile.write_classes(tmp_path / "classes.txt")
    with pytest.raises(ConfigError) as info:
        load_dataset(str(manifest), classes_file=str(classes))
    assert info.value.field == "dataset"
    msg = str(info.value)
    assert msg.startswith("--dataset (config field `dataset`): ") and str(manifest) in msg
    assert "2 `image_id` values appear more than once" in msg and "'a' (3x), 'b' (2x)" in msg and "'c'" not in msg

    # the job fails on it before any cluster work: no output directory is created
    with pytest.raises(ConfigError, match="'a' \\(3x\\)"):
        run_labeling(_labeling(manifest, tmp_path / "out", "unused", classes_file=str(classes)))
    assert not (tmp_path / "out").exists()


def test_duplicate_listing_is_bounded(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,uri\n" + "".join(f"id{i},{j}.jpg\n" for i in range(25) for j in range(2)))
    with pytest.raises(ConfigError, match="25 `image_id` values .*'id19' \\(2x\\) and 5 more$"):
        load_dataset(str(manifest), classes_file=str(hostile.write_classes(tmp_path / "c.txt")))


def test_empty_datasets_fail_fast_naming_the_field(tmp_path):
    classes = str(hostile.write_classes(tmp_path / "classes.txt"))
    empty_folder = tmp_path / "folder"
    (empty_folder / "sub").mkdir(parents=True)
    (empty_folder / "sub" / "notes.txt").write_text("no images here")
    header_only = tmp_path / "m.csv"
    header_only.write_text("image_id,uri\n")
    coco = _write_coco(tmp_path / "coco", images=[], annotations=[])
    for uri, words in ((empty_folder, "No images"), (header_only, "lists no images"), (coco, "lists no images")):
        with pytest.raises(ConfigError) as info:
            load_dataset(str(uri), classes_file=classes if uri != coco else None)
        assert info.value.field == "dataset" and words in str(info.value) and str(uri) in str(info.value)


def test_coco_annotation_with_unknown_category_names_the_id_and_file(tmp_path):
    root = _write_coco(tmp_path / "coco", images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                       annotations=[{"id": 10, "image_id": 1, "category_id": 2},
                                    {"id": 11, "image_id": 2, "category_id": 91}])
    with pytest.raises(ConfigError) as info:
        load_dataset(str(root))
    msg = str(info.value)
    assert info.value.field == "dataset"
    assert str(root / "annotations" / "instances_train.json") in msg
    assert "annotation 11 (image 2) names category_id 91" in msg and "ids [1, 2, 3, 4]" in msg


def test_missing_manifest_file_is_not_a_fast_error(tmp_path):
    (tmp_path / "here.jpg").write_bytes(hostile.hostile_images()["good.jpg"].data)
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\nhere.jpg\ngone.jpg\n")
    index = load_dataset(str(manifest), classes_file=str(hostile.write_classes(tmp_path / "c.txt")))
    assert index.records["uri"].to_pylist() == [str(tmp_path / "here.jpg"), str(tmp_path / "gone.jpg")]


def test_spaces_and_non_ascii_paths_index_and_read(tmp_path):
    base = tmp_path / "data sets" / "été 写真"
    good = hostile.hostile_images()["good.jpg"].data
    rel = f"{hostile.UNICODE_DIR}/{hostile.UNICODE_NAME}"
    classes = str(hostile.write_classes(tmp_path / "classes.txt"))

    folder = base / "folder"
    (folder / hostile.UNICODE_DIR).mkdir(parents=True)
    (folder / rel).write_bytes(good)
    manifest = base / "manifest dir" / "liste é.csv"
    manifest.parent.mkdir(parents=True)
    (manifest.parent / hostile.UNICODE_NAME).write_bytes(good)
    manifest.write_text(f"image_id,uri\nphoto ü 1,{hostile.UNICODE_NAME}\n", encoding="utf-8")
    coco = _write_coco(base / "coco", images=[{"id": 7, "file_name": rel}],
                       annotations=[{"id": 1, "image_id": 7, "category_id": 3}])
    (coco / "train" / hostile.UNICODE_DIR).mkdir(parents=True)
    (coco / "train" / rel).write_bytes(good)

    cases = (
        (folder, classes, rel, folder / rel, None),
        (manifest, classes, "photo ü 1", manifest.parent / hostile.UNICODE_NAME, None),
        (coco, None, "7", coco / "train" / rel, [2]),
    )
    for uri, vocab, image_id, path, gt in cases:
        index = load_dataset(str(uri), classes_file=vocab)
        assert index.records.to_pylist() == [{"image_id": image_id, "uri": str(path), "gt_labels": gt}]
        assert decode_image(storage.read_bytes(index.records["uri"][0].as_py())).size == (48, 36)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the labeling job on the session Ray cluster with the tiny CLIP


def _check_run(out, cases: dict[str, hostile.Case], summary) -> None:
    labels = pq.read_table(out / schema.LABELS_DIR)
    errors = pq.read_table(out / schema.ERRORS_DIR).to_pylist()
    expected_ok = {i for i, c in cases.items() if c.size is not None}
    expected_bad = {i: c for i, c in cases.items() if c.size is None}
    assert set(labels["image_id"].to_pylist()) == expected_ok and labels.num_rows == len(expected_ok)
    sizes = {r["image_id"]: (r["width"], r["height"]) for r in labels.select(["image_id", "width", "height"]).to_pylist()}
    assert sizes == {i: cases[i].size for i in expected_ok}  # upright: the EXIF-rotated photo is portrait
    assert {r["image_id"] for r in errors} == set(expected_bad) and len(errors) == len(expected_bad)
    for row in errors:
        case = expected_bad[row["image_id"]]
        assert row["stage"] == case.stage, row
        assert case.reason in row["reason"], row
    assert (summary.images, summary.labeled, summary.errors) == (len(cases), len(expected_ok), len(expected_bad))


@pytest.mark.slow
def test_hostile_folder_without_ground_truth(ray_cluster, tiny_clip, tmp_path):
    root = tmp_path / "hostile folder é"
    cases = hostile.write_hostile_folder(root)
    out = tmp_path / "out"
    summary = run_labeling(_labeling(root, out, tiny_clip, classes_file=str(hostile.write_classes(tmp_path / "c.txt"))))
    _check_run(out, cases, summary)
    assert summary.evaluation is None
    labels = pq.read_table(out / schema.LABELS_DIR).to_pylist()
    (exif,) = [r for r in labels if r["image_id"] == "exif_rotated.jpg"]
    assert (exif["width"], exif["height"]) == (40, 64)  # stored 64x40 with EXIF orientation 6
    assert all(r["gt_labels"] is None for r in labels)


@pytest.mark.slow
def test_hostile_coco(ray_cluster, tiny_clip, tmp_path):
    root = tmp_path / "hostile coco"
    cases = hostile.write_hostile_coco(root)
    out = tmp_path / "out"
    summary = run_labeling(_labeling(root, out, tiny_clip, split="train"))
    _check_run(out, cases, summary)
    labels = pq.read_table(out / schema.LABELS_DIR)
    assert all(g == [0] for g in labels["gt_labels"].to_pylist())  # category 1 on every image
    assert summary.evaluation is not None


@pytest.mark.slow
def test_image_ids_cannot_steer_output_paths(ray_cluster, tiny_clip, tmp_path):
    """A manifest's ids and paths are data: ``../../x`` or an absolute path as an id writes nothing outside output."""
    data = tmp_path / "data"
    data.mkdir()
    good = hostile.hostile_images()["good.jpg"].data
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (data / name).write_bytes(good)
    ids = ["../../escaped", f"{tmp_path}/absolute", "..\\..\\windows", "../../" + schema.RUN_CONFIG_FILE]
    manifest = data / "m.csv"
    manifest.write_text("image_id,uri,labels\n" + "".join(f"{i},{u},circle\n" for i, u in
                                                          zip(ids, ("a.jpg", "b.jpg", "c.jpg", "gone.jpg"))))
    classes = str(hostile.write_classes(data / "c.txt"))
    out = tmp_path / "deep" / "er" / "out"
    before = {p for p in tmp_path.rglob("*")}
    summary = run_labeling(_labeling(manifest, out, tiny_clip, classes_file=classes, evaluate=False))
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or out in p.parents or p in out.parents for p in created), sorted(created)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [schema.LABELS_DIR, schema.ERRORS_DIR, schema.CLASSES_FILE, schema.RUN_CONFIG_FILE, schema.SUMMARY_FILE,
         schema.INDEX_DIR, schema.CHECKPOINT_DIR])
    for sub in (schema.LABELS_DIR, schema.ERRORS_DIR, schema.INDEX_DIR, schema.CHECKPOINT_DIR):
        assert all(p.is_file() and p.suffix == ".parquet" and p.parent == out / sub for p in (out / sub).rglob("*"))
    assert sorted(pq.read_table(out / schema.LABELS_DIR)["image_id"].to_pylist()) == sorted(ids[:3])
    (err,) = pq.read_table(out / schema.ERRORS_DIR).to_pylist()
    assert err["image_id"] == ids[3] and err["stage"] == "read" and "gone.jpg" in err["reason"]
    assert (summary.labeled, summary.errors) == (3, 1)


def test_training_and_prediction_decode_share_the_hostile_handling(tmp_path):
    """``decode_resized`` (training and batch prediction) uses the same decoder: same error rows, upright pixels.

    The one difference: a 1×1 image has no K×K snippet grid to fail on here; it is resized like any other.
    """
    import numpy as np

    from cdul_ray.classifier import decode_resized

    cases = hostile.write_hostile_folder(tmp_path)
    names = sorted(cases)
    out = decode_resized({"uri": np.array([str(tmp_path / n) for n in names], dtype=object)}, 16, None)
    for i, name in enumerate(names):
        case = cases[name]
        if case.size is not None or name == "one_pixel.png":
            assert out["error_stage"][i] == "" and out["pixels"][i].any(), name
        else:
            assert out["error_stage"][i] == case.stage and case.reason in out["error_reason"][i], name
            assert not out["pixels"][i].any()
    exif = out["pixels"][names.index("exif_rotated.jpg")]  # (3, 16, 16): upright, the red half on top
    assert exif[0, 2, 8] > 200 and exif[2, 2, 8] < 60 and exif[2, 13, 8] > 200 and exif[0, 13, 8] < 60
