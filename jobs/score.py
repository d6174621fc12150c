"""Scoring: ``documents_clean`` → ``documents_scored`` with ``quality``, ``domain``, ``lang``, ``category``.

    spark-submit jobs/score.py --recipe R   |   tokenmill refine --recipe R --stages score

The models the recipe pins (``score.quality``, ``score.domain``, optionally ``score.cascade``) are
loaded once per executor process and run on Arrow batches; BERT heads share one encoder pass.
``lang`` is the language the filter judged the document by (zh / en / code / other from script
statistics and the file name; ``lang_<x>`` in its signals), else from script statistics; ``category`` (what mixing and dedup use)
comes from the domain, else the language, by the recipe's maps. Every document is scored; none is
dropped unless ``score.perplexity`` asks: then the documents whose perplexity under a small language
model (``quality_models/perplexity.py``) is above their category's percentile are rejected, as CCNet
keeps the low-perplexity part of each language.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from jobs.docstage import commit_stage, spread
from lake.tables import Lake
from lake.recipe import Recipe, RecipeError
from quality_models.language import script_langs
from jobs.spark import session_conf
from jobs.stages import NoOptions, stage_main
from schemas import table

STAGE = "score"
ARROW_BATCH_ROWS = 10_000
_LOADED: dict[str, object] = {}  # per Python worker process: recipe fingerprint → LoadedModels


def _models(recipe: Recipe):
    from quality_models.train import LoadedModels, pinned_models

    key = recipe.fingerprint()
    if key not in _LOADED:
        if any(ref.backend == "bert" for ref in pinned_models(recipe).values()):  # fastText needs no torch
            os.environ.setdefault("TOKENMILL_TORCH_THREADS", "1")
            import torch

            # Spark runs one task per core: one thread per task avoids oversubscribing the cores.
            torch.set_num_threads(int(os.environ["TOKENMILL_TORCH_THREADS"]))
        _LOADED[key] = LoadedModels(recipe)
    return _LOADED[key]


def category_of(lang: str, domain: str | None, recipe: Recipe, instruction: bool = False) -> str:
    """The mixing category: an instruction example's is ``score.instruction_category``; else the
    domain's (``domain_categories``), else the language's, else ``default_category``."""
    cfg = recipe.score
    if instruction:
        return cfg.instruction_category
    if domain is not None and domain in cfg.domain_categories:
        return cfg.domain_categories[domain]
    return cfg.lang_categories.get(lang, cfg.default_category)


# The columns scoring adds: documents_scored's fields that documents_clean lacks.
SCORES = pa.struct([f.with_nullable(True) for f in table("documents_scored").schema
                    if f.name not in table("documents_clean").columns])


def score_texts(texts, recipe: Recipe, signals=None, instruction=None) -> pa.StructArray:
    """``quality``, ``domain``, ``lang`` and ``category`` of each text (a list or Arrow string array),
    with the recipe's models loaded once per process. ``lang`` is the one the filter judged the
    document by (``lang_*`` in its ``signals``, a parallel map array), else from script statistics.
    An instruction example (``instruction``, a parallel boolean array: the document has a prompt, and
    ``text`` is its completion, which the models judge) gets the instruction category."""
    import numpy as np

    from quality_models.train import score_batch

    models = _models(recipe)
    cascade = recipe.score.cascade
    langs = langs_of(texts, signals)
    quality, domains, _ = score_batch(models, texts, *((cascade.low, cascade.high) if cascade else ()))
    # category of each distinct (language, domain) pair, not of each document
    instruction = [False] * len(langs) if instruction is None else [bool(v) for v in (
        instruction.to_pylist() if hasattr(instruction, "to_pylist") else instruction)]
    pairs: dict[tuple[str, str, bool], str] = {}
    categories = np.empty(len(langs), object)
    for i, pair in enumerate(zip(langs, domains, instruction)):
        if pair not in pairs:
            pairs[pair] = category_of(pair[0], pair[1], recipe, instruction=pair[2])
        categories[i] = pairs[pair]
    return pa.StructArray.from_arrays(
        [pa.array(quality, pa.float64()), pa.array(domains, pa.string()), pa.array(langs, pa.string()),
         pa.array(categories, pa.string())], fields=list(SCORES))


def langs_of(texts, signals=None) -> list[str]:
    """Each document's language: the one the filter judged it by (its largest ``lang_<x>`` signal),
    else (a lake filtered before the filter recorded it) from script statistics."""
    rows = [] if signals is None else signals.to_pylist() if hasattr(signals, "to_pylist") else list(signals)
    judged = [_judged_lang(row) for row in rows] or [None] * len(texts)
    if None in judged:
        judged = [j or s for j, s in zip(judged, script_langs(texts))]
    return judged


def _judged_lang(signals) -> str | None:
    pairs = signals.items() if isinstance(signals, dict) else signals or ()
    langs = [(v, k[5:]) for k, v in pairs if k.startswith("lang_")]
    return max(langs)[1] if langs else None


def scored(documents, recipe: Recipe):
    """documents_clean rows + their scores: only ``text`` travels to Python (an Arrow UDF), the
    other columns stay in the JVM."""
    from pyspark.sql import functions as F

    from schemas.spark import spark_type

    @F.arrow_udf(spark_type(SCORES))
    def scores(text: pa.Array, signals: pa.Array, instruction: pa.Array) -> pa.Array:
        return score_texts(text, recipe, signals, instruction)

    columns = table("documents_scored").columns
    # whether a document has a prompt, not the prompt: only the text travels to Python
    with_scores = documents.select("*", scores("text", "signals", F.col("prompt").isNotNull()).alias("_scores"))
    return with_scores.select(*[F.col(f"_scores.{c}") if c in SCORES.names else F.col(c) for c in columns])


def scoring_batches(spark):
    """Settings for Spark work that scores: the Arrow UDF sees the Parquet reader's batches, and
    10,000 rows (not 4,096) spread its per-batch costs (vocabulary lookups, pattern compiles) thinner."""
    return session_conf(spark, {"spark.sql.parquet.columnarReaderBatchSize": str(ARROW_BATCH_ROWS)})


@dataclass
class ScoreReport:
    documents: int
    by_category: dict[str, int]
    by_domain: dict[str, int]
    models: dict[str, str]
    mean_quality: float
    seconds: float
    version: int
    perplexity_removed: int = 0
    perplexity_cutoffs: dict[str, tuple[float, float]] = field(default_factory=dict)  # category → (percentile, cut-off)

    def __str__(self) -> str:
        cats = ", ".join(f"{k} {v}" for k, v in sorted(self.by_category.items(), key=lambda kv: -kv[1]))
        doms = ", ".join(f"{k} {v}" for k, v in sorted(self.by_domain.items(), key=lambda kv: -kv[1]))
        models = ", ".join(f"{k}={v}" for k, v in self.models.items())
        return (
            f"score: {self.documents} documents in {self.seconds:.1f} s ({self.documents / max(self.seconds, 1e-9):,.0f} docs/s); "
            f"documents_scored version {self.version}\n  models: {models}\n  category: {cats}\n  domain: {doms}\n"
            f"  mean quality {self.mean_quality:.3f}"
            + (f"\n  perplexity: {self.perplexity_removed} removed above "
               + ", ".join(f"{c} {v:.1f} (p{p:g})" for c, (p, v) in sorted(self.perplexity_cutoffs.items()))
               if self.perplexity_cutoffs else "")
        )


def check_recipe(recipe: Recipe) -> None:
    """Every pinned model exists and matches its pin: fails before any Spark work, naming the command to run."""
    from quality_models.train import check_pinned

    ppl = recipe.score.perplexity
    if ppl is not None and not (Path(ppl.model) / "config.json").is_file():
        raise RecipeError(f"recipe {recipe.origin}: score.perplexity.model: {ppl.model} is not a Hugging Face model "
                          f"folder (no config.json); export one with `tokenmill train --recipe R --export DIR`")
    check_pinned(recipe)


def run(spark, recipe: Recipe, options: NoOptions = NoOptions()) -> ScoreReport:
    """Score documents_clean with the pinned quality and domain models into documents_scored (with
    ``score.perplexity``, the documents above their category's perplexity percentile go to
    documents_rejected instead)."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    from quality_models.train import check_pinned

    versions = check_pinned(recipe)  # the versions the report names
    lake = Lake(recipe.lake, spark)
    perplexity: dict[str, tuple[float, float]] = {}
    removed = 0
    with scoring_batches(spark):
        documents = scored(spread(lake.read("documents_clean")), recipe)
        if recipe.score.perplexity is not None:
            version, removed, perplexity = _perplexity_filtered(lake, documents, recipe)
        elif _has_rejections(lake):  # an earlier run filtered by perplexity: its rejections go with it
            version = commit_stage(lake, STAGE, "documents_scored", documents,
                                   lake.read("documents_rejected").where(F.lit(False)))
        else:
            version = lake.write("documents_scored", documents, mode="overwrite", job=STAGE)
    written = lake.read("documents_scored")
    stats = written.groupBy("category", "domain").agg(F.count("*").alias("n"), F.sum("quality").alias("q")).collect()
    by_category: dict[str, int] = {}
    by_domain: dict[str, int] = {}
    for row in stats:
        by_category[row["category"]] = by_category.get(row["category"], 0) + row["n"]
        by_domain[row["domain"]] = by_domain.get(row["domain"], 0) + row["n"]
    n = sum(by_category.values())
    return ScoreReport(n, by_category, by_domain, versions, sum(r["q"] or 0 for r in stats) / max(n, 1),
                       time.perf_counter() - started, version, removed, perplexity)


def _has_rejections(lake: Lake) -> bool:
    from pyspark.sql import functions as F

    return lake.exists("documents_rejected") and \
        lake.read("documents_rejected").where(F.col("stage") == STAGE).limit(1).count() > 0


def _perplexity_filtered(lake: Lake, documents, recipe: Recipe) -> tuple[int, int, dict[str, tuple[float, float]]]:
    """Write documents_scored without the documents whose perplexity is above their category's
    percentile, and those to documents_rejected (all or nothing); each kept document's perplexity in
    its signals. Returns (version, removed, category → (percentile, cut-off))."""
    from pyspark.sql import functions as F

    from quality_models.perplexity import PerplexityModel

    cfg = recipe.score.perplexity

    @F.arrow_udf("double")
    def perplexity(text: pa.Array) -> pa.Array:
        model = PerplexityModel.load(cfg.model, cfg.max_tokens, cfg.batch_size, cfg.gpu_batch_size)
        return pa.array(model.perplexity(text.to_pylist()), pa.float64(), from_pandas=True)  # NaN: none

    measured = documents.withColumn("_ppl", perplexity("text")).persist()
    categories = [r["category"] for r in measured.select("category").distinct().collect()]
    wanted = {c: cfg.percentile.get(c, cfg.percentile.get("default", 95.0)) for c in categories}
    levels = sorted({p for p in wanted.values() if p is not None})
    cutoffs: dict[str, tuple[float, float]] = {}
    if levels:
        for row in measured.groupBy("category").agg(F.percentile_approx(
                "_ppl", F.array(*[F.lit(p / 100) for p in levels]), 10_000).alias("q")).collect():
            p = wanted[row["category"]]
            if p is not None and row["q"] is not None:
                cutoffs[row["category"]] = (p, row["q"][levels.index(p)])
    limit = F.create_map(*[x for c, (_, v) in cutoffs.items() for x in (F.lit(c), F.lit(v))])[F.col("category")] \
        if cutoffs else F.lit(None).cast("double")
    level = F.create_map(*[x for c, (p, _) in cutoffs.items() for x in (F.lit(c), F.lit(p))])[F.col("category")] \
        if cutoffs else F.lit(None).cast("double")
    marked = measured.withColumn("_limit", limit).withColumn("_level", level).withColumn("signals", F.map_concat(
        F.coalesce("signals", F.create_map().cast("map<string,double>")),
        F.create_map(F.lit("perplexity"), F.col("_ppl"))))
    gone = F.coalesce(F.col("_ppl") > F.col("_limit"), F.lit(False))
    kept = marked.where(~gone).select(*table("documents_scored").columns)
    now = datetime.now(timezone.utc)
    rejected = marked.where(gone).select(
        "doc_id", "source", F.lit(STAGE).alias("stage"), F.lit("perplexity").alias("reason"),
        F.format_string("perplexity %.1f > %.1f, the %.0fth percentile of %s", "_ppl", "_limit", "_level",
                        "category").alias("detail"),
        "text", F.lit(now).cast("timestamp").alias("rejected_at"))
    version = commit_stage(lake, STAGE, "documents_scored", kept, rejected)
    removed = lake.read("documents_rejected").where(F.col("stage") == STAGE).count()
    measured.unpersist()
    return version, removed, cutoffs


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
