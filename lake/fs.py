"""Filesystems for any lake URI: a local folder, ``file://``, or whatever pyarrow reaches (s3://,
gs://, abfss://, hdfs://). Every byte the lake reads or writes outside a Delta table goes through here."""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it."""
    if "://" not in uri or uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri.removeprefix("file://")
    return pafs.FileSystem.from_uri(uri)


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


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


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
