"""Bundled model assets: open_clip configs registered under their file stems, and the small synthetic-world CLIP.

``cdul-synth-rn`` is a small CLIP (timm ``test_resnet`` image tower, transformer text tower) trained contrastively
on single-object images of the offline benchmark world (``cdul_ray.synthetic``); see ``MODEL_CARD.md`` next to this file. Regenerate its weights
with ``python -m cdul_ray.synthetic.train_clip --seed 0 --out cdul_ray/models/``.
"""

from __future__ import annotations

import logging
import pathlib

logger = logging.getLogger(__name__)

MODELS_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent

SYNTH_MODEL_NAME = "cdul-synth-rn"
SYNTH_PRETRAINED_TAG = "synth"

# (open_clip model name, pretrained tag) -> local weights file shipped with the package.
BUNDLED_WEIGHTS: dict[tuple[str, str], pathlib.Path] = {
    (SYNTH_MODEL_NAME, SYNTH_PRETRAINED_TAG): MODELS_DIR / "cdul-synth-rn-synth.safetensors",
}

_registered = False


def register_model_configs() -> None:
    """Add ``MODELS_DIR`` to open_clip's model-config registry (idempotent).

    After this, ``open_clip.create_model_and_transforms("cdul-synth-rn", pretrained=str(path))`` and
    ``open_clip.get_tokenizer("cdul-synth-rn")`` work like built-in names.
    """
    global _registered
    import open_clip  # heavy import kept local: importing cdul_ray.models stays cheap

    if _registered and SYNTH_MODEL_NAME in open_clip.list_models():
        return
    open_clip.add_model_config(MODELS_DIR)
    _registered = True
    logger.debug("registered open_clip model configs from %s", MODELS_DIR)
