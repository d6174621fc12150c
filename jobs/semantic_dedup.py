"""Semantic dedup (SemDeDup, Abbas et al. 2023): the optional last phase of the dedup job.

Near-dedup finds copies that share shingles; a paraphrase shares few. Here the documents near-dedup
kept are embedded by the BERT-family encoder (``quality_models.bert_backend``, all-MiniLM-L6-v2 by
default, normalised mean-pooled vectors), grouped by Spark ML's k-means (cosine distance, about
``cluster_size`` documents per cluster), and inside each cluster every pair is compared: ranked by
``survivor_order`` (as near-dedup ranks), a document whose cosine with a higher-ranked kept one is at least
``threshold`` is removed, naming that one (``survivors``, a plain function). Pairs in different
k-means clusters are never compared: the price of not comparing all n² pairs (``bench/semantic_dedup.py``
measures the recall against exact all-pairs cosine).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from jobs.dedup_batches import survivor_order
from lake.recipe import Recipe

STAGE = "dedup"
REASON = "semantic_duplicate"
CATEGORY = "semantic"  # dedup_clusters.category of a semantic pair
_ENCODERS: dict[tuple[str, int], object] = {}


def survivors(embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For rows ranked best first (normalised vectors): the row each one is removed for (-1: kept), and
    its cosine with that row. A row is removed when a higher-ranked *kept* row is at least
    ``threshold`` similar; it names the most similar such row."""
    n = len(embeddings)
    kept_for = np.full(n, -1, np.int64)
    similarity = np.zeros(n)
    kept: list[int] = []
    sims = embeddings @ embeddings.T if n <= 4096 else None
    rows = None if sims is not None else np.empty_like(embeddings)  # the kept rows, in order (no copy per row)
    for i in range(n):
        if kept:
            row = sims[i, kept] if sims is not None else rows[: len(kept)] @ embeddings[i]
            j = int(np.argmax(row))
            if row[j] >= threshold:
                kept_for[i], similarity[i] = kept[j], float(row[j])
                continue
        if rows is not None:
            rows[len(kept)] = embeddings[i]
        kept.append(i)
    return kept_for, similarity


def _embed_batches(recipe: Recipe):
    cfg = recipe.dedup.semantic

    def embed(batches):
        from quality_models.bert_backend import Encoder, default_backbone

        key = (cfg.backbone or default_backbone(), cfg.max_tokens)
        if key not in _ENCODERS:  # once per Python worker process, not per partition
            _ENCODERS[key] = Encoder(key[0], max_tokens=cfg.max_tokens)
        encoder = _ENCODERS[key]
        for batch in batches:
            vectors = encoder.embed(batch.column("text").to_pylist())
            yield pa.RecordBatch.from_arrays(
                [batch.column("doc_id"), pa.array(list(vectors), pa.list_(pa.float32()))], ["doc_id", "embedding"])

    return embed


def _pairs_in_cluster(threshold: float):
    def pairs(table: pa.Table) -> pa.Table:
        ids, rank = table["doc_id"].to_pylist(), table["_rank"].to_pylist()
        order = sorted(range(table.num_rows), key=rank.__getitem__)  # survivor_order, ranked in Spark
        vectors = np.array(table["embedding"].to_pylist(), np.float32)[order] if order else np.zeros((0, 1), np.float32)
        kept_for, similarity = survivors(vectors, threshold)
        gone = np.flatnonzero(kept_for >= 0)
        cluster = table["kmeans"][0].as_py() if table.num_rows else 0
        return pa.table({"doc_id": pa.array([ids[order[i]] for i in gone], pa.string()),
                         "kept_doc_id": pa.array([ids[order[kept_for[i]]] for i in gone], pa.string()),
                         "similarity": pa.array(similarity[gone], pa.float64()),
                         "kmeans": pa.array([cluster] * len(gone), pa.int32())})

    return pairs


def semantic_duplicates(kept, recipe: Recipe):
    """(documents kept, ``documents_rejected`` rows, ``dedup_clusters`` rows) after semantic dedup of
    ``kept`` (documents_dedup rows); the new ones materialised."""
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    cfg = recipe.dedup.semantic
    kept = kept.localCheckpoint(eager=True)
    n = kept.count()
    k = max(1, math.ceil(n / cfg.cluster_size))
    embedded = kept.select("doc_id", "text").mapInArrow(_embed_batches(recipe), "doc_id string, embedding array<float>") \
        .localCheckpoint(eager=True)
    vectors = embedded.withColumn("features", array_to_vector("embedding"))
    if k > 1:
        model = KMeans(k=k, seed=recipe.dedup.seed, distanceMeasure="cosine", featuresCol="features",
                       predictionCol="kmeans").fit(vectors)
        grouped = model.transform(vectors).select("doc_id", "embedding", F.col("kmeans").cast("int"))
    else:
        grouped = vectors.select("doc_id", "embedding", F.lit(0).cast("int").alias("kmeans"))
    ranked = grouped.join(kept.select("doc_id", "quality", F.length("text").alias("length")), "doc_id") \
        .withColumn("_rank", F.row_number().over(Window.partitionBy("kmeans").orderBy(*survivor_order()))) \
        .select("doc_id", "embedding", "kmeans", "_rank")
    removed = ranked.groupBy("kmeans").applyInArrow(
        _pairs_in_cluster(cfg.threshold), "doc_id string, kept_doc_id string, similarity double, kmeans int") \
        .localCheckpoint(eager=True)
    now = datetime.now(timezone.utc)
    rejected = removed.join(kept.select("doc_id", "source", "text"), "doc_id").select(
        "doc_id", "source", F.lit(STAGE).alias("stage"), F.lit(REASON).alias("reason"),
        F.format_string("kept %s: cosine %.3f, threshold %.2f (k-means cluster %d of %d)", "kept_doc_id", "similarity",
                        F.lit(cfg.threshold), "kmeans", F.lit(k)).alias("detail"),
        "text", F.lit(now).cast("timestamp").alias("rejected_at"))
    heads = removed.select(F.col("kept_doc_id").alias("doc_id")).distinct()
    lineage = removed.select("doc_id", F.col("kept_doc_id").alias("cluster_id"), "kept_doc_id", "similarity") \
        .unionByName(heads.select("doc_id", F.col("doc_id").alias("cluster_id"), F.col("doc_id").alias("kept_doc_id"),
                                  F.lit(1.0).alias("similarity"))) \
        .select("doc_id", "cluster_id", "kept_doc_id", "similarity", F.lit(cfg.threshold).alias("threshold"),
                F.lit(CATEGORY).alias("category"))
    survivors_ = kept.join(removed.select("doc_id"), "doc_id", "left_anti") \
        .join(heads.withColumn("_head", F.col("doc_id")), "doc_id", "left") \
        .withColumn("cluster_id", F.coalesce("cluster_id", "_head")).drop("_head")
    embedded.unpersist()
    return survivors_, rejected, lineage, k


def merged_lineage(near, semantic):
    """``dedup_clusters`` rows of both phases, one per document: a document semantic dedup removed has
    its semantic row (the near cluster it headed, if any, still names it as kept); a semantic head
    already in a near cluster keeps its near row."""
    from pyspark.sql import functions as F

    removed = semantic.where(F.col("doc_id") != F.col("kept_doc_id"))
    heads = semantic.where(F.col("doc_id") == F.col("kept_doc_id"))
    near = near.join(removed.select("doc_id"), "doc_id", "left_anti")
    return near.unionByName(removed).unionByName(heads.join(near.select("doc_id"), "doc_id", "left_anti"))
