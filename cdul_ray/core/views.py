"""Global view and snippets of one image, preprocessed as open_clip's eval transform does.

The transform is split in two so that the CPU stage ships compact uint8 pixels and the accelerator does the float
work: ``geometric`` (open_clip's resize / center-crop / RGB conversion) on the CPU, ``normalize`` (ToTensor's /255 and
Normalize) on the device. Together they equal ``open_clip.image_transform_v2(cfg, is_train=False)`` bit for bit
(``make_views``, the *exact* views).

*Device* views (``cut_views``): the same geometric transform applied by torchvision to uint8 tensors, where the
image already is (the CLIP actor's GPU). The CPU stage then ships each decoded image once instead of 1 + K² resized
views, and the resizes leave the CPU. torchvision's antialiased tensor resize is close to PIL's but not bit-exact
(a few grey levels on some pixels); docs/performance.md records the pseudo-label mAP difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def make_views(image: Image.Image, geometric: Callable[[Image.Image], Image.Image] | None, k: int) -> np.ndarray:
    """The global view followed by the K×K snippets (row-major), each through the geometric transform.

    Args:
        image: decoded image (any mode; converted to RGB).
        geometric: the CPU half of the eval transform (see ``split_eval_transform``); ``None`` for device views:
            the image is returned whole, uncut, for ``cut_views`` on the CLIP actor.
        k: grid side K.

    Returns:
        [1 + K², 3, H, W] uint8, H×W the model's input size; with ``geometric=None``, [3, height, width] uint8.

    Raises:
        ValueError: the image is smaller than K pixels on a side (``snippet_boxes``), with either ``geometric``.
    """
    image = image.convert("RGB")
    if geometric is None:
        snippet_boxes(image.width, image.height, k)  # the same refusal as the exact path, before shipping pixels
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # (3, height, width)
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


def cut_views(images: Sequence[torch.Tensor], geometric: Callable[[torch.Tensor], torch.Tensor], k: int) -> torch.Tensor:
    """Device views: the global view and K×K snippets of each image, cut and resized with torch where the images are.

    Same boxes (``snippet_boxes``) and the same open_clip geometric transform as ``make_views``, applied by
    torchvision to tensors: crops of equal size (most snippets of an image, every view of equal-sized images) are
    resized together in one call.

    Args:
        images: N decoded images, each [3, height_i, width_i] uint8, on one device.
        geometric: the geometric half of the eval transform (``split_eval_transform``), tensor-capable.
        k: grid side K.

    Returns:
        [N, 1 + K², 3, H, W] uint8 on the images' device, H×W the model's input size.

    Raises:
        ValueError: an image is smaller than K pixels on a side.
    """
    crops: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
    for n, img in enumerate(images):
        _, h, w = img.shape
        boxes = [(0, 0, w, h)] + snippet_boxes(w, h, k)
        for v, (left, upper, right, lower) in enumerate(boxes):
            crops.setdefault((lower - upper, right - left), []).append((n, v, img[:, upper:lower, left:right]))
    out = None
    for group in crops.values():
        resized = geometric(torch.stack([c for _, _, c in group]))  # (M, 3, H, W) uint8
        if out is None:
            out = resized.new_empty((len(images), 1 + k * k, *resized.shape[1:]))
        n_idx = torch.tensor([n for n, _, _ in group], device=resized.device)
        v_idx = torch.tensor([v for _, v, _ in group], device=resized.device)
        out[n_idx, v_idx] = resized
    if out is None:
        raise ValueError("cut_views needs at least one image")
    return out
