"""Benchmark: ingest into the lake vs a plain ``spark.read.json(...).write.parquet(...)``.

Same input, same Spark session, interleaved runs (best of N each). Ingest does more work than the
reference (exact line numbers, UTF-8 checks, normalisation, duplicate ids, two Delta commits), so
the ratio shows what that audit trail costs.

    python bench/ingest.py [--docs 40000] [--repeats 2]
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

from jobs import ingest  # noqa: E402
from jobs.demo_corpus import build_demo_corpus  # noqa: E402
from lake.recipe import parse_recipe  # noqa: E402
from jobs.spark import get_spark  # noqa: E402
from lake.fs import end_process  # noqa: E402


def make_input(work: Path, docs: int) -> tuple[Path, int]:
    """Real demo text, repeated under fresh ids until ``docs`` records: one JSONL file per source."""
    corpus = build_demo_corpus(work / "corpus")
    records = []
    for built in corpus:
        if built.name == "messy":
            continue
        import gzip

        raw = built.path.read_bytes()
        raw = gzip.decompress(raw) if built.path.suffix == ".gz" else raw
        records.extend(json.loads(line) for line in raw.decode().splitlines())
    out = work / "input"
    out.mkdir()
    total_bytes = 0
    per_file = max(1, docs // 4)
    for f in range(4):
        lines = []
        for i in range(per_file):
            rec = dict(records[(f * per_file + i) % len(records)])
            rec["id"] = f"{f}-{i}"
            lines.append(json.dumps(rec, ensure_ascii=False))
        data = ("\n".join(lines) + "\n").encode()
        (out / f"part-{f}.jsonl").write_bytes(data)
        total_bytes += len(data)
    return out, total_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-ingest-"))
    try:
        data, size = make_input(work, args.docs)
        n_docs = (args.docs // 4) * 4
        recipe = parse_recipe(
            {"lake": str(work / "lake"), "sources": [{"name": "web", "path": f"{data}/*.jsonl", "id_field": "id", "url_field": "url"}]},
            base_dir=work,
        )
        spark = get_spark("tokenmill-bench-ingest", recipe)
        cores = spark.sparkContext.defaultParallelism
        times = {"tokenmill ingest": [], "spark.read.json → parquet": []}
        for r in range(args.repeats):
            t = time.perf_counter()
            spark.read.json(sorted(str(p) for p in data.glob("*.jsonl"))).write.mode("overwrite").parquet(str(work / f"plain-{r}"))
            times["spark.read.json → parquet"].append(time.perf_counter() - t)
            t = time.perf_counter()
            report = ingest.run(spark, recipe)
            times["tokenmill ingest"].append(time.perf_counter() - t)
            assert report.kept == n_docs, report
        print(f"input: {n_docs} documents, {size / 1e6:.1f} MB JSONL in 4 files; Spark local, {cores} cores; best of {args.repeats}")
        print(f"{'':28} {'seconds':>8} {'docs/s':>10} {'docs/s/core':>12} {'MB/s':>7}")
        best = {k: min(v) for k, v in times.items()}
        for name, secs in best.items():
            print(f"{name:28} {secs:8.2f} {n_docs / secs:10,.0f} {n_docs / secs / cores:12,.0f} {size / 1e6 / secs:7.1f}")
        ratio = best["spark.read.json → parquet"] / best["tokenmill ingest"]
        print(f"ratio (ingest throughput / plain Spark throughput): {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
