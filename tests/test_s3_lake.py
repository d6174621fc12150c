"""The lake on a real S3-compatible object store: SeaweedFS on loopback (tests/s3server.py), the
refinery's Spark on ``s3a://`` (hadoop-aws and its SDK from Maven Central), delta-rs and pyarrow for
everything else. The whole loop runs with ``lake: s3://…`` the way a user runs it, each process
configured by the environment alone: refinery stages as ``tokenmill`` commands (each starts its own
Spark with the s3a jars), classifiers trained and published into the lake, tokenizer and feed, then
the trainer daemon claims the chunk, trains on it and marks it consumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow

SIZES = {"zh_news": 60, "zh_reviews": 30, "en_docs": 60, "code": 30}


@contextmanager
def environment(values: dict[str, str]):
    """``os.environ`` with ``values`` inside the block (this process's delta-rs and pyarrow), restored after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import s3server
    from lake.jars import fetch, s3_coordinates

    fetch(s3_coordinates())  # hadoop-aws + the AWS SDK bundle, once into .tokenmill/jars
    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    with environment(server.env()):
        yield server
    server.stop()


# -- the commit protocol on this server ---------------------------------------------------------------


def test_concurrent_delta_rs_commits_on_the_server_exclude_each_other(s3):
    """Eight writers commit on top of the same version at once: the server's conditional put lets one
    in and refuses the rest, so no commit is lost (a server ignoring If-None-Match fails this)."""
    import pyarrow as pa
    from deltalake import DeltaTable

    from lake.chunks import now
    from lake.errors import ConflictError
    from lake.tables import Lake

    lake = Lake(s3.uri("race"))
    row = {"run_id": "r", "step": 0, "chunk_id": "c", "event": "claimed", "detail": "", "at": now()}
    lake.put_rows("trainer_events", [row])
    for round_ in range(3):
        snapshot = DeltaTable(lake.uri("trainer_events"))
        base = snapshot.version()  # (the winner's write moves the shared snapshot object forward)
        outcomes: list[str] = []

        def writer(n: int) -> None:
            data = pa.Table.from_pylist([{**row, "detail": f"writer {n}"}])
            try:
                lake.replace_if_unchanged("trainer_events", snapshot, data, {"run_id": "r"}, job=f"w{n}")
                outcomes.append("won")
            except ConflictError:
                outcomes.append("lost")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["lost"] * 7 + ["won"], (round_, outcomes)
        assert lake.delta("trainer_events").version() == base + 1
        winners = lake.read_arrow("trainer_events").column("detail").to_pylist()
        assert len(winners) == 1 and winners[0].startswith("writer "), winners


def test_writing_an_s3_lake_without_conditional_puts_is_refused(s3, monkeypatch):
    from lake.errors import LakeError
    from lake.fs import require_safe_commits
    from lake.tables import Lake
    from trainer.data import ChunkFeed

    monkeypatch.delenv("AWS_CONDITIONAL_PUT")
    monkeypatch.setenv("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    with pytest.raises(LakeError, match="AWS_CONDITIONAL_PUT=etag.*ALLOW_UNSAFE_RENAME"):
        require_safe_commits(s3.uri("x"))
    with pytest.raises(LakeError, match="AWS_CONDITIONAL_PUT=etag"):
        ChunkFeed(Lake(s3.uri("x")), "pretrain", "run", 0, 1, events=None)
    lake = Lake(s3.uri("x"))  # every delta-rs commit of the lake asks first, nothing reaches the bucket
    row = {"run_id": "r", "step": 0, "chunk_id": "c", "event": "claimed", "detail": "", "at": None}
    with pytest.raises(LakeError, match="AWS_CONDITIONAL_PUT=etag"):
        lake.put_rows("trainer_events", [row])
    with pytest.raises(LakeError, match="AWS_CONDITIONAL_PUT=etag"):
        lake.ensure("usage")
    assert not lake.exists("trainer_events") and not lake.exists("usage")
    require_safe_commits("/a/local/lake")  # a local lake needs nothing


def test_delta_spark_never_commits_to_s3(s3):
    from lake import native
    from lake.errors import LakeError

    with pytest.raises(LakeError, match="S3SingleDriverLogStore.*TOKENMILL_DELTA_MODE=bridge"):
        native.write(s3.uri("t/tables/documents_raw"), None, "append", None, "ingest", lambda: 0)


def test_a_session_for_an_s3_lake_needs_the_s3_jars(tmp_path, monkeypatch):
    from jobs.spark import s3a_conf, with_jars
    from lake.errors import LakeError

    class Builder:  # records what get_spark would set, starts nothing
        def __init__(self):
            self.conf = {}

        def config(self, key, value):
            self.conf[key] = value
            return self

    monkeypatch.setenv("TOKENMILL_JARS", str(tmp_path))  # an empty jar folder
    with pytest.raises(LakeError, match=r"tokenmill jars --s3"):
        with_jars(Builder(), "s3://bucket/lake")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert s3a_conf("s3://bucket/lake") == {
        "spark.hadoop.fs.s3a.endpoint.region": "eu-west-1", "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9",
        "spark.hadoop.fs.s3a.path.style.access": "true", "spark.hadoop.fs.s3a.connection.ssl.enabled": "false"}
    assert s3a_conf("/local/lake") == {}


# -- the whole loop ------------------------------------------------------------------------------------


def write_recipe(work: Path, corpus: Path, lake: str) -> Path:
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo["lake"] = lake
    for src in demo["sources"]:
        src["path"] = str(corpus / src["name"] / Path(src["path"]).name)
    demo["spark"] = {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g",
                     "conf": {"spark.ui.enabled": "false"}}
    demo["tokenizer"]["vocab_size"] = 2048
    demo["feed"]["chunk_tokens"] = 20000
    demo["feed"]["stages"]["pretrain"]["seq_len"] = 128
    demo["trainer"] |= {"runs_dir": str(work / "runs"), "eval_every": 10, "eval_docs": 5, "poll_seconds": 0.2}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


def tokenmill(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"tokenmill {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _add_a_copy_and_junk(file: Path) -> None:
    """Two records for ``tokenmill trace`` to follow: a copy of the first (dedup removes one of the two)
    and one that a filter rule rejects."""
    first = json.loads(file.read_text().splitlines()[0])
    with file.open("a") as f:
        f.write(json.dumps({**first, "id": "trace-copy", "url": "https://example.org/trace-copy"}) + "\n")
        f.write(json.dumps({"id": "trace-junk", "text": "buy now", "url": "https://example.org/trace-junk"}) + "\n")


@pytest.fixture(scope="module")
def loop(s3, tmp_path_factory):
    """Refine → models → score → dedup → tokenizer → feed → trainer, all on ``s3://lake/e2e``."""
    from jobs.demo_corpus import build_demo_corpus
    from lake.recipe import load_recipe
    from quality_models import train as qm

    work = tmp_path_factory.mktemp("s3-loop")
    build_demo_corpus(work / "corpus", SIZES)
    _add_a_copy_and_junk(work / "corpus" / "code" / "part-0.jsonl")
    recipe_file = write_recipe(work, work / "corpus", s3.uri("e2e"))
    env = {**os.environ, **s3.env(), "PYTHONPATH": str(ROOT), "TOKENMILL_ARTIFACT_CACHE": str(work / "cache"),
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".tokenmill" / "torch_extensions")}
    env.pop("TOKENMILL_DELTA_MODE", None)  # an s3:// lake chooses the bridge by itself
    outputs = {"refine1": tokenmill(["refine", "--recipe", str(recipe_file), "--stages", "ingest,filter,pii"], env, work)}
    recipe = load_recipe(recipe_file)
    qm.derive_weak_labels(recipe)  # into s3://…/labels/
    for task in ("domain", "quality"):
        qm.train_model(recipe, task, "fasttext")  # published into s3://…/models/<task>-fasttext/v1
    outputs["refine2"] = tokenmill(["refine", "--recipe", str(recipe_file), "--stages", "score,dedup"], env, work)
    outputs["tokenizer"] = tokenmill(["tokenizer", "--recipe", str(recipe_file)], env, work)
    outputs["feed"] = tokenmill(["feed", "--recipe", str(recipe_file)], env, work)
    outputs["train"] = tokenmill(["train", "--recipe", str(recipe_file), "--exit-when-idle", "1"], env, work)
    return recipe, work, outputs


def test_the_refinery_wrote_every_table_into_the_bucket_through_s3a(loop, s3):
    from lake.fs import exists, list_dir
    from lake.tables import Lake

    recipe, work, outputs = loop
    lake = Lake(recipe.lake)
    assert "[refine] Spark master local[2]" in outputs["refine1"]
    raw = lake.summary("documents_raw").rows
    kept = lake.summary("documents_dedup").rows
    rejected = lake.read_arrow("documents_rejected", columns=["stage"]).column("stage").to_pylist()
    assert raw > 100 and 0 < kept < raw and {"ingest", "filter"} <= set(rejected)
    for name in ("documents_raw", "documents_filtered", "documents_clean", "documents_scored", "documents_dedup"):
        history = lake.versions(name)
        assert history and all(v.job for v in history), name  # bridge commits, tagged with their job
        data_files = [f for f in lake.delta(name).file_uris() if f.startswith(s3.uri("e2e/tables/"))]
        assert data_files and all(exists(f) for f in data_files), name  # Spark's s3a Parquet, in the bucket
    assert exists(f"{recipe.lake}/reports") and list_dir(f"{recipe.lake}/reports")
    assert not list(work.glob("s3*")) and not (ROOT / "s3:").exists()  # nothing landed in a local "s3:" folder


def test_models_and_tokenizer_live_in_the_lake(loop):
    from lake.artifacts import TOKENIZER, versions
    from lake.fs import exists
    from lake.tables import Lake

    recipe, work, _ = loop
    assert versions(recipe.lake, "quality-fasttext") == ["v1"] and versions(recipe.lake, "domain-fasttext") == ["v1"]
    assert versions(recipe.lake, TOKENIZER) == ["v1"]
    assert exists(f"{recipe.lake}/labels/domain.jsonl") and exists(f"{recipe.lake}/labels/quality.jsonl")
    scored = Lake(recipe.lake).read_arrow("documents_scored", columns=["quality", "category"])
    assert set(scored.column("category").to_pylist()) >= {"zh", "en", "code"}
    assert 0 < min(scored.column("quality").to_pylist()) < max(scored.column("quality").to_pylist()) <= 1
    assert list((work / "cache").iterdir())  # the scoring and training processes read their copies by URI


def test_the_trainer_consumed_the_chunk_feed_wrote_to_s3(loop, s3):
    import json

    from lake import chunks
    from lake.fs import exists, file_sha256
    from lake.tables import Lake

    recipe, work, outputs = loop
    lake = Lake(recipe.lake)
    rows = chunks.manifest(lake)
    assert len(rows) == 1 and rows[0]["status"] == "consumed" and rows[0]["times_consumed"] == 1, rows
    assert 15000 <= rows[0]["n_tokens"] <= 20000
    for name, digest in zip(rows[0]["files"], rows[0]["sha256"], strict=True):
        uri = f"{chunks.chunk_dir(lake.root, rows[0]['chunk_id'])}/{name}"
        assert uri.startswith(s3.uri("e2e/chunks/")) and exists(uri) and file_sha256(uri) == digest
    events = lake.read_arrow("trainer_events").to_pylist()
    kinds = [e["event"] for e in events]
    assert kinds.count("claimed") == 1 and kinds.count("consumed") == 1, kinds
    metrics = [json.loads(x) for x in (work / "runs" / recipe.trainer.run_name / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) >= 5 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert lake.summary("usage").rows > 0


# -- one document's journey, on this lake ---------------------------------------------------------------


def _rows_of(lake, row: dict, doc_id: str) -> tuple[list[int], int]:
    """The rows of a chunk holding ``doc_id`` and its tokens there, read from the chunk's own rows."""
    from lake import chunks

    _, spans = chunks.read_rows(lake, row)
    pieces = [(r, p["length"]) for r, pieces in enumerate(spans) for p in pieces if p["doc_id"] == doc_id]
    return sorted({r for r, _ in pieces}), sum(n for _, n in pieces)


def test_trace_follows_a_trained_document_from_its_record_to_the_run(loop, s3):
    from jobs.trace import trace
    from lake import chunks
    from lake.tables import Lake

    recipe, work, _ = loop
    lake = Lake(recipe.lake)
    chunk = chunks.manifest(lake)[0]
    used = {r["doc_id"]: r["times_used"] for r in lake.read_arrow("usage").to_pylist() if r["times_used"]}
    doc_id = sorted(used)[0]
    [found] = trace(recipe, doc_id)
    assert [(d.stage, d.outcome) for d in found.decisions] == [
        ("ingest", "kept"), ("filter", "kept"), ("pii", "kept"), ("score", "kept"), ("dedup", "kept")]
    scored = lake.read_arrow("documents_scored").to_pylist()
    mine = next(r for r in scored if r["doc_id"] == doc_id)
    assert f"category {mine['category']}" in found.decisions[3].detail and f"{mine['quality']:.3f}" in found.decisions[3].detail
    rows, tokens = _rows_of(lake, chunk, doc_id)
    assert [(p.chunk["chunk_id"], p.rows, p.tokens) for p in found.placements] == [(chunk["chunk_id"], rows, tokens)]
    assert found.times_used == used[doc_id] and not found.held_out
    filtered = lake.read_arrow("documents_filtered").to_pylist()
    assert found.signals == dict(next(r for r in filtered if r["doc_id"] == doc_id)["signals"]) and found.signals
    events = {(e["run_id"], e["event"]) for e in found.training}
    assert {(recipe.trainer.run_name, "claimed"), (recipe.trainer.run_name, "consumed")} <= events
    # the command a user types, on the bucket: one screen, from the record to the run
    shown = tokenmill(["trace", doc_id, "--recipe", str(work / "recipe.yaml")], {**os.environ, **s3.env(),
                      "PYTHONPATH": str(ROOT)}, work)
    assert shown.startswith(f"document {doc_id}") and f"{chunk['chunk_id']} (consumed) row" in shown
    assert f"run {recipe.trainer.run_name}" in shown and "(consumed)" in shown and "REJECTED" not in shown


def test_trace_says_where_and_why_a_document_stopped(loop):
    from jobs.records import make_doc_id
    from jobs.trace import render, trace
    from lake.tables import Lake

    recipe, work, _ = loop
    lake = Lake(recipe.lake)
    rejected = lake.read_arrow("documents_rejected").to_pylist()
    # the junk record, found by the line of the source file it came from (ingest's own parsing gives the id)
    code_file = work / "corpus" / "code" / "part-0.jsonl"
    junk_line = len(code_file.read_text().splitlines())
    [junk] = trace(recipe, source_line=f"{code_file}:{junk_line}")
    filtered = next(r for r in rejected if r["stage"] == "filter" and r["doc_id"] == junk.doc_id)
    assert [(d.stage, d.outcome) for d in junk.decisions] == [("ingest", "kept"), ("filter", "rejected")]
    assert junk.decisions[1].detail == filtered["detail"] and filtered["detail"].startswith(filtered["reason"])
    assert "it goes no further (documents_rejected, stage filter)" in render(junk)
    assert [j.doc_id for j in trace(recipe, url="https://example.org/trace-junk")] == [junk.doc_id]
    # the copy: dedup removed one of the two (the same text), naming the other as the survivor
    first_id = json.loads(code_file.read_text().splitlines()[0])["id"]
    pair = {make_doc_id("code", first_id, ""), make_doc_id("code", "trace-copy", "")}
    [removed] = [r for r in rejected if r["stage"] == "dedup" and r["doc_id"] in pair]
    [copy] = trace(recipe, removed["doc_id"])
    survivor = (pair - {removed["doc_id"]}).pop()
    assert [d.outcome for d in copy.decisions] == ["kept"] * 4 + ["rejected"]
    assert copy.decisions[-1].detail.startswith("exact_duplicate: ") and f"survivor {survivor}" in copy.decisions[-1].detail
    # a line ingest refused: its reason and file:line, and nothing after
    messy = work / "corpus" / "messy" / "part-0.jsonl"
    [broken] = trace(recipe, source_line=f"{messy}:2")
    assert broken.doc_id is None and [(d.stage, d.outcome) for d in broken.decisions] == [("ingest", "rejected")]
    assert broken.decisions[0].detail.startswith(f"malformed_json: {messy}:2: ")


def test_the_dataset_card_states_the_chunk_sets_numbers(loop, s3):
    from collections import Counter

    from jobs.card import size_category
    from lake import chunks
    from lake.artifacts import TOKENIZER, versions
    from lake.tables import Lake

    recipe, work, _ = loop
    shown = tokenmill(["card", "--recipe", str(work / "recipe.yaml"), "--out", str(work / "card")],
                      {**os.environ, **s3.env(), "PYTHONPATH": str(ROOT)}, work)
    assert shown.strip() == str(work / "card" / "README.md")
    _, head, body = (work / "card" / "README.md").read_text().split("---\n", 2)
    meta = yaml.safe_load(head)
    # against the chunk's own rows and the tables, computed here
    lake = Lake(recipe.lake)
    # DuckDB on an object store scans delta-rs's datasets: usage's merge-written files under a string filter
    usage = lake.read_arrow("usage", ["doc_id", "times_used"]).to_pylist()
    assert lake.counts("usage", ["times_used"], where="doc_id <> '' AND times_used > 0") == Counter(
        r["times_used"] for r in usage if r["times_used"] > 0) != Counter()
    [chunk] = chunks.manifest(lake)
    in_chunk = {p["doc_id"] for row in chunks.read_rows(lake, chunk)[1] for p in row}
    kept = lake.read_arrow("documents_dedup", ["doc_id", "source", "lang"]).to_pylist()
    per_source = Counter(r["source"] for r in kept if r["doc_id"] in in_chunk)
    assert meta["source_datasets"] == sorted(per_source) and meta["size_categories"] == [size_category(len(in_chunk))]
    assert meta["language"] == sorted({r["lang"] for r in kept if r["doc_id"] in in_chunk} - {"code", "other"})
    assert meta["license"] == ["psf-2.0"]  # configs/demo.yaml gives en_docs' and code's; the others give none
    assert meta["task_categories"] == ["text-generation"] and "code" in meta["tags"]
    for category, tokens in dict(chunk["mix"]).items():
        assert f"| `{category}` | {tokens:,} |" in body
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]] for line in body.splitlines()
            if line.startswith("| `") and line.count("|") > 6}
    held = Counter(r["source"] for r in lake.read_arrow("holdout", ["source"]).to_pylist())
    for source in (s.name for s in recipe.sources):
        assert rows[source][-2:] == [f"{per_source.get(source, 0):,}", f"{held.get(source, 0):,}"], (source, rows[source])
    rejected = Counter(r["stage"] for r in lake.read_arrow("documents_rejected", ["stage"]).to_pylist())
    for stage, n in rejected.items():
        assert f"- **{stage}** rejected {n:,}: " in body
    assert f"tokenizer `{TOKENIZER}/{versions(recipe.lake, TOKENIZER)[-1]}`" in body


def test_the_report_shows_the_lakes_numbers_and_opens_in_a_browser(loop, s3):
    import re
    from collections import Counter

    import browser
    from lake import chunks
    from lake.tables import Lake

    recipe, work, _ = loop
    shown = tokenmill(["report", "--recipe", str(work / "recipe.yaml"), "--out", str(work / "report")],
                      {**os.environ, **s3.env(), "PYTHONPATH": str(ROOT)}, work)
    page = work / "report" / "report.html"
    assert shown.strip() == str(page)
    html = page.read_text()
    figures = json.loads(re.search(r'<script type="application/json" id="figures">(.*?)</script>', html, re.S)
                         .group(1).replace("<\\/", "</"))
    lake = Lake(recipe.lake)
    # the funnel and the rejections, against the tables
    for name in ("documents_raw", "documents_filtered", "documents_clean", "documents_scored", "documents_dedup"):
        assert figures["funnel"][name] == dict(Counter(lake.read_arrow(name, ["source"]).column("source").to_pylist()))
        text_bytes = Counter()
        for r in lake.read_arrow(name, ["source", "text"]).to_pylist():
            text_bytes[r["source"]] += len(r["text"].encode())
        assert {s: v["bytes"] for s, v in figures["volume"][name].items()} == dict(text_bytes)
    rejected = lake.read_arrow("documents_rejected", ["stage", "reason", "detail"]).to_pylist()
    assert figures["rejected"] == {s: dict(Counter(r["reason"] for r in rejected if r["stage"] == s))
                                   for s in {r["stage"] for r in rejected}}
    by_rule = Counter(r["reason"] for r in rejected if r["stage"] == "filter")
    assert {k: v["removed"] for k, v in figures["rules"].items() if v["removed"]} == dict(by_rule)
    assert all(v["alone"] <= v["failed"] and len(v["samples"]) <= 3 for v in figures["rules"].values())
    # shift warnings: a rule that removed more than filter.warn_share of a source's raw documents
    raw = Counter(lake.read_arrow("documents_raw", ["source"]).column("source").to_pylist())
    with_source = lake.read_arrow("documents_rejected", ["doc_id", "stage", "reason", "source"]).to_pylist()
    removed = Counter((r["reason"], r["source"]) for r in with_source if r["stage"] == "filter")
    scored = Counter(lake.read_arrow("documents_scored", ["source"]).column("source").to_pylist())
    members = {r["doc_id"]: r for r in lake.read_arrow("dedup_clusters").to_pylist() if r["doc_id"] != r["kept_doc_id"]}
    by_key = Counter((f"dedup key {members[r['doc_id']]['category']}", r["source"]) for r in with_source
                     if r["stage"] == "dedup" and r["doc_id"] in members)
    assert by_key  # the loop lake has near duplicates
    assert {(x["rule"], x["source"]) for x in figures["shifts"]} == {
        k for k, n in removed.items() if n / raw[k[1]] > recipe.filter.warn_share} | {
        k for k, n in by_key.items() if n / scored[k[1]] > recipe.dedup.warn_share}
    assert all(f"<p class='warn'>⚠ {x['text']}</p>" in html for x in figures["shifts"])
    pii = Counter()
    for r in lake.read_arrow("documents_clean", ["pii"]).to_pylist():
        pii.update({k: v for k, v in dict(r["pii"] or {}).items() if v})
    assert {k: sum(v.values()) for k, v in figures["pii"].items()} == dict(pii)
    # the chunks, their reuse and the run
    [chunk] = chunks.manifest(lake)
    assert [(c["chunk_id"], c["mix"]) for c in figures["chunks"]["per_chunk"]] == [(chunk["chunk_id"], dict(chunk["mix"]))]
    used = Counter(lake.read_arrow("usage", ["times_used"]).column("times_used").to_pylist())
    assert figures["usage"] == {str(k): v for k, v in used.items()}
    metrics = (work / "runs" / recipe.trainer.run_name / "metrics.jsonl").read_text().splitlines()
    run = figures["training"][recipe.trainer.run_name]
    assert [m["step"] for m in run["metrics"]] == [json.loads(x)["step"] for x in metrics]
    assert len(run["events"]) == lake.read_arrow("trainer_events").num_rows
    # a page that loads nothing and shows its charts: in headless Chromium, no console error, a screenshot
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script src" not in html
    shot = browser.screenshot(page, work)
    assert shot.console == [] and shot.png.stat().st_size > 20_000
    assert shot.dom.count("<svg") >= 5 and "Near-dedup" in shot.dom and f"run {recipe.trainer.run_name}" in shot.dom
