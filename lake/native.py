"""The native path: the Delta jar is on Spark's classpath (a cluster), and Spark reads and writes
``format("delta")`` itself.

Not on S3: delta-spark's only S3 log store in ``delta-storage`` is ``S3SingleDriverLogStore``,
whose mutual exclusion ends at its own JVM, so a second driver (another run of the job) or a delta-rs
writer (the bridge, feed, the trainer) could overwrite its commit silently. On an ``s3://`` lake
every commit is delta-rs's conditional put (``lake/fs.require_safe_commits``); native writes there
are refused, native reads are fine."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from lake.commits import spark_uri, sql_predicate
from lake.errors import ConflictError, LakeError
from lake.fs import is_s3

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


def delta_jar_available(spark: SparkSession) -> bool:
    """True when delta-spark's classes are on the JVM classpath (``TOKENMILL_DELTA_MODE=native|bridge``
    forces one path)."""
    forced = os.environ.get("TOKENMILL_DELTA_MODE")
    if forced in ("native", "bridge"):
        return forced == "native"
    return delta_classes_loaded(spark)


def delta_classes_loaded(spark: SparkSession) -> bool:
    """True when delta-spark's classes are on the session's JVM classpath, whatever the mode says."""
    return on_classpath(spark, "io.delta.tables.DeltaTable")


def on_classpath(spark: SparkSession, class_name: str) -> bool:
    from py4j.protocol import Py4JJavaError

    jvm = spark.sparkContext._jvm  # noqa: SLF001 - py4j is the only way to ask the classpath
    try:
        jvm.java.lang.Class.forName(class_name, False, jvm.Thread.currentThread().getContextClassLoader())
        return True
    except Py4JJavaError as err:  # only "not on the classpath" means no jar; any other failure is raised
        if err.java_exception.getClass().getName() == "java.lang.ClassNotFoundException":
            return False
        raise


def read(spark: SparkSession, uri: str) -> DataFrame:
    return spark.read.format("delta").load(spark_uri(uri))


def write(uri: str, df: DataFrame, mode: str, replace_where: dict[str, str] | None, job: str | None,
          version: Callable[[], int]) -> int:
    """One Delta commit by delta-spark, tagged with the job (``userMetadata``); returns the table's new
    version. A commit that lost to a concurrent one raises ConflictError, as on the bridge."""
    if is_s3(uri):
        raise LakeError(f"table at {uri}: delta-spark cannot commit safely to S3 beside other writers (its "
                        f"S3SingleDriverLogStore excludes only its own JVM); on an s3:// lake the bridge commits "
                        f"with delta-rs: set TOKENMILL_DELTA_MODE=bridge (or unset it) and leave the Delta jars "
                        f"out of spark-submit --jars")
    writer = df.write.format("delta").mode(mode).option("userMetadata", job or "")
    if replace_where:
        writer = writer.option("replaceWhere", sql_predicate(replace_where))
    try:
        writer.save(spark_uri(uri))
    except Exception as err:
        if not any(word in str(err) for word in CONFLICTS):
            raise
        raise ConflictError(f"table at {uri}: another writer committed while this {mode} was prepared; nothing "
                            f"of this write was committed. Rerun the job once the other writer has finished. "
                            f"({str(err).splitlines()[0]})") from None
    return version()


# delta-spark's optimistic-concurrency failures (io.delta.exceptions.*), as py4j shows them
CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
             "ConcurrentTransactionException", "MetadataChangedException", "ProtocolChangedException",
             "DELTA_CONCURRENT")
