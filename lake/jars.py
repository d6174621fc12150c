"""The jars Spark needs beside pip's pyspark: Delta Lake (``delta-spark``, ``delta-storage``) at the
version of the installed ``delta-spark`` package, built for the installed pyspark; and for an
``s3://`` lake, ``hadoop-aws`` at the Hadoop version inside pyspark with the AWS SDK v2 bundle and the
S3 analytics accelerator at the versions hadoop-aws's POM names.

    tokenmill jars                 fetch the Delta jars from Maven Central into the jar folder (once)
    tokenmill jars --s3            also hadoop-aws, the AWS SDK bundle and the S3 analytics accelerator (about 690 MB, once)

The jar folder is ``$TOKENMILL_JARS`` or ``<project>/.tokenmill/jars``. With the Delta jars there,
a Spark session the jobs start themselves runs native Delta (``jobs/spark.py``); without them it
uses the delta-rs bridge, which needs no JVM jars (an offline laptop). With the S3 jars there, the
same sessions reach an ``s3://`` lake through Hadoop's ``s3a://`` connector. Under spark-submit,
pass the same jars with ``--jars`` (``tokenmill jars`` prints the line).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from importlib.metadata import version
from pathlib import Path

MAVEN = os.environ.get("TOKENMILL_MAVEN_REPO", "https://repo1.maven.org/maven2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What hadoop-aws needs at run time, at the versions its parent POM (hadoop-project) sets: the AWS SDK v2
# bundle and the S3 analytics accelerator (its input streams). A Hadoop version not listed here is
# looked up in that POM.
S3_RUNTIME = {"software.amazon.awssdk:bundle": "aws-java-sdk-v2.version",
              "software.amazon.s3.analyticsaccelerator:analyticsaccelerator-s3": "amazon-s3-analyticsaccelerator-s3.version"}
S3_VERSIONS_FOR_HADOOP = {"3.5.0": {"aws-java-sdk-v2.version": "2.35.4",
                                    "amazon-s3-analyticsaccelerator-s3.version": "1.3.1"}}


def jar_folder() -> Path:
    return Path(os.environ.get("TOKENMILL_JARS") or PROJECT_ROOT / ".tokenmill" / "jars")


def delta_coordinates() -> list[str]:
    """Maven coordinates of the Delta jars for the installed delta-spark and pyspark (Scala 2.13)."""
    delta = version("delta-spark")
    spark_minor = ".".join(version("pyspark").split(".")[:2])
    return [f"io.delta:delta-spark_{spark_minor}_2.13:{delta}", f"io.delta:delta-storage:{delta}"]


def s3_coordinates() -> list[str]:
    """hadoop-aws at the Hadoop version inside pyspark, and what it needs at run time at the versions
    it was built with."""
    hadoop = hadoop_version()
    versions = S3_VERSIONS_FOR_HADOOP.get(hadoop) or pom_versions(hadoop, list(S3_RUNTIME.values()))
    return [f"org.apache.hadoop:hadoop-aws:{hadoop}"] + [f"{ga}:{versions[prop]}" for ga, prop in S3_RUNTIME.items()]


def hadoop_version() -> str:
    """The Hadoop client version pyspark ships (from its ``hadoop-client-api-<v>.jar``)."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    found = sorted(jars.glob("hadoop-client-api-*.jar"))
    if not found:
        raise FileNotFoundError(f"no hadoop-client-api-*.jar in {jars}: reinstall pyspark (pip install -c "
                                f"configs/constraints.txt pyspark)")
    return found[0].name.removeprefix("hadoop-client-api-").removesuffix(".jar")


def pom_versions(hadoop: str, properties: list[str]) -> dict[str, str]:
    """The version properties hadoop-aws ``hadoop`` is built with: its POM's parent, hadoop-project, sets them."""
    pom = _get(f"{MAVEN}/{_path(f'org.apache.hadoop:hadoop-aws:{hadoop}', 'pom')}").decode()
    parent = re.search(r"<parent>.*?<artifactId>([^<]+)</artifactId>\s*<version>([^<]+)</version>", pom, re.S)
    if parent is None:
        raise LookupError(f"hadoop-aws {hadoop}'s POM has no parent POM to take the versions from")
    props = _get(f"{MAVEN}/{_path(f'org.apache.hadoop:{parent.group(1)}:{parent.group(2)}', 'pom')}").decode()
    out = {}
    for prop in properties:
        found = re.search(rf"<{re.escape(prop)}>([^<]+)</{re.escape(prop)}>", props)
        if found is None:
            raise LookupError(f"{parent.group(1)} {parent.group(2)}'s POM sets no {prop}")
        out[prop] = found.group(1)
    return out


def _path(coordinate: str, ext: str = "jar") -> str:
    group, artifact, ver = coordinate.split(":")
    return f"{group.replace('.', '/')}/{artifact}/{ver}/{artifact}-{ver}.{ext}"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - Maven Central over https
        return response.read()


def _download(url: str, target: Path) -> str:
    """Stream ``url`` into ``target`` (large jars never sit whole in memory); returns its sha1."""
    digest = hashlib.sha1()  # noqa: S324 - Maven publishes sha1
    with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as out:  # noqa: S310
        while block := response.read(1 << 22):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def local_jar(coordinate: str, folder: Path | None = None) -> Path:
    return (folder or jar_folder()) / Path(_path(coordinate)).name


def present(coordinates: list[str], folder: Path | None = None) -> list[Path] | None:
    """The jars' paths when all of them are in the folder, else None."""
    paths = [local_jar(c, folder) for c in coordinates]
    return paths if all(p.is_file() for p in paths) else None


def fetch(coordinates: list[str], folder: Path | None = None, log=print) -> list[Path]:
    """Download what is missing from Maven Central, each jar checked against its published sha1."""
    folder = folder or jar_folder()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for c in coordinates:
        target = local_jar(c, folder)
        if not target.is_file():
            url = f"{MAVEN}/{_path(c)}"
            log(f"[jars] {c} ← {url}")
            expected = _get(url + ".sha1").decode().split()[0]
            partial = target.with_suffix(".part")
            try:
                if _download(url, partial) != expected:
                    raise OSError(f"{url}: its sha1 is not the published {expected}; try again later")
                partial.replace(target)  # a download cut short never looks like a jar
            finally:
                partial.unlink(missing_ok=True)
        out.append(target)
    return out


def delta_jars() -> list[Path] | None:
    """The Delta jars when they have been fetched (``tokenmill jars``), else None."""
    return present(delta_coordinates())


def s3_jars() -> list[Path] | None:
    """hadoop-aws and its run-time jars when they have been fetched (``tokenmill jars --s3``), else None."""
    return present(s3_coordinates())


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser("tokenmill jars", description=__doc__.split("\n\n")[0])
    parser.add_argument("--s3", action="store_true",
                        help="also hadoop-aws, the AWS SDK v2 bundle and the S3 analytics accelerator, for an s3:// lake (about 690 MB)")
    args = parser.parse_args(argv)
    try:
        coordinates = delta_coordinates() + (s3_coordinates() if args.s3 else [])
        paths = fetch(coordinates)
    except (OSError, LookupError) as e:
        print(f"tokenmill jars: could not fetch from {MAVEN} ({e}); without the Delta jars the jobs use the "
              f"delta-rs bridge{'' if not args.s3 else ', and without the S3 jars Spark cannot reach an s3:// lake'}. "
              f"Set TOKENMILL_MAVEN_REPO to a mirror, or copy the jars into {jar_folder()}")
        return 1
    print(f"{len(paths)} jars in {jar_folder()}; for spark-submit: --jars {','.join(str(p) for p in paths)}")
    return 0
