"""Shared pieces of the labeling speed benchmarks (bench/label_efficiency.py, bench/label_scaling.py).

Three ways to compute the same CDUL scores (global view + K×K snippets through CLIP) on the same images and model:

- ``bare``: every view preprocessed in memory first (uint8, the exact open_clip transform), then only the batched
  normalise + forward + alignment is timed: the speed of the model itself on this machine.
- ``loop``: the plain per-image loop a user would write: open the image, open_clip's own preprocess, one forward for
  the global view and one for its K² snippets. Decoding and resizing included.
- ``pipeline``: ``run_labeling`` (Ray Data, the product). Its steady state is ``(n2 - n1) / (t2 - t1)`` over two run
  sizes, so Ray start-up, model loading and text embeddings cancel.

The machine these run on may be shared: every number is recorded with the 1-minute load average next to it, and the
things compared are measured in the same process, interleaved. Read the ratios.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = None  # filled from the dataset


def load_average() -> float:
    """1-minute load average of the machine (what `uptime` prints first)."""
    return round(os.getloadavg()[0], 1)


def dataset(cache: str, images: int, image_size: int) -> str:
    """A COCO-format synthetic dataset with ``images`` train scenes of ``image_size`` px (generated once, cached)."""
    from cdul_ray.synthetic.generate import generate

    root = Path(cache) / f"synth-{images}-{image_size}px"
    generate(root, seed=0, counts={"train": images, "val": 0, "test": 0}, image_size=image_size,
             workers=os.cpu_count() or 1)
    return str(root)


def image_paths(root: str, n: int) -> list[str]:
    """The first ``n`` images of the dataset, in the order ``run_labeling --limit n`` takes them."""
    from cdul_ray.datasets import load_dataset

    index = load_dataset(root, "coco", "train", None, None, n)
    return [str(u) for u in index.records["uri"].to_pylist()]


def class_names(root: str) -> list[str]:
    from cdul_ray.datasets import load_dataset

    return list(load_dataset(root, "coco", "train", None, None, 1).classes)


class Model:
    """A CLIP model, its class text embeddings and preprocessing, loaded once in this process."""

    def __init__(self, model: str, pretrained: str, classes: list[str], precision: str = "fp32"):
        import torch

        from cdul_ray.clip import load_clip, resolve_weights, view_size
        from cdul_ray.core.alignment import DEFAULT_TEMPLATES, class_text_embeddings
        from cdul_ray.core.views import split_eval_transform

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.spec = resolve_weights(model, pretrained)
        self.model, tokenizer = load_clip(self.spec, self.device)
        self.geometric, self.mean, self.std = split_eval_transform(self.spec.preprocess)
        with torch.inference_mode():
            self.text = class_text_embeddings(self.model.encode_text, tokenizer, classes, DEFAULT_TEMPLATES,
                                              self.device)
        self.autocast = precision == "amp" and self.device.type == "cuda"
        self.size = view_size(self.spec.preprocess)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def scores(self, x):
        """Normalised views [M, 3, H, W] float on the device -> alignment probabilities [M, C]."""
        from cdul_ray.core.alignment import alignment_scores

        torch = self.torch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            feats = self.model.encode_image(x)
        return alignment_scores(feats, self.text, self.model.logit_scale)

    def flops_per_view(self) -> float:
        """Image-tower FLOPs of one view (torch's FlopCounterMode: 2 per multiply-accumulate)."""
        torch = self.torch
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, *self.size, device=self.device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self.model.encode_image(x)
        return float(counter.get_total_flops())


def preprocess_views(m: Model, paths: list[str], grid: int) -> np.ndarray:
    """[N, 1+K², 3, H, W] uint8: every view of every image, exact open_clip transform (not timed)."""
    from PIL import Image

    from cdul_ray.core.views import make_views

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(make_views(im, m.geometric, grid))
    return np.stack(out)


def bare_forward(m: Model, views: np.ndarray, batch_size: int) -> float:
    """Seconds for normalise + forward + alignment of preprocessed uint8 views, ``batch_size`` images per batch."""
    from cdul_ray.core.views import normalize

    torch = m.torch
    with torch.inference_mode():
        dev = torch.from_numpy(views).to(m.device)  # (N, 1+S, 3, H, W) uint8, resident before timing
        m.scores(normalize(dev[:1].flatten(0, 1), m.mean, m.std))  # warm-up (allocator, kernels)
        m.sync()
        start = time.perf_counter()
        for i in range(0, len(dev), batch_size):
            m.scores(normalize(dev[i:i + batch_size].flatten(0, 1), m.mean, m.std)).cpu()
        m.sync()
        return time.perf_counter() - start


def per_image_loop(m: Model, paths: list[str], grid: int) -> float:
    """Seconds for the plain loop: open, open_clip preprocess, one forward for the global view, one for the snippets."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from cdul_ray.core.alignment import snippet_boxes

    torch = m.torch
    preprocess = image_transform_v2(PreprocessCfg(**m.spec.preprocess), is_train=False)
    start = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            with Image.open(p) as im:
                im = im.convert("RGB")
                g = preprocess(im)[None].to(m.device)
                s = torch.stack([preprocess(im.crop(b)) for b in snippet_boxes(im.width, im.height, grid)])
                m.scores(g).cpu()
                m.scores(s.to(m.device)).cpu()
    m.sync()
    return time.perf_counter() - start


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False


def pipeline_seconds(root: str, n: int, **overrides: Any) -> tuple[float, float]:
    """One ``run_labeling`` over the first ``n`` images into a fresh output (no evaluation).

    Returns:
        (wall seconds, in-run images/s): the second is measured between the first and the last output file written
        (``rows_per_file`` defaults to n / 8 here), so Ray start-up and model loading are left out within one run.
    """
    import pyarrow.parquet as pq

    from cdul_ray.config import LabelConfig
    from cdul_ray.pipeline import run_labeling

    overrides.setdefault("rows_per_file", max(1, n // 8))
    with tempfile.TemporaryDirectory() as out:
        cfg = LabelConfig(dataset=root, format="coco", split="train", output=out, limit=n, evaluate=False, **overrides)
        start = time.perf_counter()
        summary = run_labeling(cfg)
        seconds = time.perf_counter() - start
        files = sorted((f.stat().st_mtime, pq.ParquetFile(f).metadata.num_rows)
                       for f in Path(out, "labels").glob("*.parquet"))
    if summary.labeled != n:
        raise RuntimeError(f"pipeline labeled {summary.labeled} of {n} images ({summary.errors} errors)")
    span = files[-1][0] - files[0][0] if len(files) > 1 else 0.0
    in_run = sum(rows for _, rows in files[1:]) / span if span > 0 else float("nan")
    return seconds, in_run


def steady_state(root: str, sizes: tuple[int, int], **overrides: Any) -> dict[str, Any]:
    """Pipeline steady-state images/s from two run sizes, (n2 - n1) / (t2 - t1) (the issue's definition), and within
    the larger run between its first and last output file (``in_run_images_per_second``, less noisy under load)."""
    n1, n2 = sizes
    l1 = load_average()
    t1, _ = pipeline_seconds(root, n1, **overrides)
    l2 = load_average()
    t2, in_run = pipeline_seconds(root, n2, **overrides)
    return {"n1": n1, "t1": round(t1, 2), "n2": n2, "t2": round(t2, 2), "load": [l1, l2, load_average()],
            "images_per_second": round((n2 - n1) / (t2 - t1), 2) if t2 > t1 else None,  # None: noise > work
            "in_run_images_per_second": round(in_run, 2) if in_run == in_run else None}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) + " |")


@contextlib.contextmanager
def quiet_logs():
    import logging

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        logging.getLogger().setLevel(level)


def parser(doc: str, sizes: tuple[int, int] | None = None):
    """The arguments every labeling bench takes: --model, --pretrained, and the two pipeline run sizes."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="cdul-synth-rn")
    p.add_argument("--pretrained", default="synth")
    if sizes:
        p.add_argument("--sizes", type=int, nargs=2, default=list(sizes), help="the two pipeline run sizes n1 < n2")
    return p


def emit(result: dict[str, Any], path: str | None) -> int:
    """Print ``result`` as one JSON line and write it to ``path`` when given; returns the exit code 0."""
    import json

    print(json.dumps(result))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return 0
