"""Benchmark: rule filtering + PII scrubbing vs datatrove's Gopher and C4 quality filters.

Same documents (the demo corpus's real zh / en / code text, repeated), same process:
- datatrove: GopherRepetitionFilter → GopherQualityFilter → C4QualityFilter, chained as in a
  datatrove pipeline (a rejected document goes no further), one core;
- tokenmill, pure functions: the filter and PII functions the Spark jobs run, one core;
- tokenmill in Spark: the filter and pii jobs end to end (read, map, Delta commits, report), per core.
The target is at least 1.5x datatrove per core.

    python bench/filter.py [--copies 20]

With few documents the Spark figure is dominated by fixed per-job costs (worker start-up, four Delta
commits, the report): on this 2-core machine 10k documents gave 1.1x, 40k documents 2.1x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import demo_texts  # noqa: E402
from jobs import filter_rules, ingest, scrub_pii  # noqa: E402
from lake.recipe import parse_recipe  # noqa: E402
from jobs.spark import get_spark  # noqa: E402
from lake.fs import end_process  # noqa: E402


def corpus(work: Path, copies: int) -> tuple[Path, list[str]]:
    texts = demo_texts(work / "demo") * copies
    path = work / "in" / "part-0.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)))
    return path, texts


def datatrove_rate(texts: list[str]) -> float:
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    filters = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter()]
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    for f in filters:
        f.filter(docs[0])  # load tokenizers before timing
    started = time.perf_counter()
    for doc in docs:
        for f in filters:
            result = f.filter(doc)
            if not (result[0] if isinstance(result, tuple) else result):
                break
    return len(docs) / (time.perf_counter() - started)


def pure_rate(texts: list[str], recipe) -> float:
    filter_doc = filter_rules.make_filter(recipe)()
    scrub_doc = scrub_pii.make_scrubber(recipe)()
    started = time.perf_counter()
    for text in texts:
        outcome = filter_doc({"text": text})
        if outcome.reject_reason is None:
            scrub_doc({"text": outcome.columns["text"]})
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=20, help="how many times the demo corpus is repeated")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-filter-"))
    try:
        path, texts = corpus(work, args.copies)
        recipe = parse_recipe({"lake": str(work / "lake"), "sources": [{"name": "demo", "path": str(path), "id_field": "id"}]}, work)
        spark = get_spark("tokenmill-bench-filter", recipe)
        cores = spark.sparkContext.defaultParallelism
        ingest.run(spark, recipe)
        started = time.perf_counter()
        f = filter_rules.run(spark, recipe)
        p = scrub_pii.run(spark, recipe)
        spark_secs = time.perf_counter() - started
        spark_rate = len(texts) / spark_secs / cores
        # The single-core references run on the first five copies: the same documents, a quarter of the time.
        sample = texts[: 5 * len(texts) // max(args.copies, 1)] if args.copies > 5 else texts
        ours = pure_rate(sample, recipe)
        ref = datatrove_rate(sample)
        print(f"{len(texts)} documents, mean {sum(map(len, texts)) / len(texts):,.0f} characters; {cores} Spark cores")
        print(f"  kept by filter {f.kept}, by pii {p.kept}")
        print(f"{'':44} {'docs/s per core':>16} {'vs datatrove':>13}")
        print(f"{'datatrove Gopher rep + quality + C4 (1 core)':44} {ref:16,.0f} {1:13.2f}")
        print(f"{'tokenmill filter + pii, pure (1 core)':44} {ours:16,.0f} {ours / ref:13.2f}")
        print(f"{'tokenmill filter + pii jobs in Spark':44} {spark_rate:16,.0f} {spark_rate / ref:13.2f}")
        print(f"  (Spark: {spark_secs:.1f} s wall for both jobs, Delta commits and the report included)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
