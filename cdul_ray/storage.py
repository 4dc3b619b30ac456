"""Local-disk and S3 access through pyarrow filesystems (one code path for AWS and any S3-protocol endpoint).

A URI is either a local path (``/data/coco``, ``./out``, ``file:///data``) or ``s3://bucket/key``.
S3 credentials come from the standard AWS chain (environment, ``~/.aws``, instance profile). An S3-compatible
endpoint (MinIO, a test server) is set with ``AWS_ENDPOINT_URL`` (the variable boto3 also honours) or explicitly with
``endpoint_override``.

Credentials never reach a log or an output file: :func:`redact` strips ``user:password@`` from every URL in a text and
replaces the values of the AWS secret variables and of credentials seen in endpoint URLs; :func:`write_json` (run
configs, summaries, evaluations) applies it to everything it writes, and error reasons and log messages go through it.
An endpoint URL may carry credentials, ``http://ACCESS_KEY:SECRET_KEY@host:9000`` (percent-encode ``/ + @ :`` in
them): pyarrow's ``endpoint_override`` takes no user info (it would try to resolve the host ``ACCESS_KEY``), so the
user and password are passed as pyarrow's ``access_key``/``secret_key`` and take precedence over the AWS chain.

Transient S3 errors (connection refused or reset, 5xx, throttling) are retried by the AWS SDK inside pyarrow with its
standard retry strategy (exponential backoff with jitter, capped at 20 s a wait) up to :data:`S3_MAX_ATTEMPTS`
attempts per request, in every process: the filesystem keeps its retry strategy when it is pickled to Ray workers
(pyarrow's own pickling drops it and falls back to 3 attempts). Permanent ones (access denied, no such bucket) are
not retried.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint_from_env() -> str | None:
    """The S3 endpoint override of this process' environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# --------------------------------------------------------------------------------------------------------------------
# Credential redaction

REDACTED = "***"
# Environment variables whose values are secrets (matched by name) and the shortest value searched for in texts:
# real AWS access key ids and secret keys are 20 and 40 characters, shorter values would match ordinary words.
_SECRET_ENV = re.compile(r"^AWS_\w*(SECRET|TOKEN|ACCESS_KEY)\w*$")
_MIN_SECRET_LEN = 8
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_seen_secrets: set[str] = set()  # credentials parsed from endpoint URLs by this process


def _redact_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    at = rest.rfind("@")
    if at < 0:
        return url
    userinfo = rest[:at]
    # ``user:password@`` or ``user@`` before the host; ``s3://bucket/img@2x.jpg`` (an ``@`` in a path) is kept
    if ":" in userinfo or "/" not in userinfo:
        return f"{scheme}://{REDACTED}@{rest[at + 1:]}"
    return url


def _secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV.match(k)} | _seen_secrets
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(value: Any) -> Any:
    """``value`` with credentials removed: for writing to logs, error rows and output files.

    Strings: ``scheme://user:password@host`` (and ``scheme://user@host``) -> ``scheme://***@host``; the values of
    environment variables named ``AWS_*SECRET*``, ``AWS_*TOKEN*``, ``AWS_*ACCESS_KEY*`` and of credentials parsed
    from endpoint URLs by this process -> ``***`` (values of 8 characters or more). Dicts, lists and tuples are
    redacted recursively (keys too); other values are returned unchanged.
    """
    if isinstance(value, str):
        text = _URL.sub(lambda m: _redact_url(m.group(0)), value)
        for secret in _secret_values():
            text = text.replace(secret, REDACTED)
        return text
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def split_endpoint(endpoint: str) -> tuple[str, str, str | None, str | None]:
    """``[scheme://][user:password@]host[:port]`` -> ``(scheme, host[:port], user, password)``.

    ``scheme`` defaults to ``https``; user and password are percent-decoded (None when absent).

    Raises:
        ValueError: a user without a password or the reverse (the message names ``s3_endpoint``, not the values).
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "https", endpoint
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return scheme, rest, None, None
    user, colon, password = userinfo.partition(":")
    if not user or not colon or not password:
        raise ValueError(
            f"config field `s3_endpoint`: credentials in the endpoint URL {redact(endpoint)} need both a user (the "
            "access key) and a password (the secret key): scheme://ACCESS_KEY:SECRET_KEY@host"
        )
    return scheme, host, unquote(user), unquote(password)


# Attempts per S3 request (the first included). With the SDK's standard backoff this rides out an outage of about
# 15 s (measured: 6 attempts against a closed port gave up after 14-21 s); a permanent error is not retried.
S3_MAX_ATTEMPTS = 6


class _S3FileSystem(pafs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` that pickles as the call that made it, so Ray workers keep its retry strategy."""

    def __init__(self, endpoint_override: str | None, region: str | None):
        kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
        if endpoint_override:
            scheme, host, user, password = split_endpoint(endpoint_override)
            kwargs["endpoint_override"] = host
            kwargs["scheme"] = scheme
            kwargs["force_virtual_addressing"] = False
            if user is not None:
                _seen_secrets.update((user, password, endpoint_override.partition("://")[2].rpartition("@")[0]))
                kwargs["access_key"], kwargs["secret_key"] = user, password
        if region:
            kwargs["region"] = region
        super().__init__(**kwargs)
        self._args = (endpoint_override, region)

    def __reduce__(self):
        return _s3, self._args


@lru_cache(maxsize=8)
def _s3(endpoint_override: str | None, region: str | None) -> pafs.S3FileSystem:
    return _S3FileSystem(endpoint_override, region)


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
    return pafs.LocalFileSystem(), absolute_uri(uri)


def absolute_uri(uri: str) -> str:
    """The one URI normaliser: a local path made absolute (``file://`` dropped, ``~`` expanded); an ``s3://`` URI
    without its trailing slash. Ray workers run in another working directory, so jobs pass only these."""
    if is_s3(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


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
    """Write ``obj`` as indented JSON, credentials redacted (:func:`redact`): run configs and summaries go here."""
    write_bytes(uri, json.dumps(redact(obj), indent=2, sort_keys=False).encode(), endpoint_override)


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


def fs_path(base: str, *parts: str) -> str:
    """Join parts onto a path *inside* a pyarrow filesystem (the second value of :func:`filesystem`)."""
    return "/".join([base.rstrip("/"), *parts])


def write_table(uri: str, table: Any, endpoint_override: str | None = None, row_group_size: int | None = None) -> None:
    """Write one pyarrow Table as a Parquet file (parent directories created); ``row_group_size`` rows per row group
    (pyarrow's default when None)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, endpoint_override)
    fs.create_dir(posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size)


class ParquetStreamWriter:
    """One Parquet file written a row group at a time (bounded memory); ``close`` finishes it. The file is created
    at the first ``write`` (or at ``close``, empty, when nothing was written)."""

    def __init__(self, uri: str, schema: Any, endpoint_override: str | None = None):
        self.uri, self.schema, self.endpoint_override = uri, schema, endpoint_override
        self._writer: Any = None
        self._stream: Any = None

    def write(self, table: Any) -> None:
        """Append ``table`` (of ``schema``) as one row group."""
        import pyarrow.parquet as pq

        if self._writer is None:
            fs, path = filesystem(self.uri, self.endpoint_override)
            fs.create_dir(posixpath.dirname(path) if is_s3(self.uri) else os.path.dirname(path), recursive=True)
            self._stream = fs.open_output_stream(path)
            self._writer = pq.ParquetWriter(self._stream, self.schema)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))

    def close(self) -> None:
        if self._writer is None:
            self.write(self.schema.empty_table())
        self._writer.close()
        self._stream.close()


def read_parquet_dir(uri: str, endpoint_override: str | None = None, columns: list[str] | None = None) -> Any:
    """Every Parquet file under a directory or S3 prefix as one pyarrow Table."""
    import pyarrow.dataset as pads

    fs, path = filesystem(uri, endpoint_override)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)


def iter_parquet_batches(uri: str, columns: list[str], batch_rows: int, endpoint_override: str | None = None):
    """Every Parquet file under a directory or S3 prefix as record batches of at most ``batch_rows`` rows (memory
    bounded by one row group and one batch)."""
    import pyarrow.dataset as pads

    fs, path = filesystem(uri, endpoint_override)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    yield from dataset.to_batches(columns=columns, batch_size=max(1, batch_rows), batch_readahead=0,
                                  fragment_readahead=0)


def read_parquet_ranges(uri: str, column: str, ranges: list[tuple[int, int]], columns: list[str] | None = None,
                        endpoint_override: str | None = None) -> Any:
    """The rows of every Parquet file under a directory or S3 prefix whose integer ``column`` lies in one of
    ``ranges`` (``[lo, hi)`` pairs, disjoint), as one pyarrow Table in file order. Only the row groups whose
    statistics of ``column`` overlap a range are read (a row group without statistics is always read)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads

    fs, path = filesystem(uri, endpoint_override)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    spans = sorted(ranges)
    lo = np.array([a for a, _ in spans], dtype=np.int64)
    hi = np.array([b for _, b in spans], dtype=np.int64)

    def inside(values: np.ndarray) -> np.ndarray:  # [n] bool: values within a range
        i = np.searchsorted(lo, values, side="right") - 1
        return (i >= 0) & (values < hi[np.maximum(i, 0)])

    pieces = []
    for fragment in dataset.get_fragments():
        groups = []
        for group in fragment.row_groups:
            stats = (group.statistics or {}).get(column)
            if stats is None:
                groups.append(group.id)
                continue
            i = np.searchsorted(lo, stats["max"], side="right") - 1  # last range starting at or before max
            if i >= 0 and hi[i] > stats["min"]:
                groups.append(group.id)
        if groups:
            table = fragment.subset(row_group_ids=groups).to_table(columns=columns)
            pieces.append(table.filter(pa.array(inside(table[column].to_numpy()))) if spans else table.slice(0, 0))
    if not pieces:
        return dataset.schema.empty_table().select(columns) if columns else dataset.schema.empty_table()
    return pa.concat_tables(pieces)


def delete_dir(uri: str, endpoint_override: str | None = None) -> None:
    """Delete a directory or S3 prefix and everything in it; nothing happens when it does not exist."""
    fs, path = filesystem(uri, endpoint_override)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_dir_if_empty(uri: str, endpoint_override: str | None = None) -> None:
    """Delete the directory or S3 prefix ``uri`` only when it holds nothing (no error when it is absent)."""
    fs, path = filesystem(uri, endpoint_override)
    if fs.get_file_info(path).type == pafs.FileType.Directory and not fs.get_file_info(
            pafs.FileSelector(path, allow_not_found=True)):
        fs.delete_dir(path)


def list_dirs(uri: str, endpoint_override: str | None = None) -> list[str]:
    """Names of the direct subdirectories of a directory or S3 prefix, sorted ([] when it does not exist)."""
    fs, path = filesystem(uri, endpoint_override)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def read_image(uri: str, endpoint_override: str | None = None):
    """Read and decode one image: the one image read of the labeling, training and prediction jobs.

    The decode is :func:`cdul_ray.images.decode_image`: upright 8-bit RGB (EXIF orientation applied), first frame;
    empty, non-image, truncated and decompression-bomb files are refused with a reason in words.

    Returns:
        ``(image, stage, reason)``: a loaded RGB ``PIL.Image`` and ``("", "")``, or ``None`` with the failed stage
        (``read``: missing file, permission, network; ``decode``: see ``decode_image``) and a reason (credentials
        redacted).
    """
    from cdul_ray.images import decode_image

    try:
        data = read_bytes(uri, endpoint_override)
    except Exception as e:  # missing file, permission, network: recorded, not fatal
        return None, "read", redact(f"{type(e).__name__}: {e}")
    try:
        return decode_image(data), "", ""
    except Exception as e:  # ImageDecodeError, or a PIL failure decode_image does not anticipate
        return None, "decode", redact(f"{type(e).__name__}: {e}")
