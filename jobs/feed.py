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
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.lake import Lake
from jobs.packing import curriculum_rank, plan_budgets
from jobs.recipe import Recipe
from jobs.sources import filesystem
from jobs.stage import parse_with_recipe
from jobs.train_tokenizer import kept_documents_table, load_tokenizer
from schemas import chunk_row_schema

STAGE = "feed"
_TOKENIZERS: dict[str, object] = {}  # per Python worker process: tokenizer sha256 → Tokenizer


class FeedError(RuntimeError):
    """A chunk that cannot be made (or verified); the message names the chunk and the fix."""


# -- the lake side ------------------------------------------------------------------------------------


def chunk_dir(lake_root: str, chunk_id: str) -> str:
    return f"{lake_root.rstrip('/')}/chunks/{chunk_id}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def manifest(lake: Lake, stage: str | None = None) -> list[dict]:
    rows = lake.read_arrow("chunks").to_pylist()
    return sorted((r for r in rows if stage is None or r["stage"] == stage), key=lambda r: r["chunk_id"])


def set_manifest_row(lake: Lake, row: dict, job: str) -> None:
    """Replace one chunk's manifest row (insert it if new)."""
    lake.put_rows("chunks", [row], replace_where={"chunk_id": row["chunk_id"]}, job=job)


def delete_manifest_row(lake: Lake, chunk_id: str, job: str) -> None:
    lake.put_rows("chunks", [], replace_where={"chunk_id": chunk_id}, job=job)


def _remove_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != 0:  # not NotFound
        fs.delete_dir(path)


def usage_increments_path(lake_root: str, chunk_id: str) -> str:
    return f"{chunk_dir(lake_root, chunk_id)}/_usage.parquet"


def cleanup_interrupted(lake: Lake) -> list[str]:
    """Undo every chunk left ``writing`` by a run that died; returns their ids."""
    if not lake.exists("chunks"):
        return []
    cleaned = []
    for row in manifest(lake):
        if row["status"] != "writing":
            continue
        chunk_id = row["chunk_id"]
        if lake.exists("usage"):
            jobs = [v.job for v in lake.versions("usage")]
            if f"feed:{chunk_id}" in jobs and f"feed-undo:{chunk_id}" not in jobs:
                increments = _read_table(usage_increments_path(lake.root, chunk_id))
                undo = pa.table({"doc_id": increments.column("doc_id"),
                                 "times_used": pc.negate(increments.column("times_used")),
                                 "last_chunk_id": pa.nulls(increments.num_rows, pa.string())})
                lake.merge_counters("usage", undo, key=["doc_id"], add=["times_used"], job=f"feed-undo:{chunk_id}")
        _remove_dir(chunk_dir(lake.root, chunk_id))
        delete_manifest_row(lake, chunk_id, job=f"feed-cleanup:{chunk_id}")
        cleaned.append(chunk_id)
    return cleaned


def _read_table(uri: str) -> pa.Table:
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f)


def file_sha256(uri: str) -> str:
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def verify_chunk(lake_root: str, row: dict) -> str | None:
    """None when every file of the chunk exists with its recorded sha256; else the reason it does not."""
    for name, expected in zip(row["files"], row["sha256"]):
        uri = f"{chunk_dir(lake_root, row['chunk_id'])}/{name}"
        fs, path = filesystem(uri)
        if fs.get_file_info(path).type == 0:
            return f"file {name} is missing from {chunk_dir(lake_root, row['chunk_id'])}"
        actual = file_sha256(uri)
        if actual != expected:
            return f"file {name} has sha256 {actual[:12]}…, the manifest says {expected[:12]}…"
    return None


def quarantine(lake: Lake, row: dict, reason: str, job: str = "verify") -> None:
    set_manifest_row(lake, {**row, "status": "quarantined", "reason": reason, "updated_at": _now()}, job=job)


def verify_ready_chunks(lake: Lake) -> list[tuple[str, str]]:
    """Check every ready chunk's files; quarantine the bad ones. Returns (chunk_id, reason) of those."""
    bad = []
    for row in manifest(lake):
        if row["status"] == "ready":
            reason = verify_chunk(lake.root, row)
            if reason:
                quarantine(lake, row, reason)
                bad.append((row["chunk_id"], reason))
    return bad


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
            fs, path = filesystem(f"{directory}/{name}")
            with fs.open_output_stream(path) as f:
                f.write(payload)
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


def next_chunk_id(lake: Lake, stage: str) -> str:
    return f"{stage}-{len(manifest(lake, stage)) if lake.exists('chunks') else 0:06d}"


def produce_chunk(spark, recipe: Recipe, lake: Lake, tokenizer=None, meta: dict | None = None) -> ChunkReport:
    """Make, write and publish the next chunk of the current stage."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    started = time.perf_counter()
    feed, stage_cfg = recipe.feed, recipe.feed.current
    if tokenizer is None:
        tokenizer, meta = load_tokenizer(recipe)
    chunk_id = next_chunk_id(lake, feed.stage)
    now = _now()
    base_row = {"chunk_id": chunk_id, "stage": feed.stage, "status": "writing", "n_tokens": 0, "n_rows": 0, "files": [],
                "sha256": [], "mix": None, "times_consumed": 0, "recipe_hash": recipe.fingerprint(),
                "tokenizer_version": f"{meta['version']}:{meta['sha256']}", "run_id": None, "reason": None,
                "created_at": now, "updated_at": now}
    set_manifest_row(lake, base_row, job=f"feed:{chunk_id}")
    directory = chunk_dir(lake.root, chunk_id)
    dir_fs, dir_path = filesystem(directory)
    dir_fs.create_dir(dir_path, recursive=True)

    mix = {c: s for c, s in stage_cfg.mix.items() if s > 0}
    source = kept_documents_table(lake)
    docs = lake.read(source)
    # the trainer's held-out documents (holdout_ids, the same rule in Spark) never go into chunks
    held = Window.partitionBy("source").orderBy(F.sha2("doc_id", 256), "doc_id")
    limit = F.least(F.lit(recipe.trainer.eval_docs),
                    F.floor(F.count("*").over(Window.partitionBy("source")) * HOLDOUT_MAX_SHARE))
    docs = docs.withColumn("_held", F.row_number().over(held) <= limit).where(~F.col("_held")).drop("_held")
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
        delete_manifest_row(lake, chunk_id, job=f"feed-cleanup:{chunk_id}")
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
    fs, path = filesystem(usage_increments_path(lake.root, chunk_id))
    with fs.open_output_stream(path) as f:
        pq.write_table(increments, f)
    lake.merge_counters("usage", increments, key=["doc_id"], add=["times_used"], assign=["last_chunk_id"],
                        job=f"feed:{chunk_id}")
    set_manifest_row(lake, {**base_row, "status": "ready", "n_tokens": int(total), "n_rows": n_rows,
                            "files": [r["name"] for r in written], "sha256": [r["sha256"] for r in written],
                            "mix": list(per_category.items()), "reason": "; ".join(plan.warnings) or None,
                            "updated_at": _now()}, job=f"feed:{chunk_id}")
    done = time.perf_counter()
    return ChunkReport(chunk_id, feed.stage, int(total), n_rows, len(written), per_category, plan.budgets, n_docs,
                       plan.warnings, done - started,
                       {"plan": planned - started, "tokenise_pack": packed - planned, "publish": done - packed})


def backlog(lake: Lake, stage: str) -> int:
    """Ready chunks of the stage not taken by a trainer yet."""
    if not lake.exists("chunks"):
        return 0
    return sum(1 for r in manifest(lake, stage) if r["status"] == "ready")


HOLDOUT_MAX_SHARE = 0.1  # a small source keeps at least 90% of its documents for training


def holdout_ids(docs: list[dict], per_source: int) -> set[str]:
    """The held-out documents (the trainer's perplexity set, never put in a chunk): per source, the
    documents with the smallest sha256 of their doc_id, ``per_source`` of them but no more than 10% of
    the source. ``docs``: dicts with doc_id and source."""
    by_source: dict[str, list[str]] = {}
    for d in docs:
        by_source.setdefault(d["source"], []).append(hashlib.sha256(d["doc_id"].encode()).hexdigest() + d["doc_id"])
    return {h[64:] for hs in by_source.values()
            for h in sorted(hs)[: min(per_source, int(len(hs) * HOLDOUT_MAX_SHARE))]}


def backlog_below(recipe_path: str, wanted: int) -> bool:
    """True when the recipe's current stage has fewer than ``wanted`` ready chunks (no Spark needed):
    what the Airflow feed DAG asks before it submits feed."""
    from jobs.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    waiting = backlog(Lake(recipe.lake), recipe.feed.stage)
    print(f"{waiting} ready chunk(s) of {recipe.feed.stage}; the backlog wants {wanted}")
    return waiting < wanted


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


def run(spark, recipe: Recipe, args=None) -> FeedReport:
    """Clean up interrupted chunks, then produce chunks until the backlog is full (or one chunk)."""
    started = time.perf_counter()
    lake = Lake(recipe.lake, spark)
    cleaned = cleanup_interrupted(lake)
    quarantined = verify_ready_chunks(lake) if getattr(args, "verify", False) else []
    until = getattr(args, "until_ready", None)
    follow = getattr(args, "follow", False)
    tokenizer, meta = load_tokenizer(recipe)
    produced: list[ChunkReport] = []
    stage = recipe.feed.stage
    announced = -1
    while True:
        waiting = backlog(lake, stage)
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
    return FeedReport(produced, cleaned, quarantined, backlog(lake, stage), time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from jobs.spark import get_spark

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--until-ready", type=int, help="produce chunks until N are ready and unconsumed")
        parser.add_argument("--follow", action="store_true", help="keep the backlog topped up (polling; Ctrl-C stops)")
        parser.add_argument("--verify", action="store_true", help="check every ready chunk's files; quarantine bad ones")

    args, recipe = parse_with_recipe("tokenmill feed", run.__doc__, argv, arguments)
    if recipe is None:
        return 2
    spark = get_spark("tokenmill-feed", recipe)
    try:
        print(run(spark, recipe, args))
    except KeyboardInterrupt:
        print("[feed] stopped; a chunk left half-written is cleaned up by the next run", file=sys.stderr)
        return 130
    except FeedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
