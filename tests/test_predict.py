"""Batch prediction (jobs/predict.py) on a local Ray cluster with a tiny classifier saved as training saves it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cdul_ray import schema
from cdul_ray.classifier import (
    create_classifier,
    load_model_dir,
    normalisation,
    resize_pixels,
    resolve_model_dir,
    save_model_dir,
)
from cdul_ray.core.metrics import mean_average_precision, multi_hot
from cdul_ray.datasets import load_dataset
from cdul_ray.predict import PredictConfig, run_prediction
from tests.helpers import CLASSES, write_coco_shapes

pytestmark = pytest.mark.slow

IMAGE_SIZE = 64


def _save(folder, seed: int, loss: str = "bce"):
    torch.manual_seed(seed)
    model = create_classifier("test_resnet", len(CLASSES)).eval()
    mean, std = normalisation(model)
    meta = {"backbone": "test_resnet", "classes": CLASSES, "image_size": IMAGE_SIZE, "loss": loss, "mean": mean,
            "std": std, "epoch": seed}
    save_model_dir(str(folder), model, meta)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training output with two checkpoints and no model/ dir: predict must pick the newest checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    _save(out / schema.CHECKPOINTS_DIR / "checkpoint_epoch0001", seed=1)
    model = _save(out / schema.CHECKPOINTS_DIR / "checkpoint_epoch0002", seed=2)
    return out, model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A COCO set (with ground truth) and a plain folder of its images plus a corrupt file in a subfolder."""
    root = tmp_path_factory.mktemp("predict_data")
    info = write_coco_shapes(root / "coco", {"test": 9}, size=48)
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted((root / "coco" / "test").glob("*.jpg"))):
        shutil.copy(p, folder / ("sub" if i % 2 else "") / p.name)
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root, info


def _expected_probs(model, paths):
    x = np.stack([resize_pixels(Image.open(p).convert("RGB"), IMAGE_SIZE) for p in paths])
    mean, std = normalisation(model)
    t = (torch.from_numpy(x).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.sigmoid(model(t)).numpy()


def test_model_dir_resolution(trained, tmp_path):
    out, _ = trained
    assert resolve_model_dir(str(out)).endswith("checkpoint_epoch0002")
    _, meta = load_model_dir(str(out))
    assert meta["epoch"] == 2 and meta["classes"] == CLASSES
    copy = tmp_path / "with_model"
    shutil.copytree(out, copy)
    _save(copy / "model", seed=3)  # the final model of a finished run wins over the checkpoints
    assert resolve_model_dir(str(copy)) == str(copy / "model")
    assert resolve_model_dir(str(copy / schema.CHECKPOINTS_DIR / "checkpoint_epoch0001")).endswith("checkpoint_epoch0001")
    with pytest.raises(FileNotFoundError, match="model.json"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_folder_one_row_per_readable_image_probabilities_in_unit_interval(ray_cluster, trained, images, tmp_path):
    out, model = trained
    root, info = images
    summary = run_prediction(PredictConfig(checkpoint=str(out), dataset=str(root / "folder"), output=str(tmp_path),
                                           batch_size=4, decode_batch_size=3))
    table = pq.read_table(tmp_path / schema.PREDICTIONS_DIR)
    assert table.schema.equals(schema.predictions_schema(len(CLASSES)), check_metadata=False)
    uris = table["uri"].to_pylist()
    good = sorted(str(p) for p in (root / "folder").rglob("*.jpg"))
    assert sorted(uris) == good and len(set(table["image_id"].to_pylist())) == len(good) == 9
    probs = np.asarray(table["probabilities"].to_pylist(), dtype=np.float32)
    assert probs.shape == (9, len(CLASSES)) and np.isfinite(probs).all()
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs, _expected_probs(model, uris), atol=1e-5)  # the newest checkpoint's model

    errors = pq.read_table(tmp_path / schema.ERRORS_DIR).to_pylist()
    assert [(e["uri"].endswith("broken.png"), e["stage"]) for e in errors] == [(True, "decode")]
    assert summary.images == 10 and summary.predicted == 9 and summary.errors == 1 and summary.map is None
    assert json.loads((tmp_path / schema.CLASSES_FILE).read_text())["classes"] == CLASSES


def test_manifest_with_a_missing_file_and_coco_with_ground_truth(ray_cluster, trained, images, tmp_path):
    out, _ = trained
    root, info = images
    files = sorted(str(p) for p in (root / "coco" / "test").glob("*.jpg"))
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": files[:4] + [str(root / "gone.jpg")]}), manifest)
    summary = run_prediction(PredictConfig(checkpoint=str(out), dataset=str(manifest), output=str(tmp_path / "m")))
    assert pq.read_table(tmp_path / "m" / schema.PREDICTIONS_DIR).num_rows == 4 and summary.errors == 1
    assert pq.read_table(tmp_path / "m" / schema.ERRORS_DIR).to_pylist()[0]["stage"] == "read"

    coco = run_prediction(PredictConfig(checkpoint=str(out), dataset=str(root / "coco"), split="test",
                                        output=str(tmp_path / "c")))
    table = pq.read_table(tmp_path / "c" / schema.PREDICTIONS_DIR)
    assert sorted(table["image_id"].to_pylist(), key=int) == info["test"]["ok"]
    # the mAP of the newest checkpoint's model, computed here from the images and the COCO annotations
    _, model = trained
    index = load_dataset(str(root / "coco"), "coco", "test", CLASSES)
    targets = multi_hot(index.records["gt_labels"].to_pylist(), len(CLASSES))
    expected = mean_average_precision(_expected_probs(model, index.records["uri"].to_pylist()), targets).map
    assert coco.map == pytest.approx(expected, abs=1e-3)
    assert json.loads((tmp_path / "c" / schema.SUMMARY_FILE).read_text())["map"] == pytest.approx(expected, abs=1e-3)


def test_fails_fast_on_missing_checkpoint_and_existing_output(images, trained, tmp_path):
    from cdul_ray.pipeline import OutputExistsError

    root, _ = images
    out, _ = trained
    with pytest.raises(FileNotFoundError, match="`checkpoint`"):
        run_prediction(PredictConfig(checkpoint=str(tmp_path / "none"), dataset=str(root / "folder"),
                                     output=str(tmp_path / "o")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_prediction(PredictConfig(checkpoint=str(out), dataset=str(root / "folder"), output=str(tmp_path / "busy")))
    assert not (tmp_path / "o").exists()


def test_rerun_predicts_only_new_images_and_refuses_another_classifier(ray_cluster, trained, images, tmp_path):
    from cdul_ray.batch_inference import OutputExistsError

    out, _ = trained
    root, _ = images
    folder = tmp_path / "photos"
    shutil.copytree(root / "folder", folder)
    cfg = PredictConfig(checkpoint=str(out), dataset=str(folder), output=str(tmp_path / "p"), batch_size=4,
                        decode_batch_size=3, rows_per_file=3)
    first = run_prediction(cfg)
    assert (first.already_done, first.predicted, first.errors) == (0, 9, 1)
    new = folder / "new.jpg"
    shutil.copy(sorted(folder.glob("*.jpg"))[0], new)
    second = run_prediction(cfg)
    assert (second.images, second.already_done, second.predicted, second.errors) == (11, 10, 1, 0)
    ids = pq.read_table(tmp_path / "p" / schema.PREDICTIONS_DIR)["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 10 and "new.jpg" in ids
    other = tmp_path / "other"
    _save(other / "model", seed=7)
    with pytest.raises(OutputExistsError, match="different checkpoint"):
        run_prediction(PredictConfig(checkpoint=str(other), dataset=str(folder), output=str(tmp_path / "p")))
