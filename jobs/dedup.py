"""Near-dedup: ``documents_scored`` → ``documents_dedup`` + ``dedup_clusters``.

    spark-submit jobs/dedup.py --recipe R [--incremental]   |   tokenmill refine --recipe R --stages dedup

1. optional line dedup: lines (or paragraphs) found in more than ``min_repeats`` documents are
   removed from every document first (boilerplate);
2. exact dedup: documents with the same normalised text are one group;
3. MinHash signatures and LSH band keys per document, in ``mapInArrow`` (``jobs/minhash.py``),
   banded for the loosest threshold of the recipe;
4. candidate pairs from shared band keys, each checked by its estimated Jaccard against its
   threshold (the domain's, else the category's; the stricter one across two);
5. connected components of the verified pairs, distributed (alternating large-star / small-star,
   Kiveris et al. 2014), with nothing collected to the driver but counts;
6. the survivor of each cluster is the highest ``quality``, then the longer text, then the smaller
   ``doc_id``; every member goes to ``dedup_clusters``, every removed one to ``documents_rejected``.

``--incremental`` dedups documents not seen by an earlier run against the documents that run kept,
without clustering the old corpus again: old kept documents are never removed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from jobs.docstage import spread
from lake.tables import Lake
from jobs.minhash import (ShingleSpec, band_keys, jaccard_estimate, normalize_for_dedup, optimal_params,
                          shingle_hashes, signatures, text_key)
from lake.recipe import Recipe
from jobs.stages import DedupOptions, stage_main
from schemas import table

STAGE = "dedup"
_SIG_DDL = ("doc_id string, text_key long, dkey string, threshold double, quality double, length long, "
            "sig binary, bands array<long>")


# -- pure parts (per Arrow batch) ------------------------------------------------------------------


def lsh_shape(recipe: Recipe) -> tuple[int, int, float]:
    """(bands, rows, loosest threshold): the banding every document gets."""
    cfg = recipe.dedup
    loosest = min([cfg.default_threshold, *cfg.thresholds.values()])
    bands, rows = optimal_params(loosest, cfg.num_perm, cfg.fp_weight, 1.0 - cfg.fp_weight)
    return bands, rows, loosest


def sign_batch(batch: pa.RecordBatch, recipe: Recipe, bands: int, rows: int) -> pa.RecordBatch:
    """Exact-text key, threshold, signature and band keys of each document of a batch."""
    cfg = recipe.dedup
    texts = batch.column("text").to_pylist()
    langs = batch.column("lang").to_pylist()
    specs = [ShingleSpec(s.unit, s.n) for s in (cfg.shingling(lang or "") for lang in langs)]
    normalized = normalize_for_dedup(texts, [s.unit for s in specs])
    sigs = signatures([shingle_hashes(t, s) for t, s in zip(normalized, specs)], cfg.num_perm, cfg.seed)
    keys = band_keys(sigs, bands, rows)
    chosen = [cfg.threshold_for(d, c) for d, c in zip(batch.column("domain").to_pylist(),
                                                       batch.column("category").to_pylist())]
    quality = batch.column("quality").to_numpy(zero_copy_only=False)
    return pa.RecordBatch.from_pydict({
        "doc_id": batch.column("doc_id"),
        "text_key": pa.array([text_key(t) for t in normalized], pa.int64()),
        "dkey": pa.array([key for _, key in chosen], pa.string()),
        "threshold": pa.array([th for th, _ in chosen], pa.float64()),
        "quality": pa.array(np.nan_to_num(quality.astype(np.float64), nan=-1.0), pa.float64()),
        "length": pa.array([len(t) for t in texts], pa.int64()),
        "sig": pa.array([row.tobytes() for row in sigs], pa.binary()),
        "bands": pa.array(list(keys), pa.list_(pa.int64())),
    })


def _sig_matrix(column: pa.Array) -> np.ndarray:
    return np.frombuffer(b"".join(column.to_pylist()), np.uint32).reshape(len(column), -1)


def similarity_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Estimated Jaccard of each (sig_a, sig_b) row, appended as ``similarity``."""
    sim = jaccard_estimate(_sig_matrix(batch.column("sig_a")), _sig_matrix(batch.column("sig_b")))
    names = [n for n in batch.schema.names if n not in ("sig_a", "sig_b")]
    return pa.RecordBatch.from_arrays([batch.column(n) for n in names] + [pa.array(sim, pa.float64())],
                                      names=names + ["similarity"])


def line_keys(text: str, unit: str, min_chars: int) -> list[tuple[int, str]]:
    """(key, piece) for each line or paragraph of a text; blank and short pieces get no key (0)."""
    pieces = text.split("\n\n") if unit == "paragraph" else text.split("\n")
    out = []
    for piece in pieces:
        norm = " ".join(piece.split()).lower()
        out.append((text_key(norm) if len(norm) >= max(min_chars, 1) else 0, piece))
    return out


def remove_lines(text: str, boilerplate: set[int], unit: str, min_chars: int) -> tuple[str, int]:
    """The text without its boilerplate lines (or paragraphs), and how many were removed."""
    kept, removed = [], 0
    for key, piece in line_keys(text, unit, min_chars):
        if key and key in boilerplate:
            removed += 1
        else:
            kept.append(piece)
    return ("\n\n" if unit == "paragraph" else "\n").join(kept).strip(), removed


# -- connected components ----------------------------------------------------------------------------


def connected_components(edges, max_rounds: int = 64):
    """(node, root) for every node of an undirected edge DataFrame (u, v); root = the component's
    smallest node. Alternating large-star / small-star on DataFrames, checkpointed every round."""
    from pyspark.sql import functions as F

    def both_ways(e):
        return e.unionByName(e.select(F.col("v").alias("u"), F.col("u").alias("v")))

    # Checkpointed: each round reads its input several times, which must not recompute the edges.
    current = edges.select(F.least("u", "v").alias("u"), F.greatest("u", "v").alias("v")) \
        .where(F.col("u") != F.col("v")).distinct().localCheckpoint(eager=True)
    for _ in range(max_rounds):
        # Large-star: every larger neighbour of u links to the smallest of u's closed neighbourhood.
        nb = both_ways(current)
        smallest = nb.groupBy("u").agg(F.min("v").alias("m")).select("u", F.least("u", "m").alias("m"))
        large = nb.where(F.col("v") > F.col("u")).join(smallest, "u") \
            .select(F.col("v").alias("u"), F.col("m").alias("v")).distinct().localCheckpoint(eager=True)
        # Small-star: u and its smaller neighbours all link to the smallest of them.
        down = both_ways(large).where(F.col("v") < F.col("u"))
        low = down.groupBy("u").agg(F.min("v").alias("m"))
        small = down.join(low, "u").select(F.col("v").alias("u"), F.col("m").alias("v")) \
            .unionByName(low.select("u", F.col("m").alias("v"))) \
            .where(F.col("u") != F.col("v")) \
            .select(F.greatest("u", "v").alias("u"), F.least("u", "v").alias("v")).distinct()
        current = small.localCheckpoint(eager=True)
        # Converged when the edges are stars: one parent per node, and no parent has a parent.
        parents = current.groupBy("u").count().where(F.col("count") > 1).limit(1).count()
        chained = current.join(current.select(F.col("u").alias("v")).distinct(), "v").limit(1).count()
        if parents == 0 and chained == 0:
            roots = current.select(F.col("v").alias("node"), F.col("v").alias("root")).distinct()
            return current.select(F.col("u").alias("node"), F.col("v").alias("root")).unionByName(roots)
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")


# -- the job -----------------------------------------------------------------------------------------


@dataclass
class DedupReport:
    documents_in: int
    kept: int
    exact_removed: int
    near_removed: int
    boilerplate_only: int
    lines_removed: int
    clusters: int
    removed_by_key: dict[str, int] = field(default_factory=dict)
    bands: int = 0
    rows: int = 0
    incremental: bool = False
    seconds: float = 0.0
    version: int = 0

    def __str__(self) -> str:
        by = ", ".join(f"{k} {v}" for k, v in sorted(self.removed_by_key.items(), key=lambda kv: -kv[1])) or "none"
        mode = " (incremental: new documents against the kept corpus)" if self.incremental else ""
        return (
            f"dedup{mode}: {self.documents_in} documents in, {self.kept} kept, "
            f"{self.exact_removed} exact and {self.near_removed} near duplicates removed, "
            f"{self.boilerplate_only} only boilerplate; {self.clusters} clusters; "
            f"{self.lines_removed} boilerplate lines removed\n"
            f"  removed by threshold key: {by}\n"
            f"  LSH {self.bands} bands x {self.rows} rows; {self.seconds:.1f} s "
            f"({self.documents_in / max(self.seconds, 1e-9):,.0f} docs/s); documents_dedup version {self.version}"
        )


def _line_dedup(spark, docs, recipe: Recipe):
    """Documents with boilerplate lines removed (+ ``_lines_removed``), or the input when off."""
    from pyspark.sql import functions as F

    cfg = recipe.dedup.line_dedup
    if cfg is None:
        return docs.withColumn("_lines_removed", F.lit(0).cast("long"))
    unit, min_chars = cfg.unit, cfg.min_chars

    def keys_of(batches):
        for batch in batches:
            # one row per (document, distinct key): a line repeated inside one document counts once
            keys = [k for t in batch.column("text").to_pylist() for k in {k for k, _ in line_keys(t, unit, min_chars)} if k]
            yield pa.RecordBatch.from_pydict({"key": pa.array(keys, pa.int64())})

    frequent = docs.select("text").mapInArrow(keys_of, "key long").groupBy("key").count() \
        .where(F.col("count") > cfg.min_repeats)
    n_frequent = frequent.count()
    if n_frequent > 5_000_000:
        raise ValueError(f"dedup.line_dedup: {n_frequent:,} distinct lines occur in more than {cfg.min_repeats} "
                         "documents; raise dedup.line_dedup.min_repeats")
    boilerplate = spark.sparkContext.broadcast({r["key"] for r in frequent.select("key").collect()})
    from pyspark.sql.types import LongType, StructField, StructType

    names = docs.columns
    # a new StructType: DataFrame.schema is cached, and StructType.add would change it in place
    schema = StructType([*docs.schema.fields, StructField("_lines_removed", LongType())])

    def strip(batches):
        for batch in batches:
            out_text, removed = [], []
            for text in batch.column("text").to_pylist():
                t, n = remove_lines(text, boilerplate.value, unit, min_chars)
                out_text.append(t)
                removed.append(n)
            cols = [pa.array(out_text, pa.string()) if n == "text" else batch.column(n) for n in names]
            yield pa.RecordBatch.from_arrays(cols + [pa.array(removed, pa.int64())], names=names + ["_lines_removed"])

    return docs.mapInArrow(strip, schema)


def run(spark, recipe: Recipe, options: DedupOptions = DedupOptions()) -> DedupReport:
    """Remove exact and near duplicates from documents_scored into documents_dedup, with lineage."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    started = time.perf_counter()
    incremental = options.incremental
    lake = Lake(recipe.lake, spark)
    cfg = recipe.dedup
    bands, rows, _ = lsh_shape(recipe)
    now = datetime.now(timezone.utc)

    scored = lake.read("documents_scored")
    old_kept = None
    if incremental and lake.exists("documents_dedup"):
        old_kept = lake.read("documents_dedup").localCheckpoint(eager=True)  # the table is rewritten below
        seen = old_kept.select("doc_id")
        if lake.exists("documents_rejected"):
            seen = seen.unionByName(lake.read("documents_rejected").where(F.col("stage") == STAGE).select("doc_id"))
        scored = scored.join(seen, "doc_id", "left_anti")
    else:
        incremental = False
    # Materialised now: in incremental mode its definition reads tables this job rewrites.
    docs = _line_dedup(spark, spread(scored), recipe).localCheckpoint(eager=True)
    boilerplate_only = docs.where(F.length(F.trim("text")) == 0)
    docs_live = docs.where(F.length(F.trim("text")) > 0)

    sign_cols = ["doc_id", "text", "lang", "domain", "category", "quality"]
    to_sign = docs_live.select(*sign_cols).withColumn("is_old", F.lit(False))
    if old_kept is not None:
        to_sign = to_sign.unionByName(old_kept.select(*sign_cols).withColumn("is_old", F.lit(True)))

    def sign(batches):
        for batch in batches:
            signed = sign_batch(batch, recipe, bands, rows)
            yield pa.RecordBatch.from_arrays([*signed.columns, batch.column("is_old")],
                                             names=[*signed.schema.names, "is_old"])

    sigs = spread(to_sign).mapInArrow(sign, _SIG_DDL + ", is_old boolean").persist()

    # Exact groups: every copy links to the group's smallest doc_id; only that one is banded.
    by_text = Window.partitionBy("text_key")
    sigs_g = sigs.withColumn("rep", F.min("doc_id").over(by_text)).withColumn("group_new", F.max(~F.col("is_old")).over(by_text))
    exact_edges = sigs_g.where((F.col("doc_id") != F.col("rep")) & F.col("group_new")) \
        .select(F.col("doc_id").alias("u"), F.col("rep").alias("v")) if cfg.exact else None
    reps = sigs_g.where(F.col("doc_id") == F.col("rep")) if cfg.exact else sigs_g

    # LSH: documents sharing a band key are candidates; in a bucket each pairs with its next ones.
    bucket = Window.partitionBy("band", "key")
    banded = reps.select("doc_id", "is_old", F.posexplode("bands").alias("band", "key")) \
        .withColumn("size", F.count("*").over(bucket)).where(F.col("size") > 1) \
        .withColumn("rank", F.row_number().over(bucket.orderBy("doc_id"))).drop("size")
    x, y = banded.alias("x"), banded.alias("y")
    pairs = x.join(y, (F.col("x.band") == F.col("y.band")) & (F.col("x.key") == F.col("y.key"))
                   & (F.col("y.rank") > F.col("x.rank")) & (F.col("y.rank") <= F.col("x.rank") + cfg.max_bucket_pairs))
    if incremental:
        pairs = pairs.where(~(F.col("x.is_old") & F.col("y.is_old")))
    pairs = pairs.select(F.least("x.doc_id", "y.doc_id").alias("a"), F.greatest("x.doc_id", "y.doc_id").alias("b")).distinct()
    side = sigs.select("doc_id", "sig", "threshold")
    pairs = pairs.join(side.toDF("a", "sig_a", "th_a"), "a").join(side.toDF("b", "sig_b", "th_b"), "b") \
        .withColumn("threshold", F.greatest("th_a", "th_b")).select("a", "b", "threshold", "sig_a", "sig_b")
    verified = pairs.mapInArrow(lambda bs: (similarity_batch(b) for b in bs),
                                "a string, b string, threshold double, similarity double") \
        .where(F.col("similarity") >= F.col("threshold"))
    edges = verified.select(F.col("a").alias("u"), F.col("b").alias("v"))
    if exact_edges is not None:
        edges = edges.unionByName(exact_edges)
    components = connected_components(edges)

    # Survivor per cluster: old kept documents first (incremental), then quality, length, doc_id.
    members = components.join(sigs.withColumnRenamed("doc_id", "node"), "node")
    best = Window.partitionBy("root").orderBy(F.col("is_old").desc(), F.col("quality").desc(),
                                              F.col("length").desc(), F.col("node").asc())
    members = members.withColumn("kept_doc_id", F.first("node").over(best)).persist()
    kept_side = members.where(F.col("node") == F.col("kept_doc_id")).select(
        F.col("node").alias("kept_doc_id"), F.col("sig").alias("sig_b"), F.col("text_key").alias("kept_text_key"),
        F.col("threshold").alias("kept_threshold"))
    lineage = members.join(kept_side, "kept_doc_id").select(
        F.col("node").alias("a"), F.col("kept_doc_id").alias("b"),
        F.greatest("threshold", "kept_threshold").alias("threshold"), F.col("sig").alias("sig_a"), "sig_b",
    ).mapInArrow(lambda bs: (similarity_batch(b) for b in bs),
                 "a string, b string, threshold double, similarity double")
    clusters = lineage.join(members.select(F.col("node").alias("a"), "dkey", "text_key", "is_old"), "a") \
        .join(kept_side.select(F.col("kept_doc_id").alias("b"), "kept_text_key"), "b") \
        .select(F.col("a").alias("doc_id"), F.col("b").alias("cluster_id"), F.col("b").alias("kept_doc_id"),
                F.when(F.col("text_key") == F.col("kept_text_key"), F.lit(1.0)).otherwise(F.col("similarity")).alias("similarity"),
                "threshold", F.col("dkey").alias("category"),
                (F.col("text_key") == F.col("kept_text_key")).alias("_exact"), "is_old").localCheckpoint(eager=True)

    removed = clusters.where((F.col("doc_id") != F.col("kept_doc_id")) & ~F.col("is_old"))
    reason = F.when(F.col("_exact"), F.lit("exact_duplicate")).otherwise(F.lit("near_duplicate"))
    detail = F.when(F.col("_exact"), F.concat(F.lit("same normalised text as kept "), F.col("kept_doc_id"))).otherwise(
        F.format_string("kept %s: similarity %.3f, threshold %.2f (%s)%s", F.col("kept_doc_id"), F.col("similarity"),
                        F.col("threshold"), F.col("category"),
                        F.when(F.col("similarity") < F.col("threshold"), F.lit("; joined through other members"))
                        .otherwise(F.lit(""))))
    removed_rows = removed.select("doc_id", reason.alias("reason"), detail.alias("detail")) \
        .join(docs.select("doc_id", "source", "text"), "doc_id")
    rejected = removed_rows.select(
        "doc_id", "source", F.lit(STAGE).alias("stage"), "reason", "detail", "text",
        F.lit(now).cast("timestamp").alias("rejected_at"),
    ).unionByName(boilerplate_only.select(
        "doc_id", "source", F.lit(STAGE).alias("stage"), F.lit("boilerplate_only").alias("reason"),
        F.format_string("every line (%d) was boilerplate", F.col("_lines_removed")).alias("detail"),
        "text", F.lit(now).cast("timestamp").alias("rejected_at"),
    ))
    heads = clusters.where(F.col("doc_id") == F.col("kept_doc_id")).select("doc_id", F.col("cluster_id").alias("_cluster"))
    new_kept = docs_live.join(removed.select("doc_id"), "doc_id", "left_anti").join(heads, "doc_id", "left") \
        .withColumn("cluster_id", F.col("_cluster")).select(*table("documents_dedup").columns)
    cluster_rows = clusters.select(*table("dedup_clusters").columns)

    if incremental:
        # Old kept documents stay; one that now heads a cluster gets its cluster id.
        old = old_kept.join(heads, "doc_id", "left").withColumn("cluster_id", F.coalesce("_cluster", "cluster_id")) \
            .select(*table("documents_dedup").columns)
        kept_all = old.unionByName(new_kept)
        known = lake.read("dedup_clusters").select("doc_id") if lake.exists("dedup_clusters") else None
        new_clusters = cluster_rows.join(known, "doc_id", "left_anti") if known is not None else cluster_rows
        lake.write("documents_rejected", rejected, mode="append", job=STAGE)
        lake.write("dedup_clusters", new_clusters, mode="append", job=STAGE)
        version = lake.write("documents_dedup", kept_all, mode="overwrite", job=STAGE)
    else:
        lake.write("documents_rejected", rejected, mode="overwrite", replace_where={"stage": STAGE}, job=STAGE)
        lake.write("dedup_clusters", cluster_rows, mode="overwrite", job=STAGE)
        version = lake.write("documents_dedup", new_kept, mode="overwrite", job=STAGE)

    stats = removed.groupBy("category", "_exact").count().collect()
    n_in = docs.count()
    report = DedupReport(
        documents_in=n_in,
        kept=new_kept.count(),
        exact_removed=sum(r["count"] for r in stats if r["_exact"]),
        near_removed=sum(r["count"] for r in stats if not r["_exact"]),
        boilerplate_only=boilerplate_only.count(),
        lines_removed=docs.agg(F.sum("_lines_removed")).first()[0] or 0,
        clusters=clusters.where(F.col("doc_id") == F.col("kept_doc_id")).count(),
        removed_by_key={},
        bands=bands, rows=rows, incremental=incremental, version=version,
    )
    for r in stats:
        report.removed_by_key[r["category"]] = report.removed_by_key.get(r["category"], 0) + r["count"]
    for df in (docs, sigs, members, clusters) + ((old_kept,) if old_kept is not None else ()):
        df.unpersist()  # localCheckpoint data is released the same way
    report.seconds = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
