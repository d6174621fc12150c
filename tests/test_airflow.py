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


def test_a_package_folder_gives_the_entry_scripts_and_the_archive(monkeypatch, tmp_path):
    """Workers without the checkout: ``tokenmill_package`` names a ``tokenmill package`` folder.
    (``airflow dags test tokenmill_refine`` from such a folder to the standalone master runs in
    tests/test_cluster.py.)"""
    from airflow_dags.common import entry_script, py_files_default
    from jobs.package import build
    from jobs.stages import REFINE

    monkeypatch.delenv("AIRFLOW_VAR_TOKENMILL_PY_FILES", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_TOKENMILL_PACKAGE", raising=False)
    assert entry_script(REFINE[0]) == str(ROOT / "jobs" / "ingest.py") and py_files_default() == ""
    build(tmp_path / "pkg")
    monkeypatch.setenv("AIRFLOW_VAR_TOKENMILL_PACKAGE", str(tmp_path / "pkg"))
    for stage in REFINE:
        assert entry_script(stage) == str(tmp_path / "pkg" / "jobs" / f"{stage.module}.py")
        assert os.path.isfile(entry_script(stage))
    assert py_files_default() == str(tmp_path / "pkg" / "tokenmill.zip")
    monkeypatch.setenv("AIRFLOW_VAR_TOKENMILL_PY_FILES", "/srv/other.zip")  # an explicit archive wins
    assert py_files_default() == "/srv/other.zip"
