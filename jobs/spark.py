"""The one way jobs get a SparkSession: local mode on a laptop, whatever spark-submit set on a cluster."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from pyspark import SparkConf
from pyspark.sql import SparkSession

from lake.errors import LakeError
from lake.fs import is_s3, require_safe_commits, s3_endpoint, s3_region
from lake.jars import delta_jars, s3_jars
from lake.recipe import Recipe


PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


def get_spark(app_name: str, recipe: Recipe | None = None) -> SparkSession:
    # Executors must run the same interpreter as the driver, or pandas/pyarrow versions diverge.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    settings = recipe.spark if recipe is not None else None
    lake = recipe.lake if recipe is not None else ""
    require_safe_commits(lake)
    builder = SparkSession.builder.appName(app_name)
    master = choose_master(submitted_master(), os.environ.get("TOKENMILL_SPARK_MASTER"),
                           settings.master if settings else "local[*]")
    if master is not None:  # no spark-submit: this process starts Spark itself
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode needs no network interface
        builder = builder.master(master)
        builder = builder.config("spark.driver.memory", settings.driver_memory if settings else "4g")
        builder = with_jars(builder, lake)
    for key, value in s3a_conf(lake).items():
        builder = builder.config(key, value)
    partitions = str(settings.shuffle_partitions if settings else 8)
    builder = (
        builder.config("spark.sql.shuffle.partitions", partitions)
        # delta-spark rebuilds a table's state from its log with 50 tasks per snapshot (its default), many
        # times per job: on a cluster each task is a round trip to an executor, a second or so on small
        # tables. The recipe's partition count is what the lake's tables are sized for.
        .config("spark.databricks.delta.snapshotPartitions", partitions)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.parquet.compression.codec", "zstd")
        # Delta's timestamp is microseconds since the epoch in UTC, not Spark's legacy INT96.
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        # The bridge commits exactly the parquet files a write produced: no marker or summary files.
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.hadoop.parquet.summary.metadata.level", "NONE")
        .config("spark.ui.showConsoleProgress", "false")
        # Python workers start in the job's working folder, first on their path: a data folder there
        # named like one of our packages (a lake at ./lake) would stand in for it as a namespace
        # package. With the project's own folder on their path the real package is found first.
        .config("spark.executorEnv.PYTHONPATH", PROJECT_ROOT)
    )
    for key, value in (settings.conf if settings else {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("TOKENMILL_SPARK_LOG_LEVEL", "WARN"))
    return spark


DELTA_SQL_CONF = {"spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
                  "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog"}


def with_jars(builder, lake: str = ""):
    """``spark.jars`` for a session this process starts: the Delta jars (native Delta as Delta's docs
    set it up, ``spark.jars`` + the SQL extension and catalog) when they have been fetched (``tokenmill
    jars``) and ``TOKENMILL_DELTA_MODE`` is not ``bridge``; and hadoop-aws with the AWS SDK for an
    ``s3://`` lake, whose Delta commits are delta-rs's alone (the bridge; ``lake/native.py`` says why)."""
    mode = os.environ.get("TOKENMILL_DELTA_MODE")
    native = mode == "native" or (mode != "bridge" and not is_s3(lake))
    jars = (delta_jars() or []) if native else []
    if jars:
        for key, value in DELTA_SQL_CONF.items():
            builder = builder.config(key, value)
    if is_s3(lake):
        s3 = s3_jars()
        if not s3:
            raise LakeError(f"the lake {lake} is on S3 and Spark needs hadoop-aws and the AWS SDK for it: run "
                            f"`tokenmill jars --s3` (once), or pass them with spark-submit --jars")
        jars = [*jars, *s3]
    return builder.config("spark.jars", ",".join(str(j) for j in jars)) if jars else builder


def s3a_conf(lake: str) -> dict[str, str]:
    """Hadoop s3a settings for an ``s3://`` lake, from the environment every AWS client reads
    (``lake/fs.py``): the endpoint and path-style requests for an S3-compatible server, the region.
    Credentials stay in the environment (s3a's default chain reads ``AWS_ACCESS_KEY_ID``), never in
    Spark's conf; a recipe's ``spark.conf`` overrides any of these."""
    if not is_s3(lake):
        return {}
    conf = {"spark.hadoop.fs.s3a.endpoint.region": s3_region() or "us-east-1"}
    endpoint = s3_endpoint()
    if endpoint:
        conf |= {"spark.hadoop.fs.s3a.endpoint": endpoint, "spark.hadoop.fs.s3a.path.style.access": "true",
                 "spark.hadoop.fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https://")).lower()}
    return conf


def submitted_master() -> str | None:
    """The master spark-submit was given, when spark-submit started this process; else None.

    spark-submit runs a Python application with the JVM already up (``PYSPARK_GATEWAY_PORT`` set);
    its settings are only visible once Python is connected to that JVM, so connect first, then ask.
    A plain ``python -m`` or ``tokenmill`` has no JVM yet, and connecting would start one too early
    (before the driver's memory is set)."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkContext

    SparkContext._ensure_initialized()  # noqa: SLF001 - attaches to spark-submit's JVM, starts nothing
    return SparkConf().get("spark.master", None)


def choose_master(submitted: str | None, environment: str | None, recipe_master: str) -> str | None:
    """The master to set, or None to keep spark-submit's: spark-submit's ``--master`` wins, then
    ``TOKENMILL_SPARK_MASTER``, then the recipe's ``spark.master``."""
    if submitted:
        return None
    return environment or recipe_master


@contextmanager
def session_conf(spark: SparkSession, settings: dict[str, str]):
    """Runtime SQL settings for the work inside the block, the session's own values restored after."""
    before = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield spark
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
