"""mAP, the metric everywhere (method.md §7): scikit-learn's average precision, averaged over classes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score


@dataclass(frozen=True)
class MAPResult:
    """mAP and its per-class parts.

    Attributes:
        map: mean AP over evaluated classes, in [0, 100] (percent, as the paper reports); NaN if none evaluated.
        ap: [C] per-class AP in [0, 100], NaN for skipped classes.
        skipped: indices of classes without a positive in the ground truth (AP undefined, excluded from the mean).
    """

    map: float
    ap: np.ndarray
    skipped: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_ap(cls, ap: np.ndarray) -> "MAPResult":
        """The result of per-class APs computed in parts (ap: [C] in [0, 100], NaN for skipped classes)."""
        evaluated = ap[~np.isnan(ap)]
        return cls(map=float(evaluated.mean()) if evaluated.size else float("nan"), ap=ap,
                   skipped=tuple(int(c) for c in np.flatnonzero(np.isnan(ap))))


def multi_hot(gt_labels: Sequence[Sequence[int] | None], num_classes: int) -> np.ndarray:
    """Class-index lists to a multi-hot matrix.

    Args:
        gt_labels: N lists of class indices in [0, C).
        num_classes: C.

    Returns:
        [N, C] uint8 in {0, 1}.

    Raises:
        ValueError: an index outside [0, C) or a missing (None) ground truth.
    """
    y = np.zeros((len(gt_labels), num_classes), dtype=np.uint8)
    for i, labels in enumerate(gt_labels):
        if labels is None:
            raise ValueError(f"row {i} has no ground truth")
        for c in labels:
            if not 0 <= c < num_classes:
                raise ValueError(f"row {i}: class index {c} outside [0, {num_classes})")
            y[i, c] = 1
    return y


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> MAPResult:
    """Mean over classes of average precision (scikit-learn definition).

    Args:
        scores: [N, C] real-valued scores (higher = more likely present).
        targets: [N, C] binary ground truth.

    Returns:
        MAPResult; classes with no positive are skipped and listed.

    Raises:
        ValueError: shapes differ or are not 2-D.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be [N, C]")
    ap = np.full(scores.shape[1], np.nan)  # NaN: skipped (no positive)
    for c in range(scores.shape[1]):
        if targets[:, c].sum() == 0:
            continue
        ap[c] = 100.0 * average_precision_score(targets[:, c], scores[:, c])
    return MAPResult.from_ap(ap)
