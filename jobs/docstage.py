"""What every document stage shares: map documents in Arrow batches, split kept from rejected, commit.

A stage supplies one pure function from a document (a dict of the source table's columns) to either
the new columns it adds or a rejection. This module runs it inside Spark (``mapInArrow``), writes the
kept documents to the next table and the rejected ones to ``documents_rejected`` (replacing that
stage's earlier rejections), so "count in = kept + rejected" holds by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa

from lake.atomic import all_or_nothing
from lake.tables import Lake
from schemas import table

# Columns every stage's intermediate output carries beside the target table's columns.
_REJECT_REASON, _REJECT_DETAIL, _FLAGS = "_reject_reason", "_reject_detail", "_flags"


@dataclass(frozen=True)
class Outcome:
    """A stage function's answer for one document."""

    columns: dict[str, Any]  # new or changed columns (e.g. text, signals)
    reject_reason: str | None = None
    reject_detail: str | None = None
    flags: tuple[str, ...] = ()  # every rule that objected, for reports


DocumentFn = Callable[[dict[str, Any]], Outcome]


def intermediate_schema(target: str) -> pa.Schema:
    return pa.schema(
        [*table(target).schema, pa.field(_REJECT_REASON, pa.string()), pa.field(_REJECT_DETAIL, pa.string()),
         pa.field(_FLAGS, pa.list_(pa.string()))]
    )


def map_documents(target: str, make_fn: Callable[[], DocumentFn]):
    """A mapInArrow body: ``make_fn`` is called once per task (load models, compile patterns there)."""
    schema = intermediate_schema(target)
    nullable = pa.schema([f.with_nullable(True) for f in schema])
    columns = table(target).columns

    def run(batches):
        fn = make_fn()
        for batch in batches:
            rows = []
            for doc in batch.to_pylist():
                outcome = fn(doc)
                row = {name: doc.get(name) for name in columns}
                row.update(outcome.columns)
                row[_REJECT_REASON] = outcome.reject_reason
                row[_REJECT_DETAIL] = outcome.reject_detail
                row[_FLAGS] = list(outcome.flags)
                rows.append(row)
            yield pa.RecordBatch.from_pylist(rows, nullable)

    return run


def run_document_stage(lake: Lake, stage: str, source: str, target: str, make_fn: Callable[[], DocumentFn]):
    """Apply a stage to every document of ``source``; returns the persisted intermediate DataFrame.

    The caller reports from it, then calls ``commit_stage`` (or not, for a dry run) and unpersists it.
    """
    from schemas.spark import spark_type

    ddl = ", ".join(f"`{f.name}` {spark_type(f.type).simpleString()}" for f in intermediate_schema(target))
    return spread(lake.read(source)).mapInArrow(map_documents(target, make_fn), ddl).persist()


def spread(documents):
    """The DataFrame over at least one partition per core: a table of few large files uses every core."""
    cores = documents.sparkSession.sparkContext.defaultParallelism
    return documents.repartition(cores) if documents.rdd.getNumPartitions() < cores else documents


def kept_and_rejected(processed, stage: str, target: str):
    """The target table's rows, and ``documents_rejected`` rows, of an intermediate DataFrame."""
    from pyspark.sql import functions as F

    now = datetime.now(timezone.utc)
    kept = processed.where(F.col(_REJECT_REASON).isNull()).select(*table(target).columns)
    rejected = processed.where(F.col(_REJECT_REASON).isNotNull()).select(
        "doc_id", "source", F.lit(stage).alias("stage"), F.col(_REJECT_REASON).alias("reason"),
        F.col(_REJECT_DETAIL).alias("detail"), "text", F.lit(now).cast("timestamp").alias("rejected_at"),
    )
    return kept, rejected


def commit_stage(lake: Lake, stage: str, target: str, kept, rejected) -> int:
    """Write the stage's rejections (replacing its previous ones), then its output table, all or
    nothing (``lake.atomic``: a kill between the two commits is undone by the next run)."""
    with all_or_nothing(lake, stage, ("documents_rejected", target)):
        lake.write("documents_rejected", rejected, mode="overwrite", replace_where={"stage": stage}, job=stage)
        return lake.write(target, kept, mode="overwrite", job=stage)
