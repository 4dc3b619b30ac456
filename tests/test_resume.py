"""Unlabeled corpora end to end, streamed exactly-once output, resume after a kill, incremental runs (issue 8)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cdul_ray import schema
from cdul_ray.batch_inference import OutputExistsError
from cdul_ray.pipeline import run_labeling
from tests.helpers import CLASSES, committed_count, folder_label_config as _cfg, output_ids
from tests.s3_fixtures import make_bucket, s3_env, upload_dir  # noqa: F401

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture()
def corpus(tmp_path):
    """A folder of photos nobody annotated (one sub-folder, one unreadable file) and a classes file."""
    folder = tmp_path / "photos"
    _write_images(folder, [f"img_{i:03d}.jpg" for i in range(10)] + ["trip/beach 1.jpg"])
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return folder, classes




def test_folder_without_ground_truth_one_row_per_readable_image(ray_cluster, corpus, tiny_clip, tmp_path, caplog):
    folder, classes = corpus
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="cdul_ray.pipeline"):
        summary = run_labeling(_cfg(folder, out, tiny_clip, classes))
    labels = pq.read_table(out / schema.LABELS_DIR)
    expected = sorted([f"img_{i:03d}.jpg" for i in range(10)] + ["trip/beach 1.jpg"])
    assert sorted(labels["image_id"].to_pylist()) == expected
    assert labels["gt_labels"].null_count == labels.num_rows  # no ground truth: null, not a crash
    assert output_ids(out, schema.ERRORS_DIR) == ["broken.jpg"]
    assert (summary.images, summary.already_done, summary.labeled, summary.errors) == (12, 0, 11, 1)
    assert summary.evaluation is None and not (out / schema.EVALUATION_JSON).exists()
    assert "no ground truth" in summary.render()
    assert "evaluation skipped: the dataset has no ground truth" in caplog.text
    assert json.loads((out / schema.SUMMARY_FILE).read_text())["labeled_total"] == 11


def test_output_inside_the_folder_dataset_is_not_labeled_on_the_next_run(ray_cluster, corpus, tiny_clip, capsys):
    from cdul_ray.cli import main

    folder, classes = corpus
    out = folder / "runs" / "first"  # the report's PNGs land under the dataset folder
    argv = ["label", "--format", "folder", "--dataset", str(folder), "--classes-file", str(classes), "--output",
            str(out), "--model", f"local-dir:{tiny_clip}", "--pretrained", "none", "--batch-size", "4",
            "--max-actors", "1"]
    assert main(argv) == 0
    assert sorted((out / "report").glob("*.png"))  # images that a naive folder listing would pick up
    assert main(argv) == 0
    console = capsys.readouterr().out
    assert "already done   12" in console and "labeled now    0" in console, console[-2000:]
    ids = output_ids(out, schema.LABELS_DIR) + output_ids(out, schema.ERRORS_DIR)
    assert sorted(ids) == sorted([f"img_{i:03d}.jpg" for i in range(10)] + ["trip/beach 1.jpg", "broken.jpg"])


def test_incremental_run_labels_only_new_images(ray_cluster, corpus, tiny_clip, tmp_path):
    folder, classes = corpus
    out = tmp_path / "out"
    run_labeling(_cfg(folder, out, tiny_clip, classes))
    first = {f.name for f in (out / schema.LABELS_DIR).glob("*.parquet")}
    before = pq.read_table(out / schema.LABELS_DIR).sort_by("image_id")

    _write_images(folder, ["new_a.jpg", "trip/new_b.jpg", "new_c.jpg"], seed=1)
    summary = run_labeling(_cfg(folder, out, tiny_clip, classes))
    assert (summary.images, summary.already_done, summary.labeled, summary.errors) == (15, 12, 3, 0)
    assert (summary.labeled_total, summary.errors_total) == (14, 1)
    ids = output_ids(out, schema.LABELS_DIR)
    assert len(ids) == len(set(ids)) == 14
    assert set(ids) - set(before["image_id"].to_pylist()) == {"new_a.jpg", "trip/new_b.jpg", "new_c.jpg"}
    # the first run's files are untouched: the same rows, bit for bit
    assert first <= {f.name for f in (out / schema.LABELS_DIR).glob("*.parquet")}
    again = pq.read_table([out / schema.LABELS_DIR / n for n in sorted(first)]).sort_by("image_id")
    assert again.equals(before)

    nothing = run_labeling(_cfg(folder, out, tiny_clip, classes))  # the same command a third time
    assert (nothing.already_done, nothing.labeled, nothing.errors) == (15, 0, 0)
    assert len(output_ids(out, schema.LABELS_DIR)) == 14


def test_different_label_defining_config_is_refused_by_name(ray_cluster, corpus, tiny_clip, tmp_path):
    folder, classes = corpus
    out = tmp_path / "out"
    run_labeling(_cfg(folder, out, tiny_clip, classes, limit=2))
    before = sorted(p.name for p in (out / schema.LABELS_DIR).iterdir())
    with pytest.raises(OutputExistsError, match=r"different grid \(grid: 3 in the output, 2 now\)"):
        run_labeling(_cfg(folder, out, tiny_clip, classes, limit=2, grid=2))
    with pytest.raises(OutputExistsError, match="different aggregator, threshold"):
        run_labeling(_cfg(folder, out, tiny_clip, classes, limit=2, aggregator="max", threshold=0.5))
    other_classes = classes.parent / "other.txt"
    other_classes.write_text("cat\ndog\n")
    with pytest.raises(OutputExistsError, match="different classes"):
        run_labeling(_cfg(folder, out, tiny_clip, other_classes, limit=2))
    # --views auto became exact views on these CPU actors; device views (what auto gives GPU actors) are refused
    assert json.loads((out / schema.RUN_CONFIG_FILE).read_text())["views_used"] == "exact"
    with pytest.raises(OutputExistsError, match=r"computed from exact views.*pass --views exact to resume"):
        run_labeling(_cfg(folder, out, tiny_clip, classes, limit=3, views="device"))
    assert sorted(p.name for p in (out / schema.LABELS_DIR).iterdir()) == before  # nothing touched
    assert json.loads((out / schema.RUN_CONFIG_FILE).read_text())["views_used"] == "exact"
    # --overwrite is the explicit fresh start
    summary = run_labeling(_cfg(folder, out, tiny_clip, classes, limit=2, grid=2, overwrite=True))
    assert (summary.already_done, summary.labeled, summary.errors) == (0, 1, 1)  # limit 2: broken.jpg, img_000.jpg
    assert json.loads((out / schema.RUN_CONFIG_FILE).read_text())["grid"] == 2


def test_manifest_without_ground_truth(ray_cluster, corpus, tiny_clip, tmp_path):
    folder, classes = corpus
    names = ["img_000.jpg", "img_001.jpg", "trip/beach 1.jpg", "gone.jpg"]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": [str(folder / n) for n in names], "image_id": ["a", "b", "c", "d"]}), manifest)
    out = tmp_path / "out"
    summary = run_labeling(_cfg(manifest, out, tiny_clip, classes, format="manifest"))
    assert sorted(output_ids(out, schema.LABELS_DIR)) == ["a", "b", "c"]
    errors = pq.read_table(out / schema.ERRORS_DIR).to_pylist()
    assert [(e["image_id"], e["stage"]) for e in errors] == [("d", "read")]
    assert (summary.labeled, summary.errors, summary.evaluation) == (3, 1, None)


def test_s3_prefix_without_ground_truth_resumes_incrementally(ray_cluster, s3_env, corpus, tiny_clip):  # noqa: F811
    folder, classes = corpus
    client = make_bucket(s3_env, "photos")
    upload_dir(client, folder, "photos", "corpus")
    cfg = _cfg("s3://photos/corpus", "s3://photos/runs/r1", tiny_clip, classes, s3_endpoint=s3_env)
    first = run_labeling(cfg)
    assert (first.labeled, first.errors) == (11, 1)

    _write_images(folder / "more", ["x.jpg", "y.jpg"], seed=2)
    upload_dir(client, folder / "more", "photos", "corpus/more")
    second = run_labeling(cfg)
    assert (second.already_done, second.labeled, second.errors) == (12, 2, 0)

    keys = [o["Key"] for o in client.list_objects_v2(Bucket="photos", Prefix="runs/r1/labels/")["Contents"]
            if o["Key"].endswith(".parquet")]
    ids = [i for k in keys for i in pq.read_table(io.BytesIO(client.get_object(Bucket="photos", Key=k)["Body"].read()),
                                                  columns=["image_id"])["image_id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 13
    assert {"more/x.jpg", "more/y.jpg", "trip/beach 1.jpg"} <= set(ids)


def _label_command(folder: Path, out: Path, clip: Path, classes: Path) -> list[str]:
    return [sys.executable, "jobs/label_folder.py", "--dataset", str(folder), "--classes-file", str(classes),
            "--output", str(out), "--model", f"local-dir:{clip}", "--pretrained", "none", "--batch-size", "4",
            "--decode-batch-size", "4", "--rows-per-file", "4", "--max-actors", "1"]


def test_killed_driver_resumes_exactly_once(tiny_clip, tmp_path):
    """SIGKILL the labeling driver's process group once label rows are on disk; the same command finishes the job."""
    folder = tmp_path / "photos"
    names = [f"p{i:03d}.jpg" for i in range(60)]
    _write_images(folder, names)
    (folder / "bad.jpg").write_bytes(b"")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "out"
    cmd = _label_command(folder, out, tiny_clip, classes)
    # its own local Ray cluster in its own process group, as `python jobs/label_folder.py` on a laptop
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            committed = [f for f in (out / schema.CHECKPOINT_DIR).glob("*.parquet") if ".pending" not in f.name] \
                if (out / schema.CHECKPOINT_DIR).exists() else []
            if len(committed) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the first run ended before it could be killed"
        assert committed_count(out) < len(names), "killed too late to test a resume"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / schema.SUMMARY_FILE).exists()
    assert committed_count(out) > 0  # data files may be half-written here: the resume rolls them back

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    labels, errors = output_ids(out, schema.LABELS_DIR), output_ids(out, schema.ERRORS_DIR)
    assert sorted(labels) == names and errors == ["bad.jpg"]  # every image exactly once
    assert summary["images"] == 61 and summary["already_done"] > 0
    assert summary["labeled"] + summary["errors"] < 61  # the second run labeled fewer images than the corpus holds
    assert summary["already_done"] + summary["labeled"] + summary["errors"] == 61
