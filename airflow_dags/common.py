"""What the tokenmill DAGs share: settings from Airflow Variables, and the failure callback."""

from __future__ import annotations

import logging
import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
log = logging.getLogger("tokenmill.airflow")


def variable(name: str, default: str) -> str:
    """An Airflow Variable, else ``AIRFLOW_VAR_<NAME>``, else the default."""
    from airflow.sdk import Variable

    try:
        return Variable.get(name, default=default)
    except Exception:  # no metadata database while parsing (tests, first start): use the default
        return os.environ.get(f"AIRFLOW_VAR_{name.upper()}", default)


def report_failure(context) -> None:
    ti = context["task_instance"]
    log.error("tokenmill task %s failed in run %s of %s; its log says why, and a rerun repairs its output",
              ti.task_id, context["run_id"], ti.dag_id)
