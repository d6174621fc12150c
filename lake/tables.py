"""All reads and writes of the lake's Delta tables: the one place for table I/O.

Two paths produce the same Delta tables:
- **native** (``lake/native.py``): the Delta jar is on Spark's classpath (a cluster); Spark reads
  and writes ``format("delta")`` itself.
- **bridge** (``lake/bridge.py``): no jar (a laptop, CI). Spark writes Parquet files and the driver
  commits them in one Delta transaction through delta-rs.

The Arrow side (``read_arrow``, ``write_arrow``, ``put_rows``, ``merge_counters``) needs no JVM: the
trainer uses it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable, write_deltalake
from deltalake.schema import Field as DeltaField
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from lake import bridge, native
from lake.native import delta_jar_available as native_available
from lake.commits import commit_properties, sql_predicate
from lake.errors import ConflictError, LakeError, SchemaMismatchError, TableMissingError
from lake.fs import make_dirs, require_safe_commits, write_bytes
from schemas import Table, added_columns, arrow_differences, conform, table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

Mode = Literal["append", "overwrite"]

# The tables of one training run: its chunks' manifest, their documents' usage, what its trainer did and
# published. A lake with a namespace (the recipe's ``namespace``: the lab gives each run its own) keeps
# them, and the chunk folders, under <lake>/<namespace>/; every other table stays shared.
RUN_TABLES = frozenset({"chunks", "usage", "trainer_events", "training_signals"})


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
    def __init__(self, root: str, spark: SparkSession | None = None, native: bool | None = None,
                 namespace: str | None = None):
        self.root = root.rstrip("/")
        self.spark = spark
        if native is None and spark is not None:
            native = native_available(spark)
        self.native = bool(native)
        self.namespace = namespace.strip("/") if namespace else None

    @classmethod
    def of(cls, recipe, spark: SparkSession | None = None) -> "Lake":
        """The lake a recipe names, in the recipe's namespace (if it has one)."""
        return cls(recipe.lake, spark, namespace=recipe.namespace)

    # -- locations --------------------------------------------------------------------------
    @property
    def run_root(self) -> str:
        """Where the run tables (``RUN_TABLES``) and the chunk folders live: the namespace's folder, or the root."""
        return f"{self.root}/{self.namespace}" if self.namespace else self.root

    def uri(self, name: str) -> str:
        table(name)  # unknown names fail here, with the list of tables
        return f"{self.run_root if name in RUN_TABLES else self.root}/tables/{name}"

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

    def has_column(self, name: str, column: str) -> bool:
        """Whether the table as written has ``column`` (a lake made before a column was added lacks it)."""
        return column in pa.schema(self.delta(name).schema().to_arrow()).names

    def kept_documents(self) -> str:
        """The table of documents the refinery kept: documents_dedup, or documents_scored before dedup ran."""
        for name in ("documents_dedup", "documents_scored"):
            if self.exists(name):
                return name
        raise TableMissingError(f"neither documents_dedup nor documents_scored exists in {self.root}; "
                                "run `tokenmill refine --recipe R` first")

    # -- Spark side -------------------------------------------------------------------------
    def read(self, name: str) -> DataFrame:
        spark = self._need_spark()
        if self.native:
            if not self.exists(name):
                self.delta(name)  # raises TableMissingError with the hint
            return native.read(spark, self.uri(name))
        return bridge.read(spark, self.delta(name).file_uris(), table(name))

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
        require_safe_commits(self.root)
        spec = table(name)
        self._check_spark_schema(spec, df)
        df = df.select(*spec.columns)
        snapshot = DeltaTable(self.uri(name)) if self.exists(name) else None
        if snapshot is not None:
            snapshot = self._upgraded(spec, snapshot)
        if self.native:
            return native.write(self.uri(name), df, mode, replace_where, job, lambda: self.delta(name).version())
        return bridge.write(self.uri(name), snapshot, spec, df, mode, replace_where, job)

    # -- Arrow side (no JVM) ----------------------------------------------------------------
    def read_arrow(self, name: str, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        if not self.exists(name):
            return table(name).schema.empty_table().select(columns or table(name).columns)
        dataset = self.delta(name).to_pyarrow_dataset()
        if filter is None:
            return dataset.to_table(columns=columns)
        dataset = _without_file_guarantees(dataset)
        try:
            return dataset.to_table(columns=columns, filter=filter)
        except pa.ArrowNotImplementedError:
            # Files delta-rs's merge wrote declare their strings string_view, which pyarrow cannot compare
            # inside a scan: read as the table's types, then filter in memory (such tables are counters).
            data = dataset.to_table()
            return data.filter(filter).select(columns or data.column_names)

    def sql(self, query: str, tables: list[str]) -> pa.Table:
        """``query``, DuckDB SQL over the lake's ``tables`` (each named as itself; one the lake lacks is an
        empty table of its schema), as of their current versions: DuckDB reads the files delta-rs lists
        (its own Parquet reader on a local lake, delta-rs's Arrow dataset on an object store) and only
        the columns and row groups the query needs, so aggregates never hold a large table in memory."""
        import duckdb

        con = self._duckdb()
        for name in tables:
            con.unregister(name)
            con.sql(f"DROP VIEW IF EXISTS {name}")
            files = self.delta(name).file_uris() if self.exists(name) else []
            local = [f.removeprefix("file://") for f in files if f.startswith(("/", "file://"))]
            if files and len(local) == len(files):
                listed = ", ".join("'" + f.replace("'", "''") + "'" for f in local)
                con.sql(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}], union_by_name = true)")
            elif files:
                con.register(name, _without_file_guarantees(self.delta(name).to_pyarrow_dataset()))
            else:
                con.register(name, table(name).schema.empty_table())
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.Error as err:
            if "string_view" not in str(err):
                raise
            # Files delta-rs's merge wrote (counters) declare their strings string_view, which pyarrow's
            # scan cannot compare with a pushed-down filter: filter in DuckDB instead.
            con.sql("SET disabled_optimizers = 'filter_pushdown,join_filter_pushdown'")
            try:
                return con.sql(query).to_arrow_table()
            finally:
                con.sql("RESET disabled_optimizers")

    def _duckdb(self):
        """This lake's DuckDB connection (in memory; made on first use)."""
        if getattr(self, "_con", None) is None:
            import duckdb

            self._con = duckdb.connect()
        return self._con

    def counts(self, name: str, keys: list[str], where: str | None = None) -> Counter:
        """Rows per ``keys`` value (a tuple for several keys) of those the SQL condition ``where`` keeps,
        aggregated by DuckDB (``sql``): memory grows with the groups, never with the table."""
        columns = ", ".join(f'"{k}"' for k in keys)
        data = self.sql(f"SELECT {columns}, count(*) AS n FROM {name} {f'WHERE {where}' if where else ''} "
                        f"GROUP BY {columns}", [name])
        return groups(data, keys, "n")

    def write_arrow(
        self,
        name: str,
        data: pa.Table,
        mode: Mode = "append",
        replace_where: dict[str, str] | None = None,
        job: str | None = None,
    ) -> int:
        require_safe_commits(self.root)
        spec = table(name)
        data = _conformed(spec, data)
        if self.exists(name):
            self._upgraded(spec, self.delta(name))
        try:
            write_deltalake(
                self.uri(name),
                data,
                mode=mode,
                predicate=sql_predicate(replace_where) if replace_where else None,
                commit_properties=commit_properties(job, data.num_rows, strict=mode == "overwrite"),
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
        require_safe_commits(self.root)
        spec = table(name)
        data = _conformed(spec, data)
        if added_columns(spec, pa.schema(snapshot.schema().to_arrow())):  # an older lake: add them, then decide again
            self._upgraded(spec, snapshot)
            raise ConflictError(f"table {name!r} gained its new columns since version {snapshot.version()}; re-read it")
        try:
            write_deltalake(snapshot, data, mode="overwrite", predicate=sql_predicate(replace_where),
                            commit_properties=commit_properties(job, data.num_rows, strict=True))
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
        require_safe_commits(self.root)
        spec = table(name)
        updates = _conformed(spec, updates)
        self.ensure(name)
        self._upgraded(spec, self.delta(name))
        set_exprs = {c: f"t.{c} + s.{c}" for c in add} | {c: f"s.{c}" for c in assign}
        try:
            (
                self.delta(name)
                .merge(
                    source=updates,
                    predicate=" AND ".join(f"t.{k} = s.{k}" for k in key),
                    source_alias="s",
                    target_alias="t",
                    commit_properties=commit_properties(job, updates.num_rows, strict=False),
                )
                .when_matched_update(updates=set_exprs)
                .when_not_matched_insert_all()
                .execute()
            )
        except CommitFailedError as err:
            raise ConflictError(f"table {name!r}: a concurrent merge won; retry the merge ({err})") from None
        return self.delta(name).version()

    def restore(self, name: str, version: int | None, job: str) -> int:
        """Put a table back to ``version`` in a new commit (None: to no rows, as before it existed);
        the files of that version are still there (vacuum removes only what no commit names)."""
        require_safe_commits(self.root)
        props = commit_properties(job, 0, strict=True)
        try:
            if version is None:
                self.delta(name).delete(commit_properties=props)
            else:
                self.delta(name).restore(version, commit_properties=props)
        except CommitFailedError as err:
            raise ConflictError(f"table {name!r}: a concurrent commit won; nothing was restored ({err})") from None
        return self.delta(name).version()

    def ensure(self, name: str) -> None:
        """Create the table, empty, if it does not exist yet."""
        require_safe_commits(self.root)
        if not self.exists(name):
            try:
                DeltaTable.create(self.uri(name), schema=table(name).schema, mode="ignore")
            except Exception as err:  # a racing creator may have won; that is fine
                if not self.exists(name):
                    raise LakeError(f"cannot create table {name!r} at {self.uri(name)}: {err}") from err

    def write_report(self, relative_dir: str, files: dict[str, str]) -> str:
        """Write text files under ``<lake>/reports/<relative_dir>/``; returns that folder."""
        folder = f"{self.root}/reports/{relative_dir}"
        make_dirs(folder)
        for name, content in files.items():
            write_bytes(f"{folder}/{name}", content.encode("utf-8"))
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

    def _upgraded(self, spec: Table, dt: DeltaTable) -> DeltaTable:
        """The table, with the nullable columns its definition gained since it was written added (a
        metadata commit; its old rows read them as null), so a lake made by an older tokenmill takes
        today's rows; SchemaMismatchError for any other difference."""
        for _ in range(3):
            added = added_columns(spec, pa.schema(dt.schema().to_arrow()))
            if not added:
                break
            try:
                dt.alter.add_columns([DeltaField.from_arrow(f) for f in added], commit_properties=commit_properties(
                    "add columns " + ", ".join(f.name for f in added), 0, strict=False))
            except CommitFailedError:  # a concurrent commit (or another writer's upgrade) won: look again
                pass
            dt = DeltaTable(self.uri(spec.name))
        problems = arrow_differences(spec, pa.schema(dt.schema().to_arrow()))
        if problems:
            raise SchemaMismatchError(
                f"table {spec.name!r} at {dt.table_uri} was written with another schema than "
                f"schemas/tables.py defines ({'; '.join(problems)}); write to a new lake or migrate the table"
            )
        return dt


def groups(data: pa.Table, keys: list[str], value: str) -> Counter:
    """An aggregate's rows as a Counter: each ``keys`` value (one key by itself, several as a tuple) → ``value``."""
    out: Counter = Counter()
    for r in data.to_pylist():
        out[r[keys[0]] if len(keys) == 1 else tuple(r[k] for k in keys)] += r[value] or 0
    return out


def _without_file_guarantees(dataset: ds.FileSystemDataset) -> ds.FileSystemDataset:
    """The same files, without the min/max guarantees delta-rs derives from each file's statistics: for
    a column a file has no statistics for (long strings, timestamps) it guarantees ``col >= null``,
    which prunes every file for a filter on that column. Parquet's own row-group statistics still skip
    what they can."""
    fragments = [dataset.format.make_fragment(f.path, f.filesystem) for f in dataset.get_fragments()]
    return ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)


def _conformed(spec: Table, data: pa.Table) -> pa.Table:
    """``data`` in the table's exact schema, or SchemaMismatchError naming what differs."""
    try:
        return conform(spec, data)
    except ValueError as err:
        raise SchemaMismatchError(str(err)) from None


def _table_version(entry: dict[str, Any]) -> TableVersion:
    # the bridge tags its commits with tokenmill.* keys; delta-spark keeps the job in userMetadata and
    # the rows in its operation metrics
    rows = entry.get("tokenmill.rows") or (entry.get("operationMetrics") or {}).get("numOutputRows")
    return TableVersion(
        version=int(entry.get("version", -1)),
        timestamp=datetime.fromtimestamp(int(entry.get("timestamp", 0)) / 1000, tz=timezone.utc),
        operation=str(entry.get("operation", "")),
        job=entry.get("tokenmill.job") or entry.get("userMetadata") or None,
        rows_written=int(rows) if rows not in (None, "") else None,
    )
