"""Benchmark: document scoring throughput.

Same documents (demo corpus, ~1.5 KB each), same process:
- fastText quality + domain (+ script language), on ~1 KB pieces of those documents repeated to
  100k rows: the executors' per-batch function on one core next to the fasttext library's own
  predict; scoring in Spark (read, score, ids and scores out) next to reading alone; the whole
  Spark score job (all columns written to Delta) next to a plain read → write of the same table;
- BERT-family (MiniLM) quality + domain heads: tokenmill's batched, truncated, one-pass scoring
  (optionally int8-quantised) next to the naive way, a transformers pipeline called per document
  for each head.
Trains the models it needs first (weak labels of the demo corpus), in a throwaway lake.

    python bench/score.py [--bert-docs 64]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import kilobyte_pieces  # noqa: E402
from jobs.demo_corpus import demo_recipe_in  # noqa: E402
from jobs import filter_rules, ingest, score, scrub_pii  # noqa: E402
from lake.tables import Lake  # noqa: E402
from lake.recipe import load_recipe  # noqa: E402
from jobs.spark import get_spark  # noqa: E402
from lake.fs import end_process  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bert-docs", type=int, default=64)
    parser.add_argument("--fast-docs", type=int, default=100_000, help="~1 KB documents for the fastText figures")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-score-"))
    try:
        recipe_file = demo_recipe_in(work)
        recipe = load_recipe(recipe_file)
        spark = get_spark("tokenmill-bench-score", recipe)
        for stage in (ingest, filter_rules, scrub_pii):
            stage.run(spark, recipe)
        tokenmill = str(Path(sys.executable).parent / "tokenmill")
        subprocess.run([tokenmill, "models", "label", "--recipe", str(recipe_file)], check=True, capture_output=True)
        for task in ("quality", "domain"):
            for backend in ("fasttext", "bert"):
                subprocess.run([tokenmill, "models", "train", "--recipe", str(recipe_file), "--task", task,
                                "--backend", backend], check=True, capture_output=True)
        clean = Lake(recipe.lake).read_arrow("documents_clean")
        texts = clean.column("text").to_pylist()
        cores = spark.sparkContext.defaultParallelism

        # fastText at volume on ~1 KB documents: the demo's clean documents cut at line ends into
        # pieces of about 1 KB, repeated to --fast-docs rows, in a lake of their own, written as
        # several files as a Spark stage writes a table (one file would be one task).
        pieces = kilobyte_rows(clean, args.fast_docs)
        big = recipe.model_copy(update={"lake": str(work / "lake1k")})
        big_lake = Lake(big.lake)
        files = 4 * cores
        step = -(-len(pieces) // files)
        for i in range(files):
            big_lake.write_arrow("documents_clean", pieces.slice(i * step, step), mode="overwrite" if i == 0 else "append", job="bench")
        shutil.copytree(Path(recipe.lake) / "models", Path(big.lake) / "models")
        piece_bytes = sum(len(t.encode()) for t in pieces.column("text").to_pylist()) / len(pieces)
        fast = fasttext_figures(spark, big, pieces, cores)
        import torch

        from quality_models.train import LoadedModels, score_batch

        torch.set_num_threads(cores)
        sample = texts[: args.bert_docs]
        rates = {}
        for quantize in (False, True):
            bert = recipe.model_copy(update={"score": recipe.score.model_copy(update={
                "quality": recipe.score.quality.model_copy(update={"backend": "bert"}),
                "domain": recipe.score.domain.model_copy(update={"backend": "bert"}), "quantize": quantize})})
            models = LoadedModels(bert)
            score_batch(models, sample[:4])  # warm up
            started = time.perf_counter()
            score_batch(models, sample)
            rates[quantize] = len(sample) / (time.perf_counter() - started)
        naive = naive_rate(models, sample)

        print(f"fastText: {len(pieces):,} documents of {piece_bytes:,.0f} bytes on average; {cores} cores")
        print(f"{'quality + domain + lang, docs/s':64} {'tokenmill':>10} {'reference':>10} {'ratio':>6}")
        print(f"{'one core, no Spark (reference: fasttext predict)':64} {fast['pure']:10,.0f} {fast['library']:10,.0f}"
              f" {fast['pure'] / fast['library']:6.2f}")
        print(f"{'Spark: scoring (id + scores), per core (reference: read only)':64} {fast['spark_score']:10,.0f}"
              f" {fast['spark_read']:10,.0f}")
        print(f"{'Spark: whole score job per core (reference: read + write)':64} {fast['job']:10,.0f}"
              f" {fast['spark_copy']:10,.0f}   (read, score, write, commit, stats;"
              f" median of 3 warm runs {fast['job_s']:.1f} s; first run {fast['cold_s']:.1f} s)")
        print(f"BERT: {len(sample)} demo documents, mean {sum(map(len, sample)) / len(sample):,.0f} characters")
        print(f"{'BERT naive: pipeline per document, per head':54} {naive:10,.1f}")
        print(f"{'BERT tokenmill: batched, truncated, one pass':54} {rates[False]:10,.1f}   x{rates[False] / naive:.2f} vs naive")
        print(f"{'BERT tokenmill, int8 dynamic quantisation':54} {rates[True]:10,.1f}   x{rates[True] / naive:.2f} vs naive")
        print(f"  (BERT on {len(sample)} documents, {recipe.score.max_tokens} tokens max, {cores} torch threads)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fasttext_figures(spark, recipe, pieces, cores: int) -> dict[str, float]:
    """docs/s for the fastText scoring of ``pieces`` (and ``recipe``'s lake holding them), one core and in Spark."""
    from jobs.docstage import spread
    from quality_models.fasttext_backend import prepare_many
    from quality_models.train import LoadedModels

    out: dict[str, float] = {}
    n = len(pieces)
    batches = pieces.column("text").combine_chunks()
    score.score_texts(batches.slice(0, 100), recipe)  # models loaded once, as an executor does
    started = time.perf_counter()  # the executors' per-batch function, in this process, one core
    for start in range(0, n, score.ARROW_BATCH_ROWS):
        score.score_texts(batches.slice(start, score.ARROW_BATCH_ROWS), recipe)
    out["pure"] = n / (time.perf_counter() - started)
    # Reference: the fasttext library's own predict on prepared lines, for both models (no lang).
    models = LoadedModels(recipe)
    started = time.perf_counter()
    for start in range(0, n, score.ARROW_BATCH_ROWS):
        lines = prepare_many(batches.slice(start, score.ARROW_BATCH_ROWS))
        for model in (models.quality, models.domain):
            model.model.predict(lines, k=len(model.labels))
    out["library"] = n / (time.perf_counter() - started)

    lake = Lake(recipe.lake, spark)

    def per_core(action, runs: int = 3) -> float:
        """docs/s per core of ``action``: the median of ``runs`` runs (this machine varies by ±10%)."""
        rates = []
        for _ in range(runs):
            started = time.perf_counter()
            with score.scoring_batches(spark):
                action()
            rates.append(n / (time.perf_counter() - started) / cores)
        return sorted(rates)[len(rates) // 2]

    out["cold_s"] = score.run(spark, recipe).seconds  # starts the Python workers, loads the models
    reports = sorted((score.run(spark, recipe) for _ in range(3)), key=lambda r: r.seconds)
    report = reports[1]  # the median of three warm runs
    out["job"], out["job_s"] = report.documents / report.seconds / cores, report.seconds
    columns = ["doc_id", *score.SCORES.names]  # scoring alone: each document's id and scores
    out["spark_score"] = per_core(lambda: score.scored(spread(lake.read("documents_clean")), recipe).select(*columns)
                                  .write.format("noop").mode("overwrite").save())
    out["spark_read"] = per_core(lambda: spread(lake.read("documents_clean")).select("doc_id", "text")
                                 .write.format("noop").mode("overwrite").save())
    out["spark_copy"] = per_core(lambda: spread(lake.read("documents_clean")).write.mode("overwrite")
                                 .parquet(str(Path(recipe.lake) / "bench-copy")))
    return out


def kilobyte_rows(clean, n: int):
    """``n`` rows shaped like documents_clean whose texts are ~1 KB pieces of the given documents."""
    import pyarrow as pa

    pieces = kilobyte_pieces(clean.column("text").to_pylist())
    first = clean.slice(0, 1).to_pylist()[0]
    rows = {name: [first[name]] * n for name in clean.schema.names}
    rows["doc_id"] = [f"kb{i:08d}" for i in range(n)]
    rows["text"] = [pieces[i % len(pieces)] for i in range(n)]
    return pa.table(rows, schema=clean.schema)


def naive_rate(models, texts: list[str]) -> float:
    """The naive way: a feature-extraction pipeline per document and per head, full length up to 512."""
    import numpy as np
    from transformers import pipeline

    extract = pipeline("feature-extraction", model=models.encoder.backbone, framework="pt", device="cpu")
    started = time.perf_counter()
    for text in texts:
        for head in (models.quality.head, models.domain.head):
            hidden = np.asarray(extract(text, truncation=True, max_length=512))[0]
            emb = hidden.mean(axis=0)
            head.predict_proba((emb / np.linalg.norm(emb))[None, :].astype(np.float32))
    return len(texts) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
