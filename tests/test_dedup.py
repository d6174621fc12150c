"""The dedup job on Spark, end to end on small real-shaped data: thresholds per category, survivors,
lineage, determinism, incremental mode, line dedup, connected components, spark-submit."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from jobs import dedup
from jobs.dedup_batches import lsh_shape, sign_batch, similarity_batch
from jobs.stages import DedupOptions
from lake.tables import Lake
from jobs.minhash import ShingleSpec, near_copy
from tests.conftest import ROOT, make_recipe

WORDS = ("market city river school budget council report station water energy house street train garden "
         "music doctor letter window summer winter science museum bridge forest island harbour farmer "
         "teacher student engine paper story north south east west morning evening village library").split()
HAN = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(n))


def _han(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(HAN) for _ in range(n))


def scored_rows(rows: list[dict]) -> pa.Table:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    base = {"source": "test", "url": None, "meta": None, "ingested_at": now, "signals": None, "pii": None, "prompt": None}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


def doc(doc_id, text, domain, lang, quality, category=None):
    return {"doc_id": doc_id, "text": text, "domain": domain, "lang": lang, "quality": quality,
            "category": category or lang}


@pytest.fixture(scope="module")
def corpus():
    """Unique documents plus copies of known exact Jaccard; ``expect`` says which copies must go."""
    rng = random.Random(7)
    rows, expect_removed, expect_kept = [], {}, set()
    for i in range(40):
        rows.append(doc(f"en{i:03d}", _words(rng, 120), "knowledge", "en", 0.5))
    for i in range(30):
        rows.append(doc(f"zh{i:03d}", _han(rng, 300), "news", "zh", 0.5))
    spec_w, spec_c = ShingleSpec("word", 5), ShingleSpec("char", 5)
    # news (threshold 0.70): a copy at ~0.78 is a duplicate ...
    text, sim = near_copy(rows[40]["text"], 0.80, spec_c, rng)
    assert 0.75 <= sim <= 0.80
    rows.append(doc("zh_copy_a", text, "news", "zh", 0.9))  # better quality: it survives
    expect_removed["zh000"] = "zh_copy_a"
    # ... while a knowledge copy (threshold 0.85) at the same similarity is not
    text, sim = near_copy(rows[0]["text"], 0.80, spec_w, rng)
    assert 0.75 <= sim <= 0.80
    rows.append(doc("en_copy_far", text, "knowledge", "en", 0.9))
    expect_kept |= {"en000", "en_copy_far"}
    # knowledge at ~0.93: removed; same quality, the longer text survives
    text, sim = near_copy(rows[1]["text"], 0.94, spec_w, rng)
    assert sim >= 0.90
    rows.append(doc("en_copy_near", text + " extra words here", "knowledge", "en", 0.5))
    expect_removed["en001"] = "en_copy_near"
    # exact copies after normalisation (case), all tied on quality and length: the smallest doc_id survives
    rows.append(doc("en_exact_b", rows[2]["text"].upper(), "knowledge", "en", 0.5))
    rows.append(doc("en_exact_a", rows[2]["text"].title(), "knowledge", "en", 0.5))
    # punctuation is not part of the normalised text either: a longer punctuated copy is exact, and wins
    rows.append(doc("en_exact_long", rows[4]["text"].replace(" ", ", "), "knowledge", "en", 0.5))
    expect_removed["en004"] = "en_exact_long"
    expect_removed["en_exact_b"] = "en002"
    expect_removed["en_exact_a"] = "en002"
    # a chain: c1 ~ en003, c2 ~ c1: one cluster, the best quality (c2) survives
    t1, _ = near_copy(rows[3]["text"], 0.93, spec_w, rng)
    t2, _ = near_copy(t1, 0.93, spec_w, rng)
    rows += [doc("en_chain1", t1, "knowledge", "en", 0.6), doc("en_chain2", t2, "knowledge", "en", 0.8)]
    expect_removed["en003"] = "en_chain2"
    expect_removed["en_chain1"] = "en_chain2"
    return rows, expect_removed, expect_kept


def _run(spark, tmp_path, rows, name="lake", incremental=False, lake_root=None, **dedup_cfg):
    recipe = make_recipe(tmp_path, [{"name": "test", "path": str(tmp_path / "none.jsonl")}],
                         dedup=dedup_cfg or {})
    recipe = recipe.model_copy(update={"lake": lake_root or str(tmp_path / name)})
    lake = Lake(recipe.lake)
    lake.write_arrow("documents_scored", scored_rows(rows), mode="overwrite", job="test")

    report = dedup.run(spark, recipe, DedupOptions(incremental=incremental))
    return recipe, lake, report


def test_thresholds_survivors_lineage_and_counts(spark, tmp_path, corpus):
    rows, expect_removed, expect_kept = corpus
    _, lake, report = _run(spark, tmp_path, rows)
    kept = set(lake.read_arrow("documents_dedup", columns=["doc_id"]).column("doc_id").to_pylist())
    rejected = lake.read_arrow("documents_rejected").to_pylist()
    rejected = {r["doc_id"]: r for r in rejected if r["stage"] == "dedup"}
    assert len(kept) + len(rejected) == len(rows) == report.documents_in
    assert set(rejected) == set(expect_removed)
    assert expect_kept <= kept
    for doc_id, survivor in expect_removed.items():
        assert survivor in rejected[doc_id]["detail"], rejected[doc_id]
    assert rejected["en_exact_b"]["reason"] == "exact_duplicate"
    assert rejected["zh000"]["reason"] == "near_duplicate"
    clusters = {r["doc_id"]: r for r in lake.read_arrow("dedup_clusters").to_pylist()}
    # every member of every cluster, the kept one included, with its threshold and category
    assert set(clusters) == set(expect_removed) | set(expect_removed.values())
    assert clusters["zh000"]["threshold"] == 0.70 and clusters["zh000"]["category"] == "news"
    assert 0.6 < clusters["zh000"]["similarity"] < 0.95
    assert clusters["en001"]["threshold"] == 0.85
    assert clusters["zh_copy_a"]["similarity"] == 1.0 and clusters["zh_copy_a"]["kept_doc_id"] == "zh_copy_a"
    assert report.exact_removed == 3 and report.near_removed == 4
    heads = {r["doc_id"]: r["cluster_id"] for r in lake.read_arrow("documents_dedup").to_pylist()}
    assert heads["en_chain2"] == "en_chain2" and heads["en010"] is None


def test_sign_batch_keys_thresholds_and_similarity_without_spark(tmp_path):
    recipe = make_recipe(tmp_path, [{"name": "test", "path": str(tmp_path / "none.jsonl")}])
    bands, rows, loosest = lsh_shape(recipe)
    assert bands * rows <= recipe.dedup.num_perm and loosest == 0.70
    rng = random.Random(3)
    text = _words(rng, 60)
    batch = pa.RecordBatch.from_pylist([
        doc("a", text, "news", "en", 0.5, category="knowledge"),  # the domain's threshold wins
        doc("b", text.upper().replace(" ", ", "), None, "en", None, category="knowledge"),
        doc("c", _words(rng, 60), None, "en", 0.5, category="poetry"),  # no threshold of its own
    ])
    signed = sign_batch(batch, recipe, bands, rows).to_pydict()
    assert signed["text_key"][0] == signed["text_key"][1] != signed["text_key"][2]  # case and punctuation aside
    assert list(zip(signed["threshold"], signed["dkey"])) == [(0.70, "news"), (0.85, "knowledge"), (0.80, "poetry")]
    assert signed["quality"][1] == -1.0 and all(len(b) == bands for b in signed["bands"])
    pairs = pa.RecordBatch.from_pydict({"a": ["a", "a"], "b": ["b", "c"], "sig_a": [signed["sig"][0]] * 2,
                                        "sig_b": [signed["sig"][1], signed["sig"][2]]})
    similar = similarity_batch(pairs)
    assert similar.schema.names == ["a", "b", "similarity"]
    assert similar.column("similarity").to_pylist()[0] == 1.0 > similar.column("similarity").to_pylist()[1]


def test_without_exact_dedup_copies_are_found_by_lsh_and_still_named_exact(spark, tmp_path, corpus):
    rows, expect_removed, _ = corpus
    _, lake, report = _run(spark, tmp_path, rows, exact=False)
    rejected = {r["doc_id"]: r for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "dedup"}
    assert set(rejected) == set(expect_removed)
    assert rejected["en_exact_b"]["reason"] == "exact_duplicate" and "en002" in rejected["en_exact_b"]["detail"]
    assert report.exact_removed == 3 and report.near_removed == 4


def test_same_clusters_across_reruns_and_partition_counts(spark, tmp_path, corpus):
    rows, _, _ = corpus
    results = []
    for i, (shuffled, partitions) in enumerate([(False, "2"), (True, "7")]):
        spark.conf.set("spark.sql.shuffle.partitions", partitions)
        try:
            order = list(rows)
            if shuffled:
                random.Random(1).shuffle(order)
            _, lake, _ = _run(spark, tmp_path, order, name=f"lake{i}")
        finally:
            spark.conf.set("spark.sql.shuffle.partitions", "2")
        clusters = sorted(tuple(r.values()) for r in lake.read_arrow("dedup_clusters").to_pylist())
        kept = sorted(lake.read_arrow("documents_dedup", columns=["doc_id"]).column("doc_id").to_pylist())
        results.append((clusters, kept))
    assert results[0] == results[1]


def test_incremental_dedups_new_documents_against_the_kept_corpus(spark, tmp_path, corpus):
    rows, expect_removed, _ = corpus
    recipe, lake, first = _run(spark, tmp_path, rows)
    old_clusters = {r["doc_id"]: r for r in lake.read_arrow("dedup_clusters").to_pylist()}
    kept_before = set(lake.read_arrow("documents_dedup", columns=["doc_id"]).column("doc_id").to_pylist())
    rng = random.Random(11)
    spec_w = ShingleSpec("word", 5)
    text_old, _ = near_copy(rows[5]["text"], 0.95, spec_w, rng)  # a copy of a kept old document
    fresh = _words(rng, 150)
    text_new, _ = near_copy(fresh, 0.95, spec_w, rng)  # two new documents copying each other
    new_rows = [doc("new_copy_of_old", text_old, "knowledge", "en", 0.99),  # better, but the old one stays
                doc("new_a", fresh, "knowledge", "en", 0.7), doc("new_b", text_new, "knowledge", "en", 0.4),
                doc("new_unique", _words(rng, 100), "knowledge", "en", 0.5)]
    report = _run(spark, tmp_path, rows + new_rows, incremental=True, lake_root=recipe.lake)[2]
    assert report.incremental and report.documents_in == 4
    kept = set(lake.read_arrow("documents_dedup", columns=["doc_id"]).column("doc_id").to_pylist())
    assert kept == kept_before | {"new_a", "new_unique"}
    rejected = {r["doc_id"]: r for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "dedup"}
    assert set(rejected) == set(expect_removed) | {"new_copy_of_old", "new_b"}
    assert "en005" in rejected["new_copy_of_old"]["detail"]
    clusters = {r["doc_id"]: r for r in lake.read_arrow("dedup_clusters").to_pylist()}
    assert all(clusters[d] == r for d, r in old_clusters.items())  # the old clusters are untouched
    assert clusters["new_b"]["kept_doc_id"] == "new_a" and clusters["en005"]["kept_doc_id"] == "en005"


def test_line_dedup_removes_boilerplate_before_document_dedup(spark, tmp_path):
    rng = random.Random(5)
    footer = "Copyright 2026 Example Media Group. All rights reserved."
    rows = [doc(f"d{i:02d}", _words(rng, 80) + "\n" + footer, "news", "en", 0.5) for i in range(12)]
    rows.append(doc("only_footer", footer + "\n" + footer, "news", "en", 0.5))
    _, lake, report = _run(spark, tmp_path, rows, line_dedup={"min_repeats": 5})
    texts = {r["doc_id"]: r["text"] for r in lake.read_arrow("documents_dedup").to_pylist()}
    assert len(texts) == 12 and all(footer not in t and t for t in texts.values())
    assert report.lines_removed == 14 and report.boilerplate_only == 1
    rejected = [r for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "dedup"]
    assert [(r["doc_id"], r["reason"]) for r in rejected] == [("only_footer", "boilerplate_only")]


def test_connected_components_match_union_find(spark):
    rng = random.Random(2)
    nodes = [f"n{i:03d}" for i in range(200)]
    edges = [(f"n{i:03d}", f"n{i + 1:03d}") for i in range(60)]  # a long chain
    edges += [(rng.choice(nodes[60:]), rng.choice(nodes[60:])) for _ in range(90)]
    parent = {n: n for n in nodes}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in edges:
        a, b = find(u), find(v)
        if a != b:
            parent[max(a, b)] = min(a, b)
    touched = {n for e in edges for n in e if e[0] != e[1]}
    expected = {}
    for n in touched:
        expected[n] = min(m for m in touched if find(m) == find(n))
    got = dedup.connected_components(spark.createDataFrame(edges, "u string, v string")).collect()
    assert {r["node"]: r["root"] for r in got} == expected
    assert len(got) == len(expected)


@pytest.mark.slow
def test_spark_submit_runs_the_dedup_job(spark, tmp_path, corpus):
    rows, expect_removed, _ = corpus
    recipe, lake, _ = _run(spark, tmp_path, rows)
    recipe_file = tmp_path / "recipe.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump({"lake": recipe.lake, "sources": [{"name": "test", "path": "x.jsonl"}]}))
    spark_submit = Path(sys.executable).parent / "spark-submit"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "TOKENMILL_SPARK_LOG_LEVEL": "ERROR"}
    out = subprocess.run([str(spark_submit), "--master", "local[2]", str(ROOT / "jobs" / "dedup.py"),
                          "--recipe", str(recipe_file)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"dedup: {len(rows)} documents in" in out.stdout
    rejected = {r["doc_id"] for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "dedup"}
    assert rejected == set(expect_removed)


def test_a_threshold_key_removing_more_than_warn_share_warns_and_fails_under_strict(spark, tmp_path, corpus):
    from jobs.stages import StageError

    rows, expect_removed, _ = corpus
    recipe, lake, report = _run(spark, tmp_path, rows, warn_share=0.01)
    rejected = [r for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "dedup"]
    clusters = {r["doc_id"]: r for r in lake.read_arrow("dedup_clusters").to_pylist()}
    per_source = {"test": len(rows)}  # scored_rows puts every row in source "test"
    removed = {}
    for r in rejected:
        if r["doc_id"] in clusters:  # boilerplate-only documents belong to no cluster
            key = (f"dedup key {clusters[r['doc_id']]['category']}", r["source"])
            removed[key] = removed.get(key, 0) + 1
    want = {k for k, n in removed.items() if n / per_source[k[1]] > 0.01}
    assert want and {(s.key, s.source) for s, _ in report.shifts} == want
    shown = str(report)
    for shift, samples in report.shifts:
        assert f"warning: {shift}; e.g. " in shown and samples and all(s.split(" → ")[0] in expect_removed for s in samples)
    before = {t: lake.delta(t).version() for t in ("documents_dedup", "documents_rejected", "dedup_clusters")}
    strict = recipe.model_copy(update={"dedup": recipe.dedup.model_copy(update={"warn_share": 0.01})})
    with pytest.raises(StageError, match="dedup --strict: nothing committed, because dedup key "):
        dedup.run(spark, strict, DedupOptions(strict=True))
    assert {t: lake.delta(t).version() for t in before} == before
