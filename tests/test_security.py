"""Security (issue 9, item 4): no credential in logs or outputs, weights never unpickle code."""

from __future__ import annotations

import builtins
import io
import json
import logging
import pickle

import pytest
import torch

from cdul_ray import storage
from tests.s3_fixtures import s3_env  # noqa: F401

# ---------------------------------------------------------------------------------------------------------------------
# Redaction


def test_redact_strips_user_info_from_every_url():
    r = storage.redact
    assert r("http://user:password@host:9000") == "http://***@host:9000"
    assert r("see --s3-endpoint https://AKIA:a%2Fb+c@minio.local/x and s3://b/k") == \
        "see --s3-endpoint https://***@minio.local/x and s3://b/k"
    assert r("endpoint 'http://u:p@ss:w/rd@h:1'") == "endpoint 'http://***@h:1'"  # unencoded @ and / in the password
    assert r("http://onlyuser@host") == "http://***@host"
    assert r("s3://bucket/photos/img@2x.jpg") == "s3://bucket/photos/img@2x.jpg"  # an @ in a key is not a user
    assert r({"s3_endpoint": "http://u:secretpw@h", "n": 3, "t": ("http://a:b@c",)}) == \
        {"s3_endpoint": "http://***@h", "n": 3, "t": ("http://***@c",)}


def test_redact_replaces_aws_secret_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")  # not a secret
    text = "key AKIAIOSFODNN7EXAMPLE secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY token FwoGZXIvYXdzEXAMPLETOKEN"
    assert storage.redact(text) == "key *** secret *** token ***"
    assert storage.redact("region eu-central-1") == "region eu-central-1"


def test_endpoint_credentials_become_access_and_secret_key():
    assert storage.split_endpoint("http://127.0.0.1:9000") == ("http", "127.0.0.1:9000", None, None)
    assert storage.split_endpoint("minio:9000") == ("https", "minio:9000", None, None)
    assert storage.split_endpoint("http://AKIA1:se%2Fcr%40et@h:1") == ("http", "h:1", "AKIA1", "se/cr@et")
    with pytest.raises(ValueError, match="`s3_endpoint`") as info:
        storage.split_endpoint("http://userwithoutpassword-123456@h")
    assert "userwithoutpassword" not in str(info.value)


def test_write_json_never_writes_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-0123456789")
    storage.write_json(str(tmp_path / "c.json"), {"s3_endpoint": "http://me:pa55word@h:1",
                                                   "note": "s3cr3t-value-0123456789"})
    assert json.loads((tmp_path / "c.json").read_text()) == {"s3_endpoint": "http://***@h:1", "note": "***"}


# ---------------------------------------------------------------------------------------------------------------------
# The labeling job against a real S3-protocol server with credentials in the environment and in the endpoint URL

ENV_ACCESS_KEY = "AKIACDULENVKEY000001"
ENV_SECRET = "cdul/env+Secret-Value-0123456789abcdefXYZ"
URL_USER = "cdulurluser42"
URL_PASSWORD = "cdul-url-P4ssw0rd-987654"


@pytest.mark.slow
def test_no_credential_reaches_outputs_logs_or_console(ray_cluster, s3_env, coco_dataset, tiny_clip, caplog, capfd,
                                                       monkeypatch):  # noqa: F811
    from cdul_ray import cli
    from tests.s3_fixtures import make_bucket, upload_dir

    root, info = coco_dataset
    client = make_bucket(s3_env, "secure")
    upload_dir(client, root, "secure", "coco")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint with credentials is the only way to the server
    scheme, host = s3_env.split("://")
    endpoint = f"{scheme}://{URL_USER}:{URL_PASSWORD}@{host}"

    with caplog.at_level(logging.DEBUG):
        rc = cli.main(["label", "--dataset", "s3://secure/coco", "--output", "s3://secure/runs/r1", "--split", "train",
                       "--model", f"local-dir:{tiny_clip}", "--pretrained", "none", "--batch-size", "4",
                       "--decode-batch-size", "4", "--max-actors", "1", "--s3-endpoint", endpoint])
    console = capfd.readouterr()
    assert rc == 0, console.err

    objects = client.list_objects_v2(Bucket="secure", Prefix="runs/r1/")["Contents"]
    blobs = {o["Key"]: client.get_object(Bucket="secure", Key=o["Key"])["Body"].read() for o in objects}
    names = {k.split("/")[2] for k in blobs}
    assert {"labels", "errors", "run_config.json", "summary.json", "classes.json", "evaluation.json"} <= names
    # the run worked through the endpoint's credentials: labels and the two planted error rows
    assert json.loads(blobs["runs/r1/summary.json"])["labeled"] == len(info["ok"])
    assert json.loads(blobs["runs/r1/summary.json"])["errors"] == 2
    recorded = json.loads(blobs["runs/r1/run_config.json"])["s3_endpoint"]
    assert recorded == f"{scheme}://***@{host}"

    secrets = [ENV_ACCESS_KEY, ENV_SECRET, URL_USER, URL_PASSWORD]
    texts = {"caplog": caplog.text, "stdout": console.out, "stderr": console.err}
    texts.update({k: v.decode("latin-1") for k, v in blobs.items()})  # Parquet included (error reasons, uris)
    assert caplog.text and "CDUL labeling finished" in console.out  # something was captured to search
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {where}"


# ---------------------------------------------------------------------------------------------------------------------
# Weights and checkpoints never run pickled code


class _Exploit:
    """Unpickling this creates the file ``path`` (stands in for arbitrary code execution)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _malicious_state_dict(path, marker) -> None:
    torch.save({"weight": torch.zeros(2), "payload": _Exploit(str(marker))}, str(path))
    # sanity: a plain unpickling of this file does run the payload
    with open(path, "rb") as f:
        buf = io.BytesIO(f.read())
    torch.load(buf, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_classifier_checkpoint_with_pickled_code_is_refused(tmp_path):
    from cdul_ray.classifier import load_model_dir
    from cdul_ray.schema import MODEL_META, MODEL_WEIGHTS

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MODEL_META).write_text(json.dumps({"backbone": "test_resnet", "classes": ["a", "b"], "loss": "bce"}))
    _malicious_state_dict(ckpt / MODEL_WEIGHTS, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model_dir(str(ckpt))
    assert not marker.exists()


def test_clip_weights_with_pickled_code_are_refused(tmp_path, tiny_clip):
    import shutil

    from cdul_ray.clip import load_clip, resolve_weights

    marker = tmp_path / "pwned"
    # a weights file passed as `pretrained` to a registered model config
    weights = tmp_path / "clip.pt"
    _malicious_state_dict(weights, marker)
    spec = resolve_weights("cdul-synth-rn", str(weights))
    assert spec.kind == "file"
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_clip(spec)
    assert not marker.exists()
    # a local-dir: model whose folder holds a pickle instead of safetensors
    folder = tmp_path / "local"
    folder.mkdir()
    shutil.copy(tiny_clip / "open_clip_config.json", folder)
    _malicious_state_dict(folder / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_clip(resolve_weights(f"local-dir:{folder}", "none"))
    assert not marker.exists()


def test_backbone_weights_file_with_pickled_code_is_refused(tmp_path):
    from cdul_ray.classifier import BackboneWeightsError, create_classifier

    marker = tmp_path / "pwned"
    weights = tmp_path / "backbone.pth"
    _malicious_state_dict(weights, marker)
    with pytest.raises(BackboneWeightsError, match="weights_only=True blocked loading"):
        create_classifier("test_resnet", 2, weights=str(weights))
    assert not marker.exists()
