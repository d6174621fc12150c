"""Near-dedup: ``documents_scored`` → ``documents_dedup`` + ``dedup_clusters``.

    spark-submit jobs/dedup.py --recipe R [--incremental]   |   tokenmill refine --recipe R --stages dedup

The phases, in the order ``run`` calls them:

1. ``remove_boilerplate_lines`` (optional line dedup): lines (or paragraphs) found in more than
   ``min_repeats`` documents are removed from every document first;
2. ``compute_signatures``: exact-text key, threshold, MinHash signature and LSH band keys per document,
   in ``mapInArrow`` (``jobs/dedup_batches.py``, ``jobs/minhash.py``), banded for the loosest threshold;
3. ``exact_groups``: documents with the same normalised text are one group, banded once;
4. ``candidate_pairs``: pairs sharing a band key, each checked by its estimated Jaccard against its
   threshold (the domain's, else the category's; the stricter one across two);
5. ``connected_components`` of the exact and near edges, distributed (alternating large-star /
   small-star, Kiveris et al. 2014), with nothing collected to the driver but counts;
6. ``choose_survivors``: the survivor of each cluster is the highest ``quality``, then the longer text,
   then the smaller ``doc_id``; every member is a ``dedup_clusters`` row;
7. ``filter_documents`` and ``write_tables``: survivors and unclustered documents to
   ``documents_dedup``, every removed one to ``documents_rejected``, naming the kept one;
8. optionally (``dedup.semantic``, full runs), before the write: ``semantic_duplicates``
   (``jobs/semantic_dedup.py``) removes paraphrases among the kept documents by embedding cosine.

``--incremental`` dedups documents not seen by an earlier run against the documents that run kept,
without clustering the old corpus again: old kept documents are never removed (``read_documents``
and ``write_tables`` are where the two modes differ).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
from pyspark.sql import Window
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructField, StructType

from jobs.dedup_batches import (SIGNATURE_DDL, line_keys, lsh_shape, sign_batch, similarity_batch, strip_batch,
                                 survivor_order)
from jobs.docstage import spread
from jobs.semantic_dedup import merged_lineage, semantic_duplicates
from jobs.shifts import Shift, shifts
from jobs.stages import DedupOptions, StageError, stage_main
from lake.atomic import all_or_nothing
from lake.recipe import Recipe, RecipeError
from lake.sections import LineDedup
from lake.tables import Lake
from schemas import table

STAGE = "dedup"


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
    shifts: list[tuple[Shift, list[str]]] = field(default_factory=list)  # (shift, samples)
    bands: int = 0
    rows: int = 0
    incremental: bool = False
    seconds: float = 0.0
    version: int = 0
    semantic_removed: int | None = None  # semantic dedup: documents removed, and the k-means clusters
    kmeans: int = 0
    semantic_skipped: bool = False  # enabled, but an incremental run leaves it out

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
            + (f"\n  semantic dedup: {self.semantic_removed} removed ({self.kmeans} k-means clusters)"
               if self.semantic_removed is not None else "")
            + ("\n  semantic dedup left out: it runs on full runs only (run without --incremental)"
               if self.semantic_skipped else "")
            + "".join(f"\n  warning: {shift}; e.g. {', '.join(samples)}" for shift, samples in self.shifts)
        )


def run(spark, recipe: Recipe, options: DedupOptions = DedupOptions()) -> DedupReport:
    """Remove exact and near duplicates from documents_scored into documents_dedup, with lineage."""
    started = time.perf_counter()
    lake = Lake(recipe.lake, spark)
    unseen, old_kept = read_documents(lake, options.incremental)
    incremental = old_kept is not None
    documents = remove_boilerplate_lines(spark, unseen, recipe)
    signed = compute_signatures(documents, old_kept, recipe)
    representatives, exact_edges = exact_groups(signed, recipe.dedup.exact)
    near_edges = candidate_pairs(representatives, signed, recipe.dedup.max_bucket_pairs, incremental)
    edges = near_edges if exact_edges is None else near_edges.unionByName(exact_edges)
    clusters = choose_survivors(connected_components(edges), signed)
    found = shift_warnings(recipe, documents, clusters)
    if options.strict and found:
        for df in (documents, signed, clusters) + ((old_kept,) if incremental else ()):
            df.unpersist()
        raise StageError("dedup --strict: nothing committed, because " + "; ".join(str(s) for s, _ in found)
                         + ". Look at the clusters (tokenmill report), then raise that key's threshold in "
                         "dedup.thresholds or dedup.warn_share")
    kept, rejected = filter_documents(documents, clusters)
    lineage = clusters.select(*table("dedup_clusters").columns)
    semantic = None
    if recipe.dedup.semantic.enabled and not incremental:
        kept, semantic_rejected, semantic_lineage, k = semantic_duplicates(kept, recipe)
        rejected = rejected.unionByName(semantic_rejected)
        lineage = merged_lineage(lineage, semantic_lineage)
        semantic = (semantic_rejected.count(), k)
    version = write_tables(lake, kept, rejected, lineage, clusters, old_kept)
    report = _report(recipe, documents, clusters, kept, incremental, version)
    report.shifts = found
    if semantic:
        report.semantic_removed, report.kmeans = semantic
    elif recipe.dedup.semantic.enabled:
        report.semantic_skipped = True
    for df in (documents, signed, clusters) + ((old_kept,) if incremental else ()):
        df.unpersist()  # localCheckpoint data is released the same way
    report.seconds = time.perf_counter() - started
    return report


# -- the phases, in order ------------------------------------------------------------------------------


def read_documents(lake: Lake, incremental: bool):
    """(documents to dedup, the documents an earlier run kept, or None when this is a full run).

    Incremental after an earlier run: only the documents it neither kept nor rejected, to be deduped
    against the ones it kept. Those are materialised now, because documents_dedup is rewritten at the end.
    """
    scored = lake.read("documents_scored")
    if not (incremental and lake.exists("documents_dedup")):
        return spread(scored), None
    old_kept = lake.read("documents_dedup").localCheckpoint(eager=True)
    seen = old_kept.select("doc_id")
    if lake.exists("documents_rejected"):
        seen = seen.unionByName(lake.read("documents_rejected").where(F.col("stage") == STAGE).select("doc_id"))
    return spread(scored.join(seen, "doc_id", "left_anti")), old_kept


def remove_boilerplate_lines(spark, documents, recipe: Recipe):
    """The documents without their boilerplate lines, with ``_lines_removed``; materialised.

    Before document dedup, because a footer or banner shared by thousands of pages says nothing about
    them but pulls their signatures together. Materialised because every later phase reads it, and in
    incremental mode its definition reads tables this job rewrites.
    """
    cfg = recipe.dedup.line_dedup
    if cfg is None:
        return documents.withColumn("_lines_removed", F.lit(0).cast("long")).localCheckpoint(eager=True)
    boilerplate = _frequent_lines(spark, documents, cfg)
    unit, min_chars = cfg.unit, cfg.min_chars
    # a new StructType: DataFrame.schema is cached, and StructType.add would change it in place
    schema = StructType([*documents.schema.fields, StructField("_lines_removed", LongType())])

    def strip(batches):
        for batch in batches:
            yield strip_batch(batch, boilerplate.value, unit, min_chars)

    return documents.mapInArrow(strip, schema).localCheckpoint(eager=True)


def _frequent_lines(spark, documents, cfg: LineDedup):
    """The keys of the lines found in more than ``min_repeats`` documents, broadcast to every task."""
    unit, min_chars = cfg.unit, cfg.min_chars

    def keys_of(batches):
        for batch in batches:
            # one row per (document, distinct key): a line repeated inside one document counts once
            keys = [k for t in batch.column("text").to_pylist() for k in {k for k, _ in line_keys(t, unit, min_chars)} if k]
            yield pa.RecordBatch.from_pydict({"key": pa.array(keys, pa.int64())})

    frequent = documents.select("text").mapInArrow(keys_of, "key long").groupBy("key").count() \
        .where(F.col("count") > cfg.min_repeats)
    n_frequent = frequent.count()
    if n_frequent > 5_000_000:
        raise ValueError(f"dedup.line_dedup: {n_frequent:,} distinct lines occur in more than {cfg.min_repeats} "
                         "documents; raise dedup.line_dedup.min_repeats")
    return spark.sparkContext.broadcast({r["key"] for r in frequent.select("key").collect()})


def compute_signatures(documents, old_kept, recipe: Recipe):
    """Exact-text key, threshold, MinHash signature and LSH band keys of every document with text left,
    and of every old kept document (``is_old``), signed in Arrow batches by ``sign_batch``; persisted.

    Old kept documents are signed again, by this run's shingling and permutations: two signatures are
    only comparable when made the same way, and no table stores them. Persisted because exact groups,
    candidate pairs and survivors all read it.
    """
    bands, rows, _ = lsh_shape(recipe)
    # an instruction example is compared whole: prompt and completion (concat_ws skips a null prompt)
    sign_cols = ["doc_id", F.concat_ws("\n", "prompt", "text").alias("text"), "lang", "domain", "category", "quality"]
    to_sign = documents.where(_text_length() > 0).select(*sign_cols).withColumn("is_old", F.lit(False))
    if old_kept is not None:
        to_sign = to_sign.unionByName(old_kept.select(*sign_cols).withColumn("is_old", F.lit(True)))

    def sign(batches):
        for batch in batches:
            signed = sign_batch(batch, recipe, bands, rows)
            yield pa.RecordBatch.from_arrays([*signed.columns, batch.column("is_old")],
                                             names=[*signed.schema.names, "is_old"])

    return spread(to_sign).mapInArrow(sign, SIGNATURE_DDL + ", is_old boolean").persist()


def exact_groups(signed, exact: bool):
    """(the documents that go on to LSH, edges (u, v) from each exact copy to its group's representative).

    Copies of one normalised text are one group, represented by its smallest doc_id; only that one is
    banded, so a bucket never fills with identical copies. A group made only of old kept documents gets
    no edges: the earlier run settled it. With ``dedup.exact`` off every document is banded and there
    are no such edges (None).
    """
    if not exact:
        return signed, None
    by_text = Window.partitionBy("text_key")
    grouped = signed.withColumn("rep", F.min("doc_id").over(by_text)) \
        .withColumn("group_new", F.max(~F.col("is_old")).over(by_text))
    edges = grouped.where((F.col("doc_id") != F.col("rep")) & F.col("group_new")) \
        .select(F.col("doc_id").alias("u"), F.col("rep").alias("v"))
    return grouped.where(F.col("doc_id") == F.col("rep")), edges


def candidate_pairs(representatives, signed, max_bucket_pairs: int, incremental: bool):
    """Near-duplicate edges (u, v): pairs sharing an LSH band key whose estimated Jaccard reaches their
    threshold, the stricter of the two documents' thresholds.

    In a bucket each document pairs only with its next ``max_bucket_pairs`` by doc_id, so a huge bucket
    costs a linear number of pairs and its members still connect through their neighbours.
    Incremental: two old kept documents are never paired again.
    """
    bucket = Window.partitionBy("band", "key")
    banded = representatives.select("doc_id", "is_old", F.posexplode("bands").alias("band", "key")) \
        .withColumn("size", F.count("*").over(bucket)).where(F.col("size") > 1) \
        .withColumn("rank", F.row_number().over(bucket.orderBy("doc_id"))).drop("size")
    x, y = banded.alias("x"), banded.alias("y")
    pairs = x.join(y, (F.col("x.band") == F.col("y.band")) & (F.col("x.key") == F.col("y.key"))
                   & (F.col("y.rank") > F.col("x.rank")) & (F.col("y.rank") <= F.col("x.rank") + max_bucket_pairs))
    if incremental:
        pairs = pairs.where(~(F.col("x.is_old") & F.col("y.is_old")))
    pairs = pairs.select(F.least("x.doc_id", "y.doc_id").alias("a"), F.greatest("x.doc_id", "y.doc_id").alias("b")).distinct()
    side = signed.select("doc_id", "sig", "threshold")
    pairs = pairs.join(side.toDF("a", "sig_a", "th_a"), "a").join(side.toDF("b", "sig_b", "th_b"), "b") \
        .withColumn("threshold", F.greatest("th_a", "th_b")).select("a", "b", "threshold", "sig_a", "sig_b")
    verified = _with_similarity(pairs).where(F.col("similarity") >= F.col("threshold"))
    return verified.select(F.col("a").alias("u"), F.col("b").alias("v"))


def connected_components(edges, max_rounds: int = 64):
    """(node, root) for every node of an undirected edge DataFrame (u, v); root = the component's
    smallest node. Alternating large-star / small-star on DataFrames, checkpointed every round."""

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


def choose_survivors(components, signed):
    """One ``dedup_clusters`` row per member of each connected component, naming the member kept, with
    ``_exact`` (same normalised text as the kept one) and ``is_old``; materialised.

    The kept member is an old kept document if the cluster has one (incremental: those are never
    removed), else the highest quality, then the longer text, then the smaller doc_id: a total order,
    so reruns and partition counts agree. Each member's similarity is estimated against the kept
    member itself, not against the neighbour that joined it to the cluster.
    """
    members = components.join(signed.withColumnRenamed("doc_id", "node"), "node")
    best = Window.partitionBy("root").orderBy(F.col("is_old").desc(), *survivor_order(doc_id="node"))
    members = members.withColumn("kept_doc_id", F.first("node").over(best)).persist()
    kept_side = members.where(F.col("node") == F.col("kept_doc_id")).select(
        F.col("node").alias("kept_doc_id"), F.col("sig").alias("sig_b"), F.col("text_key").alias("kept_text_key"),
        F.col("threshold").alias("kept_threshold"))
    lineage = _with_similarity(members.join(kept_side, "kept_doc_id").select(
        F.col("node").alias("a"), F.col("kept_doc_id").alias("b"),
        F.greatest("threshold", "kept_threshold").alias("threshold"), F.col("sig").alias("sig_a"), "sig_b"))
    same_text = F.col("text_key") == F.col("kept_text_key")
    clusters = lineage.join(members.select(F.col("node").alias("a"), "dkey", "text_key", "is_old"), "a") \
        .join(kept_side.select(F.col("kept_doc_id").alias("b"), "kept_text_key"), "b") \
        .select(F.col("a").alias("doc_id"), F.col("b").alias("cluster_id"), F.col("b").alias("kept_doc_id"),
                F.when(same_text, F.lit(1.0)).otherwise(F.col("similarity")).alias("similarity"),
                "threshold", F.col("dkey").alias("category"), same_text.alias("_exact"), "is_old") \
        .localCheckpoint(eager=True)
    members.unpersist()
    return clusters


def filter_documents(documents, clusters):
    """(``documents_dedup`` rows of the documents kept, ``documents_rejected`` rows of the others).

    A removed cluster member names the document kept for it: ``exact_duplicate`` for the same
    normalised text, else ``near_duplicate`` with similarity and threshold, noting a member that joined
    through others when it is below the threshold itself. A document that line dedup emptied is
    ``boilerplate_only``. Every document lands on exactly one side: count in = kept + rejected.
    """
    removed = _removed(clusters)
    exact = F.col("_exact")
    reason = F.when(exact, F.lit("exact_duplicate")).otherwise(F.lit("near_duplicate"))
    detail = F.when(exact, F.concat(F.lit("same normalised text as kept "), F.col("kept_doc_id"))).otherwise(
        F.format_string("kept %s: similarity %.3f, threshold %.2f (%s)%s", F.col("kept_doc_id"), F.col("similarity"),
                        F.col("threshold"), F.col("category"),
                        F.when(F.col("similarity") < F.col("threshold"), F.lit("; joined through other members"))
                        .otherwise(F.lit(""))))
    duplicates = removed.select("doc_id", reason.alias("reason"), detail.alias("detail")) \
        .join(documents.select("doc_id", "source", "text"), "doc_id")
    emptied = documents.where(_text_length() == 0).select(
        "doc_id", F.lit("boilerplate_only").alias("reason"),
        F.format_string("every line (%d) was boilerplate", F.col("_lines_removed")).alias("detail"), "source", "text")
    now = datetime.now(timezone.utc)
    rejected = duplicates.unionByName(emptied).select(
        "doc_id", "source", F.lit(STAGE).alias("stage"), "reason", "detail", "text",
        F.lit(now).cast("timestamp").alias("rejected_at"))
    kept = documents.where(_text_length() > 0).join(removed.select("doc_id"), "doc_id", "left_anti") \
        .join(_cluster_heads(clusters), "doc_id", "left").withColumn("cluster_id", F.col("_cluster")) \
        .select(*table("documents_dedup").columns)
    return kept, rejected


def write_tables(lake: Lake, kept, rejected, cluster_rows, clusters, old_kept) -> int:
    """Write documents_rejected, dedup_clusters, then documents_dedup; returns documents_dedup's version.

    Two tables cannot change in one Delta commit; the audit trail goes first so that documents_dedup
    never exists without it, and the three are all or nothing (``lake.atomic``). A full run replaces all three (of documents_rejected, this stage's rows).
    An incremental run appends the new rejections and the rows of documents not clustered before, and
    rewrites documents_dedup as the old kept documents plus the new: an old one that now heads a
    cluster gets its cluster id.
    """
    with all_or_nothing(lake, STAGE, ("documents_rejected", "dedup_clusters", "documents_dedup")):
        if old_kept is None:
            lake.write("documents_rejected", rejected, mode="overwrite", replace_where={"stage": STAGE}, job=STAGE)
            lake.write("dedup_clusters", cluster_rows, mode="overwrite", job=STAGE)
            return lake.write("documents_dedup", kept, mode="overwrite", job=STAGE)
        old = old_kept.join(_cluster_heads(clusters), "doc_id", "left") \
            .withColumn("cluster_id", F.coalesce("_cluster", "cluster_id")).select(*table("documents_dedup").columns)
        if lake.exists("dedup_clusters"):
            cluster_rows = cluster_rows.join(lake.read("dedup_clusters").select("doc_id"), "doc_id", "left_anti")
        lake.write("documents_rejected", rejected, mode="append", job=STAGE)
        lake.write("dedup_clusters", cluster_rows, mode="append", job=STAGE)
        return lake.write("documents_dedup", old.unionByName(kept), mode="overwrite", job=STAGE)


def shift_warnings(recipe: Recipe, documents, clusters) -> list[tuple[Shift, list[str]]]:
    """Each threshold key that removed more than ``dedup.warn_share`` of a source's documents, with up
    to three of the removed documents as ``removed → kept`` (``jobs/shifts.py``)."""
    inputs = {r["source"]: r["count"] for r in documents.groupBy("source").count().collect()}
    removed = _removed(clusters).join(documents.select("doc_id", "source"), "doc_id")
    counts = {(f"dedup key {r['category']}", r["source"]): r["count"]
              for r in removed.groupBy("category", "source").count().collect()}
    out = []
    for shift in shifts(inputs, counts, recipe.dedup.warn_share):
        key = shift.key.removeprefix("dedup key ")
        rows = removed.where((F.col("category") == key) & (F.col("source") == shift.source)) \
            .orderBy("doc_id").limit(3).collect()
        out.append((shift, [f"{r['doc_id']} → {r['kept_doc_id']}" for r in rows]))
    return out


def _report(recipe: Recipe, documents, clusters, kept, incremental: bool, version: int) -> DedupReport:
    stats = _removed(clusters).groupBy("category", "_exact").count().collect()
    removed_by_key: dict[str, int] = {}
    for r in stats:
        removed_by_key[r["category"]] = removed_by_key.get(r["category"], 0) + r["count"]
    bands, rows, _ = lsh_shape(recipe)
    return DedupReport(
        documents_in=documents.count(),
        kept=kept.count(),
        exact_removed=sum(r["count"] for r in stats if r["_exact"]),
        near_removed=sum(r["count"] for r in stats if not r["_exact"]),
        boilerplate_only=documents.where(_text_length() == 0).count(),
        lines_removed=documents.agg(F.sum("_lines_removed")).first()[0] or 0,
        clusters=_cluster_heads(clusters).count(),
        removed_by_key=removed_by_key,
        bands=bands, rows=rows, incremental=incremental, version=version,
    )


# -- shared by the phases ------------------------------------------------------------------------------


def _text_length():
    """Characters of text left after line dedup, outer spaces aside: 0 for a document of boilerplate only."""
    return F.length(F.trim("text"))


def _with_similarity(pairs):
    """Pairs (a, b, threshold, sig_a, sig_b) → (a, b, threshold, similarity), in Arrow batches."""
    return pairs.mapInArrow(lambda batches: (similarity_batch(b) for b in batches),
                            "a string, b string, threshold double, similarity double")


def _removed(clusters):
    """The members a cluster removes: not the kept one, and never an old kept document."""
    return clusters.where((F.col("doc_id") != F.col("kept_doc_id")) & ~F.col("is_old"))


def _cluster_heads(clusters):
    """(doc_id, _cluster) of each cluster's kept member."""
    return clusters.where(F.col("doc_id") == F.col("kept_doc_id")).select("doc_id", F.col("cluster_id").alias("_cluster"))


def check_recipe(recipe: Recipe) -> None:
    """A semantic-dedup encoder folder that is not there fails before any Spark work."""
    backbone = recipe.dedup.semantic.backbone
    if recipe.dedup.semantic.enabled and backbone is not None and not Path(backbone).is_dir():
        raise RecipeError(f"recipe {recipe.origin}: dedup.semantic.backbone: {backbone} is not a folder (a local "
                          f"Hugging Face encoder; unset, the packaged all-MiniLM-L6-v2)")


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
