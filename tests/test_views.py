"""The split eval transform equals open_clip's own preprocess, and views are cut from the snippet grid."""

import numpy as np
import open_clip
import torch
from PIL import Image

from cdul_ray.core.alignment import snippet_boxes
from cdul_ray.core.views import make_views, normalize, split_eval_transform


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
