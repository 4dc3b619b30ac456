"""A real S3-protocol server (moto) for tests: no network, no credentials, no patching of the storage layer.

Use from a test module with ``from tests.s3_fixtures import s3_env, s3_server  # noqa: F401`` (or from
``tests/conftest.py``), then::

    def test_x(s3_env, tmp_path):
        client = make_bucket(s3_env, "bucket")
        upload_dir(client, tmp_path / "coco", "bucket", "coco")
        load_dataset("s3://bucket/coco")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

S3_REGION = "us-east-1"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_REGION": S3_REGION,
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start one moto S3 server on a free localhost port for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point this test's AWS environment (boto3 and pyarrow alike) at the moto server; yields the endpoint URL."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the moto server, with the fake test credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_REGION,
    )


def make_bucket(endpoint: str, name: str) -> Any:
    """Create bucket ``name`` on the moto server (idempotent) and return a boto3 client for it."""
    client = s3_client(endpoint)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if name not in existing:
        client.create_bucket(Bucket=name)
    return client


def upload_dir(client: Any, local_dir: str | Path, bucket: str, prefix: str) -> list[str]:
    """Upload every file under ``local_dir`` to ``s3://bucket/prefix/<relative path>``; returns the keys."""
    local_dir = Path(local_dir)
    keys = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        key = f"{prefix.strip('/')}/{path.relative_to(local_dir).as_posix()}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys
