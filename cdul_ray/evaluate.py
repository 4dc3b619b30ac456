"""Pseudo-label quality from the labels Parquet alone (paper Table 1; method.md §4, §7).

The labels table keeps S_global, α, β and the snippet mean per image and class, so any aggregator and threshold ζ
can be re-evaluated here without running CLIP again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch

from cdul_ray import schema, storage
from cdul_ray.core.aggregate import aggregate, initial_soft_label
from cdul_ray.core.metrics import mean_average_precision, multi_hot

logger = logging.getLogger(__name__)

DEFAULT_SWEEP: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


@dataclass(frozen=True)
class LabelScores:
    """Scores of a labeling run, rows sorted by image_id.

    Attributes:
        image_ids: N ids. global_score, alpha, beta, mean: [N, C] float32 in [0, 1]. targets: [N, C] uint8 or None.
        classes: C class names.
    """

    image_ids: list[str]
    global_score: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    targets: np.ndarray | None
    classes: list[str]


def _matrix(column: Any, num_classes: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, num_classes).astype(np.float32)


def read_label_scores(output: str, endpoint_override: str | None = None) -> LabelScores:
    """Load ``<output>/labels`` and ``classes.json`` of a labeling run (local or S3)."""
    classes = storage.read_json(storage.join(output, schema.CLASSES_FILE), endpoint_override)["classes"]
    fs, path = storage.filesystem(storage.join(output, schema.LABELS_DIR), endpoint_override)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["image_id", "gt_labels", schema.GLOBAL_SCORE, schema.LOCAL_MAX, schema.LOCAL_MIN, schema.LOCAL_MEAN]
    )
    table = table.sort_by("image_id")
    c = len(classes)
    gt = table["gt_labels"].to_pylist()
    has_gt = table.num_rows > 0 and all(g is not None for g in gt)
    return LabelScores(
        image_ids=table["image_id"].to_pylist(),
        global_score=_matrix(table[schema.GLOBAL_SCORE], c),
        alpha=_matrix(table[schema.LOCAL_MAX], c),
        beta=_matrix(table[schema.LOCAL_MIN], c),
        mean=_matrix(table[schema.LOCAL_MEAN], c),
        targets=multi_hot(gt, c) if has_gt else None,
        classes=classes,
    )


def soft_labels(scores: LabelScores, method: str, threshold: float = 0.0, lam: float = 0.0) -> np.ndarray:
    """Initial soft pseudo labels Y0 [N, C] for an aggregator (``global`` = S_global alone, the CLIP baseline)."""
    g = torch.from_numpy(scores.global_score)
    if method == "global":
        return scores.global_score
    agg = aggregate(torch.from_numpy(scores.alpha), torch.from_numpy(scores.beta), torch.from_numpy(scores.mean),
                    method, threshold)
    return initial_soft_label(g, agg, lam).numpy()


def pseudo_label_table(
    scores: LabelScores, threshold: float, lam: float = 0.0, sweep: Sequence[float] = DEFAULT_SWEEP
) -> dict[str, Any]:
    """The paper's Table 1 (pseudo-label mAP of global / avg / max / cdul) and a ζ sweep of ``cdul``.

    Raises:
        ValueError: the run has no ground truth.
    """
    if scores.targets is None:
        raise ValueError("the labels have no ground truth (gt_labels is null); nothing to evaluate against")
    rows: dict[str, float] = {}
    per_class: dict[str, list[float | None]] = {}
    skipped: tuple[int, ...] = ()
    for method in ("global", "avg", "max", "cdul"):
        res = mean_average_precision(soft_labels(scores, method, threshold, lam), scores.targets)
        rows[method] = res.map
        per_class[method] = [None if math.isnan(a) else float(a) for a in res.ap]
        skipped = res.skipped
    zeta = {f"{z:g}": mean_average_precision(soft_labels(scores, "cdul", z, lam), scores.targets).map for z in sweep}
    local_only = {
        name: mean_average_precision(m, scores.targets).map
        for name, m in (("avg", scores.mean), ("max", scores.alpha))
    }
    return {
        "images": len(scores.image_ids),
        "classes": scores.classes,
        "threshold": threshold,
        "lam": lam,
        "map": rows,
        "per_class_ap": per_class,
        "local_only_map": local_only,
        "zeta_sweep": zeta,
        "skipped_classes": [scores.classes[i] for i in skipped],
    }


def render_table(result: dict[str, Any]) -> str:
    """Markdown of the Table 1 layout and the ζ sweep."""
    m = result["map"]
    lines = [
        f"Pseudo-label mAP (%) on {result['images']} images, {len(result['classes'])} classes "
        f"(cdul threshold ζ = {result['threshold']:g})",
        "",
        "| global | avg | max | cdul |",
        "|---:|---:|---:|---:|",
        f"| {m['global']:.1f} | {m['avg']:.1f} | {m['max']:.1f} | {m['cdul']:.1f} |",
        "",
        "ζ sweep (cdul): " + ", ".join(f"ζ={z}: {v:.1f}" for z, v in result["zeta_sweep"].items()),
    ]
    if result["skipped_classes"]:
        lines.append(f"Classes without positives (skipped): {', '.join(result['skipped_classes'])}")
    return "\n".join(lines)


def evaluate_labels(
    output: str, threshold: float, lam: float = 0.0, endpoint_override: str | None = None, write: bool = True
) -> dict[str, Any]:
    """Evaluate a labeling run from its Parquet and (by default) write ``evaluation.json`` / ``evaluation.md``."""
    result = pseudo_label_table(read_label_scores(output, endpoint_override), threshold, lam)
    if write:
        storage.write_json(storage.join(output, schema.EVALUATION_JSON), result, endpoint_override)
        storage.write_bytes(storage.join(output, schema.EVALUATION_MD), (render_table(result) + "\n").encode(),
                            endpoint_override)
    return result
