"""Shared fixtures: ONE local Spark session for the whole suite, and throwaway lakes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TOKENMILL_SPARK_LOG_LEVEL", "ERROR")


@pytest.fixture(scope="session")
def spark():
    from lake.recipe import Spark
    from jobs.spark import get_spark
    from lake.jars import delta_coordinates, fetch

    if os.environ.get("TOKENMILL_DELTA_MODE") != "bridge":
        # the Delta jars (once, into .tokenmill/jars) for the native path's tests.
        # Offline: TOKENMILL_DELTA_MODE=bridge before pytest skips them and runs the bridge alone.
        fetch(delta_coordinates())

    class _Settings:  # a recipe stand-in carrying only Spark settings sized for CI's 2 cores
        spark = Spark(master="local[2]", shuffle_partitions=2, driver_memory="2g", conf={"spark.ui.enabled": "false"})

    session = get_spark("tokenmill-tests", _Settings())
    # The session carries the jars; the rest of the suite (and the jobs it starts as subprocesses)
    # stays on the bridge, while tests/test_lake.py runs its table tests on both paths (native=True).
    os.environ.setdefault("TOKENMILL_DELTA_MODE", "bridge")
    yield session
    session.stop()


@pytest.fixture
def lake_root(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def make_recipe(tmp_path: Path, sources: list[dict], **sections):
    """A validated recipe whose lake lives under tmp_path."""
    from lake.recipe import parse_recipe

    raw = {"lake": str(tmp_path / "lake"), "sources": sources, **sections}
    return parse_recipe(raw, base_dir=tmp_path, origin=str(tmp_path / "recipe.yaml"))
