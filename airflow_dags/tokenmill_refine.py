"""Airflow DAG ``tokenmill_refine``: the refinery's stages in order (``jobs.stages.REFINE``), each a
spark-submit of jobs/<module>.py (this checkout's, or a ``tokenmill package`` folder's).

No pipeline logic lives here: each task runs the same entry point a user runs by hand. Settings come
from the DAG's params (set per run in the UI or with ``airflow dags trigger --conf``), whose defaults
come from Airflow Variables:
- ``tokenmill_recipe``: the recipe path every stage gets (default: the embedded demo recipe);
- ``tokenmill_spark_conn``: the Spark connection (default ``spark_default``; Airflow 3 creates none:
  define it, e.g. ``AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "spark://head", "port": 7077}'``
  for a standalone master, ``'{"conn_type": "spark", "host": "local[2]"}'`` for local mode);
- ``tokenmill_package``: a folder ``tokenmill package --out`` wrote, for workers without this
  checkout: its ``jobs/<module>.py`` are submitted and its ``tokenmill.zip`` is the default archive;
- ``tokenmill_py_files``: the archive shipped with ``--py-files`` on a cluster (empty when tokenmill
  is installed in the Spark Python);
- ``tokenmill_jars``: the Delta jars for ``--jars`` (see ``airflow_dags.common.submit_settings``).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param

from airflow_dags.common import PROJECT, entry_script, py_files_default, report_failure, submit_settings, variable
from jobs.stages import REFINE


with DAG(
    dag_id="tokenmill_refine",
    description=" → ".join(s.name for s in REFINE) + ", one spark-submit per stage",
    schedule=None,
    catchup=False,
    params={
        "recipe": Param(variable("tokenmill_recipe", str(PROJECT / "configs" / "demo.yaml")), type="string"),
        "py_files": Param(py_files_default(), type="string"),
    },
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "on_failure_callback": report_failure,
    },
    tags=["tokenmill"],
) as dag:
    submit = submit_settings()
    previous = None
    for stage in REFINE:  # the declared refinery stages, in pipeline order
        task = SparkSubmitOperator(
            task_id=stage.name,
            application=entry_script(stage),
            application_args=["--recipe", "{{ params.recipe }}"],
            name=f"tokenmill-{stage.name}",
            **submit,
        )
        if previous is not None:
            previous >> task
        previous = task
