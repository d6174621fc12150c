"""A stage's outcome is several Delta commits (its rejections, then its output; dedup also its
clusters), all or nothing: a stage killed between them is undone by the next refinery stage's run
(``lake/atomic.py``), and ``tokenmill status`` says so meanwhile."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from jobs import dedup, filter_rules, ingest, scrub_pii
from jobs.stages import stage
from lake.atomic import interrupted, marker_path, repair
from lake.fs import exists
from lake.status import print_status
from lake.tables import Lake

from conftest import delta_mode, make_recipe, require_native, write_jsonl
from test_dedup import _words, doc, scored_rows
from test_refine_stage1 import CONTACT_LIST
from test_rules import JUNK

GOOD = ("The river council met on Tuesday to discuss the new school budget and the repairs to the old "
        "bridge near the station. Members agreed that the water supply needs attention before the winter, "
        "and the report will be published next week with the full list of projects and their costs.")


class Killed(BaseException):
    """What a kill leaves: no handler, no clean-up, only the commits that already landed."""


def kill_before(monkeypatch, target: str) -> None:
    real = Lake.write

    def write(self, name, *args, **kwargs):
        if name == target:
            raise Killed(f"killed before committing {name}")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(Lake, "write", write)


def without(lake: Lake, name: str, doc_ids: set[str]) -> None:
    rows = lake.read_arrow(name)
    lake.write_arrow(name, rows.filter(pc.invert(pc.field("doc_id").isin(sorted(doc_ids)))), mode="overwrite", job="test")


def rejected_ids(lake: Lake, stage_name: str, version: int | None = None) -> set[str]:
    dt = DeltaTable(lake.uri("documents_rejected"), version=version) if version is not None else lake.delta("documents_rejected")
    rows = dt.to_pyarrow_table(columns=["doc_id", "stage"]).to_pylist()
    return {r["doc_id"] for r in rows if r["stage"] == stage_name}


@pytest.fixture
def refined(spark, tmp_path):
    records = [{"id": f"good-{i}", "text": f"{GOOD} Item {i}."} for i in range(12)]
    records += [{"id": f"junk-{name}", "text": text} for name, (text, _) in JUNK.items()]
    records += [{"id": "mostly-pii", "text": CONTACT_LIST}]  # kept by filter, rejected by pii
    data = write_jsonl(tmp_path / "in" / "part-0.jsonl", records)
    recipe = make_recipe(tmp_path, [{"name": "mix", "path": str(data), "id_field": "id"}])
    for s in (ingest, filter_rules, scrub_pii):
        s.run(spark, recipe)
    return recipe, Lake(recipe.lake, spark)


@pytest.mark.parametrize("killed,module,target,source", [
    ("filter", filter_rules, "documents_filtered", "documents_raw"),
    ("pii", scrub_pii, "documents_clean", "documents_filtered"),
])
def test_a_stage_killed_between_its_commits_is_undone_by_the_next_run(spark, refined, monkeypatch, capsys,
                                                                      killed, module, target, source):
    recipe, lake = refined
    before_rejected = lake.delta("documents_rejected").version()
    before_target = lake.delta(target).version()
    old_rejections = rejected_ids(lake, killed)
    assert old_rejections
    # the rerun sees none of the documents it rejected (its rejections differ), and dies after committing them
    without(lake, source, old_rejections)
    kill_before(monkeypatch, target)
    with pytest.raises(Killed):
        module.run(spark, recipe)
    monkeypatch.undo()
    assert lake.delta("documents_rejected").version() == before_rejected + 1  # the first commit landed
    assert lake.delta(target).version() == before_target  # the second never happened
    assert rejected_ids(lake, killed) != old_rejections
    assert [m["stage"] for m in interrupted(lake)] == [killed]
    print_status(lake.root)
    assert f"WARNING: {killed} died between its commits" in capsys.readouterr().out

    assert repair(lake) == [killed]
    assert not exists(marker_path(lake, killed)) and interrupted(lake) == []
    last = lake.versions("documents_rejected", 1)[0]
    assert last.operation == "RESTORE" and last.job == f"repair:{killed}"
    assert rejected_ids(lake, killed) == old_rejections  # the rejections are the ones beside the table again
    assert lake.delta(target).version() == before_target


def test_the_next_refinery_stage_repairs_first(spark, refined, monkeypatch):
    recipe, lake = refined
    old_rejections = rejected_ids(lake, "pii")
    assert old_rejections
    without(lake, "documents_filtered", old_rejections)
    kill_before(monkeypatch, "documents_clean")
    with pytest.raises(Killed):
        scrub_pii.run(spark, recipe)
    monkeypatch.undo()
    assert interrupted(lake)
    stage("filter").run(spark, recipe)  # a refinery stage's run starts with the repair
    assert interrupted(lake) == [] and rejected_ids(lake, "pii") == old_rejections
    assert [v.job for v in lake.versions("documents_rejected", 2)] == ["filter", "repair:pii"]


@pytest.mark.parametrize("mode", ["bridge", "native"])
def test_dedup_killed_after_two_of_its_three_commits_is_undone(spark, tmp_path, monkeypatch, mode):
    """On both Delta paths: the repair's restore commits (delta-rs) on tables the jar wrote too."""
    if mode == "native":
        require_native(spark)
    with delta_mode(mode):
        _dedup_killed_and_repaired(spark, tmp_path, monkeypatch)


def _dedup_killed_and_repaired(spark, tmp_path, monkeypatch):
    import random

    rng = random.Random(0)
    rows = [doc(f"en{i}", _words(rng, 120), "news", "en", 0.9) for i in range(6)]
    rows += [doc("en-copy", rows[0]["text"], "news", "en", 0.5)]
    recipe = make_recipe(tmp_path, [{"name": "test", "path": str(tmp_path / "none.jsonl")}])
    lake = Lake(recipe.lake, spark)
    lake.write_arrow("documents_scored", scored_rows(rows), mode="overwrite", job="test")
    dedup.run(spark, recipe)
    versions = {n: lake.delta(n).version() for n in ("documents_rejected", "dedup_clusters", "documents_dedup")}
    assert rejected_ids(lake, "dedup") == {"en-copy"}
    more = rows + [doc("en-copy2", rows[1]["text"], "news", "en", 0.4)]
    lake.write_arrow("documents_scored", scored_rows(more), mode="overwrite", job="test")
    kill_before(monkeypatch, "documents_dedup")
    with pytest.raises(Killed):
        dedup.run(spark, recipe)
    monkeypatch.undo()
    assert rejected_ids(lake, "dedup") == {"en-copy", "en-copy2"}  # two commits landed
    assert lake.delta("dedup_clusters").version() == versions["dedup_clusters"] + 1
    stage("dedup").run(spark, recipe)  # the rerun repairs first, then does the whole outcome
    jobs = [v.job for v in lake.versions("documents_rejected", 3)]
    assert jobs == ["dedup", "repair:dedup", "dedup"], jobs
    assert rejected_ids(lake, "dedup") == {"en-copy", "en-copy2"}
    assert lake.summary("documents_dedup").rows == len(more) - 2
