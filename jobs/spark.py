"""The one way jobs get a SparkSession: local mode on a laptop, whatever spark-submit set on a cluster."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from pyspark import SparkConf
from pyspark.sql import SparkSession

from lake.recipe import Recipe


def get_spark(app_name: str, recipe: Recipe | None = None) -> SparkSession:
    # Executors must run the same interpreter as the driver, or pandas/pyarrow versions diverge.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    settings = recipe.spark if recipe is not None else None
    builder = SparkSession.builder.appName(app_name)
    if not SparkConf().contains("spark.master"):  # spark-submit sets it; a plain `python -m` does not
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode needs no network interface
        builder = builder.master(os.environ.get("TOKENMILL_SPARK_MASTER", settings.master if settings else "local[*]"))
        builder = builder.config("spark.driver.memory", settings.driver_memory if settings else "4g")
    builder = (
        builder.config("spark.sql.shuffle.partitions", str(settings.shuffle_partitions if settings else 8))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.parquet.compression.codec", "zstd")
        # Delta's timestamp is microseconds since the epoch in UTC, not Spark's legacy INT96.
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        # The bridge commits exactly the parquet files a write produced: no marker or summary files.
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.hadoop.parquet.summary.metadata.level", "NONE")
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in (settings.conf if settings else {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("TOKENMILL_SPARK_LOG_LEVEL", "WARN"))
    return spark


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
