"""Labels read from and written to a bucket on a real S3-protocol server (moto) through the AWS code path."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from cdul_ray import schema
from cdul_ray.config import LabelConfig
from cdul_ray.evaluate import read_label_scores
from cdul_ray.pipeline import run_labeling
from tests.s3_fixtures import make_bucket, s3_env, upload_dir  # noqa: F401

pytestmark = pytest.mark.slow


def test_label_s3_to_s3(ray_cluster, s3_env, coco_dataset, tiny_clip):  # noqa: F811
    root, info = coco_dataset
    client = make_bucket(s3_env, "corpus")
    upload_dir(client, root, "corpus", "coco")
    # weights from S3 too: fetched once per node into the cache
    client.upload_file(str(tiny_clip / "open_clip_model.safetensors"), "corpus", "weights/tiny.safetensors")

    cfg = LabelConfig(
        dataset="s3://corpus/coco", output="s3://corpus/runs/r1", split="train", model=f"local-dir:{tiny_clip}",
        pretrained="none", batch_size=4, decode_batch_size=4, s3_endpoint=s3_env, max_actors=1,
    )
    summary = run_labeling(cfg)
    assert summary.labeled == len(info["ok"]) and summary.errors == 2

    keys = [o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="runs/r1/")["Contents"]]
    assert any(k.startswith("runs/r1/labels/") and k.endswith(".parquet") for k in keys)
    assert "runs/r1/classes.json" in keys and "runs/r1/evaluation.json" in keys
    body = client.get_object(Bucket="corpus", Key="runs/r1/run_config.json")["Body"].read()
    assert json.loads(body)["dataset"] == "s3://corpus/coco"

    label_keys = [k for k in keys if k.startswith("runs/r1/labels/") and k.endswith(".parquet")]
    tables = [pq.read_table(io.BytesIO(client.get_object(Bucket="corpus", Key=k)["Body"].read())) for k in label_keys]
    ids = sorted((i for t in tables for i in t["image_id"].to_pylist()), key=int)
    assert ids == info["ok"]
    assert all(u.startswith("s3://corpus/coco/train/") for t in tables for u in t["uri"].to_pylist())
    error_keys = [k for k in keys if k.startswith("runs/r1/errors/") and k.endswith(".parquet")]
    errors = [r for k in error_keys
              for r in pq.read_table(io.BytesIO(client.get_object(Bucket="corpus", Key=k)["Body"].read())).to_pylist()]
    assert {r["image_id"] for r in errors} == {info["corrupt"], info["missing"]}
    # the evaluation path reads the same Parquet back from S3
    assert read_label_scores("s3://corpus/runs/r1", s3_env).global_score.shape == (len(info["ok"]), 4)


def test_clip_weights_from_s3(s3_env, tiny_clip, tmp_path):  # noqa: F811
    from cdul_ray.clip import WeightsNotFoundError, load_clip, resolve_weights

    client = make_bucket(s3_env, "weights")
    client.upload_file(str(tiny_clip / "open_clip_model.safetensors"), "weights", "tiny/model.safetensors")
    # a registered-config model reading its weights from S3: build the same tiny architecture under a config name
    import open_clip
    import torch

    from tests.helpers import TINY_CLIP_CFG

    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_dir)
    spec = resolve_weights("tiny-test-clip", "s3://weights/tiny/model.safetensors", endpoint_override=s3_env)
    assert spec.kind == "s3"
    model, _ = load_clip(spec, "cpu", cache_dir=str(tmp_path / "cache"), endpoint_override=s3_env)
    cached = list((tmp_path / "cache" / "weights").rglob("model.safetensors"))
    assert len(cached) == 1
    reference = open_clip.create_model(f"local-dir:{tiny_clip}")
    for (k, v), (_, r) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(v, r, msg=k)
    with pytest.raises(WeightsNotFoundError, match="tiny-test-clip.*s3://weights/nope"):
        resolve_weights("tiny-test-clip", "s3://weights/nope.safetensors", endpoint_override=s3_env)
