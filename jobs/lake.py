"""All reads and writes of the lake's Delta tables: the one place for lake I/O.

Two paths produce the same Delta tables:
- **native**: the Delta jar is on Spark's classpath (a cluster); Spark reads and writes
  ``format("delta")`` itself.
- **bridge**: no jar (a laptop, CI). Spark writes Parquet files into a fresh folder inside the table,
  then the driver commits every one of them in ONE Delta transaction through delta-rs. Until that
  commit the files are invisible, so a job that dies leaves the table at its previous version.
  Reads go through the table's list of active files.

The Arrow side (``read_arrow``, ``write_arrow``, ``merge_counters``) needs no JVM: the trainer uses it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

from jobs.sources import filesystem
from schemas import Table, arrow_differences, conform, table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

Mode = Literal["append", "overwrite"]


class LakeError(RuntimeError):
    """A lake operation that cannot go on; the message says which table and what to do."""


class SchemaMismatchError(LakeError):
    pass


class ConflictError(LakeError):
    """Another writer committed to the table first; nothing of this write was committed."""


class TableMissingError(LakeError):
    pass


@dataclass(frozen=True)
class TableVersion:
    version: int
    timestamp: datetime
    operation: str
    job: str | None
    rows_written: int | None


@dataclass(frozen=True)
class TableSummary:
    name: str
    version: int
    rows: int
    files: int
    last_commit: TableVersion


class Lake:
    def __init__(self, root: str, spark: SparkSession | None = None, native: bool | None = None):
        self.root = root.rstrip("/")
        self.spark = spark
        if native is None and spark is not None:
            from jobs.spark import delta_jar_available

            native = delta_jar_available(spark)
        self.native = bool(native)

    # -- locations --------------------------------------------------------------------------
    def uri(self, name: str) -> str:
        table(name)  # unknown names fail here, with the list of tables
        return f"{self.root}/tables/{name}"

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(name))

    def delta(self, name: str) -> DeltaTable:
        try:
            return DeltaTable(self.uri(name))
        except TableNotFoundError:
            raise TableMissingError(
                f"table {name!r} does not exist in the lake {self.root} (no Delta log at {self.uri(name)}); "
                f"run the stage that writes it first (DESIGN.md, 'The lake')"
            ) from None

    # -- Spark side -------------------------------------------------------------------------
    def read(self, name: str) -> DataFrame:
        spark = self._need_spark()
        from schemas.spark import spark_schema

        if self.native:
            if not self.exists(name):
                self.delta(name)  # raises TableMissingError with the hint
            return spark.read.format("delta").load(_spark_uri(self.uri(name)))
        files = self.delta(name).file_uris()
        schema = spark_schema(table(name))
        if not files:
            return spark.createDataFrame([], schema)
        return spark.read.schema(schema).parquet(*[_spark_uri(f) for f in files])

    def write(
        self,
        name: str,
        df: DataFrame,
        mode: Mode = "overwrite",
        replace_where: dict[str, str] | None = None,
        job: str | None = None,
    ) -> int:
        """Write ``df`` as the table's next version, in one commit; returns that version.

        ``replace_where`` (with mode "overwrite") replaces only the rows whose columns equal the
        given values, e.g. ``{"stage": "ingest"}`` in ``documents_rejected``; the new rows must all
        match it.
        """
        spec = table(name)
        self._check_spark_schema(spec, df)
        df = df.select(*spec.columns)
        if self.native:
            return self._write_native(spec, df, mode, replace_where)
        return self._write_bridge(spec, df, mode, replace_where, job)

    def _write_native(self, spec: Table, df: DataFrame, mode: Mode, replace_where: dict[str, str] | None) -> int:
        writer = df.write.format("delta").mode(mode)
        if replace_where:
            writer = writer.option("replaceWhere", _sql_predicate(replace_where))
        writer.save(_spark_uri(self.uri(spec.name)))
        return self.delta(spec.name).version()

    def _write_bridge(
        self, spec: Table, df: DataFrame, mode: Mode, replace_where: dict[str, str] | None, job: str | None
    ) -> int:
        uri = self.uri(spec.name)
        snapshot = DeltaTable(uri) if self.exists(spec.name) else None
        if snapshot is not None:
            self._check_table_schema(spec, snapshot)
        write_dir = f"{uri}/w-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        df.write.mode("errorifexists").parquet(_spark_uri(write_dir))
        try:
            adds = _add_actions(uri, write_dir)
            rows = sum(json.loads(a.stats)["numRecords"] for a in adds)
            props = _commit_properties(job, rows, strict=mode == "overwrite")
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
            _delete_dir(write_dir)
            now = DeltaTable(uri).version() if self.exists(spec.name) else None
            raise ConflictError(
                f"table {spec.name!r}: another writer committed (table now at version {now}) while this "
                f"{mode} was prepared from version {snapshot.version() if snapshot else 'none'}; nothing of "
                f"this write was committed. Rerun the job once the other writer has finished. ({err})"
            ) from None
        except BaseException:
            _delete_dir(write_dir)
            raise
        return DeltaTable(uri).version()

    # -- Arrow side (no JVM) ----------------------------------------------------------------
    def read_arrow(self, name: str, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        if not self.exists(name):
            return table(name).schema.empty_table().select(columns or table(name).columns)
        return self.delta(name).to_pyarrow_dataset().to_table(columns=columns, filter=filter)

    def write_arrow(
        self,
        name: str,
        data: pa.Table,
        mode: Mode = "append",
        replace_where: dict[str, str] | None = None,
        job: str | None = None,
    ) -> int:
        spec = table(name)
        try:
            data = conform(spec, data)
        except ValueError as err:
            raise SchemaMismatchError(str(err)) from None
        if self.exists(name):
            self._check_table_schema(spec, self.delta(name))
        try:
            write_deltalake(
                self.uri(name),
                data,
                mode=mode,
                predicate=_sql_predicate(replace_where) if replace_where else None,
                commit_properties=_commit_properties(job, data.num_rows, strict=mode == "overwrite"),
            )
        except CommitFailedError as err:
            raise ConflictError(f"table {name!r}: a concurrent commit won; nothing was written ({err})") from None
        return self.delta(name).version()

    def put_rows(self, name: str, rows: list[dict], replace_where: dict[str, str] | None = None,
                 job: str | None = None, attempts: int = 20) -> int:
        """Append ``rows``, or replace the rows matching ``replace_where`` with them (none: delete them),
        retrying with a short back-off while other writers' commits land (feed and trainer share
        ``chunks``). For a decision that must not race, use ``replace_if_unchanged``."""
        data = pa.Table.from_pylist(rows, schema=table(name).schema)
        for attempt in range(attempts):
            try:
                if replace_where is None:
                    return self.write_arrow(name, data, mode="append", job=job)
                self.ensure(name)
                return self.write_arrow(name, data, mode="overwrite", replace_where=replace_where, job=job)
            except ConflictError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))  # back off while the other commit lands
        raise AssertionError("unreachable")

    def replace_if_unchanged(
        self, name: str, snapshot: DeltaTable, data: pa.Table, replace_where: dict[str, str], job: str | None = None
    ) -> int:
        """Replace the rows matching ``replace_where`` with ``data``, only if the table is still at the
        version ``snapshot`` was read at: a conditional commit (e.g. two trainers claiming one chunk).
        Raises ConflictError when another commit landed in between; re-read and decide again."""
        spec = table(name)
        try:
            data = conform(spec, data)
        except ValueError as err:
            raise SchemaMismatchError(str(err)) from None
        try:
            write_deltalake(snapshot, data, mode="overwrite", predicate=_sql_predicate(replace_where),
                            commit_properties=_commit_properties(job, data.num_rows, strict=True))
        except CommitFailedError as err:
            raise ConflictError(f"table {name!r} changed since version {snapshot.version()}; nothing was written ({err})") from None
        return self.delta(name).version()

    def merge_counters(
        self,
        name: str,
        updates: pa.Table,
        key: list[str],
        add: list[str],
        assign: list[str] = (),
        job: str | None = None,
    ) -> int:
        """Upsert ``updates``: matched rows get ``add`` columns incremented and ``assign`` columns set."""
        spec = table(name)
        try:
            updates = conform(spec, updates)
        except ValueError as err:
            raise SchemaMismatchError(str(err)) from None
        self.ensure(name)
        set_exprs = {c: f"t.{c} + s.{c}" for c in add} | {c: f"s.{c}" for c in assign}
        try:
            (
                self.delta(name)
                .merge(
                    source=updates,
                    predicate=" AND ".join(f"t.{k} = s.{k}" for k in key),
                    source_alias="s",
                    target_alias="t",
                    commit_properties=_commit_properties(job, updates.num_rows, strict=False),
                )
                .when_matched_update(updates=set_exprs)
                .when_not_matched_insert_all()
                .execute()
            )
        except CommitFailedError as err:
            raise ConflictError(f"table {name!r}: a concurrent merge won; retry the merge ({err})") from None
        return self.delta(name).version()

    def ensure(self, name: str) -> None:
        """Create the table, empty, if it does not exist yet."""
        if not self.exists(name):
            try:
                DeltaTable.create(self.uri(name), schema=table(name).schema, mode="ignore")
            except Exception as err:  # a racing creator may have won; that is fine
                if not self.exists(name):
                    raise LakeError(f"cannot create table {name!r} at {self.uri(name)}: {err}") from err

    def write_report(self, relative_dir: str, files: dict[str, str]) -> str:
        """Write text files under ``<lake>/reports/<relative_dir>/``; returns that folder."""
        folder = f"{self.root}/reports/{relative_dir}"
        fs, path = filesystem(folder)
        fs.create_dir(path, recursive=True)
        for name, content in files.items():
            with fs.open_output_stream(f"{path}/{name}") as out:
                out.write(content.encode("utf-8"))
        return folder

    # -- inspection ---------------------------------------------------------------------------
    def versions(self, name: str, limit: int | None = None) -> list[TableVersion]:
        return [_table_version(h) for h in self.delta(name).history(limit)]

    def summary(self, name: str) -> TableSummary:
        dt = self.delta(name)
        actions = pa.table(dt.get_add_actions(flatten=True))
        counts = actions.column("num_records").to_pylist() if actions.num_rows else []
        rows = (
            sum(counts)
            if all(c is not None for c in counts)
            else dt.to_pyarrow_dataset().count_rows()
        )
        return TableSummary(name, dt.version(), rows, actions.num_rows, self.versions(name, 1)[0])

    # -- checks -------------------------------------------------------------------------------
    def _need_spark(self) -> SparkSession:
        if self.spark is None:
            raise LakeError("this lake operation runs in Spark: create the Lake with a SparkSession")
        return self.spark

    @staticmethod
    def _check_spark_schema(spec: Table, df: DataFrame) -> None:
        from schemas.spark import schema_differences

        problems = schema_differences(spec, df.schema)
        if problems:
            raise SchemaMismatchError(
                f"refusing to write table {spec.name!r}: the data does not match its definition in "
                f"schemas/tables.py: " + "; ".join(problems)
            )

    @staticmethod
    def _check_table_schema(spec: Table, dt: DeltaTable) -> None:
        problems = arrow_differences(spec, pa.schema(dt.schema().to_arrow()))
        if problems:
            raise SchemaMismatchError(
                f"table {spec.name!r} at {dt.table_uri} was written with another schema than "
                f"schemas/tables.py defines ({'; '.join(problems)}); write to a new lake or migrate the table"
            )


class _TableExistsError(Exception):
    pass


def _create_with(uri: str, spec: Table, adds: list[AddAction], props: CommitProperties) -> None:
    try:
        create_table_with_add_actions(uri, DeltaSchema.from_arrow(spec.schema), adds, mode="error", commit_properties=props)
    except Exception as err:
        if DeltaTable.is_deltatable(uri):  # another writer created the table first
            raise _TableExistsError(str(err)) from err
        raise


def _spark_uri(uri: str) -> str:
    # delta-rs says s3://, Hadoop's S3 connector is s3a://.
    return "s3a://" + uri[len("s3://"):] if uri.startswith("s3://") else uri


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


def _sql_predicate(where: dict[str, str]) -> str:
    return " AND ".join(f"{col} = '{val.replace(chr(39), chr(39) * 2)}'" for col, val in where.items())


def _commit_properties(job: str | None, rows: int, strict: bool) -> CommitProperties:
    # An overwrite prepared from version N must land as N+1: retrying on top of a concurrent commit
    # could silently keep (or drop) that commit's rows, so a stale overwrite fails instead.
    return CommitProperties(
        custom_metadata={"tokenmill.job": job or "", "tokenmill.rows": str(rows)},
        max_commit_retries=0 if strict else None,
    )


def _table_version(entry: dict[str, Any]) -> TableVersion:
    rows = entry.get("tokenmill.rows")
    return TableVersion(
        version=int(entry.get("version", -1)),
        timestamp=datetime.fromtimestamp(int(entry.get("timestamp", 0)) / 1000, tz=timezone.utc),
        operation=str(entry.get("operation", "")),
        job=entry.get("tokenmill.job") or None,
        rows_written=int(rows) if rows not in (None, "") else None,
    )


def _delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
