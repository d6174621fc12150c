"""A stage's outcome in several Delta commits, all or nothing.

Two tables cannot change in one Delta commit, and a stage's outcome spans several: ingest, filter
and pii commit their rejections and then their output; dedup its rejections, its clusters, then its
output. ``all_or_nothing(lake, stage, tables)`` wraps those commits: before the first it writes
``<lake>/_outcomes/<stage>.json`` with the version each table had, after the last it removes it.
A file still there is a stage that died between its commits. ``repair`` (every refinery stage's run
starts with it; ``tokenmill status`` names what it would repair) puts each of its tables back to the
version it had, in a new commit, so the lake holds all of a stage's commits or none of them. The
refinery's stages run one at a time on a lake (as ``tokenmill refine`` and the refine DAG run them);
a marker of a process still alive on this host is refused, not repaired.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone

from lake.errors import LakeError
from lake.fs import exists, list_dir, make_dirs, read_bytes, remove_file, write_bytes
from lake.tables import Lake

FOLDER = "_outcomes"


def marker_path(lake: Lake, stage: str) -> str:
    return f"{lake.root}/{FOLDER}/{stage}.json"


@contextmanager
def all_or_nothing(lake: Lake, stage: str, tables: tuple[str, ...]):
    """The commits inside the block are one outcome of ``stage``: a kill between them is undone by ``repair``."""
    repair(lake)
    before = {name: lake.delta(name).version() if lake.exists(name) else None for name in tables}
    make_dirs(f"{lake.root}/{FOLDER}")
    marker = {"stage": stage, "started_at": datetime.now(timezone.utc).isoformat(), "before": before,
              "host": socket.gethostname(), "pid": os.getpid()}
    write_bytes(marker_path(lake, stage), json.dumps(marker).encode())
    yield
    remove_file(marker_path(lake, stage))


def interrupted(lake: Lake) -> list[dict]:
    """The markers of stages that died between their commits."""
    folder = f"{lake.root}/{FOLDER}"
    if not exists(folder):
        return []
    return [json.loads(read_bytes(f"{folder}/{info.base_name}")) for info in list_dir(folder)
            if info.base_name.endswith(".json")]


def repair(lake: Lake, log=print) -> list[str]:
    """Undo the commits of every interrupted stage; the stages repaired."""
    done = []
    for marker in interrupted(lake):
        stage = marker["stage"]
        if _alive_here(marker):
            raise LakeError(f"{stage} is writing its outcome to this lake right now (pid {marker['pid']}); "
                            f"run one refinery stage at a time per lake")
        for name, version in marker["before"].items():
            if lake.exists(name) and lake.delta(name).version() != version:
                _check_only_stage_committed(lake, name, version, stage)
                lake.restore(name, version, job=f"repair:{stage}")
        remove_file(marker_path(lake, stage))
        log(f"[lake] {stage} died between its commits (started {marker['started_at']}): its tables "
            f"{', '.join(marker['before'])} are back to their versions before it; rerun {stage} to redo it")
        done.append(stage)
    return done


def _alive_here(marker: dict) -> bool:
    if marker.get("host") != socket.gethostname() or not marker.get("pid") or marker["pid"] == os.getpid():
        return False
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_only_stage_committed(lake: Lake, name: str, version: int | None, stage: str) -> None:
    newer = [v for v in lake.versions(name) if version is None or v.version > version]
    others = [v for v in newer if v.job != stage and v.operation != "CREATE TABLE"]
    if others:
        raise LakeError(f"table {name!r}: {stage} died between its commits, and since then version {others[0].version} "
                        f"was committed by {others[0].job or 'an untagged writer'}; putting it back would lose that. "
                        f"Look at the table's history; to keep the lake as it is, delete {marker_path(lake, stage)} "
                        f"and rerun {stage}")
