"""Airflow DAG ``tokenmill_feed``: keep the trainer's backlog of ready chunks full.

    backlog_low (short-circuit: fewer than N ready chunks?) → [tokenizer, when asked] → feed

Each step runs the same entry point a user runs by hand: ``jobs/feed.py --until-ready N`` and
``jobs/train_tokenizer.py`` (both from ``jobs.stages``) through spark-submit; the backlog check is
``lake.chunks.backlog_below``.
Params (defaults from Airflow Variables): ``recipe`` (``tokenmill_recipe``), ``backlog``
(``tokenmill_backlog``, default 4), ``retrain_tokenizer`` (false), ``py_files``
(``tokenmill_py_files``; the entry scripts and archive of a ``tokenmill_package`` folder as in
``tokenmill_refine``); the Spark connection and jars as ``airflow_dags.common.submit_settings``
says. Scheduled every 10 minutes; one run at a time, since one feed per lake.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Param

from airflow_dags.common import PROJECT, entry_script, py_files_default, report_failure, submit_settings, variable
from jobs.stages import stage


def _backlog_low(recipe: str, backlog: int) -> bool:
    from lake.chunks import backlog_below

    return backlog_below(recipe, int(backlog))


def _tokenizer_asked(retrain) -> bool:
    return str(retrain).strip().lower() in ("true", "1", "yes")  # templated params arrive as text


with DAG(
    dag_id="tokenmill_feed",
    description="keep N ready chunks for the trainer: feed --until-ready N (tokenizer only when asked)",
    schedule=timedelta(minutes=10),
    catchup=False,
    max_active_runs=1,
    params={
        "recipe": Param(variable("tokenmill_recipe", str(PROJECT / "configs" / "demo.yaml")), type="string"),
        "backlog": Param(int(variable("tokenmill_backlog", "4")), type="integer", minimum=1),
        "retrain_tokenizer": Param(False, type="boolean"),
        "py_files": Param(py_files_default(), type="string"),
    },
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "on_failure_callback": report_failure},
    tags=["tokenmill"],
) as dag:
    submit = submit_settings()
    backlog_low = ShortCircuitOperator(
        task_id="backlog_low", python_callable=_backlog_low,
        op_kwargs={"recipe": "{{ params.recipe }}", "backlog": "{{ params.backlog }}"},
    )
    tokenizer_asked = ShortCircuitOperator(
        task_id="tokenizer_asked", python_callable=_tokenizer_asked,
        op_kwargs={"retrain": "{{ params.retrain_tokenizer }}"}, ignore_downstream_trigger_rules=False,
    )
    tokenizer = SparkSubmitOperator(
        task_id="tokenizer", application=entry_script(stage("tokenizer")),
        application_args=["--recipe", "{{ params.recipe }}"], name="tokenmill-tokenizer", **submit,
    )
    feed = SparkSubmitOperator(
        task_id="feed", application=entry_script(stage("feed")),
        application_args=["--recipe", "{{ params.recipe }}", "--until-ready", "{{ params.backlog }}"],
        name="tokenmill-feed", trigger_rule="none_failed", **submit,
    )
    backlog_low >> tokenizer_asked >> tokenizer >> feed
    backlog_low >> feed
