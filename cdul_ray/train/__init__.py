"""Gradient-alignment classifier training on Ray Train (paper §3.2; docs/method.md §6).

A classifier (:mod:`cdul_ray.classifier`: a timm backbone, ResNet-50 by default, or an open_clip ResNet trunk, with a
new C-way linear head) learns from the latent labels Y while, in label-update epochs, the labels of every batch move
along the loss gradient (:mod:`cdul_ray.core.label_update`). ``TorchTrainer`` runs the loop data-parallel (DDP) on
``workers`` processes; Ray Data streams the images through a CPU decode/resize stage into the workers.

The latent labels travel with the images: the training dataset is the images zipped with a Ray Data source that
reads the newest complete label version ``labels/v{e:04d}`` anew every epoch, each worker writes the rows it
received (updated) into its own part of the next version, and rank 0 completes the version (every row exactly once).
No worker holds the labels of the whole corpus, and no N-sized tensor is all-reduced.

Modules:

- :mod:`~cdul_ray.train.config`: ``TrainConfig`` (every flag of ``cdul train``) and its smoke-test shrink.
- :mod:`~cdul_ray.train.job`: the driver, ``run_training``: fail-fast set-up, the TorchTrainer, ``TrainSummary``.
- :mod:`~cdul_ray.train.worker`: the per-worker loop, one named step per phase of an epoch.
- :mod:`~cdul_ray.train.labels`: latent label versions ``labels/v{e:04d}`` on storage and ``history.csv``.
- :mod:`~cdul_ray.train.label_source`: the label versions as a Ray Data source, read anew every epoch.
- :mod:`~cdul_ray.train.cam`: class activation map PNGs.

The output layout is documented (and its names defined) in :mod:`cdul_ray.schema`.
"""

from cdul_ray.train.config import TrainConfig
from cdul_ray.train.job import OutputExistsError, TrainSummary, run_training

__all__ = ["OutputExistsError", "TrainConfig", "TrainSummary", "run_training"]
