"""Local-disk and S3 access through pyarrow filesystems (one code path for AWS and any S3-protocol endpoint).

A URI is either a local path (``/data/coco``, ``./out``, ``file:///data``) or ``s3://bucket/key``.
S3 credentials come from the standard AWS chain (environment, ``~/.aws``, instance profile). An S3-compatible
endpoint (MinIO, a test server) is set with ``AWS_ENDPOINT_URL`` (the variable boto3 also honours) or explicitly with
``endpoint_override``.
"""

from __future__ import annotations

import json
import os
import posixpath
from functools import lru_cache
from typing import Any

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint_from_env() -> str | None:
    """The S3 endpoint override of this process' environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=8)
def _s3(endpoint_override: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint_override:
        scheme, _, host = endpoint_override.partition("://")
        kwargs["endpoint_override"] = host if host else endpoint_override
        kwargs["scheme"] = scheme if host else "https"
        kwargs["force_virtual_addressing"] = False
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str, endpoint_override: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve a URI to ``(filesystem, path inside it)``.

    Args:
        uri: Local path or ``s3://bucket/key``.
        endpoint_override: S3 endpoint such as ``http://127.0.0.1:5000``; defaults to ``AWS_ENDPOINT_URL``.

    Returns:
        A picklable pyarrow filesystem (safe to ship to Ray workers) and the path to pass to it.
    """
    if is_s3(uri):
        endpoint = endpoint_override or s3_endpoint_from_env()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(endpoint, region), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str, endpoint_override: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_override)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, endpoint_override: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_override)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, endpoint_override: str | None = None) -> None:
    fs, path = filesystem(uri, endpoint_override)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str, endpoint_override: str | None = None) -> Any:
    return json.loads(read_bytes(uri, endpoint_override))


def write_json(uri: str, obj: Any, endpoint_override: str | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=False).encode(), endpoint_override)


def list_files(uri: str, suffixes: tuple[str, ...] | None = None, endpoint_override: str | None = None) -> list[str]:
    """All files under a directory or S3 prefix (recursive), as URIs of the same kind, sorted.

    Raises:
        FileNotFoundError: the directory or prefix does not exist.
    """
    fs, path = filesystem(uri, endpoint_override)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=False))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if suffixes and not info.path.lower().endswith(suffixes):
            continue
        out.append("s3://" + info.path if is_s3(uri) else info.path)
    return sorted(out)
