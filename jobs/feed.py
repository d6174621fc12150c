"""Feed: the next token chunk of the current stage, mixed, ordered, tokenised and packed.

    tokenmill feed --recipe R [--until-ready N] [--follow]   |   spark-submit jobs/feed.py --recipe R

One chunk:
1. a ``writing`` row in ``chunks`` (invisible to the trainer);
2. budgets per category from the stage's mix (``jobs/packing.plan_budgets``); documents of
   ``documents_dedup`` (else ``documents_scored``) weighted by quality × ``decay ** times_used``
   and drawn without replacement by Efraimidis-Spirakis keys, seeded per chunk;
3. tokenised in the executors (the tokenizer shipped once per executor process), each document
   followed by EOS; every category filled to its budget exactly (the crossing document is cut, its
   full length kept in its span);
4. ordered by the curriculum, packed into rows of ``seq_len + 1`` tokens with their spans, and
   written by the executors as ``<lake>/chunks/<chunk_id>/part-NNNNN.parquet`` (zstd), each file's
   sha256 computed as it is written;
5. ``usage`` incremented (one Delta merge tagged with the chunk id), then the manifest row set to
   ``ready`` with files, checksums, tokens per category and the recipe and tokenizer hashes.

A run that dies leaves its chunk ``writing``. The next run cleans it up before anything else:
removes its files, takes back its usage increments if they were committed, and deletes its row, so
manifest and usage never disagree. Run one feed per lake at a time (the Airflow DAG does).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hashlib
import io
import math
import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.packing import curriculum_rank, plan_budgets
from jobs.stages import FeedOptions, StageError, stage_main
from lake import chunks
from lake.artifacts import load_tokenizer
from lake.fs import make_dirs, write_bytes, write_parquet
from lake.holdout import without_holdout
from lake.recipe import Recipe
from lake.tables import Lake
from schemas import chunk_row_schema

STAGE = "feed"
_TOKENIZERS: dict[str, object] = {}  # per Python worker process: tokenizer sha256 → Tokenizer


class FeedError(StageError):
    """A chunk that cannot be made (or verified); the message names the chunk and the fix."""


# -- executor side ------------------------------------------------------------------------------------


def _tokenizer(tokenizer_json: str, sha: str):
    if sha not in _TOKENIZERS:
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one task per core: no thread pool per task
        from tokenizers import Tokenizer

        _TOKENIZERS[sha] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[sha]


def id_dtype(vocab_size: int):
    """The numpy type of a chunk's token ids: uint16 when the vocabulary fits, else uint32."""
    import numpy as np

    return np.uint16 if vocab_size <= 65536 else np.uint32


def tokenize_batches(batches, tokenizer_json: str, sha: str, eos_id: int, vocab_size: int, batch_size: int = 256):
    """mapInArrow body: each document's token ids (EOS appended) as packed little-endian bytes
    (uint16 or uint32, see ``id_dtype``), and their count. Bytes cross to the JVM as one copy; an
    array of ints would be converted element by element."""
    import numpy as np

    tok = _tokenizer(tokenizer_json, sha)
    dtype = id_dtype(vocab_size)
    for batch in batches:
        texts = batch.column("text").to_pylist()
        blobs, counts = [], []
        for start in range(0, len(texts), batch_size):
            for e in tok.encode_batch(texts[start : start + batch_size], add_special_tokens=False):
                ids = e.ids
                ids.append(eos_id)
                blobs.append(np.asarray(ids, dtype).tobytes())
                counts.append(len(ids))
        names = [n for n in batch.schema.names if n != "text"]
        yield pa.RecordBatch.from_arrays(
            [batch.column(n) for n in names] + [pa.array(counts, pa.int64()), pa.array(blobs, pa.binary())],
            names=names + ["n_tokens", "ids"])


def _pieces(placed, row_len: int, rows_per_file: int, width: int):
    """Each document's taken tokens cut at row boundaries, one row per piece, in Spark SQL (the same
    arithmetic as ``jobs.packing.row_pieces``, without a trip through Python); ``width`` bytes per id."""
    from pyspark.sql import functions as F

    offset, take = F.col("offset"), F.col("take")
    exploded = placed.select("doc_id", "category", "offset", "take", "n_tokens", "ids", F.explode(
        F.sequence(F.floor(offset / row_len), F.floor((offset + take - 1) / row_len))).alias("row"))
    row_start = F.col("row") * row_len
    start = F.greatest(offset, row_start)
    end = F.least(offset + take, row_start + row_len)
    return exploded.select(
        F.floor(F.col("row") / rows_per_file).alias("file"), "row", (start - row_start).alias("pos"), "doc_id",
        (start - offset).alias("doc_start"), (end - start).alias("length"), F.col("n_tokens").alias("doc_tokens"),
        "category", F.substring("ids", ((start - offset) * width + 1).cast("int"),
                                ((end - start) * width).cast("int")).alias("ids"))


def write_files_batches(batches, directory: str, row_len: int, pad_id: int, vocab_size: int):
    """mapInArrow body: the pieces of whole files (sorted by file, row, pos) → one Parquet file each."""
    import numpy as np

    schema = chunk_row_schema(vocab_size)
    id_type = schema.field("input_ids").type.value_type
    dtype = id_dtype(vocab_size)
    pending: list[pa.RecordBatch] = []

    def flush(pieces: pa.Table):
        out = []
        for file_no in sorted(set(pieces.column("file").to_pylist())):
            part = pieces.filter(pc.equal(pieces.column("file"), file_no)).sort_by([("row", "ascending"), ("pos", "ascending")])
            d = {n: part.column(n).to_pylist() for n in ("row", "pos", "doc_id", "doc_start", "length", "doc_tokens", "category")}
            rows: list[int] = []
            spans: list[list[dict]] = []
            for i in range(part.num_rows):
                if not rows or rows[-1] != d["row"][i]:
                    rows.append(d["row"][i])
                    spans.append([])
                spans[-1].append({"doc_id": d["doc_id"][i], "pos": d["pos"][i], "doc_start": d["doc_start"][i],
                                  "length": d["length"][i], "doc_tokens": d["doc_tokens"][i], "category": d["category"][i]})
            # the pieces' bytes in (row, pos) order are the rows' tokens back to back
            flat = np.frombuffer(b"".join(part.column("ids").to_pylist()), dtype)
            tokens = len(flat)
            padded = np.full(len(rows) * row_len, pad_id, dtype)  # only the chunk's last row is short
            padded[:tokens] = flat
            offsets = pa.array(np.arange(0, len(rows) * row_len + 1, row_len, dtype=np.int32))
            data = pa.table({"row": pa.array(rows, pa.int64()),
                             "input_ids": pa.ListArray.from_arrays(offsets, pa.array(padded, id_type)),
                             "spans": pa.array(spans, pa.list_(schema.field("spans").type.value_type))}, schema=schema)
            name = f"part-{file_no:05d}.parquet"
            buffer = io.BytesIO()
            pq.write_table(data, buffer, compression="zstd")
            payload = buffer.getvalue()
            write_bytes(f"{directory}/{name}", payload)
            out.append({"name": name, "sha256": hashlib.sha256(payload).hexdigest(), "rows": len(rows), "tokens": tokens})
        return out

    for batch in batches:
        pending.append(batch)
    if pending:
        written = flush(pa.Table.from_batches(pending))
        yield pa.RecordBatch.from_pylist(written, schema=pa.schema([("name", pa.string()), ("sha256", pa.string()),
                                                                    ("rows", pa.int64()), ("tokens", pa.int64())]))


# -- one chunk ------------------------------------------------------------------------------------------


@dataclass
class ChunkReport:
    chunk_id: str
    stage: str
    n_tokens: int
    n_rows: int
    files: int
    mix: dict[str, int]
    target: dict[str, int]
    documents: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # plan / tokenise_pack / publish seconds

    def __str__(self) -> str:
        share = ", ".join(f"{c} {n:,} ({n / max(self.n_tokens, 1):.1%}, target {self.target.get(c, 0):,})"
                          for c, n in sorted(self.mix.items()))
        lines = [f"chunk {self.chunk_id} ({self.stage}): {self.n_tokens:,} tokens in {self.n_rows:,} rows, "
                 f"{self.files} files, {self.documents:,} documents, {self.seconds:.1f} s "
                 f"({self.n_tokens / max(self.seconds, 1e-9):,.0f} tokens/s; "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + ")", f"  mix: {share}"]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def produce_chunk(spark, recipe: Recipe, lake: Lake, tokenizer=None, meta: dict | None = None) -> ChunkReport:
    """Make, write and publish the next chunk of the current stage."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    started = time.perf_counter()
    feed, stage_cfg = recipe.feed, recipe.feed.current
    if tokenizer is None:
        tokenizer, meta = load_tokenizer(recipe)
    chunk_id = chunks.next_chunk_id(lake, feed.stage)
    now = chunks.now()
    base_row = {"chunk_id": chunk_id, "stage": feed.stage, "status": "writing", "n_tokens": 0, "n_rows": 0, "files": [],
                "sha256": [], "mix": None, "times_consumed": 0, "recipe_hash": recipe.fingerprint(),
                "tokenizer_version": f"{meta['version']}:{meta['sha256']}", "run_id": None, "reason": None,
                "created_at": now, "updated_at": now}
    chunks.put(lake, base_row, job=f"feed:{chunk_id}")
    directory = chunks.chunk_dir(lake.root, chunk_id)
    make_dirs(directory)

    mix = {c: s for c, s in stage_cfg.mix.items() if s > 0}
    source = lake.kept_documents()
    docs = without_holdout(lake.read(source), recipe.trainer.eval_docs)  # the trainer's perplexity set
    docs = docs.where(F.col("category").isin(list(mix)))
    if stage_cfg.min_quality is not None:
        docs = docs.where(F.col("quality") >= stage_cfg.min_quality)
    docs = docs.select("doc_id", "text", "category", F.coalesce("quality", F.lit(0.5)).alias("quality"),
                       F.length(F.encode("text", "utf-8")).alias("bytes"), F.length("text").alias("chars"))
    if lake.exists("usage"):
        docs = docs.join(lake.read("usage").select("doc_id", "times_used"), "doc_id", "left")
    else:
        docs = docs.withColumn("times_used", F.lit(0).cast("long"))
    docs = docs.withColumn("times_used", F.coalesce("times_used", F.lit(0)))
    bpt = {c: (meta.get("compression", {}).get(c, {}).get("bytes_per_token") or 3.0) for c in mix}
    est = F.ceil(F.col("bytes") / F.element_at(F.create_map(*[x for c, v in bpt.items() for x in (F.lit(c), F.lit(v))]),
                                                 F.col("category"))) + 1
    docs = docs.withColumn("est", est).persist()
    available = {r["category"]: int(r["t"]) for r in docs.groupBy("category").agg(F.sum("est").alias("t")).collect()}
    plan = plan_budgets(mix, feed.chunk_tokens, available, feed.when_dry, feed.repeat_cap)
    planned = time.perf_counter()

    # Copies (the repeat rule), sampling keys, and a generous selection by estimated tokens.
    copies = F.element_at(F.create_map(*[x for c, n in plan.copies.items() for x in (F.lit(c), F.lit(n))]), F.col("category"))
    docs = docs.withColumn("copy", F.explode(F.sequence(F.lit(0), copies - 1)))
    weight = F.greatest(F.col("quality"), F.lit(0.01)) * F.pow(F.lit(feed.decay), F.col("times_used"))
    curr = stage_cfg.curriculum
    value = F.col("quality") if curr.key == "quality" else F.col("chars").cast("double")
    edges: list[float] = []
    if curr.key != "none" and curr.buckets > 1:
        probs = [i / curr.buckets for i in range(1, curr.buckets)]
        edges = [float(e) for e in docs.select(value.alias("v")).approxQuantile("v", probs, 0.001)]
        rank_udf = F.udf(lambda v: curriculum_rank(v, edges, curr.key, curr.order), "int")
        docs = docs.withColumn("rank", rank_udf(value))
        if curr.across_chunks:
            # chunk k of the stage favours bucket k (4x weight), walking easy to hard over the chunks
            favoured = min(int(chunk_id.rsplit("-", 1)[1]), curr.buckets - 1)
            weight = weight * F.when(F.col("rank") == favoured, F.lit(4.0)).otherwise(F.lit(1.0))
    else:
        docs = docs.withColumn("rank", F.lit(0))
    u = (F.abs(F.xxhash64(F.lit(feed.seed), F.lit(chunk_id), "doc_id", "copy")).cast("double") + 0.5) / F.lit(2.0**63)
    docs = docs.withColumn("key", -F.log(u) / weight)
    budget = F.element_at(F.create_map(*[x for c, n in plan.budgets.items() for x in (F.lit(c), F.lit(n))]), F.col("category"))
    by_key = Window.partitionBy("category").orderBy("key", "doc_id", "copy")
    # the selection window sorts a light projection; only the chosen documents' texts are then joined
    chosen_ids = docs.select("doc_id", "copy", "category", "key", "rank", "est") \
        .withColumn("cum_est", F.sum("est").over(by_key)) \
        .where(F.col("cum_est") - F.col("est") < budget * 1.1 + 64) \
        .select("doc_id", "copy", "category", "key", "rank")
    chosen = docs.select("doc_id", "copy", "text").join(chosen_ids, ["doc_id", "copy"]) \
        .select("doc_id", "copy", "category", "key", "rank", "text")

    # Tokenise, then fill each category's budget exactly.
    # shipped once per executor (a broadcast), parsed once per Python worker (_TOKENIZERS)
    tok_json = spark.sparkContext.broadcast(tokenizer.to_str())
    sha = meta["sha256"]
    eos_id, pad_id, vocab = meta["eos_id"], meta["pad_id"], meta["vocab_size"]
    tokenized = chosen.mapInArrow(
        lambda bs: tokenize_batches(bs, tok_json.value, sha, eos_id, vocab),
        "doc_id string, copy int, category string, key double, rank int, n_tokens long, ids binary")
    tokenized = tokenized.persist()  # the token ids, computed once
    # Budgets and offsets are decided on a light projection (no ids), then joined back by broadcast:
    # the windows never move the token ids around.
    light = tokenized.select("doc_id", "copy", "category", "key", "rank", "n_tokens")
    taken = light.withColumn("cum", F.sum("n_tokens").over(by_key)) \
        .withColumn("take", F.least(F.col("n_tokens"), F.greatest(F.lit(0), budget - (F.col("cum") - F.col("n_tokens"))))) \
        .where(F.col("take") > 0)
    # Curriculum order, then a seeded shuffle: every document's offset in the chunk's token stream.
    shuffle = F.xxhash64(F.lit(feed.seed), F.lit(chunk_id), F.lit("order"), "doc_id", "copy")
    order = Window.orderBy("rank", "shuffle", "doc_id", "copy")
    offsets = taken.withColumn("shuffle", shuffle) \
        .withColumn("offset", F.sum("take").over(order.rowsBetween(Window.unboundedPreceding, Window.currentRow)) - F.col("take")) \
        .select("doc_id", "copy", "take", "offset").persist()
    placed = tokenized.join(F.broadcast(offsets), ["doc_id", "copy"])
    row_len = stage_cfg.seq_len + 1
    pieces = _pieces(placed, row_len, feed.rows_per_file, id_dtype(vocab)().itemsize)
    total = offsets.agg(F.sum("take")).first()[0] or 0
    if total == 0:
        docs.unpersist()
        tokenized.unpersist()
        offsets.unpersist()
        chunks.delete(lake, chunk_id, job=f"feed-cleanup:{chunk_id}")
        raise FeedError(f"no documents of the categories {', '.join(mix)} in {source} for stage {feed.stage!r}")
    n_rows = math.ceil(total / row_len)
    n_files = math.ceil(n_rows / feed.rows_per_file)
    written = pieces.repartition(n_files, "file").mapInArrow(
        lambda bs: write_files_batches(bs, directory, row_len, pad_id, vocab),
        "name string, sha256 string, rows long, tokens long").collect()
    written = sorted(written, key=lambda r: r["name"])
    packed = time.perf_counter()
    tok_json.unpersist()
    per_doc = offsets.join(light.select("doc_id", "copy", "category"), ["doc_id", "copy"])
    per_category = {r["category"]: int(r["t"]) for r in per_doc.groupBy("category").agg(F.sum("take").alias("t")).collect()}
    increments = offsets.groupBy("doc_id").agg(F.count("*").alias("times_used")) \
        .withColumn("last_chunk_id", F.lit(chunk_id)).toArrow()
    n_docs = increments.num_rows
    docs.unpersist()
    tokenized.unpersist()
    offsets.unpersist()

    # usage first (its increments saved beside the files, so a cleanup can take them back), then ready
    write_parquet(chunks.usage_increments_path(lake.root, chunk_id), increments)
    lake.merge_counters("usage", increments, key=["doc_id"], add=["times_used"], assign=["last_chunk_id"],
                        job=f"feed:{chunk_id}")
    chunks.put(lake, {**base_row, "status": chunks.READY, "n_tokens": int(total), "n_rows": n_rows,
                            "files": [r["name"] for r in written], "sha256": [r["sha256"] for r in written],
                            "mix": list(per_category.items()), "reason": "; ".join(plan.warnings) or None,
                            "updated_at": chunks.now()}, job=f"feed:{chunk_id}")
    done = time.perf_counter()
    return ChunkReport(chunk_id, feed.stage, int(total), n_rows, len(written), per_category, plan.budgets, n_docs,
                       plan.warnings, done - started,
                       {"plan": planned - started, "tokenise_pack": packed - planned, "publish": done - packed})


@dataclass
class FeedReport:
    produced: list[ChunkReport]
    cleaned: list[str]
    quarantined: list[tuple[str, str]]
    backlog: int
    seconds: float

    def __str__(self) -> str:
        lines = [f"cleaned up interrupted chunk {c} (files, usage and manifest row)" for c in self.cleaned]
        lines += [f"quarantined {c}: {why}" for c, why in self.quarantined]
        tokens = sum(c.n_tokens for c in self.produced)
        lines.append(f"feed: {len(self.produced)} chunk(s) made ({', '.join(c.chunk_id for c in self.produced) or 'none'}), "
                     f"{tokens:,} tokens in {self.seconds:.1f} s; "
                     f"{self.backlog} ready and waiting")
        return "\n".join(lines)


def run(spark, recipe: Recipe, options: FeedOptions = FeedOptions()) -> FeedReport:
    """Clean up interrupted chunks, then produce chunks until the backlog is full (or one chunk)."""
    started = time.perf_counter()
    lake = Lake(recipe.lake, spark)
    cleaned = chunks.cleanup_interrupted(lake)
    quarantined = chunks.verify_ready(lake) if options.verify else []
    until, follow = options.until_ready, options.follow
    tokenizer, meta = load_tokenizer(recipe)
    produced: list[ChunkReport] = []
    stage = recipe.feed.stage
    announced = -1
    while True:
        waiting = chunks.backlog(lake, stage)
        if until is None and not follow:
            want = 1 - len(produced)
        else:
            want = (until or 1) - waiting
        if want > 0:
            report = produce_chunk(spark, recipe, lake, tokenizer, meta)
            produced.append(report)
            print(report, flush=True)
            continue
        if not follow:
            break
        if announced != len(produced):  # once per full backlog, not at every poll
            print(f"[feed] {waiting} ready chunk(s) of {stage}: backlog full; checking every "
                  f"{recipe.feed.poll_seconds:g} s", flush=True)
            announced = len(produced)
        time.sleep(recipe.feed.poll_seconds)  # --follow is a daemon: it polls the backlog
    return FeedReport(produced, cleaned, quarantined, chunks.backlog(lake, stage), time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
