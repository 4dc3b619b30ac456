"""Gradient-alignment training on a local Ray cluster (Ray Train + Ray Data) with a tiny timm backbone.

The dataset is a learnable multi-label COCO set (coloured squares, tests.helpers.write_coco_shapes). The labeling run
is produced by the real labeling job with the tiny random CLIP; because random CLIP labels carry no signal, most
tests train on a "planted" copy of that run whose soft labels are noisy ground truth (same files, same schema).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cdul_ray import schema
from cdul_ray.config import ConfigError, LabelConfig
from cdul_ray.core.metrics import mean_average_precision, multi_hot
from cdul_ray.datasets import load_dataset
from cdul_ray.pipeline import run_labeling
from cdul_ray.train import TrainConfig, run_training
from cdul_ray.train.labels import label_matrix, read_history, read_label_version
from cdul_ray.train.worker import CRASH_ENV
from tests.helpers import CLASSES, write_coco_shapes
from tests.s3_fixtures import make_bucket, s3_env, upload_dir  # noqa: F401

pytestmark = pytest.mark.slow

# Ray Train's controller polls its workers every 2 s, so every ray.train.report (one per epoch) waits up to 2 s. Poll
# faster in this session's local cluster (started after collection, so it inherits this); it changes nothing else.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

N_TRAIN, N_TEST = 41, 24  # odd: with 2 workers one image per epoch reaches no worker and is carried over
EPOCHS = 8


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    info = write_coco_shapes(root, {"train": N_TRAIN, "test": N_TEST}, size=64, corrupt_split="train")
    return root, info


@pytest.fixture(scope="module")
def clip_labels(ray_cluster, shapes, tiny_clip, tmp_path_factory):
    """A real labeling run (tiny random CLIP) of the train split: soft labels for the good images."""
    root, _ = shapes
    out = tmp_path_factory.mktemp("clip_labels")
    run_labeling(LabelConfig(dataset=str(root), output=str(out), split="train", model=f"local-dir:{tiny_clip}",
                             pretrained="none", batch_size=8, decode_batch_size=8))
    return out


@pytest.fixture(scope="module")
def planted(clip_labels, tmp_path_factory):
    """The labeling run with its soft labels replaced by noisy ground truth (0.65-0.85 present, 0.05-0.25 absent)."""
    out = tmp_path_factory.mktemp("planted") / "run"
    shutil.copytree(clip_labels, out)
    table = pq.read_table(out / schema.LABELS_DIR).sort_by("image_id")  # the job writes rows in any order
    rng = np.random.default_rng(1)
    y = np.full((table.num_rows, len(CLASSES)), 0.05, dtype=np.float32)
    for i, gt in enumerate(table["gt_labels"].to_pylist()):
        y[i, gt] = 0.65
    y += rng.uniform(0, 0.2, size=y.shape).astype(np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), len(CLASSES)).cast(
        pa.list_(pa.float32(), len(CLASSES)))
    table = table.set_column(table.schema.get_field_index(schema.SOFT_LABEL), schema.SOFT_LABEL, vec)
    shutil.rmtree(out / schema.LABELS_DIR)
    (out / schema.LABELS_DIR).mkdir()
    pq.write_table(table, out / schema.LABELS_DIR / "part-0.parquet")
    return out


def _cfg(labels, dataset, output, **kw) -> TrainConfig:
    base = dict(labels=str(labels), dataset=str(dataset), output=str(output), eval_split="test",
                backbone="test_resnet", pretrained_backbone="false", image_size=64, epochs=EPOCHS, batch_size=8,
                lr=3e-3, label_lr=0.3, label_warmup_epochs=1, workers=1, cpus_per_worker=0.5, decode_batch_size=8,
                cam_images=2, max_failures=0, cache_decoded="true", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _targets(root, split) -> dict[str, np.ndarray]:
    """image_id -> multi-hot [C] ground truth of a split of the shapes dataset."""
    index = load_dataset(str(root), "coco", split, CLASSES)
    ids = index.records["image_id"].to_pylist()
    return dict(zip(ids, multi_hot(index.records["gt_labels"].to_pylist(), len(CLASSES))))


def _classifier_map(model_dir, root, split) -> float:
    """mAP (%) of a saved classifier on every readable image of a split, computed here on the driver."""
    from cdul_ray import storage
    from cdul_ray.classifier import load_model_dir, model_input, resize_pixels
    from cdul_ray.core.label_update import predict_proba

    model, meta = load_model_dir(str(model_dir))
    index = load_dataset(str(root), "coco", split, CLASSES)
    targets = _targets(root, split)
    ids, pixels = [], []
    for image_id, uri in zip(index.records["image_id"].to_pylist(), index.records["uri"].to_pylist()):
        image, _, _ = storage.read_image(uri)
        if image is not None:
            ids.append(image_id)
            pixels.append(resize_pixels(image, meta["image_size"]))
    with torch.no_grad():
        logits = model(model_input(torch.from_numpy(np.stack(pixels)), meta, torch.device("cpu")))
    probs = predict_proba(logits, meta["loss"]).numpy()
    return mean_average_precision(probs, np.stack([targets[i] for i in ids])).map


def _versions(out, n_versions):
    return [read_label_version(str(out), v) for v in range(n_versions)]


@pytest.fixture(scope="module")
def run_2w(ray_cluster, shapes, planted, tmp_path_factory):
    root, _ = shapes
    out = tmp_path_factory.mktemp("train_2w")
    return out, run_training(_cfg(planted, root, out, workers=2))


@pytest.fixture(scope="module")
def run_1w(ray_cluster, shapes, planted, tmp_path_factory):
    root, _ = shapes
    out = tmp_path_factory.mktemp("train_1w")
    return out, run_training(_cfg(planted, root, out, workers=1))


def test_two_workers_write_every_label_version_with_each_image_exactly_once(run_2w, shapes):
    out, summary = run_2w
    _, info = shapes
    expected = set(info["train"]["ok"])
    assert summary.images == N_TRAIN and summary.skipped == 1 and summary.epochs == EPOCHS
    versions = _versions(out, EPOCHS + 1)
    for r, table in enumerate(versions):
        assert table.schema.equals(schema.LATENT_LABELS_SCHEMA, check_metadata=False)
        ids = table["image_id"].to_pylist()
        assert len(ids) == N_TRAIN and set(ids) == expected, f"version {r}"
        assert set(table["version"].to_pylist()) == {r}
        values = np.asarray(table["latent_label"].to_pylist(), dtype=np.float32)
        assert values.shape == (N_TRAIN, len(CLASSES)) and (values > 0).all() and (values < 1).all()
    for r in range(1, EPOCHS + 1):  # each worker wrote its rows; the odd image out was carried by rank 0
        parts = sorted(p.name for p in (out / "labels" / f"v{r:04d}").iterdir() if p.suffix == ".parquet")
        assert parts == ["part-00000.parquet", "part-00001.parquet", "part-carry.parquet"]
        assert json.loads((out / "labels" / f"v{r:04d}" / schema.LABEL_VERSION_COMPLETE_FILE).read_text()) == {
            "version": r, "rows": N_TRAIN}
        per_part = [pq.read_table(out / "labels" / f"v{r:04d}" / p).num_rows for p in parts]
        assert per_part == [(N_TRAIN - 1) // 2, (N_TRAIN - 1) // 2, 1]
    assert not (out / "labels" / f"v{EPOCHS + 1:04d}").exists()


def test_labels_move_only_in_update_epochs(run_2w):
    out, _ = run_2w
    ids = sorted(read_label_version(str(out), 0)["image_id"].to_pylist())
    y = [label_matrix(t, ids, len(CLASSES)) for t in _versions(out, EPOCHS + 1)]
    np.testing.assert_array_equal(y[1], y[0])  # epoch 1 is the warm-up: no update
    assert np.abs(y[2] - y[1]).mean() > 1e-3  # epochs 2.. update
    history = read_history(str(out))
    assert [h["label_updated"] for h in history] == [0, 0] + [1] * (EPOCHS - 1)
    assert history[1]["label_change"] == 0 and history[2]["label_change"] > 1e-3


def test_history_cams_errors_and_model_are_written(run_2w, shapes):
    out, summary = run_2w
    _, info = shapes
    history = read_history(str(out))
    assert [h["epoch"] for h in history] == list(range(EPOCHS + 1))
    assert [h["label_version"] for h in history] == list(range(EPOCHS + 1))
    assert np.isnan(history[0]["eval_map"])
    root, _ = shapes
    for epoch in (EPOCHS - 1, EPOCHS):  # the two checkpoints kept (keep_checkpoints=2)
        folder = out / schema.CHECKPOINTS_DIR / schema.checkpoint_dir_name(epoch)
        assert history[epoch]["eval_map"] == pytest.approx(_classifier_map(folder, root, "test"), abs=1e-3)
    train_targets = _targets(root, "train")
    ids = sorted(read_label_version(str(out), 0)["image_id"].to_pylist())  # the training images (not the corrupt one)
    assert len(ids) == N_TRAIN and set(ids) < set(train_targets)
    for h in history:  # the label mAP of every version, measured from the Parquet against the ground truth
        y = label_matrix(read_label_version(str(out), h["label_version"]), ids, len(CLASSES))
        expected = mean_average_precision(y, np.stack([train_targets[i] for i in ids])).map
        assert h["label_map"] == pytest.approx(expected, abs=1e-3)
    assert history[-1]["eval_map"] == pytest.approx(summary.eval_map, abs=1e-3)
    assert all(h["images"] == N_TRAIN - 1 for h in history[1:])  # 2 equal shards
    cams = sorted(p.name for p in (out / "cam").iterdir())
    assert len(cams) == 2 * EPOCHS and cams[0].startswith("epoch001_") and cams[-1].startswith(f"epoch{EPOCHS:03d}_")
    assert all((out / "cam" / c).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for c in cams)
    errors = pq.read_table(out / schema.ERRORS_DIR).to_pylist()
    assert [(e["image_id"], e["stage"]) for e in errors] == [(info["train"]["corrupt"], "decode")]
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["classes"] == CLASSES and meta["epoch"] == EPOCHS and meta["backbone"] == "test_resnet"
    assert (out / "checkpoints" / f"checkpoint_epoch{EPOCHS:04d}" / "model.pt").exists()
    assert json.loads((out / schema.RUN_CONFIG_FILE).read_text())["workers"] == 2


def test_one_and_two_workers_reach_the_same_test_map(run_1w, run_2w):
    _, one = run_1w
    _, two = run_2w
    assert one.eval_map > 80 and two.eval_map > 80  # the task is learned, not chance (~50)
    assert abs(one.eval_map - two.eval_map) <= 1.0


def test_crash_after_epoch_one_then_resubmit_resumes_and_matches_an_uninterrupted_run(
    run_1w, shapes, planted, tmp_path, monkeypatch
):
    import ray.train

    root, _ = shapes
    cfg = _cfg(planted, root, tmp_path)
    monkeypatch.setenv(CRASH_ENV, "1")
    with pytest.raises(ray.train.TrainingFailedError, match="test crash after epoch 1"):
        run_training(cfg)
    assert [h["epoch"] for h in read_history(str(tmp_path))] == [0, 1]
    assert (tmp_path / "labels" / "v0001").exists() and not (tmp_path / "labels" / "v0002").exists()
    assert (tmp_path / "checkpoints" / "checkpoint_epoch0001").exists()

    monkeypatch.delenv(CRASH_ENV)
    resumed = run_training(cfg)  # the same job submitted again
    assert resumed.resumed_from_epoch == 1 and resumed.epochs == EPOCHS and resumed.label_version == EPOCHS
    history = read_history(str(tmp_path))
    assert [h["epoch"] for h in history] == list(range(EPOCHS + 1))

    ref_out, ref = run_1w  # the same config, never interrupted
    ref_history = read_history(str(ref_out))
    for h, r in zip(history, ref_history):
        for key in ("train_loss", "eval_map", "label_map", "label_change"):
            np.testing.assert_allclose(h[key], r[key], rtol=1e-5, atol=1e-6, err_msg=f"epoch {h['epoch']} {key}")
    ids = sorted(read_label_version(str(ref_out), 0)["image_id"].to_pylist())
    for v in range(EPOCHS + 1):
        np.testing.assert_allclose(label_matrix(read_label_version(str(tmp_path), v), ids, len(CLASSES)),
                                   label_matrix(read_label_version(str(ref_out), v), ids, len(CLASSES)), atol=1e-6)
    a = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    b = torch.load(ref_out / "model" / "model.pt", weights_only=True)
    for k in b:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5, msg=k)

    shutil.rmtree(tmp_path / "model")  # as if the first submission had died between the last report and the export
    again = run_training(cfg)  # a finished run submitted again trains nothing more
    assert again.resumed_from_epoch == EPOCHS and again.epochs == EPOCHS and again.eval_map == resumed.eval_map
    assert [h["epoch"] for h in read_history(str(tmp_path))] == list(range(EPOCHS + 1))
    assert (tmp_path / "model" / "model.pt").read_bytes() == (
        tmp_path / "checkpoints" / f"checkpoint_epoch{EPOCHS:04d}" / "model.pt").read_bytes()


def test_updates_off_keeps_every_label_version_equal_to_the_initial_labels(ray_cluster, shapes, clip_labels, tmp_path,
                                                                          monkeypatch):
    root, info = shapes
    # An image that vanished after labeling: recorded as an error, never trained on, its label row still carried.
    data = tmp_path / "data"
    shutil.copytree(root, data)
    gone = info["train"]["ok"][3]
    (data / "train" / f"{int(gone):012d}.jpg").unlink()
    # the real CLIP labeling output, images decoded every epoch (no cache), plain training: the ablation;
    # relative paths, as typed on a command line (the workers run in another working directory)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    summary = run_training(_cfg("../" + clip_labels.name, "data", "out", label_update=False, epochs=2,
                                cache_decoded="false", eval_split=None, cam_images=0))
    assert summary.output == str(out)
    errors = pq.read_table(out / schema.ERRORS_DIR / "train-decode.parquet").to_pylist()
    assert [(e["image_id"], e["stage"]) for e in errors] == [(gone, "read")]
    assert [h["images"] for h in read_history(str(out))] == [0, N_TRAIN - 1, N_TRAIN - 1]
    ids = sorted(info["train"]["ok"])
    y = [label_matrix(t, ids, len(CLASSES)) for t in _versions(out, 3)]
    initial = pq.read_table(clip_labels / schema.LABELS_DIR).sort_by("image_id")
    by_id = dict(zip(initial["image_id"].to_pylist(), initial[schema.SOFT_LABEL].to_pylist()))
    np.testing.assert_array_equal(y[0], np.asarray([by_id[i] for i in ids], dtype=np.float32))
    np.testing.assert_array_equal(y[1], y[0])
    np.testing.assert_array_equal(y[2], y[0])
    history = read_history(str(out))
    assert [h["label_updated"] for h in history] == [0, 0, 0]
    assert history[1]["label_map"] == pytest.approx(history[0]["label_map"]) == pytest.approx(summary.label_map)
    assert summary.initial_label_map == pytest.approx(summary.label_map)


def test_train_and_predict_with_everything_on_s3(ray_cluster, s3_env, shapes, planted):  # noqa: F811
    import io

    from cdul_ray.predict import PredictConfig, run_prediction

    root, info = shapes
    client = make_bucket(s3_env, "cdul")
    upload_dir(client, root, "cdul", "shapes")
    upload_dir(client, planted, "cdul", "labeling")
    cfg = _cfg("s3://cdul/labeling", "s3://cdul/shapes", "s3://cdul/runs/t1", epochs=2, s3_endpoint=s3_env)
    summary = run_training(cfg)
    assert summary.epochs == 2 and summary.images == N_TRAIN
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="cdul", Prefix="runs/t1/")["Contents"]}
    assert {"runs/t1/history.csv", "runs/t1/model/model.pt", "runs/t1/checkpoints/checkpoint_epoch0002/model.pt",
            "runs/t1/errors/labeling.parquet"} <= keys
    assert sum(k.startswith("runs/t1/cam/epoch002_") for k in keys) == 2
    for v in range(3):
        table = read_label_version("s3://cdul/runs/t1", v, s3_env)
        assert sorted(table["image_id"].to_pylist()) == sorted(info["train"]["ok"])
    assert [h["epoch"] for h in read_history("s3://cdul/runs/t1", s3_env)] == [0, 1, 2]

    result = run_prediction(PredictConfig(checkpoint="s3://cdul/runs/t1", dataset="s3://cdul/shapes", split="test",
                                          output="s3://cdul/runs/p1", s3_endpoint=s3_env))
    assert result.predicted == N_TEST and result.errors == 0
    assert result.map == pytest.approx(summary.eval_map, abs=1e-3)  # the same model on the same test images
    part = [k for k in (o["Key"] for o in client.list_objects_v2(Bucket="cdul", Prefix="runs/p1/predictions/")
                        ["Contents"]) if k.endswith(".parquet")]
    rows = sum(pq.read_table(io.BytesIO(client.get_object(Bucket="cdul", Key=k)["Body"].read())).num_rows
               for k in part)
    assert rows == N_TEST


# --------------------------------------------------------------------------------------------------------------------
# Fail fast: before any cluster work


@pytest.mark.parametrize("field,value", [("loss", "mse"), ("psi", "two"), ("epochs", 0), ("lr", 0.0),
                                         ("label_lr", -1.0), ("workers", 0), ("cache_decoded", "maybe"),
                                         ("format", "tfrecord"), ("image_size", 4), ("supervision", "gt"),
                                         ("label_update", True)])
def test_bad_fields_are_named(field, value):
    cfg = TrainConfig(labels="l", dataset="d", output="o", supervision="ground_truth" if field == "label_update"
                      else "pseudo", label_update=field != "label_update")
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(cfg, **{field: value}).validate()
    assert e.value.field == field


def test_ground_truth_supervision_trains_on_the_annotations_of_the_same_images(shapes, planted, tmp_path):
    from cdul_ray.train.job import plan_training

    root, info = shapes
    pseudo = plan_training(_cfg(planted, root, tmp_path / "p"))
    full = plan_training(_cfg(planted, root, tmp_path / "f", supervision="ground_truth", label_update=False))
    assert full.data.image_ids == pseudo.data.image_ids and len(full.data.image_ids) == N_TRAIN
    targets = _targets(root, "train")
    expected = np.stack([targets[i] for i in full.data.image_ids]).astype(np.float32)
    np.testing.assert_array_equal(full.data.initial, expected)
    assert not np.array_equal(pseudo.data.initial, expected)  # the planted labels are noisy, not the annotations
    unannotated = tmp_path / "unannotated"  # the same images listed without annotations (test-style COCO file)
    shutil.copytree(root, unannotated)
    ann = unannotated / "annotations" / "instances_train.json"
    ann.write_text(json.dumps({k: v for k, v in json.loads(ann.read_text()).items() if k != "annotations"}))
    with pytest.raises(ConfigError, match="no ground truth to train on") as e:
        plan_training(_cfg(planted, unannotated, tmp_path / "g", supervision="ground_truth", label_update=False))
    assert e.value.field == "supervision"
    assert not any((tmp_path / d).exists() for d in "pfg")


def test_missing_labeling_run_fails_fast(shapes, tmp_path):
    root, _ = shapes
    with pytest.raises(FileNotFoundError, match="`labels`"):
        run_training(_cfg(tmp_path / "nope", root, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_backbone_and_mismatched_split_fail_fast(shapes, planted, tmp_path):
    root, _ = shapes
    with pytest.raises(ConfigError) as e:
        run_training(_cfg(planted, root, tmp_path / "a", backbone="resnet9000"))
    assert e.value.field == "backbone"
    with pytest.raises(ConfigError) as e:  # the labels are of the train split, not of test
        run_training(_cfg(planted, root, tmp_path / "b", split="test"))
    assert e.value.field == "split"
    with pytest.raises(FileNotFoundError, match="`eval_split`.*val2017"):
        run_training(_cfg(planted, root, tmp_path / "c", eval_split="val2017"))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_existing_output_resumes_only_the_same_run(run_1w, shapes, planted, tmp_path):
    from cdul_ray.train import OutputExistsError

    out, _ = run_1w
    root, _ = shapes
    with pytest.raises(ConfigError) as e:
        run_training(_cfg(planted, root, out, lr=1e-2))
    assert e.value.field == "lr" and "resum" in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a training run")
    with pytest.raises(OutputExistsError, match="another output"):
        run_training(_cfg(planted, root, tmp_path / "other"))
    with pytest.raises(OutputExistsError, match="not a training run; pass --overwrite"):
        run_training(_cfg(planted, root, planted))  # a labeling run is not resumed as a training run
    with pytest.raises(OutputExistsError, match="refusing to delete"):
        run_training(_cfg(planted, root, tmp_path / "other", overwrite=True))
    assert (tmp_path / "other" / "notes.txt").exists()


def test_backbone_weights_from_a_file_and_offline_fallback(tmp_path, monkeypatch):
    import timm

    from cdul_ray import classifier, clip
    from cdul_ray.classifier import BackboneWeightsError, create_classifier, resolve_backbone_weights

    torch.manual_seed(3)
    reference = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    source, note = resolve_backbone_weights("test_resnet", str(path))
    assert source == str(path) and "weights file" in note
    model = create_classifier("test_resnet", 4, source)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)

    monkeypatch.setattr(clip, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(classifier, "_cached_hub_file", lambda hub_id: None)
    source, note = resolve_backbone_weights("resnet18", "auto")
    assert source is None and "random init" in note and "unreachable" in note
    with pytest.raises(BackboneWeightsError, match="--pretrained-backbone"):
        resolve_backbone_weights("resnet18", "true")
    with pytest.raises(ConfigError) as e:
        resolve_backbone_weights("resnet18", str(tmp_path / "missing.pth"))
    assert e.value.field == "pretrained_backbone"


def test_classifier_cam_averages_to_the_logits():
    from cdul_ray.classifier import create_classifier

    torch.manual_seed(0)
    model = create_classifier("test_resnet", 4).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits, cams = model.cam(x)
        torch.testing.assert_close(logits, model(x))
    assert cams.shape[:2] == (2, 4) and cams.shape[2] >= 2
    torch.testing.assert_close(cams.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-5)


def test_open_clip_resnet_trunk_backbone_and_frozen_training():
    from cdul_ray.classifier import check_backbone, create_classifier

    check_backbone("open_clip:RN50")
    with pytest.raises(ConfigError) as e:
        check_backbone("open_clip:ViT-B-32")
    assert e.value.field == "backbone"
    torch.manual_seed(0)
    model = create_classifier("open_clip:RN50", 4, freeze_backbone=True)
    assert model.backbone.num_features == 2048
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    x = torch.randn(2, 3, 96, 96)
    model.eval()
    with torch.no_grad():
        logits, cams = model.cam(x)
    torch.testing.assert_close(cams.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert not model.backbone.training  # frozen batch-norm statistics
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_cli_builds_train_and_predict_configs_without_importing_ray_train():
    import subprocess
    import sys

    code = ("import sys; from cdul_ray.cli import build_parser; from cdul_ray import config; "
            "from cdul_ray.train import TrainConfig; "
            "a = build_parser().parse_args(['train', '--labels', 'L', '--dataset', 'D', '--output', 'O', "
            "'--use-gpu', '--workers', '8', '--no-label-update', '--label-lr', '0.2']); "
            "c = config.from_args(TrainConfig, a).validate(); "
            "print(c.use_gpu, c.workers, c.label_update, c.label_lr, c.backbone, 'ray.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["true", "8", "False", "0.2", "resnet50", "False"]


def test_bundled_clip_timm_tower_as_frozen_backbone():
    """``open_clip:cdul-synth-rn`` (a timm tower inside open_clip) gives the trunk's spatial features and exact CAMs."""
    from cdul_ray.classifier import check_backbone, create_classifier

    check_backbone("open_clip:cdul-synth-rn")
    torch.manual_seed(0)
    model = create_classifier("open_clip:cdul-synth-rn", 3, weights="synth", freeze_backbone=True)
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits, cams = model.cam(x)
        assert cams.shape[:2] == (2, 3) and cams.shape[2] == cams.shape[3] == 3  # 96 px / 32
        torch.testing.assert_close(cams.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), logits)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
