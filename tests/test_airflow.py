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
    assert "tokenmill_refine" in dagbag.dags


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
