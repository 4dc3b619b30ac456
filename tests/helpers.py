"""Test builders: a tiny open_clip model on disk and small COCO-format datasets with planted bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}

CLASSES = ["circle", "square", "triangle", "star"]


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random-init tiny open_clip CLIP in ``local-dir:`` layout (open_clip_config.json + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "open_clip_config.json"
    cfg_path.write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def write_coco(root: Path, n_images: int = 10, split: str = "train", seed: int = 0, corrupt: bool = True,
               missing: bool = True) -> dict:
    """A small COCO-format dataset. Adds one corrupt JPEG and one image listed but absent, when asked.

    Returns:
        {"ok": [image ids that decode], "corrupt": id or None, "missing": id or None}
    """
    rng = np.random.default_rng(seed)
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns, ok = [], [], []
    for i in range(n_images):
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        name = f"{i:012d}.jpg"
        Image.fromarray(arr).save(img_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for c in sorted(set(rng.integers(1, len(CLASSES) + 1, size=int(rng.integers(1, 3))).tolist())):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [0, 0, 5, 5], "area": 25,
                         "iscrowd": 0})
        ok.append(str(i + 1))
    corrupt_id = missing_id = None
    if corrupt:
        corrupt_id = str(n_images + 1)
        (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        images.append({"id": n_images + 1, "file_name": "corrupt.jpg", "width": 10, "height": 10})
        anns.append({"id": len(anns) + 1, "image_id": n_images + 1, "category_id": 1, "bbox": [0, 0, 1, 1],
                     "area": 1, "iscrowd": 0})
    if missing:
        missing_id = str(n_images + 2)
        images.append({"id": n_images + 2, "file_name": "missing.jpg", "width": 10, "height": 10})
    cats = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return {"ok": ok, "corrupt": corrupt_id, "missing": missing_id}


# One colour per class of CLASSES: a shapes image shows a filled square of the colour of each class present.
SHAPE_COLOURS = ((220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 220, 40))


def write_coco_shapes(root: Path, splits: dict[str, int], size: int = 48, seed: int = 0,
                      corrupt_split: str | None = None) -> dict:
    """A learnable multi-label COCO-format dataset with several splits (``instances_<split>.json`` each).

    Every image is grey noise with 1-2 coloured squares; class c is present iff a square of SHAPE_COLOURS[c] is, so a
    tiny CNN learns it in a few epochs. Image ids are unique across splits.

    Args:
        splits: split name -> number of good images, e.g. {"train": 24, "test": 12}.
        corrupt_split: add one corrupt JPEG (listed in the annotations) to this split.

    Returns:
        {split: {"ok": [image ids], "gt": {image id: [class indices]}, "corrupt": id or None}}
    """
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    out: dict = {}
    next_id = 1
    for split, n_images in splits.items():
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns, ok, gt = [], [], [], {}
        for _ in range(n_images):
            image_id = next_id
            next_id += 1
            arr = rng.integers(90, 150, size=(size, size, 3), dtype=np.uint8)
            present = sorted(rng.choice(len(CLASSES), size=int(rng.integers(1, 3)), replace=False).tolist())
            side = size // 3
            for c in present:
                x, y = (int(v) for v in rng.integers(0, size - side, size=2))
                arr[y:y + side, x:x + side] = SHAPE_COLOURS[c]
            name = f"{image_id:012d}.jpg"
            Image.fromarray(arr).save(img_dir / name, quality=95)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for c in present:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c + 1,
                             "bbox": [0, 0, side, side], "area": side * side, "iscrowd": 0})
            ok.append(str(image_id))
            gt[str(image_id)] = present
        corrupt_id = None
        if split == corrupt_split:
            corrupt_id = str(next_id)
            next_id += 1
            (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
            images.append({"id": int(corrupt_id), "file_name": "corrupt.jpg", "width": 10, "height": 10})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
        out[split] = {"ok": ok, "gt": gt, "corrupt": corrupt_id}
    return out



def folder_label_config(dataset, output, clip, classes, **overrides):
    """A LabelConfig for a folder without ground truth labeled by the tiny CLIP: small batches and output files, so
    rows reach disk (and checkpoints commit) many times per run."""
    from cdul_ray.config import LabelConfig

    base = dict(dataset=str(dataset), output=str(output), format="folder", classes_file=str(classes),
                model=f"local-dir:{clip}", pretrained="none", batch_size=4, decode_batch_size=4, rows_per_file=4,
                max_actors=1)
    base.update(overrides)
    return LabelConfig(**base)


def output_ids(out: Path, sub: str) -> list[str]:
    """Every ``image_id`` in the Parquet files of ``<out>/<sub>/`` (``[]`` when the folder does not exist)."""
    import pyarrow.parquet as pq

    files = sorted((out / sub).glob("*.parquet")) if (out / sub).exists() else []
    return [i for f in files for i in pq.read_table(f, columns=["image_id"])["image_id"].to_pylist()]


def committed_count(out: Path) -> int:
    """Image ids committed by a streamed run so far (Ray's checkpoint; a data file may be half-written until then)."""
    from cdul_ray.batch_inference import committed_ids

    return len(committed_ids(str(out), None))
