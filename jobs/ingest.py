"""Ingest: the recipe's sources → ``documents_raw``; every bad record → ``documents_rejected``.

    spark-submit jobs/ingest.py --recipe R   |   python -m jobs.ingest --recipe R   |   tokenmill ingest --recipe R

Reads each source's files in splits (exact file and line number for every record), parses and
normalises each record with ``jobs.records``, rejects duplicate doc_ids, then writes the rejections
(replacing the previous ingest rejections) and ``documents_raw`` (replacing the previous version).
Input records = kept + rejected, always.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from jobs.docstage import commit_stage, kept_and_rejected
from lake.tables import Lake
from lake.recipe import Recipe
from jobs.records import Document, Rejection, SourceSpec, parse_json_line, parse_record
from jobs.sources import (UNREADABLE, Split, SourceError, count_newlines, file_size, list_files, plan_splits, read_lines,
                          read_parquet_rows)
from jobs.stages import NoOptions, stage_main

STAGE = "ingest"
_PARSED_ARROW = pa.schema(
    [
        ("kind", pa.string()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("meta", pa.string()),
        ("prompt", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),
    ]
)
_PARSED_DDL = ", ".join(f"{f.name} {'long' if f.type == pa.int64() else 'string'}" for f in _PARSED_ARROW)
_SPLITS_DDL = "source string, format string, file string, start long, end long, lines_before long"
_BATCH = 2048


@dataclass
class IngestReport:
    files: int
    records: int
    kept: int
    rejected_by_reason: dict[str, int]
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    raw_version: int | None = None

    def __str__(self) -> str:
        rate = self.records / self.seconds if self.seconds else 0.0
        lines = [
            f"ingest: read {self.records} records from {self.files} files in {self.seconds:.1f} s ({rate:,.0f} records/s)",
            f"  kept {self.kept} in documents_raw (version {self.raw_version}); "
            f"rejected {sum(self.rejected_by_reason.values())}",
        ]
        for reason, n in sorted(self.rejected_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason:<18} {n}")
        for source, counts in sorted(self.by_source.items()):
            lines.append(f"  {source:<20} kept {counts.get('doc', 0):>8}  rejected {counts.get('reject', 0):>6}")
        return "\n".join(lines)


def run(spark, recipe: Recipe, options: NoOptions = NoOptions()) -> IngestReport:
    """Read every source of the recipe into documents_raw, rejecting bad records with their reason."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    lake = Lake(recipe.lake, spark)
    splits = _planned_splits(spark, recipe)
    records = _parsed_records(spark, recipe, splits).persist()  # read twice: duplicate ids, then the rows
    parsed = _reject_duplicate_ids(records)
    counts = parsed.groupBy("source", "kind", "reason").count().collect()
    now = datetime.now(timezone.utc)
    docs, rejects = kept_and_rejected(
        parsed.withColumn("ingested_at", F.lit(now).cast("timestamp"))
        .withColumnRenamed("reason", "_reject_reason")
        .withColumnRenamed("detail", "_reject_detail"),
        STAGE,
        "documents_raw",
    )
    raw_version = commit_stage(lake, STAGE, "documents_raw", docs, rejects)
    records.unpersist()
    report = _report(counts, files=len({s.file for s in splits}))
    report.seconds = time.perf_counter() - started
    report.raw_version = raw_version
    return report


def _parsed_records(spark, recipe: Recipe, splits: list[Split]):
    """One row per input record, a document or a rejection, parsed in the executors split by split."""
    specs = {s.name: _spec(recipe, s) for s in recipe.sources}
    split_df = spark.createDataFrame([tuple(asdict(s).values()) for s in splits], _SPLITS_DDL)
    return split_df.repartition(len(splits)).mapInArrow(lambda batches: _parse_splits(batches, specs), _PARSED_DDL)


def _reject_duplicate_ids(parsed):
    """Two documents with one doc_id: the first (by file, line) is kept, the others rejected. Only
    the keys are shuffled; the (usually tiny) result is joined back."""
    from pyspark.sql import functions as F

    location = F.struct("file", "line")
    first_seen = (
        parsed.where(F.col("kind") == "doc")
        .groupBy("doc_id")
        .agg(F.count("*").alias("_n"), F.min(location).alias("_first"))
        .where(F.col("_n") > 1)
        .select("doc_id", "_first")
    )
    is_dup = F.col("_first").isNotNull() & (F.col("kind") == "doc") & (location != F.col("_first"))
    return (
        parsed.join(first_seen, "doc_id", "left")
        .withColumn("reason", F.when(is_dup, F.lit("duplicate_doc_id")).otherwise(F.col("reason")))
        .withColumn(
            "detail",
            F.when(
                is_dup,
                F.format_string("%s:%d: same doc_id as the record at %s:%d", "file", "line", "_first.file", "_first.line"),
            ).otherwise(F.col("detail")),
        )
        .withColumn("kind", F.when(is_dup, F.lit("reject")).otherwise(F.col("kind")))
        .drop("_first")
    )


def _report(counts, files: int) -> IngestReport:
    report = IngestReport(files=files, records=0, kept=0, rejected_by_reason={})
    for row in counts:
        report.records += row["count"]
        report.by_source.setdefault(row["source"], {}).setdefault(row["kind"], 0)
        report.by_source[row["source"]][row["kind"]] += row["count"]
        if row["kind"] == "doc":
            report.kept += row["count"]
        else:
            report.rejected_by_reason[row["reason"]] = report.rejected_by_reason.get(row["reason"], 0) + row["count"]
    return report


def _planned_splits(spark, recipe: Recipe) -> list[Split]:
    """Every source's splits, with line numbers known; fails before any work if a source is empty."""
    found = {}
    for source in recipe.sources:
        files = list_files(source.path)
        if not files:
            raise SourceError(
                f"source {source.name!r} in {recipe.origin}: no file matches {source.path} "
                f"(check sources[].path; for configs/demo.yaml, `tokenmill demo` builds the demo corpus)"
            )
        found[source.name] = (source, files)
    # Small inputs still get at least two splits per core, or a single file would run on one core
    # and leave every later stage with one partition too.
    total = sum(file_size(f) for _, files in found.values() for f in files)
    split_bytes = max(1 << 20, min(recipe.ingest.split_bytes, total // (2 * spark.sparkContext.defaultParallelism) or 1))
    splits: list[Split] = []
    for source, files in found.values():
        splits.extend(plan_splits(source.name, source.format, files, split_bytes))
    multi = [s for s in splits if s.start > 0 or s.end > 0]
    if multi:
        # Number lines across splits of one file: count each split's newlines in parallel first.
        counted = (
            spark.sparkContext.parallelize(multi, len(multi)).map(lambda s: (s, count_newlines(s))).collect()
        )
        before: dict[tuple[str, int], int] = {}
        running: dict[str, int] = {}
        for split, n in sorted(counted, key=lambda sn: (sn[0].file, sn[0].start)):
            before[(split.file, split.start)] = running.get(split.file, 0)
            running[split.file] = running.get(split.file, 0) + n
        splits = [
            Split(s.source, s.format, s.file, s.start, s.end, before.get((s.file, s.start), 0)) for s in splits
        ]
    return splits


def _parse_splits(batches, specs: dict[str, SourceSpec]):
    """mapInArrow body: splits in, parsed records (documents and rejections) out."""
    rows: list[dict] = []
    for batch in batches:
        for split_row in batch.to_pylist():
            split = Split(**split_row)
            spec = specs[split.source]
            for line_no, outcome in _split_records(split, spec):
                rows.append(_row(split, line_no, outcome))
                if len(rows) >= _BATCH:
                    yield pa.RecordBatch.from_pylist(rows, _PARSED_ARROW)
                    rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, _PARSED_ARROW)


def _spec(recipe: Recipe, source) -> SourceSpec:
    return SourceSpec(source.name, source.text_field, source.id_field, source.url_field, recipe.ingest.max_doc_bytes,
                      source.kind, source.prompt_field, source.completion_field, source.messages_field)


def record_at(recipe: Recipe, file: str, line: int) -> tuple[str, Document | Rejection]:
    """(source, what ingest makes of the record at ``file:line``): a JSONL line, or a Parquet row number,
    parsed by the code ingest runs (``tokenmill trace --source-line``)."""
    wanted = os.path.realpath(file) if "://" not in file else file
    for source in recipe.sources:
        for found in list_files(source.path):
            if found != file and ("://" in found or os.path.realpath(found) != wanted):
                continue
            last = 0
            for last, outcome in _split_records(Split(source.name, source.format, found, 0, -1), _spec(recipe, source)):
                if last == line:
                    return source.name, outcome
                if last > line:
                    break
            unit = "line" if source.format == "jsonl" else "row"
            raise SourceError(f"{file}:{line}: no record there ({unit}s with records run to {last}; a blank line "
                              f"holds none)")
    raise SourceError(f"{file}: no source of {recipe.origin} reads this file "
                      f"(sources: {', '.join(f'{s.name} = {s.path}' for s in recipe.sources)})")


def _split_records(split: Split, spec: SourceSpec):
    """(line or row number, Document or Rejection) of one split. A file that cannot be read to its end
    (a truncated .gz, a Parquet file cut short) gives every record before the damage, then one
    rejection naming the file and the last intact line."""
    jsonl = split.format == "jsonl"
    damage: list[Exception] = []
    reader = _until_damaged(read_lines(split) if jsonl else read_parquet_rows(split), damage)
    last = split.lines_before if jsonl else 0
    for last, item in reader:
        if not jsonl:
            yield last, parse_record(item, spec, f"{split.file}:row {last}")
        elif item.strip():
            yield last, parse_json_line(item, spec, f"{split.file}:{last}")
    if damage:
        unit = "line" if jsonl else "row"
        yield last + 1, Rejection("unreadable_file", f"{split.file}: unreadable after {unit} {last} ({type(damage[0]).__name__}: "
                                  f"{damage[0]}); the records before it were ingested", None, None)


def _until_damaged(reader, damage: list[Exception]):
    """The reader's items until reading the file fails; the failure goes into ``damage``."""
    try:
        yield from reader
    except UNREADABLE as err:
        damage.append(err)


def _row(split: Split, line_no: int, outcome) -> dict:
    base = {"source": split.source, "file": split.file, "line": line_no}
    if isinstance(outcome, Document):
        return {**base, "kind": "doc", "doc_id": outcome.doc_id, "text": outcome.text, "url": outcome.url,
                "meta": outcome.meta, "prompt": outcome.prompt, "reason": None, "detail": None}
    return {**base, "kind": "reject", "doc_id": outcome.doc_id, "text": outcome.text, "url": None, "meta": None,
            "prompt": None, "reason": outcome.reason, "detail": outcome.detail}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
