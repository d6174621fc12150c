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
