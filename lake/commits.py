"""What every Delta commit of the lake shares, on either path: its tags, predicates and URIs."""

from __future__ import annotations

from deltalake import CommitProperties


def spark_uri(uri: str) -> str:
    # delta-rs says s3://, Hadoop's S3 connector is s3a://.
    return "s3a://" + uri[len("s3://"):] if uri.startswith("s3://") else uri


def sql_predicate(where: dict[str, str]) -> str:
    return " AND ".join(f"{col} = '{val.replace(chr(39), chr(39) * 2)}'" for col, val in where.items())


def commit_properties(job: str | None, rows: int, strict: bool) -> CommitProperties:
    # An overwrite prepared from version N must land as N+1: retrying on top of a concurrent commit
    # could silently keep (or drop) that commit's rows, so a stale overwrite fails instead.
    return CommitProperties(
        custom_metadata={"tokenmill.job": job or "", "tokenmill.rows": str(rows)},
        max_commit_retries=0 if strict else None,
    )
