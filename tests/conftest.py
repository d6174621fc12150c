"""Shared fixtures: ONE local Spark session for the whole suite, and throwaway lakes."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TOKENMILL_SPARK_LOG_LEVEL", "ERROR")


def pytest_collection_modifyitems(session, config, items):
    """The S3 tests need SeaweedFS built from source (minutes on a fresh machine): when they are among
    the tests to run, the build starts now, at low priority, while the tests before them run."""
    if any(item.path.name == "test_s3_lake.py" for item in items):
        import s3server

        s3server.build_in_background()


def pytest_sessionfinish(session, exitstatus):
    if "s3server" in sys.modules:
        sys.modules["s3server"].stop_background_build()


@pytest.fixture(scope="session")
def spark():
    from lake.recipe import Spark
    from jobs.spark import get_spark
    from lake.jars import delta_coordinates, fetch

    if os.environ.get("TOKENMILL_DELTA_MODE") != "bridge":
        # the Delta jars (once, into .tokenmill/jars) for the native path's tests.
        # Offline: TOKENMILL_DELTA_MODE=bridge before pytest skips them and runs the bridge alone.
        fetch(delta_coordinates())

    class _Settings:  # a recipe stand-in carrying only Spark settings sized for CI's 2 cores (no S3 lake)
        lake = ""
        spark = Spark(master="local[2]", shuffle_partitions=2, driver_memory="2g", conf={"spark.ui.enabled": "false"})

    session = get_spark("tokenmill-tests", _Settings())
    # The session carries the jars; the rest of the suite (and the jobs it starts as subprocesses)
    # stays on the bridge, while tests/test_lake.py runs its table tests on both paths (native=True).
    os.environ.setdefault("TOKENMILL_DELTA_MODE", "bridge")
    yield session
    session.stop()


def require_native(spark) -> None:
    """Skip a native-path test only when the run was started offline on the bridge; else the jars must be there."""
    from lake.native import delta_classes_loaded

    if not delta_classes_loaded(spark) and os.environ.get("TOKENMILL_DELTA_MODE") == "bridge":
        pytest.skip("TOKENMILL_DELTA_MODE=bridge before the run: the native path is not under test")
    assert delta_classes_loaded(spark), "the Delta jars are not on the test session's classpath (tokenmill jars)"


@contextmanager
def delta_mode(mode: str):
    """``TOKENMILL_DELTA_MODE`` set to ``bridge`` or ``native`` inside the block, restored after."""
    before = os.environ.get("TOKENMILL_DELTA_MODE")
    os.environ["TOKENMILL_DELTA_MODE"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENMILL_DELTA_MODE")
        else:
            os.environ["TOKENMILL_DELTA_MODE"] = before


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """A real Spark standalone cluster on loopback (a master and two one-core workers, tests/standalone.py),
    started once for the tests that submit to it, with the Delta jars fetched for their spark-submits."""
    import standalone
    from lake.jars import delta_coordinates, fetch

    fetch(delta_coordinates())
    cluster = standalone.start(tmp_path_factory.mktemp("standalone"), workers=2)
    yield cluster
    cluster.stop()


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
