"""The lake's guarantees, each shown on real writes (DESIGN.md, 'The lake')."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

import lake.bridge as bridge_module
from lake import ConflictError, Lake, SchemaMismatchError, TableMissingError
from schemas import table
from schemas.spark import spark_schema

from conftest import ROOT, make_recipe, require_native, write_jsonl

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def usage_df(spark, rows):
    return spark.createDataFrame(rows, spark_schema(table("usage")))


def rejected_df(spark, rows):
    return spark.createDataFrame([(d, "src", st, "r", None, "t", NOW) for d, st in rows], spark_schema(table("documents_rejected")))


def replay_log(table_dir: str) -> list[str]:
    """An independent Delta reader: replay the JSON commit log by hand (no delta-rs, no Spark)."""
    active: dict[str, bool] = {}
    for commit in sorted(glob.glob(f"{table_dir}/_delta_log/*.json")):
        for line in Path(commit).read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                active[unquote(action["add"]["path"])] = True
            if "remove" in action:
                active.pop(unquote(action["remove"]["path"]), None)
    return [f"{table_dir}/{p}" for p in sorted(active)]


@pytest.fixture(params=["bridge", "native"])
def mode(request, spark) -> str:
    """Each table test on both paths: delta-rs commits (bridge) and delta-spark (the jar, native)."""
    if request.param == "native":
        require_native(spark)
    return request.param


def test_round_trip_overwrite_and_independent_readers(spark, lake_root, mode):
    lake = Lake(lake_root, spark, native=mode == "native")
    v0 = lake.write("usage", usage_df(spark, [("a", 1, "c1"), ("b", 2, "c1")]), mode="overwrite", job="t")
    v1 = lake.write("usage", usage_df(spark, [("c", 5, "c2")]), mode="append")
    assert (v0, v1) == (0, 1)
    assert sorted(r.doc_id for r in lake.read("usage").collect()) == ["a", "b", "c"]
    v2 = lake.write("usage", usage_df(spark, [("z", 9, "c3")]), mode="overwrite")
    assert v2 == 2
    uri = lake.uri("usage")
    # delta-rs, Polars and a hand-written log replay + DuckDB all see only the overwrite's rows.
    assert DeltaTable(uri).to_pyarrow_table().column("doc_id").to_pylist() == ["z"]
    assert pl.read_delta(uri)["doc_id"].to_list() == ["z"]
    files = replay_log(uri)
    assert duckdb.sql(f"select doc_id, times_used from read_parquet({files})").fetchall() == [("z", 9)]
    assert pa.schema(DeltaTable(uri).schema().to_arrow()).names == table("usage").columns
    history = lake.versions("usage")
    assert [h.version for h in history] == [2, 1, 0]
    assert history[-1].job == "t" and history[-1].rows_written == 2


def test_write_with_wrong_columns_fails_naming_table_and_column(spark, lake_root, mode):
    lake = Lake(lake_root, spark, native=mode == "native")
    df = spark.createDataFrame([("a", "1")], "doc_id string, times_used string")
    with pytest.raises(SchemaMismatchError) as err:
        lake.write("usage", df)
    assert "'usage'" in str(err.value)
    assert "'times_used' has type string, expected bigint" in str(err.value)
    assert "'last_chunk_id' is missing" in str(err.value)
    assert not lake.exists("usage")


def test_reading_a_missing_table_says_which_stage_to_run(spark, lake_root, mode):
    with pytest.raises(TableMissingError, match="documents_raw.*run the stage that writes it"):
        Lake(lake_root, spark, native=mode == "native").read("documents_raw")


def test_replace_where_replaces_only_matching_rows_even_inside_mixed_files(spark, lake_root, mode):
    lake = Lake(lake_root, spark, native=mode == "native")
    mixed = pa.table(
        {"doc_id": ["i1", "f1"], "source": ["s", "s"], "stage": ["ingest", "filter"], "reason": ["r", "r"],
         "detail": [None, None], "text": ["t", "t"], "rejected_at": pa.array([NOW, NOW], pa.timestamp("us", "UTC"))}
    )
    lake.write_arrow("documents_rejected", mixed)  # one file holding two stages
    lake.write("documents_rejected", rejected_df(spark, [("d1", "dedup")]), mode="append")
    lake.write("documents_rejected", rejected_df(spark, [("i2", "ingest"), ("i3", "ingest")]), mode="overwrite",
               replace_where={"stage": "ingest"})
    got = sorted((r.doc_id, r.stage) for r in lake.read("documents_rejected").collect())
    assert got == [("d1", "dedup"), ("f1", "filter"), ("i2", "ingest"), ("i3", "ingest")]
    assert sorted(pl.read_delta(lake.uri("documents_rejected"))["doc_id"].to_list()) == ["d1", "f1", "i2", "i3"]


def test_only_a_missing_class_means_no_delta_jar(spark):
    """A JVM failure other than "class not found" is raised, never taken for "the bridge then"."""
    from py4j.protocol import Py4JJavaError

    from lake.native import on_classpath

    assert on_classpath(spark, "org.apache.spark.sql.SparkSession")
    assert not on_classpath(spark, "io.delta.NoSuchClass")
    with pytest.raises(Py4JJavaError, match="NullPointerException"):
        on_classpath(spark, None)


def test_a_filtered_read_finds_rows_in_columns_without_file_statistics(spark, lake_root, mode):
    """The bridge records no min/max for long strings and timestamps; delta-rs once read that as "no row
    can match" and a filter on such a column found nothing (``tokenmill trace --url``)."""
    lake = Lake(lake_root, spark, native=mode == "native")
    rows = [(f"d{i}", f"text {i}", "src", f"https://example.org/a/rather/long/path/to/page-{i}", None, NOW, None) for i in range(5)]
    lake.write("documents_raw", spark.createDataFrame(rows, spark_schema(table("documents_raw"))), mode="overwrite")
    url = rows[3][3]
    assert lake.read_arrow("documents_raw", ["doc_id"], pc.field("url") == url).to_pylist() == [{"doc_id": "d3"}]
    assert lake.read_arrow("documents_raw", ["doc_id"], pc.field("ingested_at") == NOW).num_rows == 5
    assert lake.read_arrow("documents_raw", ["doc_id"], pc.field("doc_id") == "d9").num_rows == 0


def test_a_filtered_read_of_a_merged_counter_table(lake_root):
    """delta-rs's merge writes strings as string_view, which pyarrow cannot compare inside a scan."""
    lake = Lake(lake_root)
    for batch in (["a", "b"], ["b", "c"]):
        lake.merge_counters("usage", pa.table({"doc_id": batch, "times_used": [1, 1], "last_chunk_id": ["c", "c"]}),
                            key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
    assert lake.read_arrow("usage", ["times_used"], pc.field("doc_id") == "b").to_pylist() == [{"times_used": 2}]


def test_sql_aggregates_the_tables_files_as_a_plain_group_by_does(lake_root):
    """``Lake.sql`` and ``Lake.counts`` (the report's and the card's aggregates, DuckDB over the files
    delta-rs lists) against Counter on the whole table; a merge-written counter table (string_view
    files) under a filter; a table the lake lacks is empty."""
    import random
    from collections import Counter

    from lake.tables import groups

    rng = random.Random(0)
    lake = Lake(lake_root)
    rows = [{"doc_id": f"d{i}", "cluster_id": f"c{rng.randint(0, 30)}", "kept_doc_id": f"d{i - i % 3}",
             "similarity": rng.random(), "threshold": rng.choice([0.7, 0.8]), "category": rng.choice(["zh", "en"])}
            for i in range(3000)]
    for part in range(3):  # three commits: three files
        lake.write_arrow("dedup_clusters", pa.Table.from_pylist(rows[part::3], schema=table("dedup_clusters").schema),
                         mode="append", job="t")
    got = lake.counts("dedup_clusters", ["category", "threshold"], where="doc_id <> kept_doc_id")
    want = Counter((r["category"], r["threshold"]) for r in rows if r["doc_id"] != r["kept_doc_id"])
    assert got == want and sum(got.values()) == 2000
    assert lake.counts("dedup_clusters", ["category"]) == Counter(r["category"] for r in rows)
    totals = groups(lake.sql("SELECT category, sum(similarity) AS s FROM dedup_clusters GROUP BY category",
                             ["dedup_clusters"]), ["category"], "s")
    for category, total in totals.items():
        assert total == pytest.approx(sum(r["similarity"] for r in rows if r["category"] == category))
    assert lake.counts("usage", ["doc_id"]) == {}  # no table yet: no groups
    lake.merge_counters("usage", pa.table({"doc_id": ["a", "b", "c"], "times_used": [1, 1, 1],
                                           "last_chunk_id": ["c1", "c1", "c2"]}),
                        key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
    lake.merge_counters("usage", pa.table({"doc_id": ["b"], "times_used": [1], "last_chunk_id": ["c3"]}),
                        key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
    assert lake.counts("usage", ["times_used"], where="doc_id <> 'a' AND last_chunk_id LIKE 'c%'") == {2: 1, 1: 1}


def test_merge_counters_increments_and_inserts(lake_root):
    lake = Lake(lake_root)
    lake.merge_counters("usage", pa.table({"doc_id": ["a", "b"], "times_used": [1, 1], "last_chunk_id": ["c1", "c1"]}),
                        key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
    lake.merge_counters("usage", pa.table({"doc_id": ["b", "c"], "times_used": [2, 1], "last_chunk_id": ["c2", "c2"]}),
                        key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
    got = sorted(lake.read_arrow("usage").to_pylist(), key=lambda r: r["doc_id"])
    assert got == [
        {"doc_id": "a", "times_used": 1, "last_chunk_id": "c1"},
        {"doc_id": "b", "times_used": 3, "last_chunk_id": "c2"},
        {"doc_id": "c", "times_used": 1, "last_chunk_id": "c2"},
    ]


def test_a_namespace_keeps_its_run_tables_apart_and_shares_the_documents(lake_root):
    """Two lab runs in one lake: each its own usage counters and manifest, both the same document tables."""
    from lake.chunks import chunk_dir

    plain, a, b = Lake(lake_root), Lake(lake_root, namespace="lab/x/a"), Lake(lake_root, namespace="lab/x/b")
    increment = pa.table({"doc_id": ["d1"], "times_used": [1], "last_chunk_id": ["c1"]})
    a.merge_counters("usage", increment, key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
    a.merge_counters("usage", increment, key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
    assert a.read_arrow("usage").to_pylist() == [{"doc_id": "d1", "times_used": 2, "last_chunk_id": "c1"}]
    assert b.read_arrow("usage").num_rows == 0 and not plain.exists("usage")
    assert a.uri("usage") == f"{lake_root}/lab/x/a/tables/usage" != b.uri("usage")
    assert a.uri("trainer_events") == f"{lake_root}/lab/x/a/tables/trainer_events"
    holdout = pa.table({"doc_id": ["d9"], "source": ["s"], "chosen_at": [NOW]})
    a.write_arrow("holdout", holdout)
    assert b.read_arrow("holdout", ["doc_id"]).to_pylist() == [{"doc_id": "d9"}] == plain.read_arrow("holdout", ["doc_id"]).to_pylist()
    assert a.uri("documents_dedup") == plain.uri("documents_dedup") == f"{lake_root}/tables/documents_dedup"
    assert chunk_dir(a.run_root, "pretrain-000000") == f"{lake_root}/lab/x/a/chunks/pretrain-000000"
    recipe = make_recipe(Path(lake_root).parent, [{"name": "s", "path": "s.jsonl"}], namespace="lab/x/b")
    assert Lake.of(recipe).uri("chunks") == b.uri("chunks")


def test_a_namespace_is_a_relative_folder():
    from lake.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="namespace"):
        parse_recipe({"lake": "/l", "sources": [{"name": "s", "path": "/s.jsonl"}], "namespace": "../up"}, Path("/"))


def _race(monkeypatch, target, attr, writes):
    """Run the writes in threads that all reach the commit before any of them commits."""
    barrier = threading.Barrier(len(writes), timeout=120)
    original = getattr(target, attr)

    def at_the_same_time(*args, **kwargs):
        barrier.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attr, at_the_same_time)
    outcomes = [None] * len(writes)

    def run(i):
        try:
            outcomes[i] = writes[i]()
        except Exception as err:  # noqa: BLE001 - the test inspects it
            outcomes[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_two_overwrites_racing_one_wins_the_other_gets_a_conflict(spark, lake_root, monkeypatch):
    lake = Lake(lake_root, spark, native=False)  # the race is staged at delta-rs's commit
    lake.write("usage", usage_df(spark, [("old", 1, None)]))
    a, b = usage_df(spark, [("a1", 1, None), ("a2", 1, None)]), usage_df(spark, [("b1", 1, None)])
    outcomes = _race(monkeypatch, DeltaTable, "create_write_transaction",
                     [lambda: lake.write("usage", a), lambda: lake.write("usage", b)])
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], ConflictError), outcomes
    assert "another writer committed" in str(errors[0]) and "Rerun the job" in str(errors[0])
    winner = ["a1", "a2"] if outcomes[0] == 1 else ["b1"]
    assert sorted(r.doc_id for r in lake.read("usage").collect()) == winner
    assert DeltaTable(lake.uri("usage")).version() == 1
    # The loser's files were removed: only the two committed writes remain on disk.
    assert len(glob.glob(f"{lake.uri('usage')}/w-*")) == 2


def test_two_writers_creating_the_same_table_one_wins(spark, lake_root, monkeypatch):
    lake = Lake(lake_root, spark, native=False)  # the race is staged at delta-rs's commit
    a, b = usage_df(spark, [("a", 1, None)]), usage_df(spark, [("b", 1, None)])
    outcomes = _race(monkeypatch, bridge_module, "create_table_with_add_actions",
                     [lambda: lake.write("usage", a), lambda: lake.write("usage", b)])
    assert sorted(type(o).__name__ for o in outcomes) == ["ConflictError", "int"], outcomes
    assert len(lake.read("usage").collect()) == 1


CRASHING_INGEST = """
import os, signal, sys
from deltalake import DeltaTable

commit = DeltaTable.create_write_transaction

def killed_before_commit(self, *args, **kwargs):
    if self.table_uri.rstrip("/").endswith("documents_raw"):
        os.kill(os.getpid(), signal.SIGKILL)  # Spark has written the files; the commit never happens
    return commit(self, *args, **kwargs)

DeltaTable.create_write_transaction = killed_before_commit
from jobs import ingest
sys.exit(ingest.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_job_killed_before_its_commit_leaves_the_table_as_it_was(spark, tmp_path, monkeypatch):
    from jobs import ingest

    monkeypatch.setenv("TOKENMILL_DELTA_MODE", "bridge")  # the crash is staged at delta-rs's commit

    data = tmp_path / "data" / "part-0.jsonl"
    write_jsonl(data, [{"id": i, "text": f"document number {i}"} for i in range(50)])
    recipe = make_recipe(tmp_path, [{"name": "web", "path": str(data), "id_field": "id"}])
    ingest.run(spark, recipe)
    lake = Lake(recipe.lake, spark)
    before = DeltaTable(lake.uri("documents_raw")).version()
    files_before = set(glob.glob(f"{lake.uri('documents_raw')}/w-*/*.parquet"))

    write_jsonl(data, [{"id": i, "text": f"changed document {i}"} for i in range(80)])
    (tmp_path / "recipe.yaml").write_text(f"lake: {recipe.lake}\nsources: [{{name: web, path: '{data}', id_field: id}}]\n")
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_INGEST)
    env = {**os.environ, "TOKENMILL_SPARK_MASTER": "local[1]", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), "--recipe", str(tmp_path / "recipe.yaml")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # It died midway: Spark had written its files, the commit never happened.
    assert set(glob.glob(f"{lake.uri('documents_raw')}/w-*/*.parquet")) - files_before
    assert DeltaTable(lake.uri("documents_raw")).version() == before
    texts = sorted(r.text for r in lake.read("documents_raw").collect())
    assert len(texts) == 50 and all(t.startswith("document number") for t in texts)
    assert sorted(pl.read_delta(lake.uri("documents_raw"))["text"].to_list()) == texts

    # `tokenmill vacuum` removes the dead write's folder, and nothing any commit names (an earlier
    # version's files included): time travel to every version still reads.
    from datetime import timedelta

    from lake.recipe import load_recipe
    from lake.sweep import vacuum, write_folders

    dead = {p.split("/")[-2] for p in set(glob.glob(f"{lake.uri('documents_raw')}/w-*/*.parquet")) - files_before}
    assert len(dead) == 1
    ingest.run(spark, load_recipe(tmp_path / "recipe.yaml"))  # version 2 replaces version 1's files
    folders = {name for name, _ in write_folders(lake.uri("documents_raw"))}
    assert vacuum(recipe.lake, log=lambda _: None) == []  # younger than a day: perhaps a write still running
    later = datetime.now(timezone.utc) + timedelta(days=2)
    lines = []
    listed = vacuum(recipe.lake, dry_run=True, log=lines.append, now=later)
    raw = [u.folder.rsplit("/", 1)[1] for u in listed if u.table == "documents_raw"]
    assert raw == sorted(dead) and any("would remove" in line for line in lines)
    # the other folders are the empty ones of writes with no rows (no rejections: nothing to commit)
    assert all(u.files == 0 for u in listed if u.table != "documents_raw")
    assert {name for name, _ in write_folders(lake.uri("documents_raw"))} == folders  # a dry run removes nothing
    vacuum(recipe.lake, log=lambda _: None, now=later)
    assert {name for name, _ in write_folders(lake.uri("documents_raw"))} == folders - dead
    for version in range(DeltaTable(lake.uri("documents_raw")).version() + 1):
        assert DeltaTable(lake.uri("documents_raw"), version=version).to_pyarrow_table().num_rows in (50, 80)
    assert sorted(r.text for r in lake.read("documents_raw").collect())[0].startswith("changed document")


def test_a_table_written_by_one_path_is_read_and_appended_by_the_other(spark, tmp_path):
    require_native(spark)
    for first, second in [("bridge", "native"), ("native", "bridge")]:
        root = str(tmp_path / f"{first}-then-{second}")
        a, b = Lake(root, spark, native=first == "native"), Lake(root, spark, native=second == "native")
        a.write("usage", usage_df(spark, [("a", 1, "c1")]), job=f"{first}-write")
        assert [r.doc_id for r in b.read("usage").collect()] == ["a"]
        b.write("usage", usage_df(spark, [("b", 2, "c2")]), mode="append", job=f"{second}-append")
        a.write_arrow("usage", pa.table({"doc_id": ["c"], "times_used": [3], "last_chunk_id": ["c3"]}), mode="append")
        a.merge_counters("usage", pa.table({"doc_id": ["a"], "times_used": [10], "last_chunk_id": ["c4"]}),
                         key=["doc_id"], add=["times_used"], assign=["last_chunk_id"])
        for reader in (a, b):
            assert sorted((r.doc_id, r.times_used) for r in reader.read("usage").collect()) == [("a", 11), ("b", 2), ("c", 3)]
        assert sorted(DeltaTable(a.uri("usage")).to_pyarrow_table().column("doc_id").to_pylist()) == ["a", "b", "c"]
        history = {h.version: h for h in a.versions("usage")}
        assert (history[0].job, history[0].rows_written) == (f"{first}-write", 1)
        assert (history[1].job, history[1].rows_written) == (f"{second}-append", 1)
        protocol = DeltaTable(a.uri("usage")).protocol()
        assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)  # both read and write it


def test_the_native_path_names_a_concurrent_overwrite_a_conflict(spark, lake_root, tmp_path):
    """Writer A prepares an overwrite from version 0; B overwrites first; A's commit must fail, not land."""
    from pyspark.sql import functions as F

    require_native(spark)
    lake = Lake(lake_root, spark, native=True)
    lake.write("usage", usage_df(spark, [("old", 1, None)]))
    gate = tmp_path / "b-committed"

    @F.udf("string")
    def after_b(doc_id):  # A's data is computed only once B has committed
        import os
        import time

        while not os.path.exists(str(gate)):
            time.sleep(0.05)
        return doc_id

    slow = usage_df(spark, [("a", 1, None)]).withColumn("doc_id", after_b("doc_id"))
    outcome: list = []
    writer_a = threading.Thread(target=lambda: outcome.append(_attempt(lambda: lake.write("usage", slow, job="a"))))
    writer_a.start()
    try:
        lake.write("usage", usage_df(spark, [("b", 1, None)]), job="b")
    finally:
        gate.write_text("done")
    writer_a.join(timeout=300)
    assert len(outcome) == 1 and isinstance(outcome[0], ConflictError), outcome
    assert "another writer committed" in str(outcome[0]) and "Rerun the job" in str(outcome[0])
    assert [r.doc_id for r in lake.read("usage").collect()] == ["b"]
    assert [h.job for h in lake.versions("usage")][:1] == ["b"]


def _attempt(action):
    try:
        return action()
    except Exception as err:  # the test inspects what the writer raised
        return err
