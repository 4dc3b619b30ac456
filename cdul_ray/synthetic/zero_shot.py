"""Zero-shot classification of freshly generated, held-out single-object images (the small CLIP's acceptance metric).

Prompts are ``"a photo of a {class}."`` (method.md §1); logits are ``logit_scale.exp() * cos`` (method.md §2).
The evaluation set is class-balanced: sample ``i`` has class ``i % C``. Use a seed the model was not trained on
(training draws the "single" stream under its own seed; see ``cdul_ray.synthetic.train_clip``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cdul_ray.core.alignment import class_text_embeddings
from cdul_ray.synthetic.world import CLASS_NAMES, make_single_object, sample_rng

logger = logging.getLogger(__name__)

ZERO_SHOT_TEMPLATE = "a photo of a {}."
DEFAULT_EVAL_SEED = 1000
DEFAULT_EVAL_N = 1200


@dataclass(frozen=True)
class ZeroShotResult:
    """Outcome of a zero-shot evaluation.

    Attributes:
        accuracy: top-1 accuracy over all samples.
        per_class: class name -> top-1 accuracy on that class's samples.
        confusion: ``[C, C]`` counts, rows = true class, columns = predicted class.
        n: number of samples.
        seed: generation seed of the samples.
    """

    accuracy: float
    per_class: dict[str, float]
    confusion: np.ndarray
    n: int
    seed: int


@torch.inference_mode()
def class_text_features(model: torch.nn.Module, tokenizer: Callable, device: torch.device | str = "cpu") -> torch.Tensor:
    """Unit-norm text embeddings of ``ZERO_SHOT_TEMPLATE`` for every class (``core.alignment.class_text_embeddings``).

    Returns:
        ``[C, D]`` float32.
    """
    return class_text_embeddings(model.encode_text, tokenizer, CLASS_NAMES, (ZERO_SHOT_TEMPLATE,), device)


@torch.inference_mode()
def zero_shot_eval(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    n: int = DEFAULT_EVAL_N,
    seed: int = DEFAULT_EVAL_SEED,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> ZeroShotResult:
    """Zero-shot top-1 accuracy, per class and confusion matrix on ``n`` fresh single-object images.

    Args:
        model: an open_clip CLIP model (put in eval mode here).
        preprocess: the model's eval image transform (PIL -> ``[3, H, W]``).
        tokenizer: the model's tokenizer.
        n: number of images (class-balanced: sample ``i`` has class ``i % C``).
        seed: generation seed of the "single" stream.
        batch_size: images per forward pass.
        device: where to run the model.
    """
    model.eval()
    text = class_text_features(model, tokenizer, device)  # (C, D)
    scale = model.logit_scale.exp().float()
    num_classes = len(CLASS_NAMES)
    preds, truth = [], []
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        samples = [make_single_object(sample_rng(seed, "single", i), label=i % num_classes) for i in idx]
        x = torch.stack([preprocess(s.image) for s in samples]).to(device)  # (B, 3, H, W)
        feats = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)  # (B, D)
        logits = scale * feats @ text.T  # (B, C)
        preds.append(logits.argmax(-1).cpu().numpy())
        truth.append(np.array([s.label for s in samples]))
    pred, true = np.concatenate(preds), np.concatenate(truth)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class = {c: float(confusion[k, k] / max(confusion[k].sum(), 1)) for k, c in enumerate(CLASS_NAMES)}
    accuracy = float((pred == true).mean())
    logger.info("zero-shot accuracy %.4f on %d held-out single objects (seed %d)", accuracy, n, seed)
    return ZeroShotResult(accuracy=accuracy, per_class=per_class, confusion=confusion, n=n, seed=seed)


def zero_shot_accuracy(
    model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, n: int = DEFAULT_EVAL_N,
    seed: int = DEFAULT_EVAL_SEED
) -> float:
    """Zero-shot top-1 accuracy on ``n`` freshly generated held-out single objects (see :func:`zero_shot_eval`)."""
    return zero_shot_eval(model, preprocess, tokenizer, n=n, seed=seed).accuracy
