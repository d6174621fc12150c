"""Uncommitted write folders: what a killed job leaves inside a table, found and removed.

The bridge writes a job's files into ``<table>/w-<UTC time>-<id>/`` and then commits all of them in
one Delta commit (``lake/bridge.py``). A job killed between the two leaves a folder that no commit
names: invisible to readers, but on disk for ever. A folder is removed only when no entry of the
table's log (commits and checkpoints: files added, files removed) names a file in it, and it is older
than ``older_than`` (a write still running is younger than that). Committed files are never touched,
including those of earlier versions. ``tokenmill vacuum`` sweeps every table; each bridge write sweeps
its own table first, with the default age."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import unquote

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lake.fs import filesystem, remove_dir

WRITE_FOLDER = re.compile(r"^w-(\d{8}T\d{6})-[0-9a-f]{8}$")
SWEEP_AFTER = timedelta(hours=24)  # far longer than any write takes


@dataclass(frozen=True)
class Uncommitted:
    table: str
    folder: str  # the folder's URI
    written_at: datetime
    files: int
    bytes: int


def write_folders(table_uri: str) -> list[tuple[str, datetime]]:
    """(name, when it was started) of every ``w-*`` folder in the table."""
    fs, base = filesystem(table_uri)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base)):
        match = WRITE_FOLDER.match(info.base_name)
        if info.type == pafs.FileType.Directory and match:
            found.append((info.base_name, datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)))
    return sorted(found)


def committed_folders(table_uri: str) -> set[str]:
    """The top-level folders of every file that any entry of the table's log adds or removes."""
    fs, log = filesystem(f"{table_uri}/_delta_log")
    folders: set[str] = set()
    if fs.get_file_info(log).type != pafs.FileType.Directory:
        return folders  # never committed: the table does not exist yet

    def note(path: str | None) -> None:
        if path and "/" in path and "://" not in path:
            folders.add(unquote(path).split("/", 1)[0])

    for info in fs.get_file_info(pafs.FileSelector(log)):
        if info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                for line in f.read().decode("utf-8").splitlines():
                    action = json.loads(line) if line.strip() else {}
                    for kind in ("add", "remove"):
                        note((action.get(kind) or {}).get("path"))
        elif ".checkpoint" in info.base_name and info.base_name.endswith(".parquet"):
            checkpoint = pq.read_table(info.path, filesystem=fs, columns=["add", "remove"])
            for kind in ("add", "remove"):
                for entry in checkpoint.column(kind).to_pylist():
                    note((entry or {}).get("path"))
    return folders


def uncommitted(table: str, table_uri: str, older_than: timedelta = SWEEP_AFTER,
                now: datetime | None = None) -> list[Uncommitted]:
    """The table's write folders that no log entry names, started more than ``older_than`` ago."""
    now = now or datetime.now(timezone.utc)
    old = [(name, at) for name, at in write_folders(table_uri) if now - at > older_than]
    if not old:
        return []  # the log is read only when there is something to decide
    committed = committed_folders(table_uri)
    fs, base = filesystem(table_uri)
    out = []
    for name, at in old:
        if name in committed:
            continue
        files = [i for i in fs.get_file_info(pafs.FileSelector(f"{base}/{name}", recursive=True))
                 if i.type == pafs.FileType.File]
        out.append(Uncommitted(table, f"{table_uri}/{name}", at, len(files), sum(i.size or 0 for i in files)))
    return out


def sweep(found: list[Uncommitted]) -> None:
    for u in found:
        remove_dir(u.folder)


def vacuum(lake_root: str, older_than: timedelta = SWEEP_AFTER, dry_run: bool = False, log=print,
           now: datetime | None = None) -> list[Uncommitted]:
    """``tokenmill vacuum``: every table's uncommitted write folders, removed (or only listed)."""
    from schemas import TABLES

    found = [u for name in TABLES for u in uncommitted(name, f"{lake_root.rstrip('/')}/tables/{name}", older_than, now)]
    for u in found:
        log(f"{'would remove' if dry_run else 'removed'} {u.folder}: {u.files} file(s), {u.bytes:,} bytes, "
            f"written {u.written_at:%Y-%m-%d %H:%M} UTC and never committed")
    if not dry_run:
        sweep(found)
    log(f"{len(found)} uncommitted write folder(s) older than {older_than} in {lake_root}"
        + (" (dry run: nothing removed)" if dry_run else ""))
    return found
