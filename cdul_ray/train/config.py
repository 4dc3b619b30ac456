"""The config of gradient-alignment training (``cdul train``; method.md §6) and its smoke-test shrink."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from cdul_ray.config import SMOKE_IMAGES, ConfigError, check_at_least, check_choice, check_dataset_input, \
    check_positive, check_tristate, gpu_option, option, require, to_dict
from cdul_ray.core.label_update import LOSSES, PSI

logger = logging.getLogger(__name__)

# Fields that may change when a run is resumed (same output); any other difference is refused.
RESUME_MUTABLE = frozenset(
    {"epochs", "workers", "use_gpu", "cpus_per_worker", "decode_batch_size", "max_failures", "keep_checkpoints",
     "s3_endpoint", "cache_dir", "overwrite", "cam_images"}
)

SUPERVISION = ("pseudo", "ground_truth")
SMOKE_BACKBONE = "test_resnet"  # timm's ~0.4 M-parameter test ResNet


@dataclass(frozen=True)
class TrainConfig:
    """Config of gradient-alignment training (method.md §6)."""

    labels: str = option("", "output directory of a labeling run (labels/ + classes.json): local path or s3:// URI",
                     required=True)
    dataset: str = option("", "dataset root or manifest holding the training (and held-out) images", required=True)
    output: str = option("", "output directory: local path or s3:// URI (an existing training run there is resumed)",
                     required=True)
    format: str = option("auto", "dataset format: auto, coco, voc, nuswide, folder, manifest")
    split: str | None = option(None, "training split (default: the split of the labeling run)")
    eval_split: str | None = option(None, "held-out split with ground truth for the per-epoch classifier mAP, e.g. test")
    backbone: str = option("resnet50", "timm model name (resnet50, resnet18, convnext_tiny, ...), or open_clip:<name> "
                       "for the trunk of a ResNet CLIP image tower (open_clip:RN50, open_clip:cdul-synth-rn)")
    pretrained_backbone: str = option("auto", "timm: auto (ImageNet weights when reachable or cached, else random init "
                                  "with a warning), true (required), false (random init), or a weights file / s3:// "
                                  "URI; open_clip: a pretrained tag (openai, synth), file or s3:// URI, or false")
    freeze_backbone: bool = option(False, "train only the new head on the backbone's frozen features (a linear probe; "
                               "much cheaper, e.g. on CPU)")
    image_size: int = option(224, "side of the square network input (images are resized, not cropped)")
    epochs: int = option(10, "training epochs (raise it on resume to train further)")
    batch_size: int = option(32, "global batch size, split evenly over the workers")
    lr: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    loss: str = option("bce", "loss on soft targets: bce (sigmoid outputs) or kl (softmax outputs)")
    supervision: str = option("pseudo", "what the classifier learns from: pseudo (the labeling run's soft pseudo labels: "
                              "CDUL) or ground_truth (the split's annotations: the fully supervised ceiling of paper "
                              "Table 2; needs ground truth and --no-label-update)")
    label_update: bool = option(True, "update the latent labels along the loss gradient (off: train on fixed labels)")
    label_lr: float = option(0.1, "label step size eta of z <- z - eta * psi(Y) * dD/dY")
    label_update_every: int = option(1, "update the labels every k-th epoch after the warm-up")
    label_warmup_epochs: int = option(1, "epochs of network-only training before the first label update")
    psi: str = option("one", "psi(Y) of the label step: one (psi = 1) or sigmoid_grad (psi = Y(1 - Y))")
    hflip: bool = option(True, "random horizontal flips of training images (seeded per image and epoch)")
    workers: int = option(1, "data-parallel training workers (one GPU each when training on GPUs)")
    use_gpu: str = gpu_option("auto", "one GPU per worker: auto (when the cluster has GPUs now or its autoscaler "
                                      "can add some), true or false")
    cpus_per_worker: float = option(1.0, "CPUs reserved per training worker")
    decode_batch_size: int = option(16, "images per CPU decode/resize task")
    cache_decoded: str = option("auto", "decode + resize once and keep the uint8 images in the Ray object store instead "
                            "of decoding every epoch: true, false, or auto (when they take <= 1/4 of it)")
    seed: int = option(0, "seed of the initial head, data order, flips and shuffles")
    cam_images: int = option(4, "class activation maps of this many fixed images after each epoch (0: none)")
    limit: int | None = option(None, "use only the first N images of each split")
    max_failures: int = option(1, "times Ray Train restarts from the last checkpoint after a worker failure (-1: always)")
    keep_checkpoints: int = option(2, "checkpoints kept (the newest ones)")
    s3_endpoint: str | None = option(None, "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS itself)")
    cache_dir: str = option("~/.cache/cdul_ray", "per-node cache for backbone weights fetched from S3")
    overwrite: bool = option(False, "replace an existing output directory instead of resuming or failing")
    smoke_test: bool = option(False, f"a few images ({SMOKE_IMAGES}), the tiny {SMOKE_BACKBONE} backbone, 2 epochs, CPU")

    def validate(self) -> "TrainConfig":
        """Check every field; returns self. Raises ConfigError naming the first bad field."""
        check_dataset_input(self, "labels", "dataset", "output")
        require(self, "backbone", "pretrained_backbone")
        check_at_least(self, 16, "image_size")
        check_at_least(self, 1, "epochs", "batch_size", "label_update_every", "workers", "decode_batch_size",
                       "keep_checkpoints")
        check_at_least(self, 0, "label_warmup_epochs", "seed", "cam_images", "weight_decay", "label_lr")
        check_positive(self, "lr", "cpus_per_worker")
        if self.batch_size < self.workers:
            raise ConfigError("batch_size", f"the global batch ({self.batch_size}) must be >= workers ({self.workers})")
        check_choice(self, "loss", LOSSES)
        check_choice(self, "psi", PSI)
        check_choice(self, "supervision", SUPERVISION)
        if self.supervision == "ground_truth" and self.label_update:
            raise ConfigError("label_update", "ground-truth training has no latent labels to move: pass "
                                              "--no-label-update with --supervision ground_truth")
        check_tristate(self, "use_gpu", "cache_decoded")
        check_at_least(self, -1, "max_failures")
        if self.eval_split is not None and self.eval_split == self.split:
            logger.warning("eval_split == split (%s): the 'held-out' mAP is measured on the training images",
                           self.split)
        return self

    def effective(self) -> "TrainConfig":
        """The config actually run: ``smoke_test`` shrinks it to a few images, a tiny backbone, 2 epochs and CPU.

        Raises:
            ConfigError: the shrunk config is invalid (e.g. ``workers`` > the shrunk ``batch_size``).
        """
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
            use_gpu="false",
            label_warmup_epochs=min(self.label_warmup_epochs, 1),
            cam_images=min(self.cam_images, 2),
            decode_batch_size=min(self.decode_batch_size, 8),
        ).validate()  # the shrunk config is checked too

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
