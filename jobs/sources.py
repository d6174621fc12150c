"""Finding a source's files and reading them in splits, with exact file and line numbers.

A split of an uncompressed JSONL file owns the lines that *start* inside its byte range, so every
line is read exactly once whatever the split size. Compressed files and Parquet files are one split
each (Parquet row groups are read batch by batch).
"""

from __future__ import annotations

import bz2
import fnmatch
import re
import zlib
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lake.fs import filesystem

_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
_WILDCARD = re.compile(r"[*?\[]")
_READ_BLOCK = 8 * 1024 * 1024


class SourceError(ValueError):
    pass


# What reading a damaged file raises: a truncated or corrupt compressed stream (gzip, bz2, zstd), a Parquet
# file cut short. Ingest keeps the records read before it and rejects the rest of that file, with where.
UNREADABLE = (EOFError, OSError, zlib.error, ValueError)


@dataclass(frozen=True)
class Split:
    source: str
    format: str
    file: str
    start: int
    end: int  # exclusive; -1 = to the end of the file
    # newlines before ``start`` in the file (filled in by counting; 0 for the first split)
    lines_before: int = 0


def list_files(pattern: str) -> list[str]:
    """Files matching a glob (``*``, ``?``, ``[..]``, ``**``), local or on any pyarrow filesystem."""
    fs, path = filesystem(pattern)
    prefix = "" if "://" not in pattern or pattern.startswith("file://") else pattern[: len(pattern) - len(path)]
    match = _WILDCARD.search(path)
    if match is None:
        info = fs.get_file_info(path)
        return [prefix + path] if info.type == pafs.FileType.File else []
    base = path[: match.start()].rsplit("/", 1)[0] or "/"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    regex = _glob_regex(path)
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and regex.fullmatch(i.path))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    # `**/` matches any number of folders; `*` stays inside one folder, as in a shell.
    parts = pattern.split("**/")
    translated = [
        fnmatch.translate(p).removesuffix("\\Z").removeprefix("(?s:").removesuffix(")").replace(".*", "[^/]*")
        for p in parts
    ]
    return re.compile("(?:.*/)?".join(translated))


def compression_of(file: str) -> str | None:
    for suffix, codec in _COMPRESSED.items():
        if file.endswith(suffix):
            return codec
    return None


def file_size(file: str) -> int:
    fs, path = filesystem(file)
    return fs.get_file_info(path).size or 0


def plan_splits(source: str, fmt: str, files: list[str], split_bytes: int) -> list[Split]:
    splits = []
    for file in files:
        size = file_size(file)
        if fmt != "jsonl" or compression_of(file) or size <= split_bytes:
            splits.append(Split(source, fmt, file, 0, -1))
            continue
        for start in range(0, size, split_bytes):
            splits.append(Split(source, fmt, file, start, min(start + split_bytes, size)))
    return splits


def count_newlines(split: Split) -> int:
    """Newlines in the split's byte range (used to number the lines of the splits after it)."""
    fs, path = filesystem(split.file)
    total = 0
    with fs.open_input_file(path) as f:
        f.seek(split.start)
        remaining = split.end - split.start
        while remaining > 0:
            block = f.read(min(_READ_BLOCK, remaining))
            if not block:
                break
            total += block.count(b"\n")
            remaining -= len(block)
    return total


def read_lines(split: Split) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its line ending) for each line the split owns."""
    fs, path = filesystem(split.file)
    codec = compression_of(split.file)
    line_no = split.lines_before
    if codec or split.end < 0:
        with _decompressed(fs, path, codec) as stream:
            for _, line in _lines_with_offsets(stream, 0):
                line_no += 1
                yield line_no, line.rstrip(b"\r")
        return
    with fs.open_input_file(path) as f:
        skip_first = False
        if split.start > 0:
            f.seek(split.start - 1)
            # Starting inside a line: that line belongs to the split before this one.
            skip_first = f.read(1) != b"\n"
        for offset, line in _lines_with_offsets(f, split.start):
            if offset >= split.end:
                break
            line_no += 1
            if skip_first:
                skip_first = False
                continue
            yield line_no, line.rstrip(b"\r")


def _decompressed(fs, path: str, codec: str | None):
    """The file's bytes as a stream with ``read(n)``. gzip and bz2 are decoded here as the compressed bytes
    arrive, so a truncated file hands over everything before the cut and only then raises EOFError
    (pyarrow's readers, and Python's ``GzipFile.read``, fail on the read that reaches the cut)."""
    raw = fs.open_input_stream(path, compression=None)
    if codec == "gzip":
        return _Decoding(raw, lambda: zlib.decompressobj(wbits=31), path)
    if codec == "bz2":
        return _Decoding(raw, bz2.BZ2Decompressor, path)
    if codec:
        raw.close()
        return fs.open_input_stream(path, compression=codec)
    return raw


class _Decoding:
    """A compressed stream decoded block by block; concatenated members (``cat a.gz b.gz``) follow on."""

    def __init__(self, raw, new_decoder, path: str):
        self.raw, self.new_decoder, self.path = raw, new_decoder, path
        self.decoder, self.in_member = new_decoder(), False  # in_member: a member begun and not yet ended

    def read(self, n: int) -> bytes:
        while block := self.raw.read(1 << 20):
            if out := self._decode(block):
                return out
        if self.in_member:
            raise EOFError(f"{self.path} ends inside its compressed data (truncated)")
        return b""

    def _decode(self, block: bytes) -> bytes:
        out = []
        while block:
            self.in_member = True
            out.append(self.decoder.decompress(block))
            if not self.decoder.eof:
                break
            block, self.decoder, self.in_member = self.decoder.unused_data, self.new_decoder(), False
        return b"".join(out)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()


def _lines_with_offsets(stream, offset: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset where the line starts, line without ``\\n``), reading in large blocks."""
    pending = b""
    while True:
        block = stream.read(_READ_BLOCK)
        if not block:
            break
        data = pending + block
        lines = data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield offset, line
            offset += len(line) + 1
    if pending:
        yield offset, pending


def read_parquet_rows(split: Split, batch_rows: int = 4096) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row as a dict) for each row of a Parquet file."""
    fs, path = filesystem(split.file)
    row_no = 0
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
