"""Ingest end to end on small real files, through the shared Spark session."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from jobs import ingest
from lake.tables import Lake
from jobs.sources import SourceError
from schemas import table

from conftest import ROOT, make_recipe, write_jsonl

GOOD = [{"id": f"g{i}", "text": f"Good document {i}.\r\nSecond line.", "url": f"http://x/{i}", "lang": "en"} for i in range(40)]
BAD_LINES = {  # the raw line → the reason ingest must give
    b'{"id": "b1", "text": "truncated': "malformed_json",
    b'{"id": "b2", "text": "\xff\xfe not utf-8"}': "invalid_utf8",
    json.dumps({"id": "b3", "body": "no text"}).encode(): "missing_text",
    json.dumps({"id": "b4", "text": ""}).encode(): "empty_text",
    json.dumps({"id": "b5", "text": 12}).encode(): "text_not_string",
    json.dumps({"id": "b6", "text": "y" * 5000}).encode(): "too_large",
    json.dumps(["an", "array"]).encode(): "not_an_object",
    json.dumps({"id": "g3", "text": "the same id as an earlier line"}).encode(): "duplicate_doc_id",
    b'{"id": "b7", "text": "abc \\ud800 def"}': "lone_surrogate",  # valid JSON, not text
}


def _corpus(tmp_path):
    lines = [json.dumps(r).encode() for r in GOOD]
    for k, raw in enumerate(BAD_LINES):
        lines.insert(5 + k * 4, raw)
    lines.insert(20, b"   ")  # blank lines are not records
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "web" / "part-0.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    positions = {}
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if raw in BAD_LINES:
            positions[BAD_LINES[raw]] = n
    (tmp_path / "pq").mkdir()
    pq.write_table(
        pa.table({"doc": ["k1", "k2", "k3"], "content": ["parquet text one", None, "parquet text three"]}),
        tmp_path / "pq" / "a.parquet",
    )
    return path, positions


@pytest.fixture
def ingested(spark, tmp_path):
    path, positions = _corpus(tmp_path)
    recipe = make_recipe(
        tmp_path,
        [
            {"name": "web", "path": str(path), "id_field": "id", "url_field": "url"},
            {"name": "pq", "path": str(tmp_path / "pq" / "*.parquet"), "format": "parquet", "text_field": "content", "id_field": "doc"},
        ],
        ingest={"max_doc_bytes": 4000, "split_bytes": 256},  # many splits per file: line numbers must still be exact
    )
    report = ingest.run(spark, recipe)
    return recipe, report, path, positions


def test_every_record_is_kept_or_rejected_with_reason_and_line(spark, ingested):
    recipe, report, path, positions = ingested
    lake = Lake(recipe.lake, spark)
    raw = lake.read("documents_raw").collect()
    rejected = lake.read("documents_rejected").collect()
    n_input = len(GOOD) + len(BAD_LINES) + 3
    assert report.records == n_input == len(raw) + len(rejected)
    assert report.kept == len(raw) == len(GOOD) + 2
    by_reason = {r.reason: r for r in rejected if r.source == "web"}
    assert set(by_reason) == set(BAD_LINES.values())
    for reason, line_no in positions.items():
        row = by_reason[reason]
        assert row.stage == "ingest" and row.source == "web"
        assert row.detail.startswith(f"{path}:{line_no}:"), (reason, row.detail)
    assert "same doc_id as the record at" in by_reason["duplicate_doc_id"].detail
    parquet_reject = [r for r in rejected if r.source == "pq"]
    assert len(parquet_reject) == 1 and parquet_reject[0].detail.endswith("text field 'content' is missing or null")
    assert report.rejected_by_reason["missing_text"] == 2


def test_documents_raw_is_a_delta_table_with_the_declared_schema(spark, ingested):
    recipe, *_ = ingested
    dt = DeltaTable(f"{recipe.lake}/tables/documents_raw")
    assert pa.schema(dt.schema().to_arrow()).names == table("documents_raw").columns
    rows = {r["doc_id"]: r for r in dt.to_pyarrow_table().to_pylist()}
    g0 = next(r for r in rows.values() if r["url"] == "http://x/0")
    assert g0["text"] == "Good document 0.\nSecond line."  # line endings normalised
    assert json.loads(g0["meta"]) == {"lang": "en"}
    assert g0["source"] == "web" and g0["ingested_at"] is not None
    g3 = next(r for r in rows.values() if r["url"] == "http://x/3")
    assert g3["text"].startswith("Good document 3")  # the first record with an id wins


def test_rerun_gives_the_same_documents(spark, ingested):
    recipe, report, *_ = ingested
    lake = Lake(recipe.lake, spark)
    first = sorted((r.doc_id, r.text) for r in lake.read("documents_raw").collect())
    again = ingest.run(spark, recipe)
    assert again.raw_version == report.raw_version + 1
    assert sorted((r.doc_id, r.text) for r in lake.read("documents_raw").collect()) == first
    # The ingest rejections were replaced, not appended to.
    assert lake.read("documents_rejected").count() == sum(report.rejected_by_reason.values())


def test_a_truncated_or_cut_short_file_keeps_its_intact_records_and_every_other_source(spark, tmp_path):
    import gzip

    lines = [json.dumps({"id": i, "text": f"gz document {i} " + "word " * (i % 40)}) for i in range(30000)]
    packed = gzip.compress(("\n".join(lines) + "\n").encode())
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # a download that stopped halfway
    (tmp_path / "gz" / "whole.jsonl.gz").write_bytes(gzip.compress(b'{"id": "w", "text": "intact"}\n'))
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(2000)]}), tmp_path / "p.parquet")
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "cut.parquet").write_bytes((tmp_path / "p.parquet").read_bytes()[:3000])
    good = write_jsonl(tmp_path / "ok" / "a.jsonl", [{"text": f"fine {i}"} for i in range(5)])
    recipe = make_recipe(tmp_path, [
        {"name": "gz", "path": str(tmp_path / "gz" / "*.jsonl.gz"), "id_field": "id"},
        {"name": "pq", "path": str(tmp_path / "pq" / "*.parquet"), "format": "parquet"},
        {"name": "ok", "path": str(good)},
    ])
    report = ingest.run(spark, recipe)
    lake = Lake(recipe.lake, spark)
    raw = lake.read_arrow("documents_raw", columns=["source", "text"]).to_pylist()
    by_source = {name: [r["text"] for r in raw if r["source"] == name] for name in ("gz", "pq", "ok")}
    assert len(by_source["ok"]) == 5 and "intact" in by_source["gz"]
    intact = len(by_source["gz"]) - 1
    assert 1000 < intact < 30000  # what came before the cut, every line of it whole
    assert set(by_source["gz"]) - {"intact"} == {json.loads(x)["text"] for x in lines[:intact]}
    rejected = {r["source"]: r for r in lake.read_arrow("documents_rejected").to_pylist()}
    assert rejected["gz"]["reason"] == "unreadable_file"
    assert rejected["gz"]["detail"].startswith(f"{tmp_path / 'gz' / 'cut.jsonl.gz'}: unreadable after line {intact} ")
    assert rejected["pq"]["reason"] == "unreadable_file" and "cut.parquet: unreadable after row 0" in rejected["pq"]["detail"]
    assert report.rejected_by_reason["unreadable_file"] == 2


def test_a_source_without_files_fails_before_any_work(spark, tmp_path):
    recipe = make_recipe(tmp_path, [{"name": "none", "path": str(tmp_path / "missing" / "*.jsonl")}])
    with pytest.raises(SourceError, match=r"source 'none'.*no file matches"):
        ingest.run(spark, recipe)
    assert not Lake(recipe.lake).exists("documents_raw")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python -m", "spark-submit", "tokenmill"])
def test_every_entry_point_runs_the_same_job(tmp_path, launcher):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)) + "{broken\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lake: lake\nsources: [{name: s, path: d.jsonl}]\nspark: {master: 'local[2]'}\n")
    bindir = os.path.dirname(sys.executable)
    cmd = {
        "python -m": [sys.executable, "-m", "jobs.ingest"],
        "spark-submit": [os.path.join(bindir, "spark-submit"), "--master", "local[1]", str(ROOT / "jobs" / "ingest.py")],
        "tokenmill": [os.path.join(bindir, "tokenmill"), "ingest"],
    }[launcher]
    proc = subprocess.run([*cmd, "--recipe", str(recipe)], cwd=tmp_path.parent, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read 6 records" in proc.stdout and "kept 5" in proc.stdout and "malformed_json     1" in proc.stdout
    # spark-submit's --master wins over the recipe's spark.master, which applies everywhere else
    expected = "local[1]" if launcher == "spark-submit" else "local[2]"
    assert f"[ingest] Spark master {expected}\n" in proc.stdout, proc.stdout
    assert DeltaTable(str(tmp_path / "lake" / "tables" / "documents_raw")).to_pyarrow_table().num_rows == 5


def test_spark_submits_master_wins_then_the_environment_then_the_recipe():
    from jobs.spark import choose_master

    assert choose_master("spark://head:7077", "local[3]", "local[*]") is None  # keep spark-submit's
    assert choose_master(None, "local[3]", "local[*]") == "local[3]"
    assert choose_master(None, None, "local[2]") == "local[2]"


@pytest.mark.slow
def test_a_lake_folder_in_the_working_folder_does_not_hide_the_lake_package(tmp_path):
    """Spark's Python workers put the working folder first on their path: ``./lake/tables/`` there must
    not stand in for the ``lake.tables`` module (the README's recipes use ``lake: ./lake``)."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(5)))
    (tmp_path / "r.yaml").write_text("lake: lake\nsources: [{name: s, path: d.jsonl}]\nspark: {master: 'local[1]'}\n")
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    submit = [os.path.join(bindir, "spark-submit"), "--master", "local[1]"]
    for cmd in ([*submit, str(ROOT / "jobs" / "ingest.py")],
                [*submit, str(ROOT / "jobs" / "filter_rules.py")],  # its workers import jobs.docstage → lake.tables
                [os.path.join(bindir, "tokenmill"), "filter"]):  # Spark started by this process, not by spark-submit
        proc = subprocess.run([*cmd, "--recipe", "r.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    tables = tmp_path / "lake" / "tables"
    kept = DeltaTable(str(tables / "documents_filtered")).to_pyarrow_table().num_rows
    rejected = DeltaTable(str(tables / "documents_rejected")).to_pyarrow_table().column("stage").to_pylist()
    assert kept + rejected.count("filter") == 5  # every document judged by the filter's workers
