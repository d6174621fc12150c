"""The jars Spark needs beside pip's pyspark: Delta Lake (``delta-spark``, ``delta-storage``) at the
version of the installed ``delta-spark`` package, built for the installed pyspark.

    tokenmill jars                 fetch them from Maven Central into the jar folder (once)

The jar folder is ``$TOKENMILL_JARS`` or ``<project>/.tokenmill/jars``. With the Delta jars there,
a Spark session the jobs start themselves runs native Delta (``jobs/spark.py``); without them it
uses the delta-rs bridge, which needs no JVM jars (an offline laptop). Under spark-submit, pass the
same jars with ``--jars`` (``tokenmill jars`` prints the line).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from importlib.metadata import version
from pathlib import Path

MAVEN = os.environ.get("TOKENMILL_MAVEN_REPO", "https://repo1.maven.org/maven2")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def jar_folder() -> Path:
    return Path(os.environ.get("TOKENMILL_JARS") or PROJECT_ROOT / ".tokenmill" / "jars")


def delta_coordinates() -> list[str]:
    """Maven coordinates of the Delta jars for the installed delta-spark and pyspark (Scala 2.13)."""
    delta = version("delta-spark")
    spark_minor = ".".join(version("pyspark").split(".")[:2])
    return [f"io.delta:delta-spark_{spark_minor}_2.13:{delta}", f"io.delta:delta-storage:{delta}"]


def _path(coordinate: str, ext: str = "jar") -> str:
    group, artifact, ver = coordinate.split(":")
    return f"{group.replace('.', '/')}/{artifact}/{ver}/{artifact}-{ver}.{ext}"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 - Maven Central over https
        return response.read()


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
            data = _get(url)
            expected = _get(url + ".sha1").decode().split()[0]
            if hashlib.sha1(data).hexdigest() != expected:  # noqa: S324 - Maven publishes sha1
                raise OSError(f"{url}: its sha1 is not the published {expected}; try again later")
            partial = target.with_suffix(".part")
            partial.write_bytes(data)
            partial.replace(target)  # a download cut short never looks like a jar
        out.append(target)
    return out


def delta_jars() -> list[Path] | None:
    """The Delta jars when they have been fetched (``tokenmill jars``), else None."""
    return present(delta_coordinates())


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser("tokenmill jars", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    coordinates = delta_coordinates()
    try:
        paths = fetch(coordinates)
    except OSError as e:
        print(f"tokenmill jars: could not fetch from {MAVEN} ({e}); without the Delta jars the jobs use the "
              f"delta-rs bridge. Set TOKENMILL_MAVEN_REPO to a mirror, or copy the jars into {jar_folder()}")
        return 1
    print(f"{len(paths)} jars in {jar_folder()}; for spark-submit: --jars {','.join(str(p) for p in paths)}")
    return 0
