"""Class activation maps (Zhou et al. 2016) of a few fixed images after each training epoch.

Written by the rank-0 worker to ``<output>/cam/epoch{e:03d}_<image id>.png`` (``schema.CAM_DIR``): the image and the
CAMs of its most probable classes (``Classifier.cam``), with the ground truth when the dataset has it; the panels are
drawn by :func:`cdul_ray.report.render_cam_png`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import torch

from cdul_ray import schema, storage
from cdul_ray.classifier import Classifier, model_input, resize_pixels
from cdul_ray.report import render_cam_png
from cdul_ray.train.config import TrainConfig

logger = logging.getLogger(__name__)


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:]

def cam_inputs(specs: list[dict[str, Any]], cfg: TrainConfig, endpoint: str | None) -> list[dict[str, Any]]:
    """The CAM images (``image_id``, ``uri``, ``gt``) with their resized ``pixels`` [3, S, S] uint8; unreadable ones
    are skipped with a warning."""
    out = []
    for spec in specs:
        image, stage, reason = storage.read_image(spec["uri"], endpoint)
        if image is None:
            logger.warning("CAM image %s skipped (%s: %s)", spec["image_id"], stage, reason)
            continue
        out.append({**spec, "pixels": resize_pixels(image, cfg.image_size)})
    return out


def write_cams(model: Classifier, inputs: list[dict[str, Any]], meta: dict[str, Any], classes: list[str],
                cfg: TrainConfig, epoch: int, device: torch.device, endpoint: str | None) -> None:
    """Render and write the CAMs of ``inputs`` after ``epoch`` (rank 0; the unwrapped model, no collectives)."""
    from cdul_ray.core.label_update import predict_proba

    if not inputs:
        return
    model.eval()
    with torch.inference_mode():
        x = model_input(torch.from_numpy(np.stack([i["pixels"] for i in inputs])), meta, device)  # (K, 3, S, S)
        logits, cams = model.cam(x)  # (K, C), (K, C, h, w)
        probs = predict_proba(logits, cfg.loss).float().cpu().numpy()
    model.train()
    if cams is None:
        logger.warning("backbone %s has no spatial feature map: no CAMs", cfg.backbone)
        return
    cams_np = cams.float().cpu().numpy()
    for k, spec in enumerate(inputs):
        png = render_cam_png(spec["pixels"], cams_np[k], probs[k], classes, spec["gt"],
                             f"epoch {epoch} · {spec['image_id']}")
        name = f"epoch{epoch:03d}_{_safe_name(spec['image_id'])}.png"
        storage.write_bytes(storage.join(cfg.output, schema.CAM_DIR, name), png, endpoint)
