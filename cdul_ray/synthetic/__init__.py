"""Offline benchmark world: a seeded generator of single-object images and multi-object COCO-format scenes.

``world`` draws the images (pure PIL/NumPy); ``generate`` writes the COCO-format dataset; ``train_clip`` trains
the small CLIP bundled in ``cdul_ray/models``; ``zero_shot`` measures it on held-out single objects.
"""

from cdul_ray.synthetic.world import CLASS_NAMES, COLOR_NAMES, make_scene, make_single_object, sample_rng, single_object

__all__ = ["CLASS_NAMES", "COLOR_NAMES", "make_scene", "make_single_object", "sample_rng", "single_object"]
