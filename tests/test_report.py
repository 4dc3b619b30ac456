"""The labeling report: natural scene order, label sets at chosen thresholds, how the thresholds were chosen."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cdul_ray import schema
from cdul_ray.report import f1_best_thresholds, natural_key, otsu_threshold, render_cam_png, write_report


def test_natural_order_of_image_ids():
    ids = ["10", "2", "100", "1", "img10", "img9", "img9b"]
    assert sorted(ids, key=natural_key) == ["1", "2", "10", "100", "img9", "img9b", "img10"]


def test_f1_best_threshold_per_class():
    y = np.array([[0.9, 0.5, 0.2], [0.8, 0.5, 0.1], [0.3, 0.1, 0.0], [0.2, 0.05, 0.0]], dtype=np.float32)
    t = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=np.uint8)
    thresholds, f1 = f1_best_thresholds(y, t)
    # class 0: cutting at 0.8 keeps both positives and nothing else (F1 = 1)
    assert thresholds[0] == pytest.approx(0.8) and f1[0] == pytest.approx(1.0)
    # class 1: the two 0.5 scores cannot be separated: at 0.5, 1 true positive of 2 predicted, 1 positive -> 2/3
    assert thresholds[1] == pytest.approx(0.5) and f1[1] == pytest.approx(2 / 3)
    # class 2 has no positive: no threshold to learn
    assert thresholds[2] == 1.0 and np.isnan(f1[2])


def test_otsu_threshold_splits_two_modes():
    values = np.r_[np.full(300, 0.05), np.full(100, 0.48), np.linspace(0.0, 0.1, 50)]
    t = otsu_threshold(values)
    assert 0.1 < t <= 0.48
    assert int((values >= t).sum()) == 100


def _run(tmp_path, gt: bool):
    """A 3-class labeling run of 12 images (ids 1..12) written as the pipeline writes it."""
    rng = np.random.default_rng(0)
    out = tmp_path / ("gt" if gt else "nogt")
    (out / schema.LABELS_DIR).mkdir(parents=True)
    classes = ["red", "green", "blue"]
    (out / schema.CLASSES_FILE).write_text(json.dumps({"classes": classes, "templates": ["a {}."]}))
    rows = {k: [] for k in schema.labels_schema(3).names}
    for i in range(12):
        truth = [i % 3] if i % 4 else [i % 3, (i + 1) % 3]
        uri = str(tmp_path / f"{i + 1}.png")
        Image.new("RGB", (32, 32), ((i * 20) % 255, 80, 160)).save(uri)
        soft = rng.uniform(0.0, 0.2, 3)
        soft[truth] = rng.uniform(0.5, 0.9, len(truth))
        rows["image_id"].append(str(i + 1))
        rows["uri"].append(uri)
        rows["width"].append(32)
        rows["height"].append(32)
        rows["gt_labels"].append(truth if gt else None)
        for name in schema.SCORE_COLUMNS:
            rows[name].append(soft.astype(np.float32).tolist())
    pq.write_table(pa.table(rows, schema=schema.labels_schema(3)), out / schema.LABELS_DIR / "part-0.parquet")
    return out


def test_report_without_ground_truth_uses_histograms_and_one_threshold(tmp_path):
    out = _run(tmp_path, gt=False)
    md = open(write_report(str(out))).read()
    report = out / "report"
    assert sorted(p.name for p in report.iterdir()) == ["report.md", "scenes.png", "soft_label_hist.png",
                                                         "thresholds.json"]
    saved = json.loads((report / "thresholds.json").read_text())
    t = saved["thresholds"][0]
    assert saved["thresholds"] == [t, t, t] and 0.2 <= t <= 0.5  # Otsu between the 0-0.2 and 0.5-0.9 modes
    assert "Otsu" in md and "![soft-label histogram per class and the threshold](soft_label_hist.png)" in md
    assert "1.2 labels per image on average." in md  # 3 of 12 images carry two classes above the threshold
    assert Image.open(report / "soft_label_hist.png").size[0] > 800


def test_report_with_ground_truth_uses_pr_curves(tmp_path):
    out = _run(tmp_path, gt=True)
    md = open(write_report(str(out))).read()
    names = sorted(p.name for p in (out / "report").iterdir())
    assert names == ["pr_curves.png", "report.md", "scenes.png", "thresholds.json"]
    saved = json.loads((out / "report" / "thresholds.json").read_text())
    # positives score 0.5-0.9, negatives 0-0.2: the F1-best cut of each class is its lowest positive score
    assert all(0.5 <= t <= 0.9 for t in saved["thresholds"])
    assert "1.2 labels per image on average (1.2 in the ground truth)." in md


def test_cam_panel_has_a_colour_bar_and_readable_size():
    from io import BytesIO

    rng = np.random.default_rng(0)
    png = render_cam_png(rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), rng.normal(size=(5, 4, 4)),
                         np.array([0.9, 0.1, 0.5, 0.3, 0.2]), list("abcde"), [0], "epoch 1 · 7")
    image = Image.open(BytesIO(png))
    assert image.size[0] >= 1200 and image.size[1] >= 350  # 4 panels of ~3.4 in at 100 dpi, plus the colour bar
