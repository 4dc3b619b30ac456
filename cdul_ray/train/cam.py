"""Class activation maps (Zhou et al. 2016) of a few fixed images after each training epoch.

Written by the rank-0 worker to ``<output>/cam/epoch{e:03d}_<image id>.png`` (``schema.CAM_DIR``): the image and the
CAMs of its most probable classes (``Classifier.cam``), with the ground truth when the dataset has it.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import numpy as np
import torch

from cdul_ray import schema, storage
from cdul_ray.classifier import Classifier, model_input, resize_pixels
from cdul_ray.train.config import TrainConfig

logger = logging.getLogger(__name__)


def render_cam_png(pixels: np.ndarray, cams: np.ndarray, probs: np.ndarray, classes: list[str],
                   gt: list[int] | None, title: str, top_k: int = 3) -> bytes:
    """One image and the CAMs of its ``top_k`` most probable classes, as PNG bytes.

    Args:
        pixels: [3, S, S] uint8 network input (before normalisation).
        cams: [C, h, w] class activation maps (logit units).
        probs: [C] predicted probabilities in [0, 1].
        gt: ground-truth class indices, or None; marked "(gt)" in the panel titles.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = pixels.transpose(1, 2, 0)  # (S, S, 3)
    size = image.shape[0]
    order = np.argsort(-probs)[:top_k]
    fig = Figure(figsize=(2.6 * (len(order) + 1), 3.2), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(order) + 1, squeeze=False)[0]
    gt_names = [classes[i] for i in (gt or [])]
    axes[0].imshow(image)
    axes[0].set_title(f"{title}\ngt: {', '.join(gt_names) if gt is not None else 'n/a'}", fontsize=7)
    for ax, c in zip(axes[1:], order):
        cam = torch.from_numpy(cams[c][None, None].astype(np.float32))
        up = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        up = up.numpy()
        up = (up - up.min()) / (up.max() - up.min() + 1e-8)  # [0, 1]
        ax.imshow(image)
        ax.imshow(up, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        mark = " (gt)" if gt is not None and c in gt else ""
        ax.set_title(f"{classes[c]}{mark}\np={probs[c]:.2f}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout(pad=1.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
