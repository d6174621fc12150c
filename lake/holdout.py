"""The trainer's held-out documents, frozen in the lake's ``holdout`` table.

Per source: at most ``per_source`` documents and no more than 10% of the source. Once chosen, a
document stays held out. When a source grows, ``freeze`` (feed runs it before every chunk) adds
documents to reach its share, chosen only among documents no chunk has used, the smallest sha256 of
their doc_id first; so a document the trainer has trained on never becomes an evaluation document.
Feed never puts a held-out document in a chunk; the trainer measures perplexity per source on them
(``held_out``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from lake.tables import Lake
from schemas import table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

MAX_SHARE = 0.1  # a small source keeps at least 90% of its documents for training


def freeze(lake: Lake, docs: DataFrame, per_source: int, job: str = "feed") -> set[str]:
    """The held-out doc_ids of ``docs`` (a DataFrame with doc_id and source), after adding what each
    source lacks of its share from its never-used documents (one append to ``holdout``)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark = docs.sparkSession
    docs = docs.select("doc_id", "source")
    held = lake.read("holdout").select("doc_id") if lake.exists("holdout") else spark.createDataFrame([], "doc_id string")
    want = docs.groupBy("source").agg(F.least(F.lit(per_source), F.floor(F.count("*") * MAX_SHARE)).alias("want"))
    have = docs.join(held, "doc_id", "left_semi").groupBy("source").agg(F.count("*").alias("have"))
    need = want.join(have, "source", "left").select("source", (F.col("want") - F.coalesce("have", F.lit(0))).alias("need")) \
        .where(F.col("need") > 0)
    candidates = docs.join(held, "doc_id", "left_anti")
    if lake.exists("usage"):
        candidates = candidates.join(lake.read("usage").where(F.col("times_used") > 0).select("doc_id"), "doc_id", "left_anti")
    order = Window.partitionBy("source").orderBy(F.sha2("doc_id", 256), "doc_id")
    added = candidates.join(F.broadcast(need), "source").withColumn("r", F.row_number().over(order)) \
        .where(F.col("r") <= F.col("need")).select("doc_id", "source").toArrow()
    if added.num_rows:
        now = pa.array([datetime.now(timezone.utc)] * added.num_rows, pa.timestamp("us", tz="UTC"))
        lake.write_arrow("holdout", pa.table({"doc_id": added.column("doc_id"), "source": added.column("source"),
                                              "chosen_at": now}), mode="append", job=job)
    return held_out(lake)


def held_out(lake: Lake) -> set[str]:
    """Every doc_id the lake holds out (none before feed first ran)."""
    if not lake.exists("holdout"):
        return set()
    return set(lake.read_arrow("holdout", columns=["doc_id"]).column("doc_id").to_pylist())


def held_out_documents(lake: Lake, source_table: str, columns: list[str]) -> pa.Table:
    """The held-out documents' rows of ``source_table`` (those still in it)."""
    ids = held_out(lake)
    if not ids:
        return pa.table({c: pa.array([], table(source_table).schema.field(c).type) for c in columns})
    return lake.read_arrow(source_table, columns=columns, filter=pc.field("doc_id").isin(sorted(ids)))
