"""Write the offline benchmark world as a COCO-format multi-label dataset.

Layout (COCO's official one)::

    <root>/
      annotations/instances_train.json   COCO instances: info, licenses, images, annotations, categories
      annotations/instances_val.json
      annotations/instances_test.json
      train/000000000001.jpg ...         scenes of the "train" stream
      val/000001000001.jpg ...
      test/000002000001.jpg ...
      generation.json                    the parameters of this generation (written last: marks it complete)

Scene ``i`` (0-based) of split ``s`` is drawn from ``sample_rng(seed, s, i)`` and gets image id
``SPLIT_ID_BASE[s] + i + 1``, so ids are unique across splits and do not depend on the other splits' sizes.
Annotation ``k`` of image ``id`` has id ``id * 10 + k``; besides COCO's fields it carries
``attributes = {"color": ..., "size": "large" | "small"}``. Category ids are ``1..C`` in ``CLASS_NAMES`` order.

Usage::

    python -m cdul_ray.synthetic.generate --root data/synth --seed 0 [--train N --val N --test N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import time
from dataclasses import asdict, dataclass, field

from cdul_ray.synthetic.world import CLASS_NAMES, COLOR_NAMES, SCENE_SIZE, make_scene, sample_rng

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever world.py or this file changes what gets written
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_ID_BASE: dict[str, int] = {"train": 0, "val": 1_000_000, "test": 2_000_000}
DEFAULT_COUNTS: dict[str, int] = {"train": 2000, "val": 500, "test": 1000}
JPEG_QUALITY = 90
GENERATION_FILE = "generation.json"
_OWNED = {"annotations", GENERATION_FILE, *SPLITS}


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines a generation; stored as ``<root>/generation.json``.

    Attributes:
        seed: generation seed.
        counts: images per split.
        image_size: scene side in pixels.
        jpeg_quality: JPEG quality of the written scenes.
        version: ``GENERATOR_VERSION`` of the code that wrote it.
        classes: class names, category ``k + 1`` is ``classes[k]``.
    """

    seed: int
    counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))
    image_size: int = SCENE_SIZE
    jpeg_quality: int = JPEG_QUALITY
    version: int = GENERATOR_VERSION
    classes: tuple[str, ...] = CLASS_NAMES

    def to_json(self) -> dict:
        """JSON-ready dict (stable key order)."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["counts"] = {s: int(self.counts.get(s, 0)) for s in SPLITS}
        return d


def image_id(split: str, index: int) -> int:
    """COCO image id of scene ``index`` (0-based) of ``split``."""
    return SPLIT_ID_BASE[split] + index + 1


def categories() -> list[dict]:
    """COCO ``categories``: ids ``1..C`` with natural-language names."""
    return [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASS_NAMES)]


def _write_scenes(seed: int, split: str, start: int, stop: int, size: int, quality: int, folder: str) -> tuple[
        list[dict], list[dict]]:
    """Render and write scenes ``start..stop-1`` of ``split``; returns their COCO image and annotation records."""
    images, annotations = [], []
    for i in range(start, stop):
        img, objects = make_scene(sample_rng(seed, split, i), size)
        iid = image_id(split, i)
        name = f"{iid:012d}.jpg"
        img.save(os.path.join(folder, name), format="JPEG", quality=quality)
        images.append({"id": iid, "file_name": name, "width": size, "height": size})
        for k, obj in enumerate(objects):
            x, y, w, h = obj.bbox
            annotations.append({
                "id": iid * 10 + k,
                "image_id": iid,
                "category_id": obj.label + 1,
                "bbox": [x, y, w, h],
                "area": obj.area,
                "iscrowd": 0,
                "attributes": {"color": obj.color, "size": "large" if obj.large else "small"},
            })
    return images, annotations


def _check_root(root: pathlib.Path, params: GenerationParams, overwrite: bool) -> bool:
    """True when ``root`` already holds this generation; raises if it holds something else (unless overwrite)."""
    marker = root / GENERATION_FILE
    if marker.is_file():
        try:
            existing = json.loads(marker.read_text())
        except json.JSONDecodeError:
            existing = None
        if existing == params.to_json():
            return True
        if not overwrite:
            raise FileExistsError(f"{root} holds another generation ({marker}: {existing}); pass overwrite=True "
                                  f"(--overwrite) to replace it")
    elif root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWNED)
        if foreign and not overwrite:
            raise FileExistsError(f"{root} is not empty and holds no {GENERATION_FILE} (found {foreign[:5]}); "
                                  f"pass overwrite=True (--overwrite) to write into it")
    return False


def generate(
    root: str | os.PathLike,
    seed: int = 0,
    counts: dict[str, int] | None = None,
    image_size: int = SCENE_SIZE,
    workers: int = 1,
    overwrite: bool = False,
    chunk: int = 100,
) -> dict:
    """Write (or keep, when already there) the COCO-format synthetic dataset under ``root``.

    Deterministic: the output depends only on ``seed``, ``counts`` and ``image_size`` (not on ``workers``).

    Args:
        root: output folder (created).
        seed: generation seed.
        counts: images per split (missing splits: ``DEFAULT_COUNTS``); 0 writes an empty split.
        image_size: scene side in pixels.
        workers: processes rendering scenes.
        overwrite: replace another generation / write into a non-empty folder.
        chunk: scenes per work item.

    Returns:
        The generation parameters (the content of ``generation.json``) plus ``"skipped": bool``.
    """
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; valid: {list(SPLITS)}")
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"counts must be >= 0, got {counts}")
    if max(counts.values()) > 1_000_000:
        raise ValueError("at most 1,000,000 images per split (image ids are offset per split by 1,000,000)")
    params = GenerationParams(seed=int(seed), counts=counts, image_size=int(image_size))
    root = pathlib.Path(root)
    if _check_root(root, params, overwrite):
        logger.info("%s already holds this generation (seed %d, %s); skipping", root, seed, counts)
        return {**params.to_json(), "skipped": True}

    t0 = time.perf_counter()
    (root / GENERATION_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
        (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)

    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) if workers > 1 else None
    try:
        for split in SPLITS:
            n = counts[split]
            jobs = [(seed, split, a, min(a + chunk, n), params.image_size, params.jpeg_quality, str(root / split))
                    for a in range(0, n, chunk)]
            if pool is None:
                parts = [_write_scenes(*job) for job in jobs]
            else:
                parts = list(pool.map(_write_scenes, *zip(*jobs))) if jobs else []
            coco = {
                "info": {"description": "cdul-ray synthetic multi-label shapes world", "version": str(GENERATOR_VERSION),
                         "seed": int(seed), "split": split},
                "licenses": [],
                "images": [im for p in parts for im in p[0]],
                "annotations": [an for p in parts for an in p[1]],
                "categories": categories(),
            }
            tmp = root / "annotations" / f"instances_{split}.json.tmp"
            tmp.write_text(json.dumps(coco))
            tmp.replace(root / "annotations" / f"instances_{split}.json")
            logger.info("wrote %d %s scenes (%d objects)", n, split, len(coco["annotations"]))
    finally:
        if pool is not None:
            pool.shutdown()
    (root / GENERATION_FILE).write_text(json.dumps(params.to_json(), indent=2) + "\n")
    logger.info("generated %s in %.1fs", root, time.perf_counter() - t0)
    return {**params.to_json(), "skipped": False}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description="Write the synthetic multi-label shapes world as a COCO-format dataset.")
    p.add_argument("--root", type=pathlib.Path, required=True, help="output folder, e.g. data/synth")
    p.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        p.add_argument(f"--{split}", type=int, default=DEFAULT_COUNTS[split], help=f"{split} images (%(default)s)")
    p.add_argument("--image-size", type=int, default=SCENE_SIZE)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="replace another generation in --root")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = generate(args.root, args.seed, {s: getattr(args, s) for s in SPLITS}, args.image_size, args.workers,
                   args.overwrite)
    state = "already present, skipped" if out["skipped"] else "written"
    print(f"{args.root}: {state}; seed {out['seed']}, {out['counts']}, {len(CLASS_NAMES)} classes, "
          f"{len(COLOR_NAMES)} colours")


if __name__ == "__main__":
    main()
