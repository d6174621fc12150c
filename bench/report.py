"""Benchmark: ``tokenmill report`` on a lake of ``--docs`` documents, next to DuckDB computing the
report's group-bys over the same Parquet files in the same process (the floor: reading those
columns once and counting; the text's bytes per stage and source included).

The lake is written here without Spark (delta-rs): every documents table (a tenth of the raw
documents rejected by filter rules, a twentieth removed by dedup in clusters of two, PII counts on
some), usage, the held-out set, ``--chunks`` chunk manifest rows with their mix, a tokenizer, and
a run of ``--steps`` metrics with its events. Texts are ~1 KB pieces of real text (Python's
documentation), each made unique (as a real corpus's are: Parquet cannot dictionary-encode them), so
that reading the text costs what it costs on real data.

    python bench/report.py [--docs 40000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from jobs.report import figures, page  # noqa: E402
from jobs.synthetic_lake import make_lake  # noqa: E402
from lake.fs import end_process  # noqa: E402
from lake.recipe import parse_recipe  # noqa: E402
from lake.tables import Lake  # noqa: E402
from schemas import table  # noqa: E402

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
SOURCES = ["zh_news", "en_docs", "code"]
CATEGORY = {"zh_news": "zh", "en_docs": "en", "code": "code"}


def texts(n: int) -> list[str]:
    import pydoc_data.topics as topics

    from bench.common import kilobyte_pieces

    pieces = kilobyte_pieces(list(topics.topics.values()))
    return [f"{pieces[i % len(pieces)]}\n({i})" for i in range(n)]  # each text its own: no dictionary encoding


def build(root: Path, n: int, n_chunks: int, steps: int) -> None:
    make_lake(str(root), n_docs=60)  # the tokenizer (and a small holdout, replaced below)
    lake, rng, body = Lake(str(root)), random.Random(0), texts(n)
    raw = [{"doc_id": f"d{i:07d}", "text": body[i], "source": SOURCES[i % 3], "url": f"https://example.org/{i}",
            "meta": None, "ingested_at": NOW} for i in range(n)]
    rejected_ids = {d["doc_id"] for d in raw[::10]}
    signals = [("n_chars", 1000.0), ("n_words", 160.0), ("lines_removed", 0.0)]
    kept = [{**d, "signals": signals, "pii": [("EMAIL", 1)] if i % 7 == 0 else [], "quality": rng.random(),
             "domain": CATEGORY[d["source"]], "lang": CATEGORY[d["source"]], "category": CATEGORY[d["source"]],
             "cluster_id": None} for i, d in enumerate(raw) if d["doc_id"] not in rejected_ids]
    dupes = kept[1::20]
    clusters = [{"doc_id": x["doc_id"], "cluster_id": k["doc_id"], "kept_doc_id": k["doc_id"], "similarity": 0.9,
                 "threshold": 0.8, "category": k["category"]} for k, x in zip(kept[::20], dupes) for x in (k, x)]
    gone = {d["doc_id"] for d in dupes}
    rejections = ([{"doc_id": d["doc_id"], "source": d["source"], "stage": "filter", "reason": "too_short_chars",
                    "detail": "too_short_chars: n_chars=12 < 50 (en); too_few_words: n_words=3 < 20 (en)",
                    "text": d["text"], "rejected_at": NOW} for d in raw if d["doc_id"] in rejected_ids]
                  + [{"doc_id": d["doc_id"], "source": d["source"], "stage": "dedup", "reason": "near_duplicate",
                      "detail": "similar", "text": d["text"], "rejected_at": NOW} for d in dupes])
    write = {"documents_raw": raw, "documents_filtered": kept, "documents_clean": kept, "documents_scored": kept,
             "documents_dedup": [d for d in kept if d["doc_id"] not in gone], "documents_rejected": rejections,
             "dedup_clusters": clusters,
             "usage": [{"doc_id": d["doc_id"], "times_used": 1 + i % 3, "last_chunk_id": "c"} for i, d in enumerate(kept)],
             "holdout": [{"doc_id": d["doc_id"], "source": d["source"], "chosen_at": NOW} for d in kept[::100]],
             "trainer_events": [{"run_id": "bench", "step": s, "chunk_id": f"pretrain-{s // 50:06d}", "event": e,
                                 "detail": "", "at": NOW + timedelta(seconds=s)}
                                for s in range(0, steps, 50) for e in ("claimed", "consumed")]}
    write["chunks"] = [{"chunk_id": f"pretrain-{c:06d}", "stage": "pretrain", "status": "consumed", "n_tokens": 10**9,
                        "n_rows": 488_000, "files": [], "sha256": [], "mix": [("zh", 4 * 10**8), ("en", 4 * 10**8),
                                                                              ("code", 2 * 10**8)],
                        "times_consumed": 1, "recipe_hash": None, "tokenizer_version": "v1", "run_id": "bench",
                        "reason": None, "created_at": NOW + timedelta(hours=c), "updated_at": NOW}
                       for c in range(n_chunks)]
    for name, rows in write.items():
        lake.write_arrow(name, pa.Table.from_pylist(rows, schema=table(name).schema), mode="overwrite", job="bench")
    run = root / "runs" / "bench"
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "tokens": s * 2**20, "loss": 8 / (1 + s / 500), "lr": 3e-4, "batch_sequences": 512,
         "loss_by_category": {"zh": 8 / (1 + s / 400), "en": 8 / (1 + s / 600)},
         **({"perplexity_by_source": {"zh_news": 900 / (1 + s / 300)}} if s % 100 == 0 else {})}) + "\n"
        for s in range(1, steps + 1)))


def duckdb_floor(lake: Lake) -> None:
    """The report's group-bys, once each, over the same files."""
    import duckdb

    def files(name: str) -> list[str]:
        return [u.removeprefix("file://") for u in lake.delta(name).file_uris()]

    con = duckdb.connect()
    for name in ("documents_raw", "documents_filtered", "documents_clean", "documents_scored", "documents_dedup"):
        con.sql(f"select source, count(*), sum(strlen(text)) from read_parquet({files(name)}) "
                "group by source").fetchall()
    con.sql(f"select source, count(*) from read_parquet({files('holdout')}) group by source").fetchall()
    con.sql(f"select stage, reason, source, count(*) from read_parquet({files('documents_rejected')}) "
            "group by all").fetchall()
    con.sql(f"select source, floor(quality * 10), domain, count(*) from read_parquet({files('documents_scored')}) "
            "group by all").fetchall()
    con.sql(f"select source, sum(cardinality(pii)) from read_parquet({files('documents_clean')}) group by source").fetchall()
    con.sql(f"select cluster_id, count(*) from read_parquet({files('dedup_clusters')}) group by 1").fetchall()
    con.sql(f"select times_used, count(*) from read_parquet({files('usage')}) group by 1").fetchall()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=40_000)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-report-"))
    try:
        started = time.perf_counter()
        build(work / "lake", args.docs, args.chunks, args.steps)
        print(f"lake: {args.docs:,} documents, {args.chunks} chunks, {args.steps} steps, "
              f"written in {time.perf_counter() - started:.1f} s")
        recipe = parse_recipe({"lake": str(work / "lake"), "sources": [{"name": s, "path": "x"} for s in SOURCES],
                               "trainer": {"run_name": "bench"}}, work)
        lake = Lake(recipe.lake)
        report_times, floor_times, size, shown = [], [], 0, {}
        for _ in range(args.rounds):  # interleaved, so that drift hits both
            t = time.perf_counter()
            shown = figures(recipe)
            size = len(page(recipe, shown, NOW))
            report_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            duckdb_floor(lake)
            floor_times.append(time.perf_counter() - t)
        print("documents per table: " + ", ".join(f"{t.removeprefix('documents_')} {sum(v.values()):,}"
                                                  for t, v in shown["funnel"].items()))
        print(f"{'':34} {'s (median)':>11} {'min-max':>14}")
        for name, times in (("tokenmill report (figures + page)", report_times),
                            ("DuckDB, the same group-bys", floor_times)):
            print(f"{name:34} {statistics.median(times):11.2f} {f'{min(times):.2f}-{max(times):.2f}':>14}")
        print(f"report / DuckDB: {statistics.median(report_times) / statistics.median(floor_times):.1f}x; "
              f"page {size / 1e3:,.0f} kB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
