"""Filter and PII jobs end to end: real text with injected PII, decoys and junk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import filter_rules, ingest, scrub_pii
from jobs.stages import FilterOptions
from jobs.demo_corpus import build_demo_corpus
from lake.tables import Lake

from conftest import ROOT, make_recipe, write_jsonl
from test_pii import DECOYS, POSITIVES
from test_rules import JUNK, first_failure

NAMES = ["Li Wei", "Wang Fang", "Zhang Min", "Liu Yang", "Chen Jing", "Yang Lei", "Zhao Qiang", "Huang Li"]
ROLES = ["lead", "design", "testing", "data", "backend", "mobile", "security", "support"]
# Passes every filter rule, but more than half of its characters are e-mail addresses and phones.
CONTACT_LIST = "Contacts of the project team and the review board:\n" + "\n".join(
    f"{n}, {r}: {n.split()[1].lower()}{i}@corp.cn {1381234 * 10000 + i}" for i, (n, r) in enumerate(zip(NAMES, ROLES))
)
BUILTIN_PII = [(kind, text) for kind, text in POSITIVES if kind not in ("EMPLOYEE_ID", "NAME")]


def _pii_value(text: str) -> str:
    """The PII value inside a POSITIVES sentence (what must disappear)."""
    from jobs.pii import Scrubber

    scrubber = Scrubber.build()
    for _, find in scrubber.detectors:
        for start, end in find(text):
            return text[start:end]
    raise AssertionError(text)


@pytest.fixture(scope="module")
def refined(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    built = {b.name: b for b in build_demo_corpus(tmp / "demo", {"zh_news": 40, "zh_reviews": 5, "en_docs": 40, "code": 20})}

    def texts(name):
        return built[name].texts()

    # Host texts that pass every rule by themselves, so that only PII decides these documents' fate.
    bodies = [t for t in texts("en_docs") + texts("zh_news") if first_failure(t) is None]
    records, pii_values = [], []
    for i, (kind, sentence) in enumerate(BUILTIN_PII):
        records.append({"id": f"pii-{i}", "text": bodies[i] + "\n" + sentence + "\n" + bodies[-1 - i][:300]})
        pii_values.append(_pii_value(sentence))
    for i, decoy in enumerate(DECOYS):
        host = next(b for b in bodies[20:] if first_failure(b + "\n" + decoy) is None)
        records.append({"id": f"decoy-{i}", "text": host + "\n" + decoy})
    for name, (text, _) in JUNK.items():
        records.append({"id": f"junk-{name}", "text": text})
    records.append({"id": "mostly-pii", "text": CONTACT_LIST})
    for i, text in enumerate(texts("code")):
        records.append({"id": f"code-{i}", "text": text})
    data = write_jsonl(tmp / "in" / "part-0.jsonl", records)
    recipe = make_recipe(tmp, [{"name": "mix", "path": str(data), "id_field": "id"}])
    ingest.run(spark, recipe)
    dry = filter_rules.run(spark, recipe, FilterOptions(dry_run=True))
    dry_exists = Lake(recipe.lake).exists("documents_filtered")
    report = filter_rules.run(spark, recipe)
    pii_report = scrub_pii.run(spark, recipe)
    return recipe, records, pii_values, report, pii_report, dry, dry_exists


def _doc_ids(spark, recipe, records):
    from jobs.records import make_doc_id

    return {make_doc_id("mix", r["id"], ""): r["id"] for r in records}


def test_counts_in_equal_kept_plus_rejected_at_each_stage(spark, refined):
    recipe, records, _, report, pii_report, *_ = refined
    lake = Lake(recipe.lake, spark)
    rejected = lake.read("documents_rejected").groupBy("stage").count().collect()
    by_stage = {r["stage"]: r["count"] for r in rejected}
    raw, filtered, clean = (lake.read(t).count() for t in ("documents_raw", "documents_filtered", "documents_clean"))
    assert raw == len(records)
    assert report.documents_in == raw == filtered + by_stage["filter"]
    assert pii_report.documents_in == filtered == clean + by_stage["pii"]
    assert report.kept == filtered


def test_injected_pii_is_gone_and_decoys_are_intact(spark, refined):
    recipe, records, pii_values, *_ = refined
    lake = Lake(recipe.lake, spark)
    ids = _doc_ids(spark, recipe, records)
    clean = {ids[r.doc_id]: r for r in lake.read("documents_clean").collect()}
    all_text = "\n".join(r.text for r in clean.values())
    for value in pii_values:
        assert value not in all_text, value
    pii_docs = [k for k in clean if k.startswith("pii-")]
    assert len(pii_docs) == len(pii_values)  # none of them was lost on the way
    for i, decoy in enumerate(DECOYS):
        assert decoy in clean[f"decoy-{i}"].text
        assert clean[f"decoy-{i}"].pii in (None, {})
    kinds = {}
    for k in pii_docs:
        for kind, n in clean[k].pii.items():
            kinds[kind] = kinds.get(kind, 0) + n
    assert set(kinds) == {"EMAIL", "PHONE", "ID_NUMBER", "BANK_CARD", "IP"}


def test_junk_is_rejected_with_the_right_rule_and_mostly_pii_too(spark, refined):
    recipe, records, *_ = refined
    lake = Lake(recipe.lake, spark)
    ids = _doc_ids(spark, recipe, records)
    rejected = {ids[r.doc_id]: r for r in lake.read("documents_rejected").collect()}
    for name, (_, rule) in JUNK.items():
        row = rejected[f"junk-{name}"]
        assert (row.stage, row.reason) == ("filter", rule), name
        assert row.detail.startswith(f"{rule}: ")
    assert (rejected["mostly-pii"].stage, rejected["mostly-pii"].reason) == ("pii", "mostly_pii")
    assert "@" not in rejected["mostly-pii"].text  # the audit copy is scrubbed too
    kept_code = [k for k in ids.values() if k.startswith("code-") and k not in rejected]
    assert len(kept_code) >= 18  # prose rules do not remove code


def test_signals_are_kept_and_the_report_is_written(spark, refined):
    recipe, _, _, report, _, dry, dry_exists = refined
    row = Lake(recipe.lake, spark).read("documents_filtered").first()
    assert {"n_chars", "dup_line_frac", "han_frac", "dup_5gram_frac"} <= set(row.signals)
    data = json.loads(Path(report.report_dir, "report.json").read_text())
    assert data["documents_in"] == report.documents_in and data["kept"] == report.kept
    rules = {r["rule"]: r for r in data["rules"]}
    assert rules["url_heavy"]["removed"] >= 1 and rules["url_heavy"]["samples"]
    assert sum(r["removed"] for r in data["rules"]) == report.documents_in - report.kept
    md = Path(report.report_dir, "report.md").read_text()
    assert "| rule | removed | alone | flagged |" in md and "## url_heavy: samples" in md
    # The dry run computed the same decisions and wrote no table.
    assert not dry_exists and dry.kept == report.kept and dry.dry_run


def test_a_rule_removing_more_than_warn_share_of_a_source_warns_and_fails_under_strict(spark, refined):
    from jobs.shifts import shifts
    from jobs.stages import StageError

    recipe, *_ = refined
    touchy = recipe.model_copy(update={"filter": recipe.filter.model_copy(update={"warn_share": 0.005})})
    report = filter_rules.run(spark, touchy, FilterOptions(dry_run=True))
    inputs = {s: c["in"] for s, c in report.by_source.items()}
    removed = {(r["rule"], s): n for r in report.rules for s, n in r["by_source"].items()}
    want = [(k, s) for (k, s), n in removed.items() if n / inputs[s] > 0.005]
    assert want and sorted((x.key, x.source) for x in report.shifts) == sorted(want)
    assert [x.key for x in shifts(inputs, removed, 0.005)] == [x.key for x in report.shifts]  # the job's is the function's
    shown = str(report)
    assert all(f"warning: {x}" in shown for x in report.shifts) and "e.g. " in shown
    assert json.loads(Path(report.report_dir, "report.json").read_text())["shifts"][0]["rule"] == report.shifts[0].key
    assert not filter_rules.run(spark, recipe, FilterOptions(dry_run=True)).shifts  # at the default 30%: none here
    lake = Lake(recipe.lake, spark)
    before = {t: lake.delta(t).version() for t in ("documents_filtered", "documents_rejected")}
    with pytest.raises(StageError, match=f"filter --strict: nothing committed, because {report.shifts[0].key} removed"):
        filter_rules.run(spark, touchy, FilterOptions(strict=True))
    assert {t: lake.delta(t).version() for t in before} == before


@pytest.mark.slow
def test_refine_cli_and_spark_submit(refined, tmp_path):
    recipe = refined[0]
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"lake: {recipe.lake}\nsources: [{{name: mix, path: '{recipe.sources[0].path}', id_field: id}}]\n"
                           "spark: {master: 'local[1]'}\n")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    bindir = os.path.dirname(sys.executable)
    proc = subprocess.run([os.path.join(bindir, "spark-submit"), "--master", "local[1]", str(ROOT / "jobs" / "filter_rules.py"),
                           "--recipe", str(recipe_file), "--dry-run"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run, nothing written" in proc.stdout and "report:" in proc.stdout
    proc = subprocess.run([os.path.join(bindir, "tokenmill"), "refine", "--recipe", str(recipe_file), "--stages", "pii,filter"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.index("[refine] filter") < proc.stdout.index("[refine] pii")  # pipeline order


@pytest.mark.slow
def test_packaged_archive_runs_with_spark_submit_outside_the_repository(refined, tmp_path):
    from jobs.package import build

    recipe = refined[0]
    outside = tmp_path / "elsewhere"
    archive = build(outside)
    import zipfile

    names = set(zipfile.ZipFile(archive).namelist())
    assert {"jobs/filter_rules.py", "schemas/tables.py", "lake/artifacts.py", "trainer/daemon.py"} <= names
    # the archive alone carries the project's code: imported from it, jobs comes from the zip
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(archive)!r}); import jobs.filter_rules, "
                            "jobs; print(jobs.__file__)"], capture_output=True, text=True, cwd=outside)
    assert probe.returncode == 0 and probe.stdout.strip().startswith(str(archive)), probe.stderr
    recipe_file = outside / "r.yaml"
    recipe_file.write_text(f"lake: {recipe.lake}\nsources: [{{name: mix, path: '{recipe.sources[0].path}', id_field: id}}]\n")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[1]",
                           "--py-files", "tokenmill.zip", "jobs/filter_rules.py", "--recipe", "r.yaml", "--dry-run"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=outside)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run, nothing written" in proc.stdout
