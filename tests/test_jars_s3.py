"""``tokenmill jars --s3``: hadoop-aws at pyspark's Hadoop version and the AWS SDK bundle its POM names,
fetched from Maven Central with their published sha1 checked."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pyspark
import pytest

from lake import jars


def test_s3_coordinates_follow_pysparks_hadoop_and_hadoop_aws_pom():
    shipped = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    hadoop = shipped[0].name.removeprefix("hadoop-client-api-").removesuffix(".jar")
    assert jars.hadoop_version() == hadoop
    aws, sdk, accelerator = jars.s3_coordinates()
    assert aws == f"org.apache.hadoop:hadoop-aws:{hadoop}"
    published = jars.pom_versions(hadoop, list(jars.S3_RUNTIME.values()))  # what Maven Central says today
    assert sdk == f"software.amazon.awssdk:bundle:{published['aws-java-sdk-v2.version']}"
    assert accelerator == ("software.amazon.s3.analyticsaccelerator:analyticsaccelerator-s3:"
                           f"{published['amazon-s3-analyticsaccelerator-s3.version']}")


def test_fetch_checks_the_published_sha1_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    aws = jars.s3_coordinates()[0]
    (path,) = jars.fetch([aws], tmp_path, log=lambda _: None)
    published = urllib.request.urlopen(f"{jars.MAVEN}/{jars._path(aws)}.sha1", timeout=60).read().decode().split()[0]
    assert hashlib.sha1(path.read_bytes()).hexdigest() == published  # noqa: S324
    assert jars.present([aws], tmp_path) == [path]

    real_get = jars._get
    monkeypatch.setattr(jars, "_get", lambda url: b"0" * 40 if url.endswith(".sha1") else real_get(url))
    storage = jars.delta_coordinates()[1]  # a small jar
    with pytest.raises(OSError, match="sha1 is not the published"):
        jars.fetch([storage], tmp_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no jar, no .part


def test_tokenmill_jars_s3_prints_the_spark_submit_line(tmp_path, monkeypatch, capsys):
    real = jars.fetch(jars.delta_coordinates() + jars.s3_coordinates(), log=lambda _: None)  # once, into .tokenmill/jars
    for p in real:
        (tmp_path / p.name).symlink_to(p)
    monkeypatch.setenv("TOKENMILL_JARS", str(tmp_path))
    assert jars.s3_jars() == [tmp_path / p.name for p in real[2:]]
    assert jars.main(["--s3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("--jars " + ",".join(str(tmp_path / p.name) for p in real))
    monkeypatch.setenv("TOKENMILL_JARS", str(tmp_path / "empty"))
    assert jars.s3_jars() is None
