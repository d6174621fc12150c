"""Benchmark: the whole dedup (exact + MinHash-LSH + clusters + survivors + lineage) next to
datatrove's MinHash pipeline, on the same corpus, in the same run.

Corpus: ~1 KB pieces of the demo corpus's real documents (zh news, English docs, Python code),
plus variants with a random share (0-60%) of their words / characters replaced, to ``--docs``
documents; some variants are near-duplicates, most are not.

- tokenmill: ``jobs/dedup.py`` in Spark local mode on every core: 5-gram shingles (characters
  for Chinese), 256 permutations, LSH banding for the loosest threshold, verification, connected
  components, survivors, three Delta tables written;
- datatrove: MinhashDedupSignature → Buckets → Cluster → Filter with LocalPipelineExecutor on
  every core, 5-grams, 32 buckets × 8 hashes (256), xxhash, reading and writing JSONL.

Prints documents/s of both and the ratio (target at least 2x), and peak resident memory: the Spark
JVM (driver and executor in one process in local mode) and the executors' Python workers; and
datatrove's worker processes.

    python bench/dedup.py [--docs 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PeakMemory, jvm_pid, kilobyte_pieces  # noqa: E402
from jobs.demo_corpus import demo_recipe_in  # noqa: E402
from jobs import dedup, filter_rules, ingest, scrub_pii  # noqa: E402
from lake.tables import Lake  # noqa: E402
from lake.recipe import load_recipe  # noqa: E402
from quality_models.language import script_langs  # noqa: E402
from jobs.spark import get_spark  # noqa: E402
from schemas import table  # noqa: E402
from lake.fs import end_process  # noqa: E402


def variant(text: str, share: float, rng: random.Random) -> str:
    """The text with about ``share`` of its words (characters, for text without spaces) replaced."""
    words = text.split(" ")
    if len(words) > 20:
        return " ".join(w if rng.random() >= share else rng.choice(words) + "x" for w in words)
    chars = list(text)
    return "".join(c if rng.random() >= share else rng.choice(chars) for c in chars)


def build_corpus(pieces: list[str], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(pieces[:n])
    while len(out) < n:
        out.append(variant(rng.choice(pieces), rng.uniform(0.0, 0.6), rng))
    return out


def run_datatrove(texts: list[str], work: Path, cores: int) -> float:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from loguru import logger

    logger.remove()  # datatrove logs every task's stats; the comparison is printed below

    source = work / "dt_in"
    source.mkdir()
    per = (len(texts) + cores - 1) // cores
    for part in range(cores):
        with open(source / f"part-{part}.jsonl", "w", encoding="utf-8") as f:
            for i in range(part * per, min(len(texts), (part + 1) * per)):
                f.write(json.dumps({"id": str(i), "text": texts[i]}, ensure_ascii=False) + "\n")
    config = MinhashConfig(n_grams=5, num_buckets=32, hashes_per_bucket=8, hash_config=HashConfig(precision=64))
    logs = work / "dt_logs"
    started = time.perf_counter()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(source)), MinhashDedupSignature(str(work / "dt_sigs"), config=config)],
                          tasks=cores, workers=cores, logging_dir=str(logs / "1")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(work / "dt_sigs"), str(work / "dt_buckets"), config=config)],
                          tasks=config.num_buckets, workers=cores, logging_dir=str(logs / "2")).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(work / "dt_buckets"), str(work / "dt_remove"), config=config)],
                          tasks=1, workers=1, logging_dir=str(logs / "3")).run()
    LocalPipelineExecutor(pipeline=[JsonlReader(str(source)), MinhashDedupFilter(str(work / "dt_remove")),
                                    JsonlWriter(str(work / "dt_out"))],
                          tasks=cores, workers=cores, logging_dir=str(logs / "4")).run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=40_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-dedup-"))
    try:
        recipe = load_recipe(demo_recipe_in(work))
        spark = get_spark("tokenmill-bench-dedup", recipe)
        cores = spark.sparkContext.defaultParallelism
        for stage in (ingest, filter_rules, scrub_pii):
            stage.run(spark, recipe)
        lake = Lake(recipe.lake)
        clean = lake.read_arrow("documents_clean")
        texts = build_corpus(kilobyte_pieces(clean.column("text").to_pylist()), args.docs)
        langs = script_langs(texts)
        now = datetime.now(timezone.utc)
        rng = random.Random(1)
        import pyarrow as pa

        rows = [{"doc_id": f"d{i:08d}", "text": t, "source": "bench", "url": None, "meta": None, "ingested_at": now,
                 "signals": None, "pii": None, "quality": rng.random(), "lang": lang,
                 "domain": {"zh": "news", "en": "knowledge", "code": "code"}.get(lang, "other"),
                 "category": lang} for i, (t, lang) in enumerate(zip(texts, langs))]
        lake.write_arrow("documents_scored", pa.Table.from_pylist(rows, schema=table("documents_scored").schema),
                         mode="overwrite", job="bench")
        mean_bytes = sum(len(t.encode()) for t in texts) / len(texts)

        jvm = jvm_pid(spark)
        with PeakMemory(jvm) as ours_mem:
            started = time.perf_counter()
            report = dedup.run(spark, recipe)
            ours = time.perf_counter() - started
        spark.stop()

        with PeakMemory(os.getpid(), exclude={jvm}) as dt_mem:  # the JVM lives on after spark.stop()
            theirs = run_datatrove(texts, work, cores)
        kept_dt = 0
        import gzip

        for f in (work / "dt_out").rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                data = gzip.decompress(data) if f.suffix == ".gz" else data
                kept_dt += data.count(b"\n")

        print(f"{len(texts):,} documents, {mean_bytes:,.0f} bytes on average; {cores} cores")
        print(f"{'':44} {'seconds':>8} {'docs/s':>9} {'removed':>8}")
        print(f"{'tokenmill dedup (Spark, 3 Delta tables)':44} {ours:8.1f} {len(texts) / ours:9,.0f} "
              f"{report.exact_removed + report.near_removed:8,d}")
        print(f"{'datatrove MinHash (4 stages, JSONL)':44} {theirs:8.1f} {len(texts) / theirs:9,.0f} "
              f"{len(texts) - kept_dt:8,d}")
        print(f"ratio: x{theirs / ours:.2f} datatrove's time (target >= 2)")
        print(f"peak memory: tokenmill JVM (driver + executor) {ours_mem.root_peak / 1024:,.0f} MiB, "
              f"Python workers {ours_mem.children_peak / 1024:,.0f} MiB; "
              f"datatrove workers {dt_mem.children_peak / 1024:,.0f} MiB; "
              f"this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
        print(f"  tokenmill: {report.exact_removed} exact + {report.near_removed} near removed at thresholds "
              f"{dict(recipe.dedup.thresholds)} (default {recipe.dedup.default_threshold}); "
              "datatrove: one threshold implied by 32x8 banding (~0.65), no verification")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
