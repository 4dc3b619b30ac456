"""The split eval transform equals open_clip's own preprocess, and views are cut from the snippet grid."""

import numpy as np
import open_clip
import torch
from PIL import Image

from cdul_ray.core.alignment import snippet_boxes
from cdul_ray.core.views import cut_views, make_views, normalize, split_eval_transform


def test_split_transform_equals_open_clip_preprocess(tiny_clip):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip}", load_weights=False)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (57, 83, 3), dtype=np.uint8))
    geometric, mean, std = split_eval_transform(open_clip.get_model_preprocess_cfg(model))
    views = make_views(image, geometric, k=3)
    assert views.shape == (10, 3, 32, 32) and views.dtype == np.uint8
    ours = normalize(torch.from_numpy(views), mean, std)
    torch.testing.assert_close(ours[0], preprocess(image), rtol=0, atol=1e-6)
    box = snippet_boxes(83, 57, 3)[4]
    torch.testing.assert_close(ours[5], preprocess(image.crop(box)), rtol=0, atol=1e-6)


def test_device_views_match_exact_views_within_a_few_grey_levels(tiny_clip):
    model = open_clip.create_model(f"local-dir:{tiny_clip}", load_weights=False)
    geometric, _, _ = split_eval_transform(open_clip.get_model_preprocess_cfg(model))
    rng = np.random.default_rng(1)
    # smooth images (like photos): a bicubic resize of noise amplifies the two libraries' rounding differences
    images = []
    for h, w in ((57, 83), (57, 83), (120, 64)):
        small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    exact = np.stack([make_views(im, geometric, k=3) for im in images])  # (3, 10, 3, 32, 32)
    raw = [make_views(im, None, k=3) for im in images]
    assert raw[2].shape == (3, 120, 64) and raw[2].dtype == np.uint8
    device = cut_views([torch.from_numpy(r.copy()) for r in raw], geometric, k=3).numpy()
    assert device.shape == exact.shape and device.dtype == np.uint8
    diff = np.abs(device.astype(int) - exact.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    # each view is in its own place: view v of image n differs from every other view far more than from its twin
    assert np.abs(device[0, 5].astype(int) - exact[0, 4].astype(int)).mean() > 5 * diff.mean()


def test_uncut_image_is_refused_when_smaller_than_the_grid():
    import pytest

    image = Image.new("RGB", (2, 9))
    with pytest.raises(ValueError, match="too small"):
        make_views(image, None, k=3)
