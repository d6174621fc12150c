import pyarrow as pa
import pytest
from pyspark.sql import types as T

from schemas import TABLES, arrow_differences, conform, table
from schemas.spark import schema_differences, spark_schema

DESIGN_KEY_COLUMNS = {
    "documents_raw": ["doc_id", "text", "source", "url", "meta", "ingested_at"],
    "documents_filtered": ["signals"],
    "documents_clean": ["pii"],
    "documents_scored": ["quality", "domain", "lang", "category"],
    "documents_dedup": ["cluster_id"],
    "documents_rejected": ["doc_id", "stage", "reason", "detail", "text"],
    "dedup_clusters": ["doc_id", "cluster_id", "kept_doc_id", "similarity", "threshold", "category"],
    "chunks": ["chunk_id", "stage", "status", "n_tokens", "files", "sha256", "mix", "times_consumed"],
    "usage": ["doc_id", "times_used", "last_chunk_id"],
    "holdout": ["doc_id", "source"],  # not in DESIGN's contract (read-only): the frozen evaluation set
    "trainer_events": ["run_id", "step", "chunk_id", "event", "detail"],
    # not in DESIGN's table (issue #15): what an adaptive feed mix reads
    "training_signals": ["run_id", "step", "tokens", "category", "loss", "slope", "published_at"],
}


def test_every_design_table_is_defined_with_its_key_columns():
    assert set(TABLES) == set(DESIGN_KEY_COLUMNS)
    for name, columns in DESIGN_KEY_COLUMNS.items():
        assert set(columns) <= set(table(name).columns), name


def test_document_tables_extend_each_other_in_pipeline_order():
    chain = ["documents_raw", "documents_filtered", "documents_clean", "documents_scored", "documents_dedup"]
    for before, after in zip(chain, chain[1:]):
        assert table(after).columns[: len(table(before).columns)] == table(before).columns


def test_a_table_written_before_its_definition_gained_nullable_columns_needs_only_those_added():
    from schemas import added_columns

    older = pa.schema([f for f in table("chunks").schema if f.name not in ("mix_weights", "mix_signal")])
    assert [f.name for f in added_columns(table("chunks"), older)] == ["mix_weights", "mix_signal"]
    assert added_columns(table("chunks"), table("chunks").schema) == []
    without_key = pa.schema([f for f in table("chunks").schema if f.name != "chunk_id"])
    assert added_columns(table("chunks"), without_key) == []  # a required column is not added: that is a mismatch


def test_spark_schema_is_derived_from_arrow():
    s = spark_schema(table("chunks"))
    assert s["files"].dataType == T.ArrayType(T.StringType(), True)
    assert s["mix"].dataType == T.MapType(T.StringType(), T.LongType(), True)
    assert s["created_at"].dataType == T.TimestampType()
    assert schema_differences(table("chunks"), s) == []


def test_spark_differences_name_the_column_and_the_difference():
    s = spark_schema(table("usage"))
    wrong = T.StructType(
        [T.StructField("doc_id", T.StringType()), T.StructField("times_used", T.StringType()),
         T.StructField("extra", T.IntegerType())]
    )
    problems = schema_differences(table("usage"), wrong)
    assert "column 'times_used' has type string, expected bigint" in problems
    assert "column 'last_chunk_id' is missing (expected string)" in problems
    assert "column 'extra' (int) is not in the table's definition" in problems
    assert schema_differences(table("usage"), s) == []


def test_conform_casts_compatible_arrow_and_rejects_the_rest():
    data = pa.table({"last_chunk_id": ["c1"], "doc_id": ["d1"], "times_used": pa.array([3], pa.int32())})
    out = conform(table("usage"), data)
    assert out.schema == table("usage").schema
    assert out.column("times_used").to_pylist() == [3]
    bad = pa.table({"doc_id": ["d1"], "times_used": ["three"], "last_chunk_id": ["c"]})
    with pytest.raises(ValueError, match="'times_used' has type string, expected int64"):
        conform(table("usage"), bad)
    assert arrow_differences(table("usage"), bad.schema)


def test_unknown_table_lists_the_real_ones():
    with pytest.raises(KeyError, match="documents_raw"):
        table("documents")
