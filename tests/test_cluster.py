"""The refinery on a real Spark standalone cluster (a master and two workers on loopback), submitted
the way cluster users submit it, from a ``tokenmill package`` folder outside the checkout, native
Delta from the jars: the refine stages by ``airflow dags test tokenmill_refine`` (its Spark
connection the standalone master, its entry scripts and archive the package folder's, SQLite as
Airflow's database), then the tokenizer and feed by spark-submit in client mode by hand.

The same corpus is also refined in this process in local mode on the delta-rs bridge, so every stage
runs on both Delta paths (the jar on the cluster, the bridge here), and both lakes must hold the same
result. (Native Delta in local mode is tested table by table in tests/test_lake.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.demo_corpus import build_demo_corpus
from jobs.stages import REFINE, STAGES
from lake import chunks
from lake.artifacts import load_tokenizer
from lake.jars import delta_jars
from lake.recipe import load_recipe
from lake.tables import Lake

from conftest import ROOT, delta_mode, require_native

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # every stage spark-submitted: minutes on 2 cores

SIZES = {"zh_news": 60, "zh_reviews": 30, "en_docs": 60, "code": 30}
BEFORE_MODELS = ("ingest", "filter", "pii")  # the classifiers learn from what these keep and reject


def write_recipe(work: Path, corpus: Path, name: str) -> Path:
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo["lake"] = str(work / name / "lake")
    for src in demo["sources"]:
        src["path"] = str(corpus / src["name"] / Path(src["path"]).name)
    demo["tokenizer"]["vocab_size"] = 2048
    demo["feed"]["chunk_tokens"] = 20000
    demo["feed"]["stages"]["pretrain"]["seq_len"] = 128
    path = work / name / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(demo))
    return path


def copy_models(source, recipe) -> None:
    """The classifiers ``source``'s lake published, into ``recipe``'s lake (fastText's multithreaded
    training is not reproducible, so every run scores with the same models)."""
    shutil.copytree(Path(source.lake) / "models", Path(recipe.lake) / "models", dirs_exist_ok=True)
    shutil.rmtree(Path(recipe.lake) / "models" / "tokenizer", ignore_errors=True)


def refine_here(spark, recipe) -> None:
    """Every stage in this process's local-mode session; the classifiers trained after pii."""
    from quality_models import train as qm

    for s in STAGES:
        if s.name == "score":
            qm.derive_weak_labels(recipe)
            for task in ("domain", "quality"):
                qm.train_model(recipe, task, "fasttext")
        s.run(spark, recipe)


def airflow(cluster, package: Path, home: Path):
    """``airflow <args>`` as a user with a ``tokenmill package`` folder and a standalone master runs it."""
    bindir = os.path.dirname(sys.executable)
    host, port = cluster.url.rsplit(":", 1)
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "airflow_dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": host, "port": int(port)}),
           "AIRFLOW_VAR_TOKENMILL_JARS": ",".join(str(j) for j in delta_jars()),
           "AIRFLOW_VAR_TOKENMILL_PACKAGE": str(package),
           "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    for key in ("TOKENMILL_SPARK_MASTER", "TOKENMILL_DELTA_MODE"):  # the suite's own settings: the jobs choose
        env.pop(key, None)                                          # native from the jars, the master from spark-submit

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(bindir, "airflow"), *args], capture_output=True, text=True, env=env,
                              cwd=package, timeout=1800)
    return run


@pytest.fixture(scope="module")
def runs(spark, standalone_cluster, tmp_path_factory):
    """The same corpus refined in local mode on the bridge, and on the cluster with the jar."""
    from jobs.package import build

    require_native(spark)
    work = tmp_path_factory.mktemp("cluster-e2e")
    corpus = work / "corpus"
    build_demo_corpus(corpus, SIZES)
    local = {"bridge": load_recipe(write_recipe(work, corpus, "bridge"))}
    with delta_mode("bridge"):
        refine_here(spark, local["bridge"])

    outside = work / "elsewhere"  # the user's folder: the archive, the entry scripts, a recipe
    build(outside)
    shutil.copy(write_recipe(work, corpus, "cluster"), outside / "recipe.yaml")
    cluster = load_recipe(outside / "recipe.yaml")
    copy_models(local["bridge"], cluster)  # the same classifiers, in the cluster's lake, read there by lake URI
    before = {a["id"] for a in standalone_cluster.applications()}
    outputs = {}
    run_airflow = airflow(standalone_cluster, outside, work / "airflow")
    migrated = run_airflow("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-4000:]
    dag = run_airflow("dags", "test", "tokenmill_refine", "-c", json.dumps({"recipe": str(outside / "recipe.yaml")}))
    assert dag.returncode == 0 and "state=success" in dag.stdout + dag.stderr, dag.stdout[-4000:] + dag.stderr[-4000:]
    for s in REFINE:
        outputs[s.name] = dag.stdout + dag.stderr
    for s in STAGES:
        if s not in REFINE:
            proc = standalone_cluster.submit(f"jobs/{s.module}.py", ["--recipe", "recipe.yaml"], cwd=outside,
                                             py_files="tokenmill.zip")
            assert proc.returncode == 0, f"{s.name}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            outputs[s.name] = proc.stdout
    apps = [a for a in standalone_cluster.applications() if a["id"] not in before]
    return local, cluster, outputs, apps


def test_every_stage_ran_on_the_clusters_executors(runs, standalone_cluster):
    _, _, outputs, apps = runs
    assert sorted(a["name"] for a in apps) == sorted(f"tokenmill-{s.name}" for s in STAGES), apps
    assert all(a["state"] == "FINISHED" for a in apps), apps
    for app in apps:
        logs = standalone_cluster.executor_logs(app["id"])
        assert logs, f"{app['name']}: no executor ran on a worker"
        assert any("Running task" in p.read_text(errors="replace") for p in logs), app["name"]
    for name, out in outputs.items():
        assert f"[{name}] Spark master {standalone_cluster.url}" in out, (name, out[-1000:])  # never a silent local mode


def lake_result(recipe) -> dict:
    """What a refinery run decides, read back from its lake."""
    lake = Lake(recipe.lake)
    out = {name: sorted(lake.read_arrow(name, columns=["doc_id"]).column("doc_id").to_pylist())
           for name in ("documents_raw", "documents_clean", "documents_scored", "documents_dedup")}
    out["scores"] = {r["doc_id"]: (r["category"], round(r["quality"], 5)) for r in
                     lake.read_arrow("documents_scored", columns=["doc_id", "category", "quality"]).to_pylist()}
    out["tokenizer"] = load_tokenizer(recipe)[1]["sha256"]
    out["chunks"] = [(r["chunk_id"], r["n_tokens"], r["sha256"]) for r in chunks.manifest(lake)]
    return out


def test_the_cluster_with_the_jar_and_the_local_bridge_give_the_same_lake(runs):
    local, cluster, _, _ = runs
    expected = lake_result(local["bridge"])
    assert expected["documents_dedup"] and expected["chunks"] and expected["chunks"][0][1] > 0
    assert lake_result(cluster) == expected


def test_the_cluster_wrote_through_delta_spark_and_the_bridge_through_delta_rs(runs):
    """The jar's commits carry the job in userMetadata; the bridge's carry tokenmill.* keys."""
    local, cluster, _, _ = runs
    for name in ("documents_raw", "documents_dedup"):
        history = Lake(cluster.lake).delta(name).history()
        assert history[0]["operation"] == "WRITE" and history[0].get("userMetadata") in ("ingest", "dedup"), history[0]
    lake = Lake(cluster.lake)
    dedup_rejected = sum(1 for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "dedup")
    assert lake.summary("documents_dedup").rows + dedup_rejected == lake.summary("documents_scored").rows
    history = Lake(local["bridge"].lake).delta("documents_dedup").history()
    assert "userMetadata" not in history[0] and history[0]["tokenmill.job"] == "dedup", history[0]
