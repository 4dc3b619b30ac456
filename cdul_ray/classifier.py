"""The classifier of CDUL's training and inference stages (paper §3.2-§3.3; method.md §6): its input pipeline, the
network (a backbone + a new C-way linear head, with class activation maps), backbone weights, and the model
directory that training writes and prediction reads.

- Input: :func:`decode_resized` (a Ray Data CPU UDF: read + decode + square resize, uint8) and :func:`model_input`
  (normalisation on the training/inference device).
- Network: :class:`Classifier` over a timm backbone or :class:`OpenClipTrunk` (the convolutional trunk of an
  open_clip ResNet CLIP image tower, ``backbone="open_clip:<name>"``); :func:`create_classifier`, :func:`check_backbone`
  and :func:`resolve_backbone_weights` (ImageNet weights: hub, local cache, file, ``s3://``).
- Model directory (``schema.MODEL_WEIGHTS`` + ``schema.MODEL_META``): :func:`save_model_dir`, :func:`load_model_dir`,
  :func:`resolve_model_dir` (a model dir, a training output or a checkpoint).

Pure torch except the Ray Data UDF's signature; no Ray import.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from cdul_ray import schema, storage
from cdul_ray.config import ConfigError

logger = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "open_clip:"  # backbone = the convolutional trunk of an open_clip ResNet CLIP image tower
# CLIP's (OpenAI) image normalisation, for an open_clip trunk built without weights.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BackboneWeightsError(RuntimeError):
    """ImageNet weights were required (``pretrained_backbone=true``) and cannot be loaded."""


# --------------------------------------------------------------------------------------------------------------------
# Input: read + decode + resize on CPU (Ray Data tasks), normalise on the device

def resize_pixels(image, image_size: int) -> np.ndarray:
    """A PIL image squashed to the square network input (no crop: objects near the border stay in view).

    Returns:
        [3, S, S] uint8, S = ``image_size``.
    """
    from PIL import Image

    resized = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)  # (3, S, S)


def decode_resized(batch: dict[str, np.ndarray], image_size: int, endpoint_override: str | None) -> dict[str, Any]:
    """Ray Data UDF (CPU tasks): index rows -> uint8 pixels of the resized images.

    Input batch: ``uri`` [B] and any other columns (passed through). Output adds ``pixels`` [B, 3, S, S] uint8 (zeros
    on error rows), ``error_stage`` and ``error_reason`` [B] str (``""`` when the image decoded).
    """
    pixels = np.zeros((len(batch["uri"]), 3, image_size, image_size), dtype=np.uint8)  # (B, 3, S, S)
    stages, reasons = [], []
    for i, uri in enumerate(batch["uri"]):
        image, stage, reason = storage.read_image(str(uri), endpoint_override)
        if image is not None:
            pixels[i] = resize_pixels(image, image_size)
        stages.append(stage)
        reasons.append(reason)
    out = dict(batch)
    out["pixels"] = pixels
    out["error_stage"] = np.array(stages, dtype=object)
    out["error_reason"] = np.array(reasons, dtype=object)
    return out


def model_input(pixels: torch.Tensor, meta: dict[str, Any], device: torch.device) -> torch.Tensor:
    """uint8 pixels [B, 3, S, S] -> normalised float32 network input on ``device`` (the backbone's mean/std)."""
    from cdul_ray.core.views import normalize

    return normalize(pixels.to(device, non_blocking=True), tuple(meta["mean"]), tuple(meta["std"]))



# --------------------------------------------------------------------------------------------------------------------
# Classifier


class Classifier(nn.Module):
    """A backbone with global pooling (timm, ``num_classes=0``) and a new C-way linear head.

    ``forward``: images [B, 3, S, S] -> logits [B, C]. ``cam``: logits and class activation maps [B, C, h, w]
    (Zhou et al. 2016: the head's weights applied to the last feature map; for average-pooled CNNs the spatial mean
    of the map equals the logit).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen: batch-norm statistics stay those of the pretrained backbone
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feats = self.backbone(x)  # (B, F)
        return self.head(feats)  # (B, C)

    def cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, C] and CAMs [B, C, h, w] (None for backbones whose features are not a spatial map)."""
        feats = self.backbone.forward_features(x)  # (B, F, h, w) for CNNs
        logits = self.head(self.backbone.forward_head(feats))  # (B, C)
        if feats.ndim != 4:
            return logits, None
        cams = torch.einsum("cf,bfhw->bchw", self.head.weight, feats) + self.head.bias.view(1, -1, 1, 1)
        return logits, cams


class OpenClipTrunk(nn.Module):
    """The convolutional trunk of an open_clip CNN CLIP image tower with global average pooling, so it takes any
    input size and gives exact CAMs: the stem + 4 stages of a ``ModifiedResNet`` (RN50, RN101, ...; CLIP's attention
    pooling dropped) or the timm trunk of a ``TimmModel`` tower (e.g. the bundled ``cdul-synth-rn``; projection
    dropped).

    Same interface as a timm backbone with ``num_classes=0``: ``forward_features`` [B, 3, S, S] -> [B, F, h, w],
    ``forward_head`` -> [B, F], ``forward`` = both, ``num_features`` = F, ``pretrained_cfg`` with mean/std.
    """

    def __init__(self, visual: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if hasattr(visual, "attnpool"):
            visual.attnpool = nn.Identity()  # unused: CLIP's attention pooling is tied to the pretraining input size
        else:
            visual.head = nn.Identity()  # TimmModel: the CLIP projection is not a classifier feature
        self.visual = visual
        self.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std)}
        with torch.no_grad():
            self.num_features = int(self.forward_features(torch.zeros(1, 3, 64, 64)).shape[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if hasattr(v, "trunk"):
            return v.trunk.forward_features(x)  # (B, F, h, w)
        return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # (B, F, h, w)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.mean(dim=(2, 3))  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def open_clip_trunk(name: str, pretrained: str | None, endpoint_override: str | None, cache_dir: str) -> OpenClipTrunk:
    from cdul_ray.clip import create_architecture, load_clip, resolve_weights

    if pretrained is None:  # the architecture only (weights come from a state dict)
        model = create_architecture(name)
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        spec = resolve_weights(name, pretrained, endpoint_override=endpoint_override)
        model, _ = load_clip(spec, "cpu", cache_dir, endpoint_override)
        mean, std = spec.preprocess["mean"], spec.preprocess["std"]
    return OpenClipTrunk(model.visual, mean, std)


def check_backbone(name: str) -> None:
    """Raise ConfigError(``backbone``) unless timm knows ``name`` (or open_clip, for a ResNet CLIP ``open_clip:``)."""
    import timm

    if name.startswith(OPEN_CLIP_PREFIX):
        from cdul_ray.clip import open_clip_module

        model_cfg = open_clip_module().get_model_config(name[len(OPEN_CLIP_PREFIX):])
        vision = (model_cfg or {}).get("vision_cfg", {})
        modified_resnet = isinstance(vision.get("layers"), (list, tuple))
        timm_cnn = bool(vision.get("timm_model_name")) and vision.get("timm_pool", "avg") == "avg"
        if not (modified_resnet or timm_cnn):
            raise ConfigError("backbone", f"{name!r}: not an open_clip CNN CLIP (RN50, RN101, cdul-synth-rn, ...); "
                                          "ViT image towers are not supported as backbones")
        return
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:10]
        raise ConfigError("backbone", f"unknown timm model {name!r}; similar names: {close or 'none'} "
                                      "(all: timm.list_models())")


def _cached_hub_file(hf_hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def resolve_backbone_weights(name: str, pretrained: str, endpoint_override: str | None = None,
                             cache_dir: str = "~/.cache/cdul_ray") -> tuple[str | None, str]:
    """Where the backbone's ImageNet weights come from.

    Args:
        name: timm model name.
        pretrained: ``auto``, ``true``, ``false``, a local weights file, or an ``s3://`` URI (fetched into
            ``cache_dir``).

    Returns:
        ``(source, note)``: source is None (random init), ``"hub"`` (timm downloads them) or a local file; the note
        says what was chosen and why, for the log and model.json.

    Raises:
        ConfigError: a weights file that does not exist.
        BackboneWeightsError: ``true`` and no weights can be had (no pretrained tag, hub unreachable, no cache).
    """
    mode = pretrained.lower()
    if mode == "false":
        return None, "random init (pretrained_backbone=false)"
    if name.startswith(OPEN_CLIP_PREFIX):
        if mode in ("auto", "true"):
            raise ConfigError("pretrained_backbone", f"{name} needs an open_clip pretrained tag (openai, synth, ...), "
                                                     "a weights file or an s3:// URI, or false")
        from cdul_ray.clip import resolve_weights

        resolve_weights(name[len(OPEN_CLIP_PREFIX):], pretrained, endpoint_override=endpoint_override)  # fail fast
        return pretrained, f"open_clip weights {pretrained!r}"
    if mode not in ("auto", "true"):
        if storage.is_s3(pretrained):
            local = os.path.join(os.path.expanduser(cache_dir), "backbones", pretrained[len("s3://"):])
            if not os.path.exists(local):
                if not storage.exists(pretrained, endpoint_override):
                    raise ConfigError("pretrained_backbone", f"{pretrained} does not exist")
                storage.write_bytes(local, storage.read_bytes(pretrained, endpoint_override))
            return local, f"weights file {pretrained}"
        path = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(path):
            raise ConfigError("pretrained_backbone", f"{pretrained!r} is not auto/true/false and no such file exists")
        return path, f"weights file {path}"

    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if cfg is None or not (hub_id or getattr(cfg, "url", None) or getattr(cfg, "file", None)):
        msg = f"timm has no pretrained weights for {name!r}"
        if mode == "true":
            raise BackboneWeightsError(msg)
        logger.warning("%s: training from random init", msg)
        return None, f"random init ({msg})"
    cached = _cached_hub_file(hub_id) if hub_id else None
    if cached:
        return cached, f"ImageNet weights {hub_id} (local cache {cached})"
    from cdul_ray.clip import hub_reachable

    if hub_reachable():
        return "hub", f"ImageNet weights {hub_id or cfg.url} (downloaded by timm)"
    msg = (f"ImageNet weights for {name!r} ({hub_id}) are not cached and the Hugging Face hub is unreachable "
           "(offline?)")
    if mode == "true":
        raise BackboneWeightsError(msg + "; pass a weights file with --pretrained-backbone /path/to/weights")
    logger.warning("%s: training %s from RANDOM INIT; classifier mAP will be much lower. Pass "
                   "--pretrained-backbone /path/to/weights (or s3://...) to use a local copy.", msg, name)
    return None, f"random init ({msg})"


def create_classifier(backbone: str, num_classes: int, weights: str | None = None, freeze_backbone: bool = False,
                      endpoint_override: str | None = None, cache_dir: str = "~/.cache/cdul_ray") -> Classifier:
    """A Classifier over the timm backbone ``backbone`` (or an ``open_clip:`` ResNet CLIP trunk).

    Args:
        weights: None (random init); timm: ``"hub"`` (timm's pretrained download) or a local weights file; open_clip:
            a pretrained tag, file or ``s3://`` URI (see ``resolve_backbone_weights``).
        freeze_backbone: train the head only.

    Raises:
        BackboneWeightsError: the weights could not be loaded.
    """
    import timm

    if backbone.startswith(OPEN_CLIP_PREFIX):
        trunk = open_clip_trunk(backbone[len(OPEN_CLIP_PREFIX):], weights, endpoint_override, cache_dir)
        return Classifier(trunk, num_classes, freeze_backbone)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if weights is not None:
        kwargs["pretrained"] = True
        if weights != "hub":
            kwargs["pretrained_cfg_overlay"] = {"file": weights}
    try:
        net = timm.create_model(backbone, **kwargs)
    except Exception as e:
        if weights is None:
            raise
        raise BackboneWeightsError(f"cannot load weights ({weights}) into {backbone!r}: {e}") from e
    return Classifier(net, num_classes, freeze_backbone)


def normalisation(model: Classifier) -> tuple[list[float], list[float]]:
    """The backbone's input mean/std (ImageNet's for timm's ImageNet models)."""
    cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    return list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))


def save_model_dir(uri: str, model: Classifier, meta: dict[str, Any], endpoint_override: str | None = None) -> None:
    """Write ``model.pt`` (state dict) and ``model.json`` (meta) into a local directory or S3 prefix."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(uri, schema.MODEL_WEIGHTS), buf.getvalue(), endpoint_override)
    storage.write_json(storage.join(uri, schema.MODEL_META), meta, endpoint_override)


def resolve_model_dir(uri: str, endpoint_override: str | None = None) -> str:
    """The directory holding ``model.json`` + ``model.pt`` for a checkpoint, model dir or training output.

    Accepts a checkpoint directory, ``<output>/model``, or a training output (its ``model/``, else its newest
    checkpoint).

    Raises:
        FileNotFoundError: nothing loadable there; the message lists what was tried.
    """
    tried = []
    for cand in (uri, storage.join(uri, schema.MODEL_DIR)):
        tried.append(cand)
        if storage.exists(storage.join(cand, schema.MODEL_META), endpoint_override):
            return cand
    ckpt_root = storage.join(uri, schema.CHECKPOINTS_DIR)
    tried.append(ckpt_root + "/" + schema.CHECKPOINT_PREFIX + "*")
    if storage.exists(ckpt_root, endpoint_override):
        dirs = checkpoint_dirs(ckpt_root, endpoint_override)
        for d in reversed(dirs):
            if storage.exists(storage.join(d, schema.MODEL_META), endpoint_override):
                return d
    raise FileNotFoundError(f"no trained classifier ({schema.MODEL_META} + {schema.MODEL_WEIGHTS}) found; tried {tried}")


def checkpoint_dirs(ckpt_root: str, endpoint_override: str | None = None) -> list[str]:
    """The ``checkpoint_epoch*`` directories of a Ray Train run directory, oldest first."""
    names = [n for n in storage.list_dirs(ckpt_root, endpoint_override) if n.startswith(schema.CHECKPOINT_PREFIX)]
    return [storage.join(ckpt_root, n) for n in names]


def load_model_dir(uri: str, device: torch.device | str = "cpu",
                   endpoint_override: str | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Load a classifier saved by training (see ``resolve_model_dir`` for what ``uri`` may be).

    Returns:
        The model in eval mode on ``device`` and its meta (``classes``, ``image_size``, ``loss``, ``mean``, ``std``...).
    """
    folder = resolve_model_dir(uri, endpoint_override)
    meta = storage.read_json(storage.join(folder, schema.MODEL_META), endpoint_override)
    model = create_classifier(meta["backbone"], len(meta["classes"]))
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, schema.MODEL_WEIGHTS), endpoint_override)),
                       map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
