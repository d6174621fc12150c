"""Feed: the next token chunk of the current stage, mixed, ordered, tokenised and packed.

    tokenmill feed --recipe R [--until-ready N] [--follow]   |   spark-submit jobs/feed.py --recipe R

One chunk, in the phases ``produce_chunk`` calls in order:
1. ``open_chunk``: the chunk's mix (the stage's, or its adaptive mix from the trainer's latest signal:
   ``jobs/adaptive_mix.chunk_mix``), a ``writing`` row in ``chunks`` (invisible to the trainer) and
   the chunk's folder;
2. ``eligible_documents`` of ``documents_dedup`` (else ``documents_scored``) and ``plan_chunk``:
   budgets per category from the stage's mix (``jobs/packing.plan_budgets``); ``sampling_keys`` and
   ``select_documents``: documents weighted by quality × ``decay ** times_used`` and drawn without
   replacement by Efraimidis-Spirakis keys, seeded per chunk;
3. ``tokenise`` in the executors (``jobs/feed_executors.py``; the tokenizer shipped once per executor
   process), each document followed by EOS, chosen again with a wider margin where the estimate fell
   short of a budget (``tokenise_enough``); ``place``: every category filled to its budget exactly
   (the crossing document is cut, its full length kept in its span);
4. ordered by the curriculum, packed into rows of ``seq_len + 1`` tokens with their spans, and
   written by the executors as ``<lake>/chunks/<chunk_id>/part-NNNNN.parquet`` (zstd), each file's
   sha256 computed as it is written (``write_files``);
5. ``tally`` and ``publish``: ``usage`` incremented (one Delta merge tagged with the chunk id), then
   the manifest row set to ``ready`` with files, checksums, tokens per category and the recipe and
   tokenizer hashes.

Selecting, taking to the budget and packing run in Spark SQL (keys, window sums, ``_pieces``);
``tests/test_feed_packing.py`` runs those phases on hand-made token ids and checks them against
``jobs/packing.take_to_budget`` (over the documents in the order of the keys ``sampling_keys``
computes) and ``jobs/packing.pack``.

A run that dies leaves its chunk ``writing``. The next run cleans it up before anything else:
removes its files, takes back its usage increments if they were committed, and deletes its row, so
manifest and usage never disagree. Run one feed per lake at a time (the Airflow DAG does).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math
import time
from dataclasses import dataclass

from pyspark.sql import Window
from pyspark.sql import functions as F

from jobs.adaptive_mix import chunk_mix
from jobs.feed_executors import id_dtype, tokenize_batches, write_files_batches
from jobs.feed_reports import ChunkReport, FeedError, FeedReport
from jobs.packing import Plan, curriculum_rank, pack_examples, plan_budgets
from jobs.stages import FeedOptions, stage_main
from lake import chunks
from lake.artifacts import load_tokenizer
from lake.fs import make_dirs, remove_dir, write_parquet
from lake.holdout import freeze
from lake.recipe import Recipe
from lake.tables import Lake

STAGE = "feed"
# What ``tokenise`` gives ``place`` and ``write_files``: one row per chosen copy of a document, with
# its token ids (EOS appended) as packed bytes of ``jobs.feed_executors.id_dtype``.
# ``prompt_tokens``: an instruction example's leading tokens that carry no loss (0 for plain text).
TOKENIZED = ("doc_id string, copy int, category string, key double, rank int, prompt_tokens int, n_tokens long, "
             "ids binary")


@dataclass(frozen=True)
class OpenChunk:
    """A chunk being made, as ``open_chunk`` hands it to the later phases."""

    chunk_id: str
    base_row: dict  # its manifest row, status ``writing``
    directory: str  # <lake>/chunks/<chunk_id>
    mix: dict[str, float]  # the shares of the categories it is planned with (each positive; they sum to 1)
    row_len: int  # seq_len + 1
    signal: dict | None = None  # an adaptive mix's signal (``jobs.adaptive_mix.ChunkMix``)


def produce_chunk(spark, recipe: Recipe, lake: Lake, tokenizer=None, meta: dict | None = None) -> ChunkReport:
    """Make, write and publish the next chunk of the current stage, phase by phase."""
    started = time.perf_counter()
    feed = recipe.feed
    if tokenizer is None:
        tokenizer, meta = load_tokenizer(recipe)
    chunk = open_chunk(recipe, lake, meta)
    docs, source = eligible_documents(lake, recipe, meta, chunk.mix)
    plan = plan_chunk(docs, recipe, chunk.mix)
    planned = time.perf_counter()
    try:
        tokenized, tok_json = tokenise_enough(spark, sampling_keys(docs, plan, recipe, chunk.chunk_id), plan,
                                              tokenizer, meta, source)
    except FeedError:
        _release(docs)
        remove_dir(chunk.directory)
        chunks.delete(lake, chunk.chunk_id, job=f"feed-cleanup:{chunk.chunk_id}")
        raise
    offsets, total, layout = place(tokenized, plan.budgets, feed.seed, chunk.chunk_id, chunk.row_len)
    if total == 0:
        _release(docs, tokenized, offsets)
        chunks.delete(lake, chunk.chunk_id, job=f"feed-cleanup:{chunk.chunk_id}")
        raise FeedError(f"no documents of the categories {', '.join(chunk.mix)} in {source} for stage {feed.stage!r}")
    written = write_files(tokenized, offsets, chunk.directory, chunk.row_len, feed.rows_per_file, meta["pad_id"],
                          meta["vocab_size"], layout)
    packed = time.perf_counter()
    tok_json.unpersist()
    per_category, increments = tally(tokenized, offsets, chunk.chunk_id)
    _release(docs, tokenized, offsets)
    n_rows = layout.rows
    publish(lake, chunk, plan, written, per_category, increments, total, n_rows)
    done = time.perf_counter()
    return ChunkReport(chunk.chunk_id, feed.stage, int(total), n_rows, len(written), per_category, plan.budgets,
                       increments.num_rows, plan.warnings, done - started,
                       {"plan": planned - started, "tokenise_pack": packed - planned, "publish": done - packed},
                       chunk.mix, chunk.signal)


# -- the phases, in order ------------------------------------------------------------------------------


def open_chunk(recipe: Recipe, lake: Lake, meta: dict) -> OpenChunk:
    """The next chunk id of the stage, its mix, its ``writing`` row in ``chunks`` (with the mix and
    the signal behind it) and its (empty) folder."""
    feed = recipe.feed
    chunk_id = chunks.next_chunk_id(lake, feed.stage)
    mix = chunk_mix(lake, feed.current, recipe.trainer.run_name)
    now = chunks.now()
    base_row = {"chunk_id": chunk_id, "stage": feed.stage, "status": "writing", "n_tokens": 0, "n_rows": 0, "files": [],
                "sha256": [], "mix": None, "mix_weights": list(mix.shares.items()), "mix_signal": mix.signal_json(),
                "times_consumed": 0, "recipe_hash": recipe.fingerprint(),
                "tokenizer_version": chunks.tokenizer_id(meta), "run_id": None, "reason": None,
                "created_at": now, "updated_at": now}
    chunks.put(lake, base_row, job=f"feed:{chunk_id}")
    directory = chunks.chunk_dir(lake.run_root, chunk_id)
    make_dirs(directory)
    return OpenChunk(chunk_id, base_row, directory, mix.shares, feed.current.seq_len + 1, mix.signal)


def eligible_documents(lake: Lake, recipe: Recipe, meta: dict, mix: dict[str, float]):
    """(the documents this stage may draw from, the table they come from); persisted.

    The kept documents of the mix's categories (and of at least ``min_quality``), without the
    trainer's held-out set (``lake.holdout.freeze``: extended first where a source grew), with their quality (0.5 when unscored), bytes, characters, ``times_used``
    from ``usage`` and ``est``, their tokens estimated from the tokenizer's bytes per token.
    """
    stage_cfg = recipe.feed.current
    source = lake.kept_documents()
    docs = lake.read(source)
    held = freeze(lake, docs, recipe.trainer.eval_docs)  # the trainer's perplexity set: never in a chunk
    if held:
        docs = docs.join(F.broadcast(docs.sparkSession.createDataFrame([(i,) for i in sorted(held)], "doc_id string")),
                         "doc_id", "left_anti")
    docs = docs.where(F.col("category").isin(list(mix)))
    if stage_cfg.min_quality is not None:
        docs = docs.where(F.col("quality") >= stage_cfg.min_quality)
    whole = F.concat_ws("", "prompt", "text")  # an instruction example's prompt is tokenised too
    docs = docs.select("doc_id", "text", "prompt", "category", F.coalesce("quality", F.lit(0.5)).alias("quality"),
                       F.length(F.encode(whole, "utf-8")).alias("bytes"), F.length("text").alias("chars"))
    if lake.exists("usage"):
        docs = docs.join(lake.read("usage").select("doc_id", "times_used"), "doc_id", "left")
    else:
        docs = docs.withColumn("times_used", F.lit(0).cast("long"))
    docs = docs.withColumn("times_used", F.coalesce("times_used", F.lit(0)))
    bpt = {c: (meta.get("compression", {}).get(c, {}).get("bytes_per_token") or 3.0) for c in mix}
    est = F.ceil(F.col("bytes") / _per_category(bpt)) + 1
    return docs.withColumn("est", est).persist(), source


def plan_chunk(docs, recipe: Recipe, mix: dict[str, float]) -> Plan:
    """Tokens per category and copies allowed (``jobs/packing.plan_budgets``), from the estimates."""
    feed = recipe.feed
    available = {r["category"]: int(r["t"]) for r in docs.groupBy("category").agg(F.sum("est").alias("t")).collect()}
    return plan_budgets(mix, feed.chunk_tokens, available, feed.when_dry, feed.repeat_cap)


def sampling_keys(docs, plan: Plan, recipe: Recipe, chunk_id: str):
    """Each document once per allowed ``copy`` (the repeat rule), with its curriculum ``rank`` and its
    Efraimidis-Spirakis ``key``: the smallest keys of a category sample it without replacement by weight.

    weight = max(quality, 0.01) × decay ** times_used (× 4 in the favoured bucket of a curriculum
    ``across_chunks``); u = (|xxhash64(seed, chunk_id, doc_id, copy)| + 0.5) / 2**63; key = -log(u) / weight.
    """
    feed = recipe.feed
    docs = docs.withColumn("copy", F.explode(F.sequence(F.lit(0), _per_category(plan.copies) - 1)))
    weight = F.greatest(F.col("quality"), F.lit(0.01)) * F.pow(F.lit(feed.decay), F.col("times_used"))
    docs, weight = _curriculum(docs, weight, recipe, chunk_id)
    u = (F.abs(F.xxhash64(F.lit(feed.seed), F.lit(chunk_id), "doc_id", "copy")).cast("double") + 0.5) / F.lit(2.0**63)
    return docs.withColumn("key", -F.log(u) / weight)


def _curriculum(docs, weight, recipe: Recipe, chunk_id: str):
    """(docs with ``rank``, the weight): the bucket order of ``jobs/packing.curriculum_rank`` between
    approximate quantiles of the key's values; 0 for every document without a curriculum."""
    curr = recipe.feed.current.curriculum
    if curr.key == "none" or curr.buckets <= 1:
        return docs.withColumn("rank", F.lit(0)), weight
    value = F.col("quality") if curr.key == "quality" else F.col("chars").cast("double")
    probs = [i / curr.buckets for i in range(1, curr.buckets)]
    edges = [float(e) for e in docs.select(value.alias("v")).approxQuantile("v", probs, 0.001)]
    rank_udf = F.udf(lambda v: curriculum_rank(v, edges, curr.key, curr.order), "int")
    docs = docs.withColumn("rank", rank_udf(value))
    if curr.across_chunks:
        # chunk k of the stage favours bucket k (4x weight), walking easy to hard over the chunks
        favoured = min(int(chunk_id.rsplit("-", 1)[1]), curr.buckets - 1)
        weight = weight * F.when(F.col("rank") == favoured, F.lit(4.0)).otherwise(F.lit(1.0))
    return docs, weight


def select_documents(keyed, budgets: dict[str, int]):
    """The documents (doc_id, copy, category, key, rank, text, prompt) worth tokenising: per category, in key
    order, while the estimated tokens before them are under 110% of the budget + 64.

    The selection window sorts a light projection; only the chosen documents' texts are then joined.
    """
    chosen_ids = keyed.select("doc_id", "copy", "category", "key", "rank", "est") \
        .withColumn("cum_est", F.sum("est").over(_by_key())) \
        .where(F.col("cum_est") - F.col("est") < _per_category(budgets) * 1.1 + 64) \
        .select("doc_id", "copy", "category", "key", "rank")
    return keyed.select("doc_id", "copy", "text", "prompt").join(chosen_ids, ["doc_id", "copy"]) \
        .select("doc_id", "copy", "category", "key", "rank", "text", "prompt")


def tokenise(spark, chosen, tokenizer, meta: dict):
    """(the chosen documents' token ids, ``TOKENIZED``, persisted: computed once; the broadcast tokenizer).

    The tokenizer is shipped once per executor (a broadcast) and parsed once per Python worker."""
    tok_json = spark.sparkContext.broadcast(tokenizer.to_str())
    sha = meta["sha256"]
    eos_id, vocab = meta["eos_id"], meta["vocab_size"]
    tokenized = chosen.mapInArrow(lambda bs: tokenize_batches(bs, tok_json.value, sha, eos_id, vocab), TOKENIZED)
    return tokenized.persist(), tok_json


def tokenise_enough(spark, keyed, plan: Plan, tokenizer, meta: dict, source: str, rounds: int = 4):
    """``select_documents`` then ``tokenise``, until every category has at least its budget in real
    tokens. The selection goes by estimated tokens (bytes ÷ the tokenizer's bytes per token): where
    that overestimates a category, it chooses more of it and tokenises again. A category whose
    documents run out below its budget is an error naming it (the plan believed the estimate)."""
    scale = {c: 1.0 for c in plan.budgets}
    eligible = {r["category"]: r["count"] for r in keyed.groupBy("category").count().collect()}
    for attempt in range(rounds):
        chosen = select_documents(keyed, {c: math.ceil(b * scale[c]) for c, b in plan.budgets.items()})
        tokenized, tok_json = tokenise(spark, chosen, tokenizer, meta)
        got = {r["category"]: (int(r["t"]), r["n"]) for r in
               tokenized.groupBy("category").agg(F.sum("n_tokens").alias("t"), F.count("*").alias("n")).collect()}
        short = {c: got.get(c, (0, 0)) for c, b in plan.budgets.items() if b > 0 and got.get(c, (0, 0))[0] < b}
        if not short:
            return tokenized, tok_json
        _release(tokenized)
        tok_json.unpersist()
        dry = [c for c, (_, n) in short.items() if n >= eligible.get(c, 0)]
        if dry or attempt == rounds - 1:
            c = (dry or list(short))[0]
            raise FeedError(
                f"category {c!r}: its documents in {source} hold {short[c][0]:,} tokens, below its budget of "
                f"{plan.budgets[c]:,} in this chunk (the plan estimated them from {meta.get('compression', {}).get(c, {}).get('bytes_per_token') or 3.0:g} "
                f"bytes per token). Retrain the tokenizer on today's documents (its compression figures are the "
                f"estimate), lower feed.chunk_tokens, or set feed.when_dry: repeat")
        for c, (have, _) in short.items():  # choose more of each short category, by how far off it was
            scale[c] *= max(1.25, 1.1 * plan.budgets[c] / max(have, 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Layout:
    """How a chunk's rows are laid out: the text stream's rows first in the numbering, then the rows of
    instruction examples (``jobs.packing.pack_examples``), spread among them (``interleave_row``)."""

    text_rows: int
    example_rows: int

    @property
    def rows(self) -> int:
        return self.text_rows + self.example_rows


def place(tokenized, budgets: dict[str, int], seed: int, chunk_id: str, row_len: int):
    """(doc_id, copy, take, offset) of every document in the chunk, persisted; the chunk's tokens; its
    ``Layout``.

    Each category takes its documents in key order until its budget is filled exactly (the crossing
    one cut to ``take``; an instruction example is never cut: it is taken whole while the budget is not
    yet full); then curriculum rank, then a seeded shuffle, give each text document its ``offset`` in
    the chunk's token stream. Decided on a light projection (no ids): the windows never move the ids.
    Instruction examples go into rows of their own after the stream's last row, packed on the driver
    by ``jobs.packing.pack_examples`` (their lengths only), so that none is cut across rows unless it
    is longer than one.
    """
    light = tokenized.select("doc_id", "copy", "category", "key", "rank", "prompt_tokens", "n_tokens")
    budget = _per_category(budgets)
    before = F.col("cum") - F.col("n_tokens")
    example = F.col("prompt_tokens") > 0
    taken = light.withColumn("cum", F.sum("n_tokens").over(_by_key())) \
        .withColumn("take", F.when(example, F.when(before < budget, F.col("n_tokens")).otherwise(F.lit(0)))
                    .otherwise(F.least(F.col("n_tokens"), F.greatest(F.lit(0), budget - before)))) \
        .where(F.col("take") > 0)
    shuffle = F.xxhash64(F.lit(seed), F.lit(chunk_id), F.lit("order"), "doc_id", "copy")
    order = Window.orderBy("rank", "shuffle", "doc_id", "copy")
    stream = taken.where(~example).withColumn("shuffle", shuffle) \
        .withColumn("offset", F.sum("take").over(order.rowsBetween(Window.unboundedPreceding, Window.currentRow)) - F.col("take")) \
        .select("doc_id", "copy", "take", "offset").persist()
    text_tokens = stream.agg(F.sum("take")).first()[0] or 0
    text_rows = math.ceil(text_tokens / row_len)
    examples = taken.where(example).select("doc_id", "copy", "take").orderBy("doc_id", "copy").collect()
    at = pack_examples([r["take"] for r in examples], row_len)
    placed = [(r["doc_id"], r["copy"], r["take"], (text_rows + row) * row_len + pos) for r, (row, pos) in zip(examples, at)]
    example_rows = max((row + math.ceil((pos + r["take"]) / row_len) for r, (row, pos) in zip(examples, at)), default=0)
    if not placed:
        return stream, text_tokens, Layout(text_rows, 0)
    offsets = stream.unionByName(tokenized.sparkSession.createDataFrame(
        placed, "doc_id string, copy int, take long, offset long")).persist()
    offsets.count()
    stream.unpersist()
    total = text_tokens + sum(r["take"] for r in examples)
    return offsets, total, Layout(text_rows, example_rows)


def write_files(tokenized, offsets, directory: str, row_len: int, rows_per_file: int, pad_id: int, vocab_size: int,
                layout: Layout) -> list:
    """The chunk's files, written by the executors: one Row (name, sha256, rows, tokens) each, by name.

    The placed documents are cut into pieces at row boundaries (``_pieces``), ``rows_per_file``
    rows to a file, and each file's pieces go to one task (``write_files_batches``)."""
    placed = tokenized.join(F.broadcast(offsets), ["doc_id", "copy"])
    pieces = _pieces(placed, row_len, rows_per_file, id_dtype(vocab_size)().itemsize, layout)
    n_files = math.ceil(layout.rows / rows_per_file)
    written = pieces.repartition(n_files, "file").mapInArrow(
        lambda bs: write_files_batches(bs, directory, row_len, pad_id, vocab_size),
        "name string, sha256 string, rows long, tokens long").collect()
    return sorted(written, key=lambda r: r["name"])


def _pieces(placed, row_len: int, rows_per_file: int, width: int, layout: Layout):
    """Each document's taken tokens cut at row boundaries, one row per piece, in Spark SQL (the same
    arithmetic as ``jobs.packing.row_pieces``, without a trip through Python); ``width`` bytes per id.
    Each piece's row is then moved to where ``jobs.packing.interleave_row`` puts it."""
    offset, take = F.col("offset"), F.col("take")
    exploded = placed.select("doc_id", "category", "offset", "take", "n_tokens", "prompt_tokens", "ids", F.explode(
        F.sequence(F.floor(offset / row_len), F.floor((offset + take - 1) / row_len))).alias("stream_row"))
    row_start = F.col("stream_row") * row_len
    start = F.greatest(offset, row_start)
    end = F.least(offset + take, row_start + row_len)
    row = _interleaved_row(F.col("stream_row"), layout)
    return exploded.select(
        F.floor(row / rows_per_file).alias("file"), row.alias("row"), (start - row_start).alias("pos"), "doc_id",
        (start - offset).alias("doc_start"), (end - start).alias("length"), F.col("n_tokens").alias("doc_tokens"),
        "category", "prompt_tokens", F.substring("ids", ((start - offset) * width + 1).cast("int"),
                                                 ((end - start) * width).cast("int")).alias("ids"))


def _interleaved_row(row, layout: Layout):
    """``jobs.packing.interleave_row`` as a column (tests/test_feed_packing.py ties the two)."""
    t, e = layout.text_rows, layout.example_rows
    if t == 0 or e == 0:
        return row
    j = row - t
    text_before = F.floor(((2 * row + 1) * e - 1 - t) / F.lit(2.0 * t)) + 1
    examples_before = F.floor(((2 * j + 1) * t - e) / F.lit(2.0 * e)) + 1
    return F.when(row < t, row + F.least(F.lit(e), F.greatest(F.lit(0), text_before))) \
        .otherwise(j + F.least(F.lit(t), F.greatest(F.lit(0), examples_before))).cast("long")


def tally(tokenized, offsets, chunk_id: str):
    """(tokens per category, the usage increments: one row (doc_id, times_used, last_chunk_id) per
    document, counting its copies), as the manifest and ``usage`` record them."""
    per_doc = offsets.join(tokenized.select("doc_id", "copy", "category"), ["doc_id", "copy"])
    per_category = {r["category"]: int(r["t"]) for r in per_doc.groupBy("category").agg(F.sum("take").alias("t")).collect()}
    increments = offsets.groupBy("doc_id").agg(F.count("*").alias("times_used")) \
        .withColumn("last_chunk_id", F.lit(chunk_id)).toArrow()
    return per_category, increments


def publish(lake: Lake, chunk: OpenChunk, plan: Plan, written: list, per_category: dict[str, int], increments,
            total: int, n_rows: int) -> None:
    """``usage`` first (its increments saved beside the files, so a cleanup can take them back), then
    the manifest row ``ready`` with the files, their checksums, the mix and the plan's warnings."""
    write_parquet(chunks.usage_increments_path(lake.run_root, chunk.chunk_id), increments)
    lake.merge_counters("usage", increments, key=["doc_id"], add=["times_used"], assign=["last_chunk_id"],
                        job=chunks.usage_job(chunk.base_row))
    chunks.put(lake, {**chunk.base_row, "status": chunks.READY, "n_tokens": int(total), "n_rows": n_rows,
                      "files": [r["name"] for r in written], "sha256": [r["sha256"] for r in written],
                      "mix": list(per_category.items()), "reason": "; ".join(plan.warnings) or None,
                      "updated_at": chunks.now()}, job=f"feed:{chunk.chunk_id}")


# -- shared by the phases ------------------------------------------------------------------------------


def _per_category(values: dict):
    """A column: the value of the row's ``category`` in ``values``."""
    return F.element_at(F.create_map(*[x for c, v in values.items() for x in (F.lit(c), F.lit(v))]), F.col("category"))


def _by_key():
    """A category's documents in sampling order (ties by doc_id, then copy: a total order)."""
    return Window.partitionBy("category").orderBy("key", "doc_id", "copy")


def _release(*frames) -> None:
    for df in frames:
        df.unpersist()


# -- the job: chunks until the backlog is full ---------------------------------------------------------


def run(spark, recipe: Recipe, options: FeedOptions = FeedOptions()) -> FeedReport:
    """Clean up interrupted chunks, then produce chunks until the backlog is full (or one chunk)."""
    started = time.perf_counter()
    lake = Lake.of(recipe, spark)
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
