"""The offline benchmark world: determinism, COCO validity, scene structure (cdul_ray.synthetic)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from cdul_ray.synthetic import generate as gen
from cdul_ray.synthetic import world

COUNTS = {"train": 10, "val": 4, "test": 6}


def _make(root: pathlib.Path, seed: int, workers: int = 1) -> pathlib.Path:
    out = gen.generate(root, seed=seed, counts=COUNTS, workers=workers)
    assert out["skipped"] is False
    return root


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> dict[str, pathlib.Path]:
    base = tmp_path_factory.mktemp("synth")
    return {"a": _make(base / "a", 0), "b": _make(base / "b", 0), "c": _make(base / "c", 1)}


def _coco(root: pathlib.Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _pixels(root: pathlib.Path, split: str, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / split / name).convert("RGB"))


def test_same_seed_is_identical(ds):
    for split in gen.SPLITS:
        ja = (ds["a"] / "annotations" / f"instances_{split}.json").read_bytes()
        jb = (ds["b"] / "annotations" / f"instances_{split}.json").read_bytes()
        assert ja == jb
        names = sorted(p.name for p in (ds["a"] / split).iterdir())
        assert names == sorted(p.name for p in (ds["b"] / split).iterdir())
        assert len(names) == COUNTS[split]
        for name in names:
            assert np.array_equal(_pixels(ds["a"], split, name), _pixels(ds["b"], split, name))
    assert (ds["a"] / gen.GENERATION_FILE).read_bytes() == (ds["b"] / gen.GENERATION_FILE).read_bytes()


def test_different_seed_differs(ds):
    for split in gen.SPLITS:
        assert _coco(ds["a"], split)["annotations"] != _coco(ds["c"], split)["annotations"]
        name = _coco(ds["a"], split)["images"][0]["file_name"]
        diff = np.abs(_pixels(ds["a"], split, name).astype(int) - _pixels(ds["c"], split, name).astype(int))
        assert diff.mean() > 10


def test_worker_count_does_not_change_output(ds, tmp_path):
    other = _make(tmp_path / "w2", 0, workers=2)
    for split in gen.SPLITS:
        assert (other / "annotations" / f"instances_{split}.json").read_bytes() == (
            ds["a"] / "annotations" / f"instances_{split}.json").read_bytes()
        for im in _coco(other, split)["images"]:
            assert np.array_equal(_pixels(other, split, im["file_name"]), _pixels(ds["a"], split, im["file_name"]))


def test_coco_layout_and_validity(ds):
    root = ds["a"]
    all_ids: dict[str, set[int]] = {}
    for split in gen.SPLITS:
        coco = _coco(root, split)
        assert set(coco) >= {"images", "annotations", "categories"}
        cats = coco["categories"]
        assert len(cats) >= 10
        assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))
        assert [c["name"] for c in cats] == list(world.CLASS_NAMES)
        assert all("_" not in c["name"] for c in cats)  # natural-language names
        cat_ids = {c["id"] for c in cats}
        images = {im["id"]: im for im in coco["images"]}
        assert len(images) == len(coco["images"]) == COUNTS[split]
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        per_image: dict[int, list[dict]] = {i: [] for i in images}
        for a in coco["annotations"]:
            assert a["category_id"] in cat_ids
            assert a["image_id"] in images
            assert a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            im = images[a["image_id"]]
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert 0 < a["area"] <= w * h * 1.05 + 4  # coverage area fits in its box (anti-aliased fringe aside)
            per_image[a["image_id"]].append(a)
        for iid, im in images.items():
            path = root / split / im["file_name"]
            assert path.is_file()
            with Image.open(path) as f:
                assert f.format == "JPEG"
                assert f.size == (im["width"], im["height"]) == (world.SCENE_SIZE, world.SCENE_SIZE)
            anns = per_image[iid]
            assert 2 <= len(anns) <= 4  # one large + one to three small
            sizes = [a["attributes"]["size"] for a in anns]
            assert sizes.count("large") == 1
            assert all(a["attributes"]["color"] in world.COLOR_NAMES for a in anns)
        all_ids[split] = set(images)
    splits = list(all_ids)
    for i, s in enumerate(splits):
        for t in splits[i + 1:]:
            assert not all_ids[s] & all_ids[t], f"image ids shared by {s} and {t}"
    # Disjoint content too: no scene appears in two splits.
    digests = {}
    for split in gen.SPLITS:
        for p in sorted((root / split).iterdir()):
            key = _pixels(root, split, p.name).tobytes()
            assert key not in digests, f"{split}/{p.name} duplicates {digests[key]}"
            digests[key] = f"{split}/{p.name}"


def test_idempotent_skip_and_refusal(ds, tmp_path):
    root = _make(tmp_path / "r", 3)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = gen.generate(root, seed=3, counts=COUNTS)
    assert again["skipped"] is True
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(FileExistsError):
        gen.generate(root, seed=4, counts=COUNTS)
    replaced = gen.generate(root, seed=4, counts=COUNTS, overwrite=True)
    assert replaced["skipped"] is False and json.loads((root / gen.GENERATION_FILE).read_text())["seed"] == 4
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        gen.generate(foreign, seed=0, counts=COUNTS)


def test_scene_statistics():
    """Over many scenes: object sizes in range, every class and colour used, 1-3 small objects, classes may repeat."""
    n = 150
    side = world.SCENE_SIZE
    labels, colors, n_small, repeats = [], [], [], 0
    for i in range(n):
        img, objects = world.make_scene(world.sample_rng(5, "train", i))
        assert img.size == (side, side)
        large = [o for o in objects if o.large]
        small = [o for o in objects if not o.large]
        assert len(large) == 1 and objects[0].large
        n_small.append(len(small))
        # Tight boxes of a shape whose farthest point is at radius r span between ~r and 2r (x1.1 stretch).
        lo, hi = world.LARGE_DIAMETER_RANGE
        assert 0.45 * lo * side <= max(large[0].bbox[2:]) <= 1.1 * hi * side + 2
        lo, hi = world.SMALL_DIAMETER_RANGE
        for o in small:
            assert 0.45 * lo * side <= max(o.bbox[2:]) <= 1.1 * hi * side + 2
        labels += [o.label for o in objects]
        colors += [o.color for o in objects]
        repeats += len({o.label for o in objects}) < len(objects)
    assert set(labels) == set(range(len(world.CLASS_NAMES)))
    assert set(colors) == set(world.COLOR_NAMES)
    assert set(n_small) == {1, 2, 3}
    assert repeats > 0


def test_classes_are_distinct_shapes():
    """Same pose, different class: the coverage masks must differ substantially (IoU < 0.85)."""
    masks = {}
    for name in world.CLASS_NAMES:
        alpha, _, _ = world.render_alpha(name, 40.0, 40.0, 30.0, 0.3)
        masks[name] = alpha > 0.5
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            inter = np.logical_and(masks[a], masks[b]).sum()
            union = np.logical_or(masks[a], masks[b]).sum()
            assert inter / union < 0.85, (a, b, inter / union)


def test_single_object_sample():
    s = world.single_object(0, 0)
    assert s.image.mode == "RGB"
    assert world.SINGLE_SIZE_RANGE[0] <= s.image.size[0] == s.image.size[1] <= world.SINGLE_SIZE_RANGE[1]
    assert world.CLASS_NAMES[s.label] in s.caption and s.caption in world.all_captions()
    again = world.single_object(0, 0)
    assert np.array_equal(np.asarray(s.image), np.asarray(again.image)) and s.caption == again.caption
    forced = world.make_single_object(world.sample_rng(0, "single", 1), label=7)
    assert forced.label == 7 and world.CLASS_NAMES[7] in forced.caption
    imgs, labels, caps = world.single_object_arrays(0, 0, 3, 64)
    assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == np.uint8
    assert labels[0] == s.label and caps[0] == s.caption
    with pytest.raises(ValueError):
        world.sample_rng(0, "nope", 0)
