"""The DAGs parse with zero import errors and run the stages in pipeline order."""

import os

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "airflow_dags"))


def test_every_dag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"tokenmill_refine", "tokenmill_feed"} <= set(dagbag.dags)


def test_refine_dag_submits_each_stage_in_order(dagbag):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    dag = dagbag.dags["tokenmill_refine"]
    order = [t.task_id for t in dag.topological_sort()]
    assert order == ["ingest", "filter", "pii", "score", "dedup"]
    for task in dag.tasks:
        assert isinstance(task, SparkSubmitOperator)
        assert task.application.endswith((".py",)) and os.path.isfile(task.application)
        assert task.application_args == ["--recipe", "{{ params.recipe }}"]
        assert task.retries == 2 and task.on_failure_callback
    assert dag.params["recipe"].endswith("configs/demo.yaml")


def test_tasks_pass_the_delta_jars_with_their_sql_settings(monkeypatch):
    from airflow_dags.common import submit_settings
    from jobs.spark import DELTA_SQL_CONF

    monkeypatch.setenv("AIRFLOW_VAR_TOKENMILL_JARS", "/jars/delta-spark.jar,/jars/delta-storage.jar")
    monkeypatch.setenv("AIRFLOW_VAR_TOKENMILL_SPARK_CONN", "spark_cluster")
    settings = submit_settings()
    assert settings["jars"] == "/jars/delta-spark.jar,/jars/delta-storage.jar" and settings["conf"] == DELTA_SQL_CONF
    assert settings["conn_id"] == "spark_cluster"
    monkeypatch.setenv("AIRFLOW_VAR_TOKENMILL_JARS", "")  # no jars: the bridge, and no Delta SQL settings
    settings = submit_settings()
    assert settings["jars"] is None and settings["conf"] is None


def test_a_variable_that_cannot_be_read_is_an_error_not_the_demo_recipe(monkeypatch):
    from airflow.sdk import Variable

    from airflow_dags.common import variable

    monkeypatch.setenv("AIRFLOW_VAR_TOKENMILL_RECIPE", "/srv/recipes/web.yaml")
    assert variable("tokenmill_recipe", "configs/demo.yaml") == "/srv/recipes/web.yaml"
    monkeypatch.delenv("AIRFLOW_VAR_TOKENMILL_RECIPE")
    assert variable("tokenmill_recipe", "configs/demo.yaml") == "configs/demo.yaml"  # not set: the default

    def unreachable(*args, **kwargs):
        raise ConnectionError("metadata database at db:5432 refused the connection")

    monkeypatch.setattr(Variable, "get", unreachable)
    with pytest.raises(ConnectionError, match="refused"):
        variable("tokenmill_recipe", "configs/demo.yaml")


def test_feed_dag_checks_the_backlog_then_feeds(dagbag, tmp_path):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    dag = dagbag.dags["tokenmill_feed"]
    tasks = {t.task_id: t for t in dag.tasks}
    assert set(tasks) == {"backlog_low", "tokenizer_asked", "tokenizer", "feed"}
    assert isinstance(tasks["feed"], SparkSubmitOperator)
    assert tasks["feed"].application_args == ["--recipe", "{{ params.recipe }}", "--until-ready", "{{ params.backlog }}"]
    assert tasks["feed"].trigger_rule == "none_failed"  # runs when the tokenizer step was skipped
    assert {t.task_id for t in tasks["backlog_low"].downstream_list} == {"tokenizer_asked", "feed"}
    assert dag.max_active_runs == 1
    assert tasks["tokenizer_asked"].python_callable("False") is False
    assert tasks["tokenizer_asked"].python_callable("true") is True
    # the backlog check reads the lake through jobs.feed: an empty lake has no ready chunk
    import yaml

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({"lake": str(tmp_path / "lake"), "sources": [{"name": "a", "path": "a.jsonl"}]}))
    assert tasks["backlog_low"].python_callable(str(recipe_file), "2") is True


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_airflow_dags_test_runs_the_refinery_on_the_standalone_cluster(spark, standalone_cluster, tmp_path):
    """`airflow dags test tokenmill_refine` on the demo recipe, its Spark connection the standalone
    master, the Delta jars from the ``tokenmill_jars`` Variable, SQLite as Airflow's database."""
    import json
    import subprocess
    import sys

    from jobs import filter_rules, ingest, scrub_pii
    from jobs.demo_corpus import demo_recipe_in
    from lake.jars import delta_jars
    from lake.tables import Lake
    from lake.recipe import load_recipe

    recipe_file = demo_recipe_in(tmp_path, {"zh_news": 60, "zh_reviews": 30, "en_docs": 60, "code": 30})  # small: CI time
    recipe = load_recipe(recipe_file)
    for stage in (ingest, filter_rules, scrub_pii):  # the classifiers learn from what these keep and reject
        stage.run(spark, recipe)
    bindir = os.path.dirname(sys.executable)
    for args in (["label"], ["train", "--task", "domain"], ["train", "--task", "quality"]):
        subprocess.run([os.path.join(bindir, "tokenmill"), "models", *args, "--recipe", str(recipe_file)], check=True,
                       capture_output=True)
    host, port = standalone_cluster.url.rsplit(":", 1)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "airflow_dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": host, "port": int(port)}),
           "AIRFLOW_VAR_TOKENMILL_JARS": ",".join(str(j) for j in delta_jars()),
           "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("TOKENMILL_DELTA_MODE")  # the suite's bridge setting: the jobs choose native from the jars
    before = {a["id"] for a in standalone_cluster.applications()}
    airflow = os.path.join(bindir, "airflow")
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.run([airflow, "dags", "test", "tokenmill_refine", "-c", json.dumps({"recipe": str(recipe_file)})],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "state=success" in proc.stdout + proc.stderr
    apps = [a for a in standalone_cluster.applications() if a["id"] not in before]
    assert sorted(a["name"] for a in apps) == sorted(f"tokenmill-{s}" for s in ("ingest", "filter", "pii", "score", "dedup"))
    assert all(a["state"] == "FINISHED" and standalone_cluster.executor_logs(a["id"]) for a in apps), apps
    lake = Lake(recipe.lake)
    for name in ("documents_scored", "documents_dedup", "dedup_clusters"):
        assert lake.exists(name) and [v.job for v in lake.versions(name)][0] in ("score", "dedup")
    assert lake.delta("documents_dedup").history()[0].get("userMetadata") == "dedup"  # written by the Delta jar
    kept = lake.summary("documents_dedup").rows
    dedup_rejected = sum(1 for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "dedup")
    assert kept + dedup_rejected == lake.summary("documents_scored").rows
