"""Benchmark: feed (sample + tokenise + pack + write one chunk) against the limit, the tokenizer's
``encode_batch`` alone on the same documents; and reading a chunk back with pyarrow.

Documents: ~1 KB pieces of the demo corpus's real zh / en / code text, repeated to ``--docs``
rows of ``documents_dedup``; a tokenizer trained on them (32k vocabulary). One chunk of
``--chunk-tokens`` tokens, 4:4:2, seq_len 2048.

- tokenise + pack, tokens/s per core: the feed job's Spark work from tokenising the chosen documents
  to the written files (Spark local mode, every core), divided by the cores; and the whole chunk
  (planning the mix before, the usage and manifest commits after) the same way;
- the limit: ``Tokenizer.encode_batch`` on one thread over the same documents the chunk used;
  target: at least 70% of it;
- reading the chunk back: ``pyarrow.parquet.read_table`` of the chunk's folder plus flattening
  ``input_ids`` to one numpy array, tokens/s; target at least 50M.

    python bench/feed.py [--docs 60000] [--chunk-tokens 6000000]
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool: per-core figures

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import kilobyte_pieces  # noqa: E402
from jobs.demo_corpus import demo_recipe_in  # noqa: E402
from jobs import feed, filter_rules, ingest, scrub_pii, train_tokenizer  # noqa: E402
from lake import chunks  # noqa: E402
from lake.artifacts import load_tokenizer  # noqa: E402
from lake.tables import Lake  # noqa: E402
from lake.recipe import load_recipe  # noqa: E402
from quality_models.language import script_langs  # noqa: E402
from jobs.spark import get_spark  # noqa: E402
from schemas import table  # noqa: E402
from lake.fs import end_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=60_000)
    parser.add_argument("--chunk-tokens", type=int, default=6_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-feed-"))
    try:
        recipe = load_recipe(demo_recipe_in(work), {
            "feed.chunk_tokens": args.chunk_tokens, "feed.rows_per_file": 1024,
            "feed.stages": {"pretrain": {"seq_len": 2048}}, "tokenizer.sample_bytes": 20_000_000,
            "tokenizer.vocab_size": 32000})
        spark = get_spark("tokenmill-bench-feed", recipe)
        cores = spark.sparkContext.defaultParallelism
        for stage in (ingest, filter_rules, scrub_pii):
            stage.run(spark, recipe)
        lake = Lake(recipe.lake, spark)
        pieces = kilobyte_pieces(lake.read_arrow("documents_clean").column("text").to_pylist())
        texts = [pieces[i % len(pieces)] for i in range(args.docs)]
        langs = script_langs(texts)
        now, rng = datetime.now(timezone.utc), random.Random(0)
        import pyarrow as pa

        rows = [{"doc_id": f"d{i:08d}", "text": t, "source": "bench", "ingested_at": now, "quality": rng.random(),
                 "domain": lang, "lang": lang, "category": lang} for i, (t, lang) in enumerate(zip(texts, langs))]
        lake.write_arrow("documents_dedup", pa.Table.from_pylist(rows, schema=table("documents_dedup").schema),
                         mode="overwrite", job="bench")
        print(train_tokenizer.run(spark, recipe))
        tok, meta = load_tokenizer(recipe)

        report = feed.produce_chunk(spark, recipe, lake, tok, meta)
        ours = report.n_tokens / report.phases["tokenise_pack"] / cores
        whole = report.n_tokens / report.seconds / cores

        chunk = chunks.manifest(lake)[0]
        import pyarrow.parquet as pq

        used = {s["doc_id"] for r in pq.read_table(
            chunks.chunk_dir(recipe.lake, chunk["chunk_id"]), columns=["spans"]).column("spans").to_pylist() for s in r}
        sample = [t for i, t in enumerate(texts) if f"d{i:08d}" in used]
        started = time.perf_counter()
        limit_tokens = 0
        for start in range(0, len(sample), 256):
            limit_tokens += sum(len(e.ids) for e in tok.encode_batch(sample[start : start + 256], add_special_tokens=False))
        limit = limit_tokens / (time.perf_counter() - started)

        import numpy as np

        reads = []
        for _ in range(3):
            started = time.perf_counter()
            data = pq.read_table(chunks.chunk_dir(recipe.lake, chunk["chunk_id"]), columns=["input_ids"])
            flat = np.asarray(data.column("input_ids").combine_chunks().flatten())
            reads.append(flat.size / (time.perf_counter() - started))
        read_rate = max(reads)
        size = sum(f.stat().st_size for f in Path(chunks.chunk_dir(recipe.lake, chunk["chunk_id"])).glob("part-*"))

        print(f"chunk {chunk['chunk_id']}: {report.n_tokens:,} tokens, {report.n_rows:,} rows of 2049, "
              f"{report.files} files, {size / 1e6:.1f} MB ({flat.dtype}); {report.documents:,} documents; {cores} cores")
        print(f"{'':52} {'tokens/s':>12}")
        print(f"{'limit: encode_batch alone, one thread':52} {limit:12,.0f}")
        print(f"{'feed: tokenise + pack + write the files, per core':52} {ours:12,.0f}   ratio {ours / limit:.2f} "
              f"(target >= 0.70; {report.phases['tokenise_pack']:.1f} s)")
        print(f"{'feed: the whole chunk (plan, publish), per core':52} {whole:12,.0f}   ratio {whole / limit:.2f} "
              f"({report.seconds:.1f} s: plan {report.phases['plan']:.1f}, publish {report.phases['publish']:.1f})")
        print(f"{'read a chunk back (pyarrow, flattened to numpy)':52} {read_rate:12,.0f}   "
              f"ratio {read_rate / 50e6:.2f} of 50M (target >= 1)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
