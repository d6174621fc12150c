"""The trainer's held-out documents: per source, the documents with the smallest sha256 of their
doc_id, ``per_source`` of them but no more than 10% of the source. The trainer measures perplexity
per source on them; feed never puts them in a chunk. Both sides ask this module, so they agree."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

MAX_SHARE = 0.1  # a small source keeps at least 90% of its documents for training


def holdout_ids(docs: list[dict], per_source: int) -> set[str]:
    """The held-out doc_ids of ``docs`` (dicts with doc_id and source)."""
    by_source: dict[str, list[str]] = {}
    for d in docs:
        by_source.setdefault(d["source"], []).append(hashlib.sha256(d["doc_id"].encode()).hexdigest() + d["doc_id"])
    return {h[64:] for hs in by_source.values()
            for h in sorted(hs)[: min(per_source, int(len(hs) * MAX_SHARE))]}


def without_holdout(docs: DataFrame, per_source: int) -> DataFrame:
    """``docs`` less the held-out documents: the same rule as ``holdout_ids``, in Spark."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy("source").orderBy(F.sha2("doc_id", 256), "doc_id")
    limit = F.least(F.lit(per_source), F.floor(F.count("*").over(Window.partitionBy("source")) * MAX_SHARE))
    return docs.withColumn("_held", F.row_number().over(order) <= limit).where(~F.col("_held")).drop("_held")
