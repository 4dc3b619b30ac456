"""A short visual report of a labeling run, written next to its output (``<output>/report/``, ``schema.REPORT_DIR``).

- ``ap_<method>.png``: per-class pseudo-label AP bar chart, one per aggregator (global, avg, max, cdul);
- ``scenes.png``: a grid of a few images with their top soft labels against the ground truth;
- ``report.md``: the Table 1 layout, the ζ sweep and links to both.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from cdul_ray import schema, storage
from cdul_ray.evaluate import read_label_scores, render_table

logger = logging.getLogger(__name__)

METHODS = ("global", "avg", "max", "cdul")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_report(output: str, evaluation: dict[str, Any], n_images: int = 8, top_k: int = 4,
                 endpoint_override: str | None = None) -> str:
    """Write the report of a labeling run with ground truth; returns the URI of ``report.md``.

    Args:
        output: labeling run directory (local or s3://).
        evaluation: the result of ``cdul_ray.evaluate.evaluate_labels`` for that run.
        n_images: images shown in ``scenes.png`` (the first ones by image id: deterministic).
        top_k: soft labels listed per image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.dataset as pads

    from cdul_ray.images import decode_image

    folder = storage.join(output, schema.REPORT_DIR)
    classes = evaluation["classes"]
    x = np.arange(len(classes))
    for method in METHODS:
        ap = np.array([np.nan if a is None else a for a in evaluation["per_class_ap"][method]], dtype=float)
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes)), 3.2))
        ax.bar(x, np.nan_to_num(ap), color="#4477aa")
        ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{method}: pseudo-label AP per class (mAP {evaluation['map'][method]:.1f})")
        storage.write_bytes(storage.join(folder, f"ap_{method}.png"), _png(fig), endpoint_override)
        plt.close(fig)

    scores = read_label_scores(output, endpoint_override)
    fs, path = storage.filesystem(storage.join(output, schema.LABELS_DIR), endpoint_override)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["image_id", "uri", "gt_labels", schema.SOFT_LABEL]
    ).sort_by("image_id")
    n = min(n_images, table.num_rows)
    cols = 4
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        row = {k: table[k][i].as_py() for k in ("image_id", "uri", "gt_labels", schema.SOFT_LABEL)}
        ax = axes.flat[i]
        try:
            ax.imshow(decode_image(storage.read_bytes(row["uri"], endpoint_override)))  # upright, as labeled
        except Exception as e:  # the report must not fail on one image
            logger.warning("report: cannot show %s: %s", storage.redact(row["uri"]), storage.redact(str(e)))
        truth = set(row["gt_labels"] or [])
        y = np.asarray(row[schema.SOFT_LABEL])
        top = np.argsort(-y)[:top_k]
        lines = [f"{'✓' if c in truth else '✗'} {classes[c]} {y[c]:.2f}" for c in top]
        missed = [classes[c] for c in sorted(truth) if c not in top]
        if missed:
            lines.append("missed: " + ", ".join(missed))
        ax.set_title(f"{row['image_id']}\n" + "\n".join(lines), fontsize=7, loc="left")
    fig.suptitle("top soft labels (✓ present in ground truth, ✗ absent)", fontsize=9)
    storage.write_bytes(storage.join(folder, "scenes.png"), _png(fig), endpoint_override)
    plt.close(fig)

    md = [
        "# CDUL pseudo-label report",
        "",
        render_table(evaluation),
        "",
        f"Images: {len(scores.image_ids)}. Per-class AP:",
        "",
        *[f"![{m}](ap_{m}.png)" for m in METHODS],
        "",
        "Scenes with their top soft labels:",
        "",
        "![scenes](scenes.png)",
        "",
    ]
    uri = storage.join(folder, schema.REPORT_FILE)
    storage.write_bytes(uri, "\n".join(md).encode(), endpoint_override)
    return uri
