"""The delta-rs bridge: Delta tables written by Spark without the Delta jar.

Spark writes Parquet files into a fresh folder inside the table; the driver then commits every one
of them in ONE Delta transaction through delta-rs. Until that commit the files are invisible, so a
job that dies leaves the table at its previous version. Reads go through the table's list of active
files.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

from lake.commits import commit_properties, spark_uri
from lake.errors import ConflictError
from lake.fs import filesystem, remove_dir
from lake.sweep import sweep, uncommitted
from schemas import Table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


def read(spark: SparkSession, files: list[str], spec: Table) -> DataFrame:
    """The table as a DataFrame of exactly its active files."""
    from schemas.spark import spark_schema

    schema = spark_schema(spec)
    if not files:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*[spark_uri(f) for f in files])


def write(uri: str, snapshot: DeltaTable | None, spec: Table, df: DataFrame, mode: str,
          replace_where: dict[str, str] | None, job: str | None) -> int:
    """Write ``df`` into a fresh folder of the table and commit all its files at once; returns the version."""
    sweep(uncommitted(spec.name, uri))  # what killed writes left here, long ago (lake/sweep.py)
    write_dir = f"{uri}/w-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    df.write.mode("errorifexists").parquet(spark_uri(write_dir))
    try:
        adds = _add_actions(uri, write_dir)
        rows = sum(json.loads(a.stats)["numRecords"] for a in adds)
        props = commit_properties(job, rows, strict=mode == "overwrite")
        if snapshot is None:
            _create_with(uri, spec, adds, props)
        elif replace_where:
            removes, rewritten = _replace_where_actions(snapshot, spec, replace_where, write_dir)
            snapshot.create_write_transaction(
                [*adds, *rewritten, *removes], "append", spec.schema, commit_properties=props
            )
        else:
            snapshot.create_write_transaction(adds, mode, spec.schema, commit_properties=props)
    except (CommitFailedError, _TableExistsError) as err:
        remove_dir(write_dir)
        now = DeltaTable(uri).version() if DeltaTable.is_deltatable(uri) else None
        raise ConflictError(
            f"table {spec.name!r}: another writer committed (table now at version {now}) while this "
            f"{mode} was prepared from version {snapshot.version() if snapshot else 'none'}; nothing of "
            f"this write was committed. Rerun the job once the other writer has finished. ({err})"
        ) from None
    except BaseException:
        remove_dir(write_dir)
        raise
    return DeltaTable(uri).version()


class _TableExistsError(Exception):
    pass


def _create_with(uri: str, spec: Table, adds: list[AddAction], props: CommitProperties) -> None:
    try:
        create_table_with_add_actions(uri, DeltaSchema.from_arrow(spec.schema), adds, mode="error", commit_properties=props)
    except Exception as err:
        if DeltaTable.is_deltatable(uri):  # another writer created the table first
            raise _TableExistsError(str(err)) from err
        raise


def _add_actions(table_uri: str, write_dir: str) -> list[AddAction]:
    """One AddAction, with row count and min/max statistics, per Parquet file Spark wrote."""
    fs, base = filesystem(write_dir)
    _, table_base = filesystem(table_uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    adds = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        if not info.base_name.endswith(".parquet") or info.base_name.startswith((".", "_")):
            fs.delete_file(info.path)  # checksums and markers: never part of the table
            continue
        meta = pq.read_metadata(info.path, filesystem=fs)
        if meta.num_rows == 0:
            fs.delete_file(info.path)  # an empty Spark partition: nothing to commit
            continue
        adds.append(
            AddAction(
                path=info.path[len(table_base.rstrip("/")) + 1:],
                size=info.size,
                partition_values={},
                modification_time=int(info.mtime_ns // 1_000_000) if info.mtime_ns else int(time.time() * 1000),
                data_change=True,
                stats=json.dumps(_file_stats(meta)),
            )
        )
    return adds


def _file_stats(meta: pq.FileMetaData) -> dict[str, Any]:
    """Delta file statistics from the Parquet footer: rows, and min/max/nulls of short columns."""
    stats: dict[str, Any] = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    schema = meta.schema.to_arrow_schema()
    for col_idx, field in enumerate(schema):
        if not (pa.types.is_string(field.type) or pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            continue
        lows, highs, nulls = [], [], 0
        for rg in range(meta.num_row_groups):
            col = meta.row_group(rg).column(col_idx)
            st = col.statistics
            if st is None or not st.has_min_max:
                if meta.row_group(rg).num_rows:
                    lows = highs = None
                    break
                continue
            lows.append(st.min)
            highs.append(st.max)
            nulls += st.null_count or 0
        if lows is None or not lows:
            continue
        low, high = min(lows), max(highs)
        if isinstance(low, str) and (len(low) > 32 or len(high) > 32):
            continue  # long text: min/max would be truncated, so useless for exact predicates
        stats["minValues"][field.name] = low
        stats["maxValues"][field.name] = high
        stats["nullCount"][field.name] = nulls
    return stats


def _replace_where_actions(
    snapshot: DeltaTable, spec: Table, where: dict[str, str], write_dir: str
) -> tuple[list[RemoveAction], list[AddAction]]:
    """Remove every active file whose rows all match ``where``; rewrite the files that mix.

    Returns the removals and the AddActions of the rewritten files (written into ``write_dir``).
    """
    now = int(time.time() * 1000)
    wanted = list(where.values())
    removes: list[RemoveAction] = []
    mixed = 0
    for act in pa.table(snapshot.get_add_actions(flatten=True)).to_pylist():
        lows = [act.get(f"min.{c}") for c in where]
        highs = [act.get(f"max.{c}") for c in where]
        if all(lo is not None and hi is not None for lo, hi in zip(lows, highs)):
            if lows == wanted and highs == wanted:
                removes.append(_remove(act, now))  # every row matches: drop the whole file
                continue
            if any(not (lo <= val <= hi) for lo, hi, val in zip(lows, highs, wanted)):
                continue  # no row can match: keep the file as it is
        # The file may mix matching and other rows: keep the others in a rewritten file.
        src_fs, src_path = filesystem(f"{snapshot.table_uri.rstrip('/')}/{act['path']}")
        keep = pq.read_table(src_path, filesystem=src_fs, schema=spec.schema).filter(~_match_expression(where))
        removes.append(_remove(act, now))
        if keep.num_rows:
            out_fs, out = filesystem(f"{write_dir}/kept-{mixed:05d}.parquet")
            pq.write_table(keep, out, filesystem=out_fs, compression="zstd")
            mixed += 1
    rewritten = [a for a in _add_actions(snapshot.table_uri, write_dir) if "/kept-" in a.path] if mixed else []
    return removes, rewritten


def _remove(action: dict[str, Any], now_ms: int) -> RemoveAction:
    return RemoveAction(path=action["path"], data_change=True, deletion_timestamp=now_ms, size=action["size_bytes"])


def _match_expression(where: dict[str, str]) -> pc.Expression:
    expr = None
    for col, val in where.items():
        term = pc.field(col) == val
        expr = term if expr is None else expr & term
    return expr
