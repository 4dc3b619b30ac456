"""Global view and snippets of one image, preprocessed exactly as open_clip's eval transform does.

The transform is split in two so that the CPU stage ships compact uint8 pixels and the accelerator does the float
work: ``geometric`` (open_clip's resize / center-crop / RGB conversion) on the CPU, ``normalize`` (ToTensor's /255 and
Normalize) on the device. Together they equal ``open_clip.image_transform_v2(cfg, is_train=False)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from cdul_ray.core.alignment import snippet_boxes


def split_eval_transform(preprocess_cfg: Mapping[str, Any]) -> tuple[Callable[[Image.Image], Image.Image], tuple, tuple]:
    """open_clip's eval transform as ``(geometric PIL->PIL transform, mean, std)``.

    Args:
        preprocess_cfg: fields of ``open_clip.transform.PreprocessCfg`` (size, mean, std, interpolation, ...).

    Raises:
        ValueError: open_clip's transform no longer ends with ToTensor + Normalize (a library change to look at).
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose, Normalize

    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    steps = list(transform.transforms)
    if not isinstance(steps[-1], Normalize):
        raise ValueError(f"unexpected open_clip eval transform {transform}; expected it to end with Normalize")
    norm = steps[-1]
    return Compose(steps[:-2]), tuple(norm.mean), tuple(norm.std)


def make_views(image: Image.Image, geometric: Callable[[Image.Image], Image.Image], k: int) -> np.ndarray:
    """The global view followed by the K×K snippets (row-major), each through the geometric transform.

    Args:
        image: decoded image (any mode; converted to RGB).
        geometric: the CPU half of the eval transform (see ``split_eval_transform``).
        k: grid side K.

    Returns:
        [1 + K², 3, H, W] uint8, H×W the model's input size.
    """
    image = image.convert("RGB")
    crops = [image] + [image.crop(box) for box in snippet_boxes(image.width, image.height, k)]
    return np.stack([np.asarray(geometric(c), dtype=np.uint8).transpose(2, 0, 1) for c in crops])  # (1+S, 3, H, W)


def normalize(views: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 views to CLIP input: ``(x / 255 - mean) / std`` per channel.

    Args:
        views: [M, 3, H, W] uint8.
        mean: 3 channel means in [0, 1]. std: 3 channel standard deviations.

    Returns:
        [M, 3, H, W] float32.
    """
    x = views.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
