"""What the tokenmill DAGs share: settings from Airflow Variables, and the failure callback."""

from __future__ import annotations

import logging
import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
log = logging.getLogger("tokenmill.airflow")


def variable(name: str, default: str) -> str:
    """An Airflow Variable (``AIRFLOW_VAR_<NAME>`` in the environment, then the metadata database), else
    the default when it is not set. A failure to read it (an unreachable database or secrets backend)
    is raised, never mistaken for "not set": a DAG must not quietly run the demo recipe."""
    from airflow.sdk import Variable

    return Variable.get(name, default=default)


def package_folder() -> str:
    """The ``tokenmill_package`` Variable: a folder ``tokenmill package --out`` wrote, for Airflow
    workers that have no checkout (the DAGs then submit its entry scripts, with its archive as the
    default ``--py-files``); empty for this checkout."""
    return variable("tokenmill_package", "")


def entry_script(stage) -> str:
    """The spark-submit application of a declared stage: ``jobs/<module>.py`` in the package folder,
    else in this checkout."""
    return str(Path(package_folder() or PROJECT) / "jobs" / f"{stage.module}.py")


def py_files_default() -> str:
    """The ``py_files`` param's default: the ``tokenmill_py_files`` Variable, else the package
    folder's ``tokenmill.zip``, else none (tokenmill installed in the Spark Python)."""
    folder = package_folder()
    return variable("tokenmill_py_files", str(Path(folder) / "tokenmill.zip") if folder else "")


def submit_settings() -> dict:
    """The SparkSubmitOperator arguments every tokenmill task shares, from the Variables:
    ``tokenmill_spark_conn`` (default ``spark_default``), ``tokenmill_py_files`` (the ``--py-files``
    archive, through the DAG's ``py_files`` param) and ``tokenmill_jars`` (the Delta jars for
    ``--jars``, comma-separated; default: the ones ``tokenmill jars`` fetched on this machine, empty
    for none). With jars the stages run native Delta, the SQL extension and catalog set with them;
    without, the delta-rs bridge."""
    from jobs.spark import DELTA_SQL_CONF
    from lake.jars import delta_jars

    jars = variable("tokenmill_jars", ",".join(str(j) for j in delta_jars() or []))
    return {
        "conn_id": variable("tokenmill_spark_conn", "spark_default"),
        "py_files": "{{ params.py_files }}",  # rendered empty: no --py-files
        "jars": jars or None,
        "conf": dict(DELTA_SQL_CONF) if jars else None,
        "env_vars": {"PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", "python3")},
    }


def report_failure(context) -> None:
    ti = context["task_instance"]
    log.error("tokenmill task %s failed in run %s of %s; its log says why, and a rerun repairs its output",
              ti.task_id, context["run_id"], ti.dag_id)
