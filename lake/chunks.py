"""The chunk store: the one owner of the ``chunks`` manifest and of every chunk's state.

A chunk is a folder ``<lake>/chunks/<chunk_id>/`` of zstd Parquet files plus one row in ``chunks``.
Its status moves ``writing → ready → training → consumed``, or to ``quarantined`` (bad data,
checksum mismatch, loss spike). Feed writes chunks and publishes them ``ready``; the trainer
claims, verifies, reads and finishes them. Everything here goes through delta-rs (no JVM).

Feed's usage increments of a chunk are saved beside its files (``_usage.parquet``), so that a
chunk a dead feed left ``writing`` can be undone entirely: files, usage and manifest row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lake.errors import ConflictError
from lake.fs import exists, file_sha256, read_parquet, remove_dir
from lake.tables import Lake
from schemas import table

WRITING, READY, TRAINING, CONSUMED, QUARANTINED = "writing", "ready", "training", "consumed", "quarantined"


def now() -> datetime:
    return datetime.now(timezone.utc)


def chunk_dir(lake_root: str, chunk_id: str) -> str:
    return f"{lake_root.rstrip('/')}/chunks/{chunk_id}"


def usage_increments_path(lake_root: str, chunk_id: str) -> str:
    return f"{chunk_dir(lake_root, chunk_id)}/_usage.parquet"


# -- the manifest -------------------------------------------------------------------------------------


def manifest(lake: Lake, stage: str | None = None, status: str | None = None) -> list[dict]:
    """Manifest rows in chunk order, optionally of one stage and one status."""
    rows = lake.read_arrow("chunks").to_pylist()
    return sorted((r for r in rows if (stage is None or r["stage"] == stage) and (status is None or r["status"] == status)),
                  key=lambda r: r["chunk_id"])


def put(lake: Lake, row: dict, job: str) -> dict:
    """Replace one chunk's manifest row (insert it if new)."""
    lake.put_rows("chunks", [row], replace_where={"chunk_id": row["chunk_id"]}, job=job, attempts=50)
    return row


def delete(lake: Lake, chunk_id: str, job: str) -> None:
    lake.put_rows("chunks", [], replace_where={"chunk_id": chunk_id}, job=job, attempts=50)


def set_status(lake: Lake, row: dict, status: str, job: str, reason: str | None = None,
               consumed: bool = False) -> dict:
    """The chunk's row with a new status (and reason), written back; ``consumed`` counts one use."""
    return put(lake, {**row, "status": status, "reason": reason if reason is not None else row.get("reason"),
                      "times_consumed": row["times_consumed"] + (1 if consumed else 0), "updated_at": now()}, job)


def quarantine(lake: Lake, row: dict, reason: str, job: str) -> dict:
    """Take a chunk out of training for good, saying why (bad files, a loss that kept spiking, another
    tokenizer); its documents' usage is taken back, as they were not trained on."""
    take_back_usage(lake, row)
    return set_status(lake, row, QUARANTINED, job, reason=reason)


def next_chunk_id(lake: Lake, stage: str) -> str:
    return f"{stage}-{len(manifest(lake, stage)) if lake.exists('chunks') else 0:06d}"


def backlog(lake: Lake, stage: str) -> int:
    """Ready chunks of the stage not taken by a trainer yet."""
    return len(manifest(lake, stage, READY)) if lake.exists("chunks") else 0


# -- verification ---------------------------------------------------------------------------------------


def tokenizer_id(meta: dict) -> str:
    """What a chunk records of the tokenizer its ids come from (``tokenizer_version``): version and hash."""
    return f"{meta['version']}:{meta['sha256']}"


def tokenizer_mismatch(row: dict, run_tokenizer: str) -> str | None:
    """Why a chunk cannot be trained by a run on ``run_tokenizer`` (its ids mean other tokens), or None."""
    theirs = row.get("tokenizer_version")
    if theirs is None or theirs == run_tokenizer or (":" not in theirs and theirs == run_tokenizer.split(":")[0]):
        return None  # a chunk that names only the version (an older lake) is judged by the version
    return (f"tokenized with tokenizer {theirs}, but the run trains with {run_tokenizer}: its ids are another "
            f"vocabulary's; rerun feed with the run's tokenizer, or train these chunks in a run on that one")


def verify(lake_root: str, row: dict) -> str | None:
    """None when every file of the chunk exists with its recorded sha256; else the reason it does not."""
    folder = chunk_dir(lake_root, row["chunk_id"])
    for name, expected in zip(row["files"], row["sha256"]):
        uri = f"{folder}/{name}"
        if not exists(uri):
            return f"file {name} is missing from {folder}"
        actual = file_sha256(uri)
        if actual != expected:
            return f"file {name} has sha256 {actual[:12]}…, the manifest says {expected[:12]}…"
    return None


def verify_ready(lake: Lake, job: str = "verify") -> list[tuple[str, str]]:
    """Check every ready chunk's files; quarantine the bad ones. Returns (chunk_id, reason) of those."""
    bad = []
    for row in manifest(lake, status=READY):
        reason = verify(lake.run_root, row)
        if reason:
            quarantine(lake, row, reason, job)
            bad.append((row["chunk_id"], reason))
    return bad


# -- the writer's side (feed) ----------------------------------------------------------------------------


def cleanup_interrupted(lake: Lake) -> list[str]:
    """Undo every chunk left ``writing`` by a run that died: its usage increments if they were committed,
    its files, its row. Returns their ids."""
    if not lake.exists("chunks"):
        return []
    cleaned = []
    for row in manifest(lake, status=WRITING):
        chunk_id = row["chunk_id"]
        take_back_usage(lake, row)
        remove_dir(chunk_dir(lake.run_root, chunk_id))
        delete(lake, chunk_id, job=f"feed-cleanup:{chunk_id}")
        cleaned.append(chunk_id)
    return cleaned


def usage_job(row: dict) -> str:
    """The tag of the ``usage`` commit that counted a chunk's documents: the chunk and its attempt (the
    time its ``writing`` row was made). A chunk id is used again after a clean-up; the attempt is not."""
    return f"feed:{row['chunk_id']}@{row['created_at']:%Y%m%dT%H%M%S%f}"


def take_back_usage(lake: Lake, row: dict) -> bool:
    """Subtract the chunk's usage increments, once per attempt, if that attempt's were committed (a chunk
    cleaned up, or quarantined: its documents were not trained on). True when it took them back."""
    if not lake.exists("usage"):
        return False
    jobs = [v.job for v in lake.versions("usage")]
    counted, undo = usage_job(row), "usage-undo:" + usage_job(row).removeprefix("feed:")
    legacy = f"feed:{row['chunk_id']}"  # lakes written before the attempt was in the tag
    if counted in jobs:
        if undo in jobs:
            return False
    elif not (legacy in jobs and f"feed-undo:{row['chunk_id']}" not in jobs):
        return False
    else:
        undo = f"feed-undo:{row['chunk_id']}"
    saved = usage_increments_path(lake.run_root, row["chunk_id"])
    if not exists(saved):  # the chunk's folder is gone with them: what it counted cannot be known any more
        return False
    increments = read_parquet(saved)
    negated = pa.table({"doc_id": increments.column("doc_id"), "times_used": pc.negate(increments.column("times_used")),
                        "last_chunk_id": pa.nulls(increments.num_rows, pa.string())})
    lake.merge_counters("usage", negated, key=["doc_id"], add=["times_used"], job=undo)
    return True


def usage_disagreements(lake: Lake) -> list[tuple[str, int, int]] | None:
    """``(doc_id, times_used in usage, appearances in the live chunks)`` for every document where the
    two differ; the live chunks are those ready, in training or consumed (a chunk cleaned up or
    quarantined gave its usage back). Empty when they agree; None when it cannot be told (no usage
    yet, or a live chunk without its saved increments)."""
    if not (lake.exists("usage") and lake.exists("chunks")):
        return None
    expected: dict[str, int] = {}
    for row in manifest(lake):
        if row["status"] not in (READY, TRAINING, CONSUMED):
            continue
        saved = usage_increments_path(lake.run_root, row["chunk_id"])
        if not exists(saved):
            return None
        increments = read_parquet(saved)
        for doc, n in zip(increments.column("doc_id").to_pylist(), increments.column("times_used").to_pylist()):
            expected[doc] = expected.get(doc, 0) + n
    used = lake.read_arrow("usage", columns=["doc_id", "times_used"])
    recorded = dict(zip(used.column("doc_id").to_pylist(), used.column("times_used").to_pylist()))
    return sorted((d, recorded.get(d) or 0, expected.get(d, 0)) for d in recorded.keys() | expected.keys()
                  if (recorded.get(d) or 0) != expected.get(d, 0))


@dataclass(frozen=True)
class Placement:
    """Where one document went in one chunk: the rows holding its pieces, and its tokens there."""

    chunk: dict  # the manifest row
    rows: list[int]
    tokens: int


def placements(lake: Lake, doc_id: str) -> list[Placement]:
    """Every chunk (any status) that holds ``doc_id``, with its rows: the chunk's saved usage
    increments tell which chunks to open, then only their ``spans`` column is read."""
    found = []
    for row in manifest(lake):
        saved = usage_increments_path(lake.run_root, row["chunk_id"])
        if not exists(saved) or not read_parquet(saved, filters=[("doc_id", "==", doc_id)]).num_rows:
            continue
        folder = chunk_dir(lake.run_root, row["chunk_id"])
        data = pa.concat_tables([read_parquet(f"{folder}/{name}", columns=["row", "spans"]) for name in row["files"]])
        pieces = pc.list_flatten(data.column("spans"))
        mine = pc.equal(pc.struct_field(pieces, "doc_id"), doc_id)
        parents = pc.filter(pc.list_parent_indices(data.column("spans")), mine)
        rows = sorted(set(pc.take(data.column("row"), parents).to_pylist()))
        tokens = int(pc.sum(pc.filter(pc.struct_field(pieces, "length"), mine)).as_py() or 0)
        found.append(Placement(row, rows, tokens))
    return found


# -- the reader's side (trainer) ---------------------------------------------------------------------------


def claim_next(lake: Lake, stage: str, run_id: str, attempts: int = 50) -> dict | None:
    """Claim the first ready chunk of ``stage`` for ``run_id`` (status ``training``); None when none is ready.

    The claim is a conditional commit on the version the choice was read from: of two trainers
    racing for one chunk exactly one wins; the other re-reads and takes the next one."""
    for _ in range(attempts):
        if not lake.exists("chunks"):
            return None
        snapshot = lake.delta("chunks")
        rows = sorted(snapshot.to_pyarrow_table().to_pylist(), key=lambda r: r["chunk_id"])
        ready = [r for r in rows if r["stage"] == stage and r["status"] == READY]
        if not ready:
            return None
        row = {**ready[0], "status": TRAINING, "run_id": run_id, "updated_at": now()}
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
    rows = [r for r in manifest(lake, stage, TRAINING) if r["run_id"] == run_id]
    return rows[0] if rows else None


def read_rows(lake: Lake, row: dict) -> tuple[np.ndarray, list[list[dict]]]:
    """(input_ids as an int64 array [rows, seq_len + 1], spans per row), in row order."""
    folder = chunk_dir(lake.run_root, row["chunk_id"])
    data = pa.concat_tables([read_parquet(f"{folder}/{name}") for name in row["files"]]).sort_by("row")
    ids = data.column("input_ids").combine_chunks()
    width = len(ids[0]) if len(ids) else 0
    flat = np.asarray(ids.flatten()).astype(np.int64)
    return flat.reshape(len(ids), width), data.column("spans").to_pylist()


class Events:
    """``trainer_events`` rows of one run (appended with delta-rs)."""

    def __init__(self, lake: Lake, run_id: str, enabled: bool = True):
        self.lake, self.run_id, self.enabled = lake, run_id, enabled

    def __call__(self, step: int, event: str, chunk_id: str | None = None, detail: str | None = None) -> None:
        if not self.enabled:
            return
        row = {"run_id": self.run_id, "step": int(step), "chunk_id": chunk_id, "event": event, "detail": detail,
               "at": now()}
        self.lake.put_rows("trainer_events", [row], job="trainer")


def backlog_below(recipe_path: str, wanted: int) -> bool:
    """True when the recipe's current stage has fewer than ``wanted`` ready chunks (no Spark needed):
    what the Airflow feed DAG asks before it submits feed."""
    from lake.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    waiting = backlog(Lake.of(recipe), recipe.feed.stage)
    print(f"{waiting} ready chunk(s) of {recipe.feed.stage}; the backlog wants {wanted}")
    return waiting < wanted
