"""Three trainer processes racing for chunks while a feed is producing them, on each Delta path.

``chunks``, ``usage`` and ``trainer_events`` are written by delta-rs alone, from feed's driver and from
every trainer, whichever path Spark takes for the documents tables: one implementation per table, so
the conditional commits of one implementation decide every race on it. The test shows what that buys:
no chunk is claimed twice, no status change is lost, and the log reads the same through delta-rs and
through the Delta jar."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from jobs import feed
from jobs.synthetic_lake import make_lake
from lake import chunks
from lake.tables import Lake
from conftest import ROOT, delta_mode, make_recipe, require_native

pytestmark = pytest.mark.slow

CLAIMERS = ("trainer-a", "trainer-b", "trainer-c")
CHUNKS = 5


@pytest.mark.parametrize("mode", ["bridge", "native"])
def test_trainers_racing_a_running_feed_claim_each_chunk_once(spark, tmp_path, mode):
    require_native(spark)  # the jar reads the log back, whichever path the feed took
    root = str(tmp_path / "lake")
    make_lake(root, n_docs=240)
    recipe = make_recipe(tmp_path, [{"name": "t", "path": str(tmp_path / "none.jsonl")}],
                         feed={"chunk_tokens": 600, "stages": {"pretrain": {"seq_len": 31}}, "rows_per_file": 8})
    stop = tmp_path / "feed-finished"
    claimers = {run: subprocess.Popen([sys.executable, str(ROOT / "tests" / "chunk_claimer.py"), root, run, str(stop)],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for run in CLAIMERS}
    try:
        with delta_mode(mode):
            for _ in range(CHUNKS):  # a running feed: one chunk at a time, published while trainers claim
                feed.run(spark, recipe)
    finally:
        stop.touch()
    trained = {}
    for run, proc in claimers.items():
        out, err = proc.communicate(timeout=360)
        assert proc.returncode == 0, f"{run}: {err[-3000:]}"
        trained[run] = [json.loads(line) for line in out.splitlines()]

    lake = Lake(root)
    rows = chunks.manifest(lake)
    ids = [c["chunk_id"] for run in CLAIMERS for c in trained[run]]
    assert len(rows) == CHUNKS and sorted(ids) == sorted(r["chunk_id"] for r in rows)  # each exactly once
    owner = {c["chunk_id"]: run for run in CLAIMERS for c in trained[run]}
    for r in rows:  # every claim and every consumption is in the table, by the run that did it
        assert (r["status"], r["times_consumed"], r["run_id"]) == ("consumed", 1, owner[r["chunk_id"]]), r
    events = Counter((e["run_id"], e["chunk_id"], e["event"]) for e in lake.read_arrow("trainer_events").to_pylist())
    assert events == Counter({(owner[c], c, e): 1 for c in owner for e in ("claimed", "consumed")})

    # the log is whole for both implementations: the Delta jar reads what delta-rs committed
    via_jar = spark.read.format("delta").load(lake.uri("chunks")).select("chunk_id", "status", "run_id").collect()
    assert sorted(tuple(r) for r in via_jar) == sorted((r["chunk_id"], r["status"], r["run_id"]) for r in rows)
    versions = [v["version"] for v in lake.delta("chunks").history()]
    assert sorted(versions) == list(range(max(versions) + 1))
