"""Gradient-alignment classifier training on Ray Train (paper §3.2; docs/method.md §6).

A classifier (a timm backbone, ResNet-50 by default, with a new C-way linear head) learns from the latent labels Y
while, in label-update epochs, the labels of every batch move along the loss gradient
(:mod:`cdul_ray.core.label_update`). ``TorchTrainer`` runs the loop data-parallel (DDP) on ``workers`` processes; Ray
Data streams the images through a CPU decode/resize stage into ``get_dataset_shard("train").iter_torch_batches``.

Output directory (local path or ``s3://`` URI)::

    <output>/
      run_config.json          the effective TrainConfig (a resubmission with the same output resumes; see below)
      classes.json             {"classes": [...]}, the labeling run's class order
      labels/v0000/            initial latent labels Y0 = the labeling run's soft_label (LATENT_LABELS_SCHEMA)
      labels/v{e:04d}/         latent labels after epoch e: exactly one row per training image, written by the
                               workers (part-{rank}.parquet: the rows each processed; part-carry.parquet: rows no
                               worker saw in that epoch, carried over unchanged)
      checkpoints/             Ray Train run directory: checkpoint_epoch{e:04d}/ (model.pt, optimizer.pt, model.json,
                               state.json) and Ray's checkpoint_manager_snapshot.json
      history.csv              one row per epoch (epoch 0 = the initial labels): loss, eval mAP, label mAP, ...
      cam/epoch{e:03d}_<id>.png class activation maps of a few fixed images after each epoch
      errors/*.parquet         ERRORS_SCHEMA: training images without a pseudo label (the labeling run's errors,
                               reused) and images that failed to decode during training or evaluation
      model/                   the final classifier (model.pt + model.json), input of ``cdul predict``
      summary.json             what the run did

Resume: every epoch ends with ``ray.train.report(metrics, checkpoint=...)``. Ray Train keeps a snapshot of the
reported checkpoints in ``<output>/checkpoints``; a run with the same output (a worker crash retried through
``max_failures``, or the same command submitted again) gets the latest one from ``ray.train.get_checkpoint()`` and
continues at the next epoch with the model, optimizer, history and label version of that checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import posixpath
import re
import socket
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from cdul_ray import schema, storage
from cdul_ray.config import ConfigError, _f, check_output_location, to_dict
from cdul_ray.core.label_update import LOSSES, PSI

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # RunConfig(name=...) under <output>
HISTORY_FILE = "history.csv"
CAM_DIR = "cam"
MODEL_DIR = "model"
MODEL_WEIGHTS = "model.pt"  # state dict of Classifier
MODEL_META = "model.json"  # backbone, classes, image size, loss, normalisation
OPTIMIZER_STATE = "optimizer.pt"
TRAIN_STATE = "state.json"  # epoch, label version, history
CHECKPOINT_PREFIX = "checkpoint_epoch"
# Test-only crash hook: the rank-0 worker raises after reporting the checkpoint of this epoch (when it trained that
# epoch itself), so tests can kill a run after an epoch and check that a resubmission resumes. Not for production.
CRASH_ENV = "CDUL_TEST_CRASH_AFTER_EPOCH"

HISTORY_COLUMNS = (
    "epoch",  # 0 = the initial labels, before training
    "label_version",  # the labels/v{...} written at the end of the epoch
    "label_updated",  # 1 if the epoch updated the labels (method.md §6 schedule)
    "train_loss",  # mean network loss over the epoch's training images
    "eval_map",  # classifier mAP (%) on eval_split (NaN without one)
    "label_map",  # mAP (%) of the latent labels against the training ground truth (NaN without one)
    "label_change",  # mean |Y_e - Y_{e-1}| over all training images and classes
    "images",  # training images processed in the epoch (all workers)
    "seconds",  # wall time of the epoch
)

# Fields that may change when a run is resumed (same output); any other difference is refused.
RESUME_MUTABLE = frozenset(
    {"epochs", "workers", "use_gpu", "cpus_per_worker", "decode_batch_size", "max_failures", "keep_checkpoints",
     "s3_endpoint", "cache_dir", "overwrite", "cam_images"}
)

SMOKE_BACKBONE = "test_resnet"  # timm's ~0.4 M-parameter test ResNet
OPEN_CLIP_PREFIX = "open_clip:"  # backbone = the convolutional trunk of an open_clip ResNet CLIP image tower
SMOKE_IMAGES = 16


class OutputExistsError(FileExistsError):
    """The output directory holds something other than a compatible training run and ``overwrite`` is off."""


class BackboneWeightsError(RuntimeError):
    """ImageNet weights were required (``pretrained_backbone=true``) and cannot be loaded."""


# --------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TrainConfig:
    """Config of gradient-alignment training (method.md §6)."""

    labels: str = _f("", "output directory of a labeling run (labels/ + classes.json): local path or s3:// URI",
                     required=True)
    dataset: str = _f("", "dataset root or manifest holding the training (and held-out) images", required=True)
    output: str = _f("", "output directory: local path or s3:// URI (an existing training run there is resumed)",
                     required=True)
    format: str = _f("auto", "dataset format: auto, coco, voc, nuswide, folder, manifest")
    split: str | None = _f(None, "training split (default: the split of the labeling run)")
    eval_split: str | None = _f(None, "held-out split with ground truth for the per-epoch classifier mAP, e.g. test")
    backbone: str = _f("resnet50", "timm model name (resnet50, resnet18, convnext_tiny, ...), or open_clip:<name> "
                       "for the trunk of a ResNet CLIP image tower (open_clip:RN50, open_clip:cdul-synth-rn)")
    pretrained_backbone: str = _f("auto", "timm: auto (ImageNet weights when reachable or cached, else random init "
                                  "with a warning), true (required), false (random init), or a weights file / s3:// "
                                  "URI; open_clip: a pretrained tag (openai, synth), file or s3:// URI, or false")
    freeze_backbone: bool = _f(False, "train only the new head on the backbone's frozen features (a linear probe; "
                               "much cheaper, e.g. on CPU)")
    image_size: int = _f(224, "side of the square network input (images are resized, not cropped)")
    epochs: int = _f(10, "training epochs (raise it on resume to train further)")
    batch_size: int = _f(32, "global batch size, split evenly over the workers")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    loss: str = _f("bce", "loss on soft targets: bce (sigmoid outputs) or kl (softmax outputs)")
    label_update: bool = _f(True, "update the latent labels along the loss gradient (off: train on fixed labels)")
    label_lr: float = _f(0.1, "label step size eta of z <- z - eta * psi(Y) * dD/dY")
    label_update_every: int = _f(1, "update the labels every k-th epoch after the warm-up")
    label_warmup_epochs: int = _f(1, "epochs of network-only training before the first label update")
    psi: str = _f("one", "psi(Y) of the label step: one (psi = 1) or sigmoid_grad (psi = Y(1 - Y))")
    hflip: bool = _f(True, "random horizontal flips of training images (seeded per image and epoch)")
    workers: int = _f(1, "data-parallel training workers (one GPU each with --use-gpu)")
    use_gpu: bool = _f(False, "one GPU per worker")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per training worker")
    decode_batch_size: int = _f(16, "images per CPU decode/resize task")
    cache_decoded: str = _f("auto", "decode + resize once and keep the uint8 images in the Ray object store instead "
                            "of decoding every epoch: true, false, or auto (when they take <= 1/4 of it)")
    seed: int = _f(0, "seed of the initial head, data order, flips and shuffles")
    cam_images: int = _f(4, "class activation maps of this many fixed images after each epoch (0: none)")
    limit: int | None = _f(None, "use only the first N images of each split")
    max_failures: int = _f(1, "times Ray Train restarts from the last checkpoint after a worker failure (-1: always)")
    keep_checkpoints: int = _f(2, "checkpoints kept (the newest ones)")
    s3_endpoint: str | None = _f(None, "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS itself)")
    cache_dir: str = _f("~/.cache/cdul_ray", "per-node cache for backbone weights fetched from S3")
    overwrite: bool = _f(False, "replace an existing output directory instead of resuming or failing")
    smoke_test: bool = _f(False, f"a few images ({SMOKE_IMAGES}), the tiny {SMOKE_BACKBONE} backbone, 2 epochs, CPU")

    def validate(self) -> "TrainConfig":
        """Check every field; returns self. Raises ConfigError naming the first bad field."""
        from cdul_ray.datasets import FORMATS

        for name in ("labels", "dataset", "output"):
            if not getattr(self, name):
                raise ConfigError(name, "is required")
        check_output_location("output", self.output)
        if self.format not in FORMATS:
            raise ConfigError("format", f"{self.format!r} is not one of {FORMATS}")
        if not self.backbone:
            raise ConfigError("backbone", "is required (a timm model name such as resnet50)")
        if not self.pretrained_backbone:
            raise ConfigError("pretrained_backbone", "must be auto, true, false or a weights file")
        for name, low in (("image_size", 16), ("epochs", 1), ("batch_size", 1), ("label_update_every", 1),
                          ("workers", 1), ("decode_batch_size", 1), ("keep_checkpoints", 1)):
            if getattr(self, name) < low:
                raise ConfigError(name, f"must be >= {low}, got {getattr(self, name)}")
        for name in ("label_warmup_epochs", "seed", "cam_images", "weight_decay", "label_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.batch_size < self.workers:
            raise ConfigError("batch_size", f"the global batch ({self.batch_size}) must be >= workers ({self.workers})")
        if self.loss not in LOSSES:
            raise ConfigError("loss", f"{self.loss!r} is not one of {LOSSES}")
        if self.psi not in PSI:
            raise ConfigError("psi", f"{self.psi!r} is not one of {PSI}")
        if not self.cpus_per_worker > 0:
            raise ConfigError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be >= 1, got {self.limit}")
        if self.cache_decoded not in ("auto", "true", "false"):
            raise ConfigError("cache_decoded", f"must be auto, true or false, got {self.cache_decoded!r}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", f"must be >= -1, got {self.max_failures}")
        if self.eval_split is not None and self.eval_split == self.split:
            logger.warning("eval_split == split (%s): the 'held-out' mAP is measured on the training images",
                           self.split)
        return self

    def effective(self) -> "TrainConfig":
        """The config actually run: ``smoke_test`` shrinks it to a few images, a tiny backbone, 2 epochs and CPU."""
        if not self.smoke_test:
            return self
        return dataclasses.replace(
            self,
            backbone=SMOKE_BACKBONE,
            pretrained_backbone="false",
            image_size=64,
            epochs=min(self.epochs, 2),
            batch_size=min(self.batch_size, 8),
            limit=min(self.limit or SMOKE_IMAGES, SMOKE_IMAGES),
            workers=1,
            use_gpu=False,
            label_warmup_epochs=min(self.label_warmup_epochs, 1),
            cam_images=min(self.cam_images, 2),
            decode_batch_size=min(self.decode_batch_size, 8),
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------------------------------
# Images: read + decode + resize on CPU (Ray Data tasks), normalise on the training device


def load_image(uri: str, endpoint_override: str | None):
    """Read and decode one image.

    Returns:
        ``(image, stage, reason)``: a loaded RGB ``PIL.Image`` and ``("", "")``, or ``None`` with the failed stage
        (``read``: missing file, permission, network; ``decode``: corrupt or unsupported data) and a reason.
    """
    from PIL import Image

    try:
        data = storage.read_bytes(uri, endpoint_override)
    except Exception as e:  # missing file, permission, network: recorded, not fatal
        return None, "read", f"{type(e).__name__}: {e}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB"), "", ""
    except Exception as e:  # truncated / corrupt / unsupported image
        return None, "decode", f"{type(e).__name__}: {e}"


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
        image, stage, reason = load_image(str(uri), endpoint_override)
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


def _open_clip_trunk(name: str, pretrained: str | None, endpoint_override: str | None, cache_dir: str) -> OpenClipTrunk:
    from cdul_ray.clip import create_architecture, load_clip, resolve_weights

    if pretrained is None:  # the architecture only (weights come from a state dict)
        model = create_architecture(name)
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    else:
        spec = resolve_weights(name, pretrained, endpoint_override=endpoint_override)
        model, _ = load_clip(spec, "cpu", cache_dir, endpoint_override)
        mean, std = spec.preprocess["mean"], spec.preprocess["std"]
    return OpenClipTrunk(model.visual, mean, std)


def check_backbone(name: str) -> None:
    """Raise ConfigError(``backbone``) unless timm knows ``name`` (or open_clip, for a ResNet CLIP ``open_clip:``)."""
    import timm

    if name.startswith(OPEN_CLIP_PREFIX):
        from cdul_ray.clip import _open_clip

        model_cfg = _open_clip().get_model_config(name[len(OPEN_CLIP_PREFIX):])
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


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
    if _hub_reachable():
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
        trunk = _open_clip_trunk(backbone[len(OPEN_CLIP_PREFIX):], weights, endpoint_override, cache_dir)
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
    return list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225)))


def save_model_dir(uri: str, model: Classifier, meta: dict[str, Any], endpoint_override: str | None = None) -> None:
    """Write ``model.pt`` (state dict) and ``model.json`` (meta) into a local directory or S3 prefix."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(uri, MODEL_WEIGHTS), buf.getvalue(), endpoint_override)
    storage.write_json(storage.join(uri, MODEL_META), meta, endpoint_override)


def resolve_model_dir(uri: str, endpoint_override: str | None = None) -> str:
    """The directory holding ``model.json`` + ``model.pt`` for a checkpoint, model dir or training output.

    Accepts a checkpoint directory, ``<output>/model``, or a training output (its ``model/``, else its newest
    checkpoint).

    Raises:
        FileNotFoundError: nothing loadable there; the message lists what was tried.
    """
    tried = []
    for cand in (uri, storage.join(uri, MODEL_DIR)):
        tried.append(cand)
        if storage.exists(storage.join(cand, MODEL_META), endpoint_override):
            return cand
    ckpt_root = storage.join(uri, CHECKPOINTS_DIR)
    tried.append(ckpt_root + "/" + CHECKPOINT_PREFIX + "*")
    if storage.exists(ckpt_root, endpoint_override):
        dirs = _checkpoint_dirs(ckpt_root, endpoint_override)
        for d in reversed(dirs):
            if storage.exists(storage.join(d, MODEL_META), endpoint_override):
                return d
    raise FileNotFoundError(f"no trained classifier ({MODEL_META} + {MODEL_WEIGHTS}) found; tried {tried}")


def _checkpoint_dirs(ckpt_root: str, endpoint_override: str | None) -> list[str]:
    from pyarrow.fs import FileSelector, FileType

    fs, path = storage.filesystem(ckpt_root, endpoint_override)
    infos = fs.get_file_info(FileSelector(path, allow_not_found=True))
    names = sorted(posixpath.basename(i.path) for i in infos
                   if i.type == FileType.Directory and posixpath.basename(i.path).startswith(CHECKPOINT_PREFIX))
    return [storage.join(ckpt_root, n) for n in names]


def load_model_dir(uri: str, device: torch.device | str = "cpu",
                   endpoint_override: str | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Load a classifier saved by training (see ``resolve_model_dir`` for what ``uri`` may be).

    Returns:
        The model in eval mode on ``device`` and its meta (``classes``, ``image_size``, ``loss``, ``mean``, ``std``...).
    """
    folder = resolve_model_dir(uri, endpoint_override)
    meta = storage.read_json(storage.join(folder, MODEL_META), endpoint_override)
    model = create_classifier(meta["backbone"], len(meta["classes"]))
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, MODEL_WEIGHTS), endpoint_override)),
                       map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------------------------------------------
# Latent label versions: <output>/labels/v{r:04d}/*.parquet with LATENT_LABELS_SCHEMA


def absolute_uri(uri: str) -> str:
    """A local path made absolute (``~`` expanded); ``s3://`` URIs unchanged."""
    if storage.is_s3(uri):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


def version_uri(output: str, version: int) -> str:
    return storage.join(output, schema.LABELS_DIR, f"v{version:04d}")


def label_table(image_ids: list[str], labels: np.ndarray, version: int) -> pa.Table:
    """Rows of one label version. labels: [n, C] float32 in [0, 1]."""
    n, c = labels.shape
    flat = pa.array(np.ascontiguousarray(labels, dtype=np.float32).reshape(-1))
    vectors = pa.FixedSizeListArray.from_arrays(flat, c).cast(pa.list_(pa.float32()))
    return pa.table({"image_id": pa.array(image_ids, pa.string()),
                     "version": pa.array(np.full(n, version, dtype=np.int32)),
                     "latent_label": vectors}, schema=schema.LATENT_LABELS_SCHEMA)


def _write_table(uri: str, table: pa.Table, endpoint_override: str | None) -> None:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri, endpoint_override)
    fs.create_dir(posixpath.dirname(path) if storage.is_s3(uri) else os.path.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _delete_dir(uri: str, endpoint_override: str | None) -> None:
    from pyarrow.fs import FileType

    fs, path = storage.filesystem(uri, endpoint_override)
    if fs.get_file_info(path).type == FileType.Directory:
        fs.delete_dir(path)


def _versions_after(output: str, version: int, endpoint_override: str | None) -> list[int]:
    """Label versions > ``version`` present in ``<output>/labels``."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = storage.filesystem(storage.join(output, schema.LABELS_DIR), endpoint_override)
    names = [posixpath.basename(i.path) for i in fs.get_file_info(FileSelector(path, allow_not_found=True))
             if i.type == FileType.Directory]
    return sorted(int(n[1:]) for n in names if re.fullmatch(r"v\d{4,}", n) and int(n[1:]) > version)


def read_label_version(output: str, version: int, endpoint_override: str | None = None) -> pa.Table:
    """All rows of ``labels/v{version:04d}`` (image_id, version, latent_label)."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(version_uri(output, version), endpoint_override)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def label_matrix(table: pa.Table, image_ids: list[str], num_classes: int) -> np.ndarray:
    """Label rows in the order of ``image_ids``.

    Returns:
        [N, C] float32.

    Raises:
        RuntimeError: a training image is missing or appears twice, or a row has the wrong length.
    """
    ids = table["image_id"].to_pylist()
    if len(ids) != len(image_ids) or len(set(ids)) != len(ids) or set(ids) != set(image_ids):
        raise RuntimeError(f"label version has {len(ids)} rows ({len(set(ids))} distinct ids) for "
                           f"{len(image_ids)} training images: some are missing or duplicated")
    flat = pc.list_flatten(table["latent_label"]).to_numpy(zero_copy_only=False)
    if flat.size != len(ids) * num_classes:
        raise RuntimeError(f"label vectors do not all have {num_classes} values")
    values = flat.reshape(len(ids), num_classes).astype(np.float32)
    position = {image_id: i for i, image_id in enumerate(ids)}
    return values[[position[i] for i in image_ids]]


# --------------------------------------------------------------------------------------------------------------------
# History and class activation maps


def _csv_value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def history_csv(history: list[dict[str, Any]]) -> str:
    """The history rows as CSV text (columns ``HISTORY_COLUMNS``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in history:
        writer.writerow([_csv_value(row.get(c, float("nan"))) for c in HISTORY_COLUMNS])
    return buf.getvalue()


def read_history(output: str, endpoint_override: str | None = None) -> list[dict[str, float]]:
    """``<output>/history.csv`` as a list of rows (numbers as float, ``epoch``/``label_version`` as int)."""
    text = storage.read_bytes(storage.join(output, HISTORY_FILE), endpoint_override).decode()
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        parsed: dict[str, float] = {k: float(v) for k, v in row.items()}
        for k in ("epoch", "label_version", "label_updated", "images"):
            parsed[k] = int(parsed[k])
        rows.append(parsed)
    return rows


def render_cam_png(*args: Any, **kwargs: Any) -> bytes:
    """CAM panel PNG: see ``cdul_ray.report.render_cam_png`` (the one place figures are drawn)."""
    from cdul_ray.report import render_cam_png as render

    return render(*args, **kwargs)


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[-80:]


# --------------------------------------------------------------------------------------------------------------------
# The per-worker training loop (runs inside Ray Train workers)


def _collate_fn():
    """A Ray Data collate function (numpy batch -> tensors + the string columns); built in the worker."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            stage = np.asarray(batch["error_stage"], dtype=object)
            return {
                "pixels": torch.from_numpy(np.array(batch["pixels"], dtype=np.uint8)),  # (B, 3, S, S), a copy
                "row": torch.from_numpy(np.array(batch["row"], dtype=np.int64)),  # (B,)
                "ok": torch.from_numpy(stage == ""),  # (B,) bool
                "image_id": [str(x) for x in batch["image_id"]],
                "uri": [str(x) for x in batch["uri"]],
                "error_stage": [str(x) for x in stage],
                "error_reason": [str(x) for x in batch["error_reason"]],
            }

    return _Collate()


def _flip_mask(image_ids: list[str], seed: int, epoch: int) -> torch.Tensor:
    """Deterministic per-image, per-epoch coin flips (independent of the worker count)."""
    return torch.tensor([zlib.crc32(f"{seed}:{epoch}:{i}".encode()) & 1 == 1 for i in image_ids], dtype=torch.bool)


class _Dist:
    """torch.distributed helpers that also work for one process (no-ops) and on NCCL (device tensors)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.device = device if self.on and dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return t
        x = t.to(self.device)
        self.dist.all_reduce(x)
        return x.cpu()

    def barrier(self) -> None:
        if self.on:
            self.dist.barrier()

    def gather_to_all(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, obj)
        return out


def _errors_table(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    unique = sorted(set(rows))
    return pa.table({"image_id": [r[0] for r in unique], "uri": [r[1] for r in unique],
                     "stage": [r[2] for r in unique], "reason": [r[3] for r in unique]}, schema=schema.ERRORS_SCHEMA)


def _train_worker(loop: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer. ``loop`` is built by ``run_training``."""
    import ray
    import ray.train
    import ray.train.torch

    from cdul_ray.core.label_update import is_update_epoch, label_step, soft_target_loss
    from cdul_ray.core.metrics import mean_average_precision

    cfg = TrainConfig(**loop["cfg"])
    endpoint = cfg.s3_endpoint
    classes: list[str] = loop["classes"]
    c = len(classes)
    meta: dict[str, Any] = loop["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    image_ids: list[str] = ray.get(loop["image_ids"])
    train_targets: np.ndarray | None = ray.get(loop["train_targets"])
    eval_targets: np.ndarray | None = ray.get(loop["eval_targets"])
    n = len(image_ids)

    model = create_classifier(cfg.backbone, c, freeze_backbone=cfg.freeze_backbone)
    model.load_state_dict(ray.get(loop["init_state"]))
    if cfg.use_gpu and world > 1 and not cfg.freeze_backbone:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    start_epoch, version, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model.load_state_dict(torch.load(os.path.join(folder, MODEL_WEIGHTS), map_location="cpu",
                                             weights_only=True))
            opt_state = torch.load(os.path.join(folder, OPTIMIZER_STATE), map_location="cpu", weights_only=True)
            with open(os.path.join(folder, TRAIN_STATE)) as f:
                state = json.load(f)
        start_epoch, version, history = state["epoch"], state["label_version"], state["history"]
        logger.info("rank %d: resuming after epoch %d (label version %d)", rank, start_epoch, version)
    ddp = ray.train.torch.prepare_model(model)  # moves to the device; DDP when world > 1
    if checkpoint is not None:
        optimizer.load_state_dict(opt_state)  # after the move: state tensors follow the parameters' device
    comm = _Dist(device)

    labels = torch.from_numpy(label_matrix(read_label_version(cfg.output, version, endpoint), image_ids, c))  # (N, C)
    if rank == 0:
        for stale in _versions_after(cfg.output, version, endpoint):  # written by an attempt that crashed later
            _delete_dir(version_uri(cfg.output, stale), endpoint)
        if not history:
            label_map = mean_average_precision(labels.numpy(), train_targets).map if train_targets is not None \
                else float("nan")
            history = [{"epoch": 0, "label_version": 0, "label_updated": 0, "train_loss": float("nan"),
                        "eval_map": float("nan"), "label_map": label_map, "label_change": 0.0, "images": 0,
                        "seconds": 0.0}]
    comm.barrier()

    cam_inputs = _cam_inputs(loop["cam"], cfg, endpoint) if rank == 0 else []
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop["has_eval"] else None
    per_worker = max(1, cfg.batch_size // world)
    collate = _collate_fn()
    crash_after = loop.get("crash_after_epoch")

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        update = is_update_epoch(epoch, cfg.label_update, cfg.label_warmup_epochs, cfg.label_update_every)
        ddp.train()
        seen = torch.zeros(n, dtype=torch.int32)  # (N,) rows this worker trained on
        new_labels = labels.clone()  # (N, C)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of per-image losses, images)
        errors: list[tuple[str, str, str, str]] = []
        for batch in train_shard.iter_torch_batches(
            batch_size=per_worker, collate_fn=collate, local_shuffle_buffer_size=4 * per_worker,
            local_shuffle_seed=cfg.seed * 1000 + epoch,
        ):
            ok = batch["ok"]  # (B,)
            errors += [(i, u, s, r) for i, u, s, r, good in zip(batch["image_id"], batch["uri"], batch["error_stage"],
                                                                 batch["error_reason"], ok.tolist()) if not good]
            x = model_input(batch["pixels"], meta, device)  # (B, 3, S, S)
            if cfg.hflip:
                flip = _flip_mask(batch["image_id"], cfg.seed, epoch).to(device)
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            rows = batch["row"][ok]  # (B',)
            logits = ddp(x)  # (B, C)
            if bool(ok.any()):
                loss = soft_target_loss(logits[ok.to(device)], labels[rows].to(device), cfg.loss)
            else:  # every image of the batch failed to decode: keep DDP's collectives in step
                loss = logits.sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            k = int(ok.sum())
            loss_sum += torch.tensor([loss.item() * k, k], dtype=torch.float64)
            seen[rows] += 1
            if update and k:
                new_labels[rows] = label_step(labels[rows], logits[ok.to(device)].detach().float().cpu(),
                                              cfg.label_lr, cfg.loss, cfg.psi)

        # ---- merge the workers' label rows: every image exactly once per version -------------------------------
        seen_all = comm.all_reduce_sum(seen.clone())  # (N,)
        if int(seen_all.max()) > 1:
            raise RuntimeError(f"epoch {epoch}: {int((seen_all > 1).sum())} images reached several workers")
        mine = seen > 0
        merged = comm.all_reduce_sum(torch.where(mine.view(-1, 1), new_labels, torch.zeros_like(new_labels)))
        next_labels = torch.where((seen_all > 0).view(-1, 1), merged, labels)  # (N, C); unseen rows carried over
        loss_sum = comm.all_reduce_sum(loss_sum)
        vuri = version_uri(cfg.output, epoch)
        if rank == 0:
            _delete_dir(vuri, endpoint)
        comm.barrier()
        idx = torch.nonzero(mine).flatten().tolist()
        _write_table(storage.join(vuri, f"part-{rank:05d}.parquet"),
                     label_table([image_ids[i] for i in idx], next_labels[idx].numpy(), epoch), endpoint)
        if rank == 0:
            carry = torch.nonzero(seen_all == 0).flatten().tolist()
            if carry:
                _write_table(storage.join(vuri, "part-carry.parquet"),
                             label_table([image_ids[i] for i in carry], next_labels[carry].numpy(), epoch), endpoint)
        all_errors = comm.gather_to_all(errors) if epoch == start_epoch + 1 else []
        comm.barrier()

        metrics: dict[str, Any] = {"epoch": epoch, "label_version": epoch, "start_epoch": start_epoch}
        if rank == 0:
            label_matrix(read_label_version(cfg.output, epoch, endpoint), image_ids, c)  # raises if not exact
            if all_errors and any(all_errors):
                _write_table(storage.join(cfg.output, schema.ERRORS_DIR, "train-decode.parquet"),
                             _errors_table([e for part in all_errors for e in part]), endpoint)
            eval_map = _evaluate(model, eval_shard, eval_targets, meta, device, cfg.batch_size, cfg, collate,
                                 first=epoch == start_epoch + 1) if eval_shard is not None else float("nan")
            label_map = (mean_average_precision(next_labels.numpy(), train_targets).map
                         if train_targets is not None else float("nan"))
            row = {"epoch": epoch, "label_version": epoch, "label_updated": int(update),
                   "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)), "eval_map": eval_map,
                   "label_map": label_map, "label_change": float((next_labels - labels).abs().mean()),
                   "images": int(loss_sum[1]), "seconds": time.time() - t0}
            history.append(row)
            metrics.update(row)
            storage.write_bytes(storage.join(cfg.output, HISTORY_FILE), history_csv(history).encode(), endpoint)
            _write_cams(model, cam_inputs, meta, classes, cfg, epoch, device, endpoint)
            logger.info("epoch %d: loss %.4f, eval mAP %.2f, label mAP %.2f, labels %s", epoch, row["train_loss"],
                        eval_map, label_map, "updated" if update else "fixed")
        labels = next_labels

        meta_now = {**meta, "epoch": epoch, "label_version": epoch}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(folder, MODEL_WEIGHTS))
                torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_STATE))
                with open(os.path.join(folder, MODEL_META), "w") as f:
                    json.dump(meta_now, f, indent=2)
                with open(os.path.join(folder, TRAIN_STATE), "w") as f:
                    json.dump({"epoch": epoch, "label_version": epoch, "history": history}, f)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:04d}")
        if rank == 0 and epoch == cfg.epochs:
            save_model_dir(storage.join(cfg.output, MODEL_DIR), model, meta_now, endpoint)
        if crash_after is not None and epoch == crash_after and rank == 0:
            raise RuntimeError(f"{CRASH_ENV}={crash_after}: test crash after epoch {epoch}")


def _evaluate(model: Classifier, shard, targets: np.ndarray | None, meta: dict[str, Any], device: torch.device,
              batch_size: int, cfg: TrainConfig, collate, first: bool) -> float:
    """Classifier mAP (%) on the whole held-out split (rank 0; the unwrapped model, no collectives)."""
    from cdul_ray.core.label_update import predict_proba
    from cdul_ray.core.metrics import mean_average_precision

    model.eval()
    probs = np.zeros(targets.shape, dtype=np.float32)  # (M, C)
    done = np.zeros(len(targets), dtype=bool)
    errors = []
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            ok = batch["ok"]
            errors += [(i, u, s, r) for i, u, s, r, good in zip(batch["image_id"], batch["uri"], batch["error_stage"],
                                                                 batch["error_reason"], ok.tolist()) if not good]
            if not bool(ok.any()):
                continue
            logits = model(model_input(batch["pixels"][ok], meta, device))  # (B', C)
            rows = batch["row"][ok].numpy()
            probs[rows] = predict_proba(logits, cfg.loss).float().cpu().numpy()
            done[rows] = True
    model.train()
    if first and errors:
        _write_table(storage.join(cfg.output, schema.ERRORS_DIR, "eval-decode.parquet"), _errors_table(errors),
                     cfg.s3_endpoint)
    if not done.any():
        return float("nan")
    return mean_average_precision(probs[done], targets[done]).map


def _cam_inputs(specs: list[dict[str, Any]], cfg: TrainConfig, endpoint: str | None) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        image, stage, reason = load_image(spec["uri"], endpoint)
        if image is None:
            logger.warning("CAM image %s skipped (%s: %s)", spec["image_id"], stage, reason)
            continue
        out.append({**spec, "pixels": resize_pixels(image, cfg.image_size)})
    return out


def _write_cams(model: Classifier, inputs: list[dict[str, Any]], meta: dict[str, Any], classes: list[str],
                cfg: TrainConfig, epoch: int, device: torch.device, endpoint: str | None) -> None:
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
        storage.write_bytes(storage.join(cfg.output, CAM_DIR, name), png, endpoint)


# --------------------------------------------------------------------------------------------------------------------
# The job (driver)


@dataclass(frozen=True)
class TrainSummary:
    """What a training run did. Metrics are those of the last epoch (NaN when not measured)."""

    output: str
    images: int
    skipped: int
    eval_images: int
    classes: int
    epochs: int
    resumed_from_epoch: int
    label_version: int
    train_loss: float
    eval_map: float
    label_map: float
    initial_label_map: float
    backbone: str
    backbone_weights: str
    seconds: float

    def render(self) -> str:
        def fmt(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{v:.2f}"

        resumed = f" (resumed after epoch {self.resumed_from_epoch})" if self.resumed_from_epoch else ""
        return "\n".join([
            "CDUL training finished",
            f"  training images  {self.images}" + (f"  ({self.skipped} without a pseudo label, see errors/)"
                                                   if self.skipped else ""),
            f"  eval images      {self.eval_images}",
            f"  classes          {self.classes}",
            f"  backbone         {self.backbone}: {self.backbone_weights}",
            f"  epochs           {self.epochs}{resumed}",
            f"  train loss       {fmt(self.train_loss)}",
            f"  eval mAP         {fmt(self.eval_map)}",
            f"  label mAP        {fmt(self.initial_label_map)} (initial) -> {fmt(self.label_map)} "
            f"(version {self.label_version})",
            f"  wall time        {self.seconds:.1f} s",
            f"  history          {storage.join(self.output, HISTORY_FILE)}",
            f"  classifier       {storage.join(self.output, MODEL_DIR)}",
        ])


@dataclass
class _TrainingSet:
    records: pa.Table  # image_id, uri, row (rows 0..N-1 in a seeded order)
    image_ids: list[str]
    initial: np.ndarray  # (N, C) float32
    targets: np.ndarray | None  # (N, C) uint8
    skipped: pa.Table  # ERRORS_SCHEMA rows of index images without a pseudo label
    gt: dict[str, list[int]]


def _read_labeling_run(labels: str, endpoint: str | None) -> tuple[list[str], pa.Table, pa.Table, dict[str, Any]]:
    """(classes, labels table [image_id, soft_label], errors table, run_config) of a labeling run."""
    import pyarrow.dataset as pads

    classes_uri = storage.join(labels, schema.CLASSES_FILE)
    labels_uri = storage.join(labels, schema.LABELS_DIR)
    for uri in (classes_uri, labels_uri):
        if not storage.exists(uri, endpoint):
            raise FileNotFoundError(f"config field `labels`: {uri} does not exist; `labels` must be the output "
                                    "directory of a labeling run (cdul label)")
    classes = list(storage.read_json(classes_uri, endpoint)["classes"])
    fs, path = storage.filesystem(labels_uri, endpoint)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id", schema.SOFT_LABEL])
    if table.num_rows == 0:
        raise ValueError(f"config field `labels`: {labels_uri} holds no labeled image")
    errors = schema.ERRORS_SCHEMA.empty_table()
    errors_uri = storage.join(labels, schema.ERRORS_DIR)
    if storage.exists(errors_uri, endpoint):
        fs, path = storage.filesystem(errors_uri, endpoint)
        errors = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    run_config_uri = storage.join(labels, schema.RUN_CONFIG_FILE)
    run_config = storage.read_json(run_config_uri, endpoint) if storage.exists(run_config_uri, endpoint) else {}
    return classes, table, errors, run_config


def _load_index(cfg: TrainConfig, split: str | None, classes: list[str], endpoint: str | None, field: str):
    """A dataset split indexed with the labeling run's class list as vocabulary (ground truth remapped by name)."""
    from cdul_ray.datasets import load_dataset

    with tempfile.TemporaryDirectory() as folder:
        vocab = os.path.join(folder, "classes.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(classes) + "\n")
        try:
            return load_dataset(cfg.dataset, cfg.format, split, vocab, endpoint, cfg.limit)
        except ValueError as e:
            raise ConfigError(field, str(e)) from e
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config field `{field}`: {e}") from e


def _join(index, classes: list[str], table: pa.Table, errors: pa.Table, cfg: TrainConfig) -> _TrainingSet:
    """Training images = index images with a pseudo label; the rest are recorded as skipped."""
    from cdul_ray.core.metrics import multi_hot

    c = len(classes)
    label_ids = table["image_id"].to_pylist()
    values = pc.list_flatten(table[schema.SOFT_LABEL]).to_numpy(zero_copy_only=False).reshape(-1, c)
    by_id = {image_id: i for i, image_id in enumerate(label_ids)}
    ids = index.records["image_id"].to_pylist()
    uris = index.records["uri"].to_pylist()
    gts = index.records["gt_labels"].to_pylist()
    keep = [i for i, image_id in enumerate(ids) if image_id in by_id]
    if not keep:
        raise ConfigError("split", f"none of the {len(label_ids)} images of the labeling run {cfg.labels} is in "
                                   f"{cfg.dataset} (split {cfg.split!r}); image ids must match")
    extra = len(set(label_ids) - set(ids))
    if extra and cfg.limit is None:
        raise ConfigError("split", f"{extra} images of the labeling run {cfg.labels} are not in {cfg.dataset} "
                                   f"(split {cfg.split!r}): the labels were made from another dataset or split")
    if len(keep) < cfg.workers:
        raise ConfigError("workers", f"{len(keep)} training images cannot feed {cfg.workers} workers")
    # Images the labeling run could not label: reuse its reasons.
    reasons = {r["image_id"]: r for r in errors.to_pylist()}
    missing = [i for i, image_id in enumerate(ids) if image_id not in by_id]
    skipped_rows = []
    for i in missing:
        r = reasons.get(ids[i])
        skipped_rows.append((ids[i], uris[i], r["stage"] if r else "labels",
                             r["reason"] if r else f"no pseudo label in the labeling run {cfg.labels}"))
    order = np.random.default_rng(cfg.seed).permutation(len(keep))
    keep = [keep[i] for i in order]
    image_ids = [ids[i] for i in keep]
    records = pa.table({"image_id": pa.array(image_ids, pa.string()),
                        "uri": pa.array([uris[i] for i in keep], pa.string()),
                        "row": pa.array(np.arange(len(keep), dtype=np.int64))})
    initial = values[[by_id[i] for i in image_ids]].astype(np.float32)
    targets = multi_hot([gts[i] for i in keep], c) if index.has_ground_truth else None
    return _TrainingSet(records=records, image_ids=image_ids, initial=initial, targets=targets,
                        skipped=_errors_table(skipped_rows), gt={ids[i]: gts[i] for i in keep})


def _prepare_output(cfg: TrainConfig, endpoint: str | None) -> bool:
    """Fresh run (False) or resume of a compatible run in ``output`` (True).

    Raises:
        ConfigError: ``output`` holds a training run with a different value of a field that cannot change on resume.
        OutputExistsError: ``output`` holds something else (and ``overwrite`` is off).
    """
    from pyarrow.fs import FileSelector, FileType

    fs, path = storage.filesystem(cfg.output, endpoint)
    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        return False
    if info.type != FileType.Directory:
        raise OutputExistsError(f"config field `output`: {cfg.output} exists and is not a directory")
    if not fs.get_file_info(FileSelector(path, allow_not_found=True)):
        return False
    run_config_uri = storage.join(cfg.output, schema.RUN_CONFIG_FILE)
    previous = storage.read_json(run_config_uri, endpoint) if storage.exists(run_config_uri, endpoint) else None
    if cfg.overwrite:
        if not previous:  # --overwrite replaces a cdul run, never an arbitrary directory (`--output ~ --overwrite`)
            raise OutputExistsError(f"config field `output`: {cfg.output} is not empty and holds no cdul run "
                                    f"({schema.RUN_CONFIG_FILE}); refusing to delete it even with --overwrite")
        fs.delete_dir_contents(path)
        return False
    if not previous:
        raise OutputExistsError(f"config field `output`: {cfg.output} is not empty and holds no cdul run; choose "
                                "another output")
    if "label_lr" not in previous:
        raise OutputExistsError(f"config field `output`: {cfg.output} holds a cdul run that is not a training run; "
                                "pass --overwrite to replace it or choose another output")
    current = cfg.to_dict()
    for name, value in current.items():
        if name not in RESUME_MUTABLE and previous.get(name) != value:
            raise ConfigError(name, f"{cfg.output} holds a training run with {name}={previous.get(name)!r}, not "
                                    f"{value!r}; resuming it needs the same value (or pass --overwrite, or another "
                                    "--output)")
    return True


def _latest_checkpoint(output: str, endpoint: str | None) -> tuple[int, str | None]:
    """(epoch, directory) of the newest complete checkpoint in ``output``, or (0, None)."""
    root = storage.join(output, CHECKPOINTS_DIR)
    if not storage.exists(root, endpoint):
        return 0, None
    for d in reversed(_checkpoint_dirs(root, endpoint)):
        if all(storage.exists(storage.join(d, f), endpoint) for f in (TRAIN_STATE, MODEL_WEIGHTS, MODEL_META)):
            return int(storage.read_json(storage.join(d, TRAIN_STATE), endpoint)["epoch"]), d
    return 0, None


def _dataset(records: pa.Table, cfg: TrainConfig, endpoint: str | None, cache: bool):
    """Index rows -> Ray Dataset of decoded, resized images (materialised once when ``cache``)."""
    import ray.data

    step = max(cfg.decode_batch_size, -(-records.num_rows // 2000))  # at most 2000 input blocks
    ds = ray.data.from_arrow([records.slice(i, step) for i in range(0, records.num_rows, step)])
    ds.context.execution_options.preserve_order = True  # the cached blocks keep the (seeded) row order
    ds = ds.map_batches(decode_resized, fn_kwargs={"image_size": cfg.image_size, "endpoint_override": endpoint},
                        batch_size=cfg.decode_batch_size, num_cpus=1)
    if cache:
        _wait_for_free_cpu()
        ds = ds.materialize()  # progress shown on the driver (bars on a TTY, periodic lines otherwise)
    # Consumed inside Ray Train (split coordinator, workers): their tqdm bars would be forwarded to the driver's
    # console as hundreds of redraws; the epoch lines of the training loop report progress instead.
    ds.context.enable_progress_bars = False
    return ds


def _wait_for_free_cpu(timeout_s: float = 5.0) -> None:
    """Wait (at most ``timeout_s``) until the cluster reports a free CPU before a driver-side Dataset execution.

    A previous execution's tasks hand their CPUs back a moment after it returns; Ray Data checks
    ``ray.available_resources()`` when an execution starts and, seeing none, warns that "The Dataset job will hang".
    """
    import ray

    deadline = time.time() + timeout_s
    while not ray.available_resources().get("CPU") and time.time() < deadline:
        time.sleep(0.1)


def _cache_decoded(cfg: TrainConfig, n_images: int) -> bool:
    if cfg.cache_decoded != "auto":
        return cfg.cache_decoded == "true"
    import ray

    decoded = n_images * 3 * cfg.image_size ** 2
    budget = ray.cluster_resources().get("object_store_memory", 0) / 4
    logger.info("decoded images: %.2f GiB, %s in the object store", decoded / 2 ** 30,
                "cached" if decoded <= budget else "decoded every epoch, not cached")
    return decoded <= budget


def run_training(cfg: TrainConfig) -> TrainSummary:
    """Train a classifier with gradient alignment (method.md §6) on a Ray cluster; resume a run in ``output``.

    Everything that can fail fast does so before any Ray work: the config, the backbone name and weights, the
    labeling run, the dataset splits and their image ids, the output directory.

    Raises:
        ConfigError, FileNotFoundError, OutputExistsError, BackboneWeightsError; ``ray.train.TrainingFailedError``
        when training fails more than ``max_failures`` times.
    """
    import ray

    start = time.time()
    cfg = cfg.validate().effective()
    endpoint = cfg.s3_endpoint or storage.s3_endpoint_from_env()
    # Ray Train workers run in their own working directory: local paths must be absolute.
    cfg = dataclasses.replace(cfg, **{k: absolute_uri(getattr(cfg, k)) for k in ("labels", "dataset", "output")})
    check_backbone(cfg.backbone)
    classes, label_rows, label_errors, label_run = _read_labeling_run(cfg.labels, endpoint)
    cfg = dataclasses.replace(cfg, s3_endpoint=endpoint, split=cfg.split or label_run.get("split"))
    if cfg.format == "auto" and label_run.get("format") not in (None, "auto"):
        cfg = dataclasses.replace(cfg, format=label_run["format"])
    train_index = _load_index(cfg, cfg.split, classes, endpoint, "split")
    data = _join(train_index, classes, label_rows, label_errors, cfg)
    eval_index = _load_index(cfg, cfg.eval_split, classes, endpoint, "eval_split") if cfg.eval_split else None
    if eval_index is not None and not eval_index.has_ground_truth:
        raise ConfigError("eval_split", f"split {cfg.eval_split!r} of {cfg.dataset} has no ground truth to measure")
    weights, weights_note = resolve_backbone_weights(cfg.backbone, cfg.pretrained_backbone, endpoint, cfg.cache_dir)
    resume = _prepare_output(cfg, endpoint)
    resumed_from, last_checkpoint = _latest_checkpoint(cfg.output, endpoint) if resume else (0, None)
    logger.info("%d training images (%d skipped), %s eval images, %d classes; %s run",
                len(data.image_ids), data.skipped.num_rows, len(eval_index) if eval_index else 0, len(classes),
                f"resuming after epoch {resumed_from}" if resume else "fresh")

    torch.manual_seed(cfg.seed)
    model = create_classifier(cfg.backbone, len(classes), weights, cfg.freeze_backbone, endpoint, cfg.cache_dir)
    mean, std = normalisation(model)
    meta = {"backbone": cfg.backbone, "classes": classes, "image_size": cfg.image_size, "loss": cfg.loss,
            "mean": mean, "std": std, "backbone_weights": weights_note}
    if not resume:
        storage.write_json(storage.join(cfg.output, schema.CLASSES_FILE), {"classes": classes}, endpoint)
        _write_table(storage.join(version_uri(cfg.output, 0), "part-initial.parquet"),
                     label_table(data.image_ids, data.initial, 0), endpoint)
        _write_table(storage.join(cfg.output, schema.ERRORS_DIR, "labeling.parquet"), data.skipped, endpoint)
    # Written last: its presence marks a complete set-up that a resubmission can resume.
    storage.write_json(storage.join(cfg.output, schema.RUN_CONFIG_FILE), cfg.to_dict(), endpoint)

    if last_checkpoint is not None and resumed_from >= cfg.epochs:
        logger.info("%s already holds %d trained epochs (epochs=%d): nothing to train", cfg.output, resumed_from,
                    cfg.epochs)
        model_dir = storage.join(cfg.output, MODEL_DIR)
        if not storage.exists(storage.join(model_dir, MODEL_META), endpoint):  # crashed between report and export
            for name in (MODEL_WEIGHTS, MODEL_META):
                storage.write_bytes(storage.join(model_dir, name),
                                    storage.read_bytes(storage.join(last_checkpoint, name), endpoint), endpoint)
        return _summary(cfg, data, eval_index, resumed_from, weights_note, start, endpoint)

    if not ray.is_initialized():
        ray.init()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not storage.is_s3(cfg.output):
        logger.warning("%d-node cluster but output %s is a local path: every worker writes label versions and rank 0 "
                       "checkpoints there, so it must be shared storage (NFS) on all nodes; prefer s3://", nodes,
                       cfg.output)
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    cam_source = eval_index.records if eval_index is not None else data.records
    cam = [{"image_id": r["image_id"], "uri": r["uri"], "gt": r.get("gt_labels", data.gt.get(r["image_id"]))}
           for r in cam_source.slice(0, cfg.cam_images).to_pylist()]
    n_eval = len(eval_index) if eval_index is not None else 0
    cache = _cache_decoded(cfg, len(data.image_ids) + n_eval)
    datasets = {"train": _dataset(data.records, cfg, endpoint, cache)}
    eval_targets = None
    if eval_index is not None:
        from cdul_ray.core.metrics import multi_hot

        eval_records = pa.table({"image_id": eval_index.records["image_id"], "uri": eval_index.records["uri"],
                                 "row": pa.array(np.arange(len(eval_index), dtype=np.int64))})
        datasets["eval"] = _dataset(eval_records, cfg, endpoint, cache)
        eval_targets = multi_hot(eval_index.records["gt_labels"].to_pylist(), len(classes))
    crash = os.environ.get(CRASH_ENV)
    loop = {
        "cfg": cfg.to_dict(),
        "classes": classes,
        "meta": meta,
        "image_ids": ray.put(data.image_ids),
        "train_targets": ray.put(data.targets),
        "eval_targets": ray.put(eval_targets),
        "init_state": ray.put({k: v.detach().clone() for k, v in model.state_dict().items()}),
        "has_eval": eval_index is not None,
        "cam": cam,
        "crash_after_epoch": int(crash) if crash else None,
    }
    fs, path = storage.filesystem(cfg.output, endpoint)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS_DIR, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        # Eval is not split (rank 0 measures the whole split); ordered execution keeps runs reproducible.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    trainer.fit()
    return _summary(cfg, data, eval_index, resumed_from, weights_note, start, endpoint)


def _summary(cfg: TrainConfig, data: _TrainingSet, eval_index, resumed_from: int, weights_note: str, start: float,
             endpoint: str | None) -> TrainSummary:
    """The summary of a run from its history.csv; also written as summary.json."""
    history = read_history(cfg.output, endpoint)
    last = history[-1]
    summary = TrainSummary(
        output=cfg.output, images=len(data.image_ids), skipped=data.skipped.num_rows,
        eval_images=len(eval_index) if eval_index is not None else 0, classes=data.initial.shape[1],
        epochs=int(last["epoch"]), resumed_from_epoch=resumed_from, label_version=int(last["label_version"]),
        train_loss=last["train_loss"], eval_map=last["eval_map"], label_map=last["label_map"],
        initial_label_map=history[0]["label_map"], backbone=cfg.backbone, backbone_weights=weights_note,
        seconds=time.time() - start,
    )
    storage.write_json(storage.join(cfg.output, schema.SUMMARY_FILE),
                       {k: (None if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in dataclasses.asdict(summary).items()}, endpoint)
    return summary
