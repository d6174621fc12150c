"""The trainer's side of the chunk store, through delta-rs only (no JVM): find the next ready chunk,
claim it with a conditional commit, read its rows, mark it consumed or quarantined, and record
every step of that in ``trainer_events``."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.feed import chunk_dir, verify_chunk
from jobs.lake import ConflictError, Lake
from schemas import table


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Events:
    """``trainer_events`` rows of one run (appended with delta-rs)."""

    def __init__(self, lake: Lake, run_id: str, enabled: bool = True):
        self.lake, self.run_id, self.enabled = lake, run_id, enabled

    def __call__(self, step: int, event: str, chunk_id: str | None = None, detail: str | None = None) -> None:
        if not self.enabled:
            return
        row = {"run_id": self.run_id, "step": int(step), "chunk_id": chunk_id, "event": event, "detail": detail,
               "at": _now()}
        self.lake.put_rows("trainer_events", [row], job="trainer")


def claim_next(lake: Lake, stage: str, run_id: str, attempts: int = 50) -> dict | None:
    """Claim the first ready chunk of ``stage`` for ``run_id`` (status ``training``); None when none is ready.

    The claim is a conditional commit on the version the choice was read from: of two trainers
    racing for one chunk exactly one wins; the other re-reads and takes the next one."""
    for _ in range(attempts):
        if not lake.exists("chunks"):
            return None
        snapshot = lake.delta("chunks")
        rows = sorted(snapshot.to_pyarrow_table().to_pylist(), key=lambda r: r["chunk_id"])
        ready = [r for r in rows if r["stage"] == stage and r["status"] == "ready"]
        if not ready:
            return None
        row = {**ready[0], "status": "training", "run_id": run_id, "updated_at": _now()}
        try:
            lake.replace_if_unchanged("chunks", snapshot, pa.Table.from_pylist([row], schema=table("chunks").schema),
                                      {"chunk_id": row["chunk_id"]}, job=f"trainer:{run_id}")
            return row
        except ConflictError:
            continue
    return None


def find_claimed(lake: Lake, stage: str, run_id: str) -> dict | None:
    """The chunk this run had claimed and not finished (a restarted run resumes it)."""
    if not lake.exists("chunks"):
        return None
    rows = [r for r in lake.read_arrow("chunks").to_pylist()
            if r["stage"] == stage and r["status"] == "training" and r["run_id"] == run_id]
    return sorted(rows, key=lambda r: r["chunk_id"])[0] if rows else None


def set_status(lake: Lake, row: dict, status: str, reason: str | None = None, consumed: bool = False) -> dict:
    new = {**row, "status": status, "reason": reason if reason is not None else row.get("reason"),
           "times_consumed": row["times_consumed"] + (1 if consumed else 0), "updated_at": _now()}
    lake.put_rows("chunks", [new], replace_where={"chunk_id": row["chunk_id"]}, job="trainer", attempts=50)
    return new


def check(lake: Lake, row: dict) -> str | None:
    """Why the chunk's files cannot be trained on (missing, altered), or None."""
    return verify_chunk(lake.root, row)


def read_rows(lake: Lake, row: dict) -> tuple[np.ndarray, list[list[dict]]]:
    """(input_ids as an int64 array [rows, seq_len + 1], spans per row), in row order."""
    folder = chunk_dir(lake.root, row["chunk_id"])
    parts = [pq.read_table(f"{folder}/{name}") for name in row["files"]]
    data = pa.concat_tables(parts).sort_by("row")
    ids = data.column("input_ids").combine_chunks()
    width = len(ids[0]) if len(ids) else 0
    flat = np.asarray(ids.flatten()).astype(np.int64)
    return flat.reshape(len(ids), width), data.column("spans").to_pylist()
