"""The labeling job end to end on a local Ray cluster with a tiny open_clip model (Ray Data + Parquet)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cdul_ray import schema
from cdul_ray.config import LabelConfig
from cdul_ray.core.aggregate import aggregate, initial_soft_label
from cdul_ray.core.metrics import mean_average_precision, multi_hot
from cdul_ray.evaluate import read_label_scores, soft_labels
from cdul_ray.pipeline import run_labeling
from tests.helpers import CLASSES

pytestmark = pytest.mark.slow


def _cfg(dataset, output, clip, **kw) -> LabelConfig:
    base = dict(dataset=str(dataset), output=str(output), split="train", model=f"local-dir:{clip}",
                pretrained="none", batch_size=4, decode_batch_size=4, threshold=0.3)
    base.update(kw)
    return LabelConfig(**base)


def _vectors(table, column):
    return np.asarray(table[column].to_pylist(), dtype=np.float32)


@pytest.fixture(scope="module")
def labeled(ray_cluster, coco_dataset, tiny_clip, tmp_path_factory):
    root, info = coco_dataset
    out = tmp_path_factory.mktemp("labels_1actor")
    summary = run_labeling(_cfg(root, out, tiny_clip, max_actors=1))
    return out, info, summary


def test_one_row_per_readable_image_with_the_fixed_schema(labeled):
    out, info, summary = labeled
    table = pq.read_table(out / schema.LABELS_DIR)
    assert table.schema.equals(schema.labels_schema(len(CLASSES)), check_metadata=False)
    assert sorted(table["image_id"].to_pylist(), key=int) == info["ok"]
    assert summary.images == len(info["ok"]) + 2 and summary.labeled == len(info["ok"]) and summary.errors == 2
    assert (table["width"].to_numpy() >= 40).all() and (table["height"].to_numpy() >= 40).all()
    assert json.loads((out / schema.CLASSES_FILE).read_text())["classes"] == CLASSES
    assert json.loads((out / schema.RUN_CONFIG_FILE).read_text())["grid"] == 3


def test_scores_are_probabilities_and_consistent(labeled):
    out, _, _ = labeled
    table = pq.read_table(out / schema.LABELS_DIR)
    g = _vectors(table, schema.GLOBAL_SCORE)
    a, b, m, y = (_vectors(table, c) for c in (schema.LOCAL_MAX, schema.LOCAL_MIN, schema.LOCAL_MEAN, schema.SOFT_LABEL))
    for arr in (g, a, b, m, y):
        assert arr.shape == (table.num_rows, len(CLASSES))
        assert np.isfinite(arr).all() and (arr >= 0).all() and (arr <= 1).all()
    np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-5)  # global softmax over classes
    assert (b <= m + 1e-6).all() and (m <= a + 1e-6).all()  # min <= mean <= max over snippets
    expected = initial_soft_label(torch.from_numpy(g), aggregate(*map(torch.from_numpy, (a, b, m)), "cdul", 0.3))
    np.testing.assert_allclose(y, expected.numpy(), atol=1e-6)


def test_errors_table_names_the_corrupt_and_missing_files(labeled):
    out, info, _ = labeled
    errors = pq.read_table(out / schema.ERRORS_DIR)
    assert errors.schema.equals(schema.ERRORS_SCHEMA, check_metadata=False)
    rows = {r["image_id"]: r for r in errors.to_pylist()}
    assert set(rows) == {info["corrupt"], info["missing"]}
    assert rows[info["corrupt"]]["uri"].endswith("corrupt.jpg") and rows[info["corrupt"]]["stage"] == "decode"
    assert rows[info["missing"]]["uri"].endswith("missing.jpg") and rows[info["missing"]]["stage"] == "read"
    assert rows[info["missing"]]["reason"]


def test_evaluation_written_and_reproducible_from_parquet(labeled):
    out, _, summary = labeled
    ev = json.loads((out / schema.EVALUATION_JSON).read_text())
    assert set(ev["map"]) == {"global", "avg", "max", "cdul"}
    scores = read_label_scores(str(out))
    table = pq.read_table(out / schema.LABELS_DIR).sort_by("image_id")
    np.testing.assert_allclose(soft_labels(scores, "cdul", 0.3), _vectors(table, schema.SOFT_LABEL), atol=1e-6)
    # Table 1 from the written columns and the ground truth, independently of cdul_ray.evaluate
    targets = multi_hot(table["gt_labels"].to_pylist(), len(CLASSES))
    for method, column in (("global", schema.GLOBAL_SCORE), ("cdul", schema.SOFT_LABEL)):
        expected = mean_average_precision(_vectors(table, column), targets).map
        assert ev["map"][method] == pytest.approx(expected, abs=1e-3)
        assert summary.evaluation["map"][method] == pytest.approx(expected, abs=1e-3)
    assert ev["zeta_sweep"]["0"] == pytest.approx(ev["map"]["max"])


def test_one_and_two_actors_give_identical_labels(labeled, coco_dataset, tiny_clip, tmp_path):
    out1, _, _ = labeled
    root, _ = coco_dataset
    run_labeling(_cfg(root, tmp_path, tiny_clip, min_actors=2, max_actors=2, cpus_per_actor=0.5, batch_size=3))
    t1 = pq.read_table(out1 / schema.LABELS_DIR).sort_by("image_id")
    t2 = pq.read_table(tmp_path / schema.LABELS_DIR).sort_by("image_id")
    assert t1["image_id"].to_pylist() == t2["image_id"].to_pylist()
    for col in schema.SCORE_COLUMNS:
        np.testing.assert_allclose(_vectors(t1, col), _vectors(t2, col), atol=1e-5, rtol=1e-5)


def test_cdul_evaluate_re_evaluates_from_parquet_alone(labeled, capsys):
    from cdul_ray.cli import main

    out, _, summary = labeled
    assert main(["evaluate", "--output", str(out), "--threshold", "0", "--no-write"]) == 0
    printed = capsys.readouterr().out
    m = summary.evaluation["map"]
    # with ζ = 0 cdul equals max; global/avg/max do not depend on ζ
    row = f"| {m['global']:.1f} | {m['avg']:.1f} | {m['max']:.1f} | {m['max']:.1f} |"
    assert row in printed
    assert json.loads((out / schema.EVALUATION_JSON).read_text())["threshold"] == 0.3  # --no-write kept the file


def test_overwrite_never_deletes_a_directory_that_is_not_a_labeling_run(coco_dataset, tiny_clip, tmp_path):
    from cdul_ray.pipeline import OutputExistsError

    root, _ = coco_dataset
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="holds no labeling run"):
        run_labeling(_cfg(root, precious, tiny_clip, overwrite=True))
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_views_cut_on_the_device_give_nearly_the_exact_labels(labeled, coco_dataset, tiny_clip, tmp_path):
    """views=device (torch resize where CLIP runs) vs the default exact PIL views on CPU: same rows, same errors,
    scores within a small tolerance (docs/performance.md: the mAP difference on the synthetic benchmark)."""
    out1, _, summary1 = labeled
    root, _ = coco_dataset
    summary2 = run_labeling(_cfg(root, tmp_path, tiny_clip, max_actors=1, views="device"))
    assert (summary2.labeled, summary2.errors) == (summary1.labeled, summary1.errors)
    t1 = pq.read_table(out1 / schema.LABELS_DIR).sort_by("image_id")
    t2 = pq.read_table(tmp_path / schema.LABELS_DIR).sort_by("image_id")
    assert t1["image_id"].to_pylist() == t2["image_id"].to_pylist()
    e1 = pq.read_table(out1 / schema.ERRORS_DIR).sort_by("image_id")
    e2 = pq.read_table(tmp_path / schema.ERRORS_DIR).sort_by("image_id")
    assert e1["image_id"].to_pylist() == e2["image_id"].to_pylist()
    for col in schema.SCORE_COLUMNS:
        np.testing.assert_allclose(_vectors(t1, col), _vectors(t2, col), atol=0.02)
    # really the other path: torch's resize is not bit-exact with PIL's
    assert not np.array_equal(_vectors(t1, schema.GLOBAL_SCORE), _vectors(t2, schema.GLOBAL_SCORE))


def test_compiled_clip_gives_the_eager_labels(labeled, coco_dataset, tiny_clip, tmp_path):
    """--compile (torch.compile of the image tower in the actor, batches padded to --batch-size): the same rows and
    errors, scores equal to float rounding."""
    out1, _, summary1 = labeled
    root, _ = coco_dataset
    summary2 = run_labeling(_cfg(root, tmp_path, tiny_clip, max_actors=1, compile=True))
    assert (summary2.labeled, summary2.errors) == (summary1.labeled, summary1.errors)
    t1 = pq.read_table(out1 / schema.LABELS_DIR).sort_by("image_id")
    t2 = pq.read_table(tmp_path / schema.LABELS_DIR).sort_by("image_id")
    assert t1["image_id"].to_pylist() == t2["image_id"].to_pylist()
    for col in schema.SCORE_COLUMNS:
        np.testing.assert_allclose(_vectors(t1, col), _vectors(t2, col), atol=1e-5, rtol=1e-4)
    run_config = json.loads((tmp_path / schema.RUN_CONFIG_FILE).read_text())
    assert run_config["compile"] is True
    assert run_config["decode_batch_size"] == run_config["decode_batch_rows_used"] == 4


def test_run_config_records_the_decode_blocks_auto_resolved_to(labeled, coco_dataset, tiny_clip, tmp_path):
    """--decode-batch-size unset: run_config.json says what the auto rule chose (the tiny CLIP's 32 px views are
    small, so the 256-image cap)."""
    root, _ = coco_dataset
    run_labeling(_cfg(root, tmp_path, tiny_clip, max_actors=1, decode_batch_size=None, limit=3))
    run_config = json.loads((tmp_path / schema.RUN_CONFIG_FILE).read_text())
    assert run_config["decode_batch_size"] is None
    assert run_config["decode_batch_rows_used"] == 256
