"""Filesystems for any lake URI: a local folder, ``file://``, or whatever pyarrow reaches (s3://,
gs://, abfss://, hdfs://). Every byte the lake reads or writes outside a Delta table goes through here.

An ``s3://`` (or ``s3a://``) lake is reached with the settings every AWS client reads from the
environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or the usual credential chain),
``AWS_REGION``, and for an S3-compatible server ``AWS_ENDPOINT_URL`` (``http://host:port``; plain
http also needs ``AWS_ALLOW_HTTP=true`` for delta-rs). pyarrow, delta-rs and Spark's s3a connector
(``jobs/spark.py``) all take them from there, so the refinery and the trainer see the same lake.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from functools import lru_cache
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lake.errors import LakeError

S3_SCHEMES = ("s3://", "s3a://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it."""
    if "://" not in uri or uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri.removeprefix("file://")
    if is_s3(uri) and s3_endpoint() is not None:
        return s3_filesystem(s3_endpoint(), s3_region()), uri.split("://", 1)[1]
    return pafs.FileSystem.from_uri("s3://" + uri[len("s3a://"):] if uri.startswith("s3a://") else uri)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEMES)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``); None: AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@lru_cache(maxsize=8)
def s3_filesystem(endpoint: str, region: str | None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for an S3-compatible endpoint (path-style requests, as such servers expect);
    without an endpoint, ``FileSystem.from_uri`` finds the bucket's AWS region itself."""
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parts.hostname:
        raise LakeError(f"AWS_ENDPOINT_URL={endpoint!r} is not an endpoint; set it to http(s)://host:port")
    return pafs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme, region=region or "us-east-1")


def require_safe_commits(lake_root: str) -> None:
    """Refuse to write an ``s3://`` lake unless delta-rs commits there with a conditional put.

    A Delta commit is "create ``_delta_log/<version>.json`` unless it exists". On an object store
    that is only atomic as a conditional PUT (``If-None-Match: *``): delta-rs does it with
    ``AWS_CONDITIONAL_PUT=etag``. Without it delta-rs either refuses to write or (with
    ``AWS_S3_ALLOW_UNSAFE_RENAME=true``) lets two writers (feed and the trainer share ``chunks``)
    overwrite each other's commit silently. Every process that writes the lake needs the setting."""
    if not is_s3(lake_root):
        return
    setting = os.environ.get("AWS_CONDITIONAL_PUT") or os.environ.get("aws_conditional_put") or ""
    if setting.lower() == "etag":
        return
    raise LakeError(
        f"the lake {lake_root} is on S3, where a Delta commit is only safe as a conditional put: set "
        f"AWS_CONDITIONAL_PUT=etag (AWS S3, and S3-compatible servers that honour If-None-Match) in the "
        f"environment of every process that writes the lake (refinery jobs, feed, trainer)"
        + (f"; AWS_CONDITIONAL_PUT={setting!r} is not a conditional put" if setting else "")
        + ("; AWS_S3_ALLOW_UNSAFE_RENAME lets concurrent commits overwrite each other and is not enough"
           if os.environ.get("AWS_S3_ALLOW_UNSAFE_RENAME") else "")
    )


def check_lake_writable(lake_root: str) -> None:
    """Refuse a local lake that cannot be written (a file, or a folder without write permission) before
    any work starts, in one line; an object-store lake is checked by its first commit."""
    if "://" in lake_root and not lake_root.startswith("file://"):
        return
    path = os.path.abspath(lake_root.removeprefix("file://"))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "the lake" if existing == path else f"{existing}, on the lake's path,"
        raise LakeError(f"lake: {lake_root}: {what} is a file, not a folder; point the recipe's lake: at a folder "
                        f"(it is created when missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LakeError(f"lake: {lake_root}: {existing} is not writable by this user; give it write permission or "
                        f"point the recipe's lake: elsewhere")


def end_process(code: int) -> int:
    """End a finished command run as a program: flush its output and leave with ``code`` at once.

    Once a command is done and committed, delta-rs's runtime threads (and, on an object store, the
    AWS SDK inside pyarrow) can abort the interpreter's own shutdown ("terminate called without an
    active exception", exit code -6/134 instead of the command's), on a local lake as well. Everything
    the command wrote is committed before it returns, so nothing is lost by skipping that shutdown.
    Only for a command run as a program (``python -m jobs.cli``, a stage, the daemon), never for one
    called in-process."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], pafs.LocalFileSystem)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def make_dirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def remove_dir(uri: str) -> None:
    """Delete a folder and everything in it; nothing happens when it is not there."""
    fs, path = filesystem(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def remove_file(uri: str) -> None:
    """Delete a file; nothing happens when it is not there."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_list(uri: str) -> list[str]:
    """A list file (keywords, domains, words): one entry per line, stripped; blank lines and ``#`` comments skipped."""
    entries = (line.strip() for line in read_bytes(uri).decode("utf-8").splitlines())
    return [e for e in entries if e and not e.startswith("#")]


def write_bytes(uri: str, payload: bytes) -> None:
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(payload)


def read_parquet(uri: str, **kwargs):
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f, **kwargs)


def write_parquet(uri: str, data, **kwargs) -> None:
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        pq.write_table(data, f, **kwargs)


def file_sha256(uri: str) -> str:
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def list_dir(uri: str) -> list[pafs.FileInfo]:
    """The entries directly inside a folder (none when it does not exist)."""
    fs, path = filesystem(uri)
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
