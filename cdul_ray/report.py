"""A short visual report of a labeling run, written next to its output (``<output>/report/``, ``schema.REPORT_DIR``),
and the CAM panels of training (``render_cam_png``): the one place figures are drawn.

Soft pseudo labels are scores in [0, 1]; a user who wants a label *set* per image thresholds them. The report shows
those sets and how the thresholds were chosen:

- ``ap_<method>.png`` (ground truth only): per-class pseudo-label AP bar chart, one per aggregator (global, avg, max,
  cdul);
- ``pr_curves.png`` (ground truth only): per-class precision/recall curve of the soft label, the F1-best threshold of
  each class marked on it (the thresholds the scenes use);
- ``soft_label_hist.png`` (no ground truth, e.g. a folder of images): per-class histogram of the soft-label values and
  the one threshold the scenes use (Otsu's split of all values), to move where a class's histogram says so;
- ``scenes.png``: the first images (natural order of image ids: 1, 2, ..., 10) with the label set at those thresholds,
  marked against the ground truth when there is one;
- ``thresholds.json`` (``schema.REPORT_THRESHOLDS_FILE``): the classes, their thresholds and how they were chosen;
- ``report.md`` (``schema.REPORT_FILE``): the Table 1 layout, the ζ sweep, the thresholds and links to every PNG.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdul_ray import schema, storage
from cdul_ray.evaluate import read_label_scores, render_table

logger = logging.getLogger(__name__)

METHODS = ("global", "avg", "max", "cdul")
MAX_CLASS_PANELS = 40  # per-class panels drawn (the most frequent / highest-scoring classes first)
MAX_SCENE_LABELS = 6  # labels listed per image in scenes.png


def _png(fig: Any, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``"img2" < "img10"``, ``"9" < "10" < "100"``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def f1_best_thresholds(y: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the threshold on ``y`` with the best F1 against ``targets``.

    Args:
        y: [N, C] soft labels in [0, 1]. targets: [N, C] 0/1.

    Returns:
        (thresholds [C], F1 [C]) — a class without positives gets threshold 1.0 and F1 NaN.
    """
    n, c = y.shape
    thresholds = np.ones(c, dtype=np.float64)
    f1 = np.full(c, np.nan)
    for k in range(c):
        pos = targets[:, k] > 0
        if not pos.any():
            continue
        order = np.argsort(-y[:, k], kind="stable")
        scores, hits = y[order, k], pos[order]
        tp = np.cumsum(hits)
        last = np.r_[scores[1:] != scores[:-1], True]  # cut only between distinct scores
        f = 2 * tp / (np.arange(1, n + 1) + pos.sum())
        f = np.where(last, f, -1.0)
        best = int(np.argmax(f))
        thresholds[k], f1[k] = float(scores[best]), float(f[best])
    return thresholds, f1


def otsu_threshold(values: np.ndarray, bins: int = 100) -> float:
    """Otsu's threshold of values in [0, 1]: the split of their histogram with the largest between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(edges[int(np.argmax(w0 * w1 * (m0 - m1) ** 2)) + 1])


def _class_order(y: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    weight = targets.sum(0) if targets is not None else y.mean(0)
    return np.argsort(-weight, kind="stable")[:MAX_CLASS_PANELS]


def _grid(plt: Any, n: int, cols: int, w: float, h: float):
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


@dataclass
class _RunLabels:
    """The soft labels of a labeling run, rows in natural image-id order."""

    classes: list[str]
    ids: list[str]
    uris: list[str]
    soft: np.ndarray  # (N, C) soft labels in [0, 1]
    gt: list[list[int]] | None  # ground-truth class indices per image, None without ground truth

    def targets(self) -> np.ndarray:
        """(N, C) 0/1 multi-hot ground truth (requires ``gt``)."""
        targets = np.zeros_like(self.soft, dtype=np.uint8)
        for i, g in enumerate(self.gt or []):
            targets[i, list(g)] = 1
        return targets


def _read_run(output: str, endpoint_override: str | None) -> _RunLabels:
    import pyarrow.dataset as pads

    scores = read_label_scores(output, endpoint_override)
    fs, path = storage.filesystem(storage.join(output, schema.LABELS_DIR), endpoint_override)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["image_id", "uri", "gt_labels", schema.SOFT_LABEL])
    ids = table["image_id"].to_pylist()
    order = sorted(range(len(ids)), key=lambda i: natural_key(ids[i]))
    soft = np.asarray(table[schema.SOFT_LABEL].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      dtype=np.float32).reshape(len(ids), len(scores.classes))  # (N, C)
    gt_col = table["gt_labels"].to_pylist()
    uris = table["uri"].to_pylist()
    return _RunLabels(list(scores.classes), [ids[i] for i in order], [uris[i] for i in order], soft[order],
                      [list(gt_col[i] or []) for i in order] if scores.targets is not None else None)


def write_report(output: str, evaluation: dict[str, Any] | None = None, n_images: int = 8,
                 endpoint_override: str | None = None) -> str:
    """Write the report of a labeling run; returns the URI of ``report.md``.

    Args:
        output: labeling run directory (local or s3://).
        evaluation: the result of ``cdul_ray.evaluate.evaluate_labels`` for that run, or None (no ground truth).
        n_images: images shown in ``scenes.png`` (the first ones in natural image-id order: deterministic).

    Returns:
        URI of ``<output>/report/report.md``; every PNG it links sits next to it (``report_files`` lists them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = storage.join(output, schema.REPORT_DIR)
    run = _read_run(output, endpoint_override)

    def save(fig: Any, name: str, caption: str, dpi: int = 110) -> None:
        storage.write_bytes(storage.join(folder, name), _png(fig, dpi), endpoint_override)
        plt.close(fig)
        pngs.append((name, caption))

    pngs: list[tuple[str, str]] = []  # (file name, caption)
    if evaluation is not None:
        _ap_charts(plt, run.classes, evaluation, save)
    if run.gt is not None:
        thresholds, how = _pr_thresholds(plt, run, save)
    else:
        thresholds, how = _histogram_threshold(plt, run, save)
    save(_scenes_figure(plt, run, thresholds, n_images, endpoint_override), "scenes.png",
         "label sets of the first images")

    per_image = float(np.mean((run.soft >= thresholds[None, :]).sum(1))) if run.ids else 0.0
    md = ["# CDUL pseudo-label report", ""]
    if evaluation is not None:
        md += [render_table(evaluation), ""]
    md += [
        f"Images: {len(run.ids)}. Label sets: {how}; {per_image:.1f} labels per image on average"
        + (f" ({float(np.mean([len(g) for g in run.gt])):.1f} in the ground truth)." if run.gt else "."),
        "",
        "| class | threshold |",
        "|---|---:|",
        *[f"| {c} | {t:.2f} |" for c, t in zip(run.classes, thresholds)],
        "",
        *[f"![{caption}]({name})\n" for name, caption in pngs],
    ]
    storage.write_json(storage.join(folder, schema.REPORT_THRESHOLDS_FILE),
                       {"classes": run.classes, "thresholds": [float(t) for t in thresholds], "how": how},
                       endpoint_override)
    uri = storage.join(folder, schema.REPORT_FILE)
    storage.write_bytes(uri, "\n".join(md).encode(), endpoint_override)
    return uri


def _ap_charts(plt: Any, classes: list[str], evaluation: dict[str, Any], save: Any) -> None:
    """``ap_<method>.png``: per-class pseudo-label AP of each aggregator (ground truth only)."""
    x = np.arange(len(classes))
    for method in METHODS:
        ap = np.array([np.nan if a is None else a for a in evaluation["per_class_ap"][method]], dtype=float)
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes)), 3.4))
        ax.bar(x, np.nan_to_num(ap), color="#4477aa")
        ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{method}: pseudo-label AP per class (mAP {evaluation['map'][method]:.1f})")
        save(fig, f"ap_{method}.png", f"pseudo-label AP per class, {method}")


def _pr_thresholds(plt: Any, run: _RunLabels, save: Any) -> tuple[np.ndarray, str]:
    """``pr_curves.png`` and the per-class F1-best thresholds [C] (ground truth), with how they were chosen."""
    from sklearn.metrics import precision_recall_curve

    soft, targets, classes = run.soft, run.targets(), run.classes
    thresholds, f1 = f1_best_thresholds(soft, targets)
    shown = _class_order(soft, targets)
    fig, axes = _grid(plt, len(shown), 4, 3.0, 2.8)
    for ax, k in zip(axes.flat, shown):
        if targets[:, k].any():
            prec, rec, cuts = precision_recall_curve(targets[:, k], soft[:, k])
            ax.plot(rec, prec, color="#4477aa")
            j = int(np.searchsorted(cuts, thresholds[k]))
            ax.plot(rec[j], prec[j], "o", color="#cc3311")
            ax.set_title(f"{classes[k]}\nt={thresholds[k]:.2f}  F1={f1[k]:.2f}", fontsize=10)
        else:
            ax.set_title(f"{classes[k]}\n(no positives)", fontsize=10)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=9)
        ax.set_ylabel("precision", fontsize=9)
    fig.suptitle("precision/recall of the soft label per class; ● the F1-best threshold t (used in scenes.png)",
                 fontsize=12)
    save(fig, "pr_curves.png", "precision/recall per class and the chosen thresholds", 90)
    return thresholds, ("per class, the threshold with the best F1 on this run's ground truth (the red dots of "
                        "pr_curves.png); on new images without ground truth, reuse these thresholds")


def _histogram_threshold(plt: Any, run: _RunLabels, save: Any) -> tuple[np.ndarray, str]:
    """``soft_label_hist.png`` and one Otsu threshold for every class [C] (no ground truth), with how it was chosen."""
    soft, classes = run.soft, run.classes
    t = otsu_threshold(soft.ravel())
    shown = _class_order(soft, None)
    fig, axes = _grid(plt, len(shown), 4, 3.0, 2.4)
    for ax, k in zip(axes.flat, shown):
        ax.hist(soft[:, k], bins=40, range=(0, 1), color="#4477aa")
        ax.axvline(t, color="#cc3311", lw=1.5)
        ax.set_yscale("log")
        ax.set_title(f"{classes[k]}: {int((soft[:, k] >= t).sum())} of {len(soft)} ≥ t", fontsize=10)
        ax.set_xlabel("soft label", fontsize=9)
    fig.suptitle(f"soft-label values per class (log count); red: threshold t={t:.2f} used in scenes.png",
                 fontsize=12)
    save(fig, "soft_label_hist.png", "soft-label histogram per class and the threshold", 90)
    return np.full(len(classes), t), (
        f"one threshold t={t:.2f} for all classes: Otsu's split of all soft-label values (no ground truth); "
        "a class whose histogram has its own gap (soft_label_hist.png) deserves its own threshold")


def _scene_lines(run: _RunLabels, i: int, thresholds: np.ndarray) -> list[str]:
    """The label set of image ``i`` at ``thresholds`` (best first), marked against the ground truth when known."""
    y, classes = run.soft[i], run.classes
    chosen = [c for c in np.argsort(-y) if y[c] >= thresholds[c]]
    selected = set(chosen)
    more = len(chosen) - MAX_SCENE_LABELS
    chosen = chosen[:MAX_SCENE_LABELS]
    if run.gt is not None:
        truth = set(run.gt[i])
        lines = [f"{'✓' if c in truth else '✗'} {classes[c]} {y[c]:.2f}" for c in chosen]
        missed = [classes[c] for c in sorted(truth) if c not in selected]
        if missed:
            lines.append("missed: " + ", ".join(missed))
    else:
        lines = [f"{classes[c]} {y[c]:.2f}" for c in chosen]
    if more > 0:
        lines.insert(len(chosen), f"(+{more} more)")
    return lines


def _scenes_figure(plt: Any, run: _RunLabels, thresholds: np.ndarray, n_images: int,
                   endpoint_override: str | None) -> Any:
    """``scenes.png``: the first ``n_images`` images (decoded upright, as labeled) with their label sets."""
    from cdul_ray.images import decode_image

    n = min(n_images, len(run.ids))
    fig, axes = _grid(plt, n, 4, 3.6, 5.0)
    for ax, i in zip(axes.flat, range(n)):
        ax.axis("off")
        try:
            ax.imshow(decode_image(storage.read_bytes(run.uris[i], endpoint_override)))  # upright, as labeled
        except Exception as e:  # the report must not fail on one image
            logger.warning("report: cannot show %s: %s", storage.redact(run.uris[i]), storage.redact(str(e)))
        lines = _scene_lines(run, i, thresholds)
        ax.set_title(f"image {run.ids[i]}\n" + ("\n".join(lines) or "(no label above its threshold)"), fontsize=10,
                     loc="left")
    legend = "✓ in the ground truth, ✗ not; " if run.gt is not None else ""
    fig.suptitle(f"label set per image: soft labels at or above the class threshold ({legend}value = soft label)",
                 fontsize=12)
    return fig


def report_files(output: str, endpoint_override: str | None = None) -> list[str]:
    """Every file of a run's report (``report.md``, ``thresholds.json`` and the PNGs), sorted."""
    return storage.list_files(storage.join(output, schema.REPORT_DIR), endpoint_override=endpoint_override)


def render_cam_png(pixels: np.ndarray, cams: np.ndarray, probs: np.ndarray, classes: list[str],
                   gt: list[int] | None, title: str, top_k: int = 3) -> bytes:
    """One image and the class activation maps of its ``top_k`` most probable classes, as PNG bytes.

    Each CAM is min-max scaled to [0, 1] per panel (a colour bar shows the scale: 1 = the most activated region).

    Args:
        pixels: [3, S, S] uint8 network input (before normalisation).
        cams: [C, h, w] class activation maps (logit units).
        probs: [C] predicted probabilities in [0, 1].
        gt: ground-truth class indices, or None; marked "(gt)" in the panel titles.
    """
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = pixels.transpose(1, 2, 0)  # (S, S, 3)
    size = image.shape[0]
    order = np.argsort(-probs)[:top_k]
    fig = Figure(figsize=(3.4 * (len(order) + 1) + 0.8, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(order) + 1, squeeze=False)[0]
    gt_names = [classes[i] for i in (gt or [])]
    axes[0].imshow(image)
    axes[0].set_title(f"{title}\nground truth: {', '.join(gt_names) if gt is not None else 'n/a'}", fontsize=11)
    mappable = False
    for ax, c in zip(axes[1:], order):
        cam = torch.from_numpy(cams[c][None, None].astype(np.float32))
        up = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        up = up.numpy()
        up = (up - up.min()) / (up.max() - up.min() + 1e-8)  # [0, 1]
        ax.imshow(image)
        ax.imshow(up, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        mappable = True
        mark = " (gt)" if gt is not None and c in gt else ""
        ax.set_title(f"{classes[c]}{mark}\np = {probs[c]:.2f}", fontsize=12)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout(pad=1.0)
    if mappable:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=list(axes), fraction=0.025, pad=0.01)
        bar.set_label("class activation (scaled per panel)", fontsize=10)
        bar.ax.tick_params(labelsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
