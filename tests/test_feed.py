"""Tokenizer training and the feed job end to end on a small lake: chunks trace to documents, the
mix holds, usage matches the chunks, reruns are identical, crashes are cleaned up, bad files are
quarantined, backpressure stops at the backlog."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import feed, train_tokenizer
from jobs.stages import FeedOptions
from lake import chunks
from lake.artifacts import load_tokenizer
from lake.holdout import held_out
from lake.tables import Lake
from schemas import table
from tests.conftest import make_recipe

HAN = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后天"
WORDS = "river school budget council report station water energy house street train garden music".split()


def _docs(seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    rows = []
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(90):
        kind = ("zh", "en", "code")[i % 3]
        if kind == "zh":
            text = "".join(rng.choice(HAN) for _ in range(rng.randint(80, 400))) + f"，第{i}号。"
        elif kind == "en":
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 200))) + f" {i} 2026."
        else:
            text = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {rng.randint(0, 99)}" for j in range(rng.randint(3, 15)))
        rows.append({"doc_id": f"{kind}{i:03d}", "text": text, "source": kind, "url": None, "meta": None,
                     "ingested_at": now, "signals": None, "pii": None, "quality": rng.uniform(0.2, 1.0),
                     "domain": kind, "lang": kind, "category": kind, "cluster_id": None})
    return pa.Table.from_pylist(rows, schema=table("documents_dedup").schema)


def _recipe(tmp_path, name="lake", **feed_overrides):
    cfg = {"chunk_tokens": 3000, "stages": {"pretrain": {"seq_len": 63}}, "rows_per_file": 20, **feed_overrides}
    recipe = make_recipe(tmp_path, [{"name": "t", "path": str(tmp_path / "none.jsonl")}],
                         tokenizer={"vocab_size": 600, "min_frequency": 1, "holdout_docs": 5,
                                    "domain_tokens": ["river school"]},
                         feed=cfg)
    return recipe.model_copy(update={"lake": str(tmp_path / name)})


@pytest.fixture(scope="module")
def fed(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feed")
    recipe = _recipe(tmp)
    lake = Lake(recipe.lake)
    lake.write_arrow("documents_dedup", _docs(), mode="overwrite", job="test")
    report = train_tokenizer.run(spark, recipe)
    first = feed.run(spark, recipe, FeedOptions(until_ready=3))
    return recipe, lake, report, first


def _chunk_rows(lake_root: str, chunk_id: str) -> list[dict]:
    return pq.read_table(chunks.chunk_dir(lake_root, chunk_id)).sort_by("row").to_pylist()


def test_tokenizer_vocabulary_buffer_digits_and_domain_tokens(fed):
    recipe, _, report, _ = fed
    tok, meta = load_tokenizer(recipe)
    assert meta["vocab_size"] % 128 == 0 and meta["vocab_size"] == tok.get_vocab_size()
    assert meta["model_vocab_size"] % 128 == 0 and meta["model_vocab_size"] - meta["vocab_size"] >= 1000
    assert tok.encode("2026", add_special_tokens=False).tokens == ["2", "0", "2", "6"]
    assert "river school" in tok.encode("the river school report", add_special_tokens=False).tokens
    assert set(report.compression) == {"zh", "en", "code"}
    assert report.compression["zh"]["han_per_token"] > 0.5 and report.compression["en"]["bytes_per_token"] > 1.5


def test_a_chinese_domain_token_matches_inside_running_text_and_a_word_only_standing_alone():
    from jobs.train_tokenizer import build_tokenizer

    tok = build_tokenizer(["服用药物后 the river flows"] * 20, 300, ["<|endoftext|>"], ["阿司匹林", "aspirin"], 1)
    assert "阿司匹林" in tok.encode("服用阿司匹林后", add_special_tokens=False).tokens
    assert "aspirin" in tok.encode("take aspirin now", add_special_tokens=False).tokens
    assert "aspirin" not in tok.encode("aspirinate", add_special_tokens=False).tokens


def test_removed_tokens_leave_the_vocabulary_and_ids_stay_contiguous():
    from jobs.train_tokenizer import build_tokenizer, pad_to_multiple, remove_tokens

    texts = ["the river and the riverbank and the rivers"] * 50
    tok = build_tokenizer(texts, 300, ["<|endoftext|>"], [], 1)
    target = "Ġriver"
    assert target in tok.get_vocab()
    trimmed = remove_tokens(tok, [target])
    vocab = trimmed.get_vocab()
    assert target not in vocab and "Ġriverbank" not in vocab  # built from it: unreachable, gone too
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert trimmed.decode(trimmed.encode("the river").ids) == "the river"
    pad_to_multiple(trimmed)
    assert trimmed.get_vocab_size() % 128 == 0


def test_chunks_trace_to_documents_and_hold_the_mix(fed):
    recipe, lake, _, first = fed
    tok, meta = load_tokenizer(recipe)
    texts = {r["doc_id"]: r["text"] for r in lake.read_arrow("documents_dedup").to_pylist()}
    ready = [r for r in chunks.manifest(lake) if r["status"] == "ready"]
    assert [r["chunk_id"] for r in ready] == ["pretrain-000000", "pretrain-000001", "pretrain-000002"]
    for chunk in ready:
        rows = _chunk_rows(recipe.lake, chunk["chunk_id"])
        assert len(rows) == chunk["n_rows"] and all(len(r["input_ids"]) == 64 for r in rows)
        per_cat: Counter = Counter()
        seen: dict[str, int] = {}
        for row in rows:
            for s in row["spans"]:
                ids = tok.encode(texts[s["doc_id"]], add_special_tokens=False).ids + [meta["eos_id"]]
                assert s["doc_tokens"] == len(ids)
                assert row["input_ids"][s["pos"] : s["pos"] + s["length"]] == ids[s["doc_start"] : s["doc_start"] + s["length"]]
                assert s["doc_start"] == seen.get(s["doc_id"], 0)  # pieces of a document follow each other
                seen[s["doc_id"]] = s["doc_start"] + s["length"]
                per_cat[s["category"]] += s["length"]
        assert sum(per_cat.values()) == chunk["n_tokens"] == recipe.feed.chunk_tokens
        # a document is whole, or it is the one cut at its category's budget (its full length is in the span)
        cut = Counter(r for d, n in seen.items() for r in [d[:2] if d.startswith(("zh", "en")) else "code"]
                      if n < len(tok.encode(texts[d], add_special_tokens=False).ids) + 1)
        assert all(v <= 1 for v in cut.values())
        target = {"zh": 0.4, "en": 0.4, "code": 0.2}
        for cat, share in target.items():
            assert abs(per_cat[cat] / chunk["n_tokens"] - share) <= 0.01
        assert dict(chunk["mix"]) == dict(per_cat)
        assert dict(chunk["mix_weights"]) == target and chunk["mix_signal"] is None  # a fixed mix: no signal


def test_usage_counts_equal_appearances_in_ready_chunks(fed):
    recipe, lake, _, _ = fed
    appearances: Counter = Counter()
    for chunk in chunks.manifest(lake):
        if chunk["status"] == "ready":
            for row in _chunk_rows(recipe.lake, chunk["chunk_id"]):
                appearances.update(s["doc_id"] for s in row["spans"] if s["doc_start"] == 0)
    usage = {r["doc_id"]: r["times_used"] for r in lake.read_arrow("usage").to_pylist() if r["times_used"]}
    assert usage == dict(appearances)


def test_placements_name_each_chunk_row_and_token_of_a_document(fed):
    """What ``tokenmill trace`` shows of a document's chunks, against the rows the chunks hold."""
    recipe, lake, _, _ = fed
    usage = {r["doc_id"]: r["times_used"] for r in lake.read_arrow("usage").to_pylist()}
    doc = max(sorted(usage), key=lambda d: usage[d])  # the most used (in several chunks where any is)
    expected = []
    for chunk in chunks.manifest(lake):
        pieces = [(row["row"], s["length"]) for row in _chunk_rows(recipe.lake, chunk["chunk_id"])
                  for s in row["spans"] if s["doc_id"] == doc]
        if pieces:
            expected.append((chunk["chunk_id"], sorted({r for r, _ in pieces}), sum(n for _, n in pieces)))
    assert len(expected) == usage[doc] >= 1
    assert [(p.chunk["chunk_id"], p.rows, p.tokens) for p in chunks.placements(lake, doc)] == expected
    assert chunks.placements(lake, "no-such-document") == []


def test_same_seed_same_chunks_and_backpressure(spark, tmp_path, fed):
    recipe, lake, _, first = fed
    assert len(first.produced) == 3
    again = feed.run(spark, recipe, FeedOptions(until_ready=3))
    assert again.produced == [] and again.backlog == 3  # the backlog is full: nothing to do
    twin = recipe.model_copy(update={"lake": str(tmp_path / "twin")})
    twin_lake = Lake(twin.lake)
    twin_lake.write_arrow("documents_dedup", _docs(), mode="overwrite", job="test")
    # the same tokenizer file, so that only the feed is compared
    import shutil

    shutil.copytree(f"{recipe.lake}/models", f"{twin.lake}/models")
    feed.run(spark, twin, FeedOptions(until_ready=2))
    for a, b in zip(chunks.manifest(lake)[:2], chunks.manifest(twin_lake)):
        assert (a["chunk_id"], a["sha256"], a["n_tokens"]) == (b["chunk_id"], b["sha256"], b["n_tokens"])


def _dying_before_ready(monkeypatch):
    """Feed "killed" between its usage commit and the manifest's ``ready``; returns the real ``chunks.put``."""
    real = chunks.put

    def dies_before_ready(lake_, row, job):
        if row["status"] == "ready":
            raise KeyboardInterrupt("killed between the usage commit and the manifest")
        return real(lake_, row, job)

    monkeypatch.setattr(chunks, "put", dies_before_ready)
    return real


def test_a_crash_before_ready_is_cleaned_up_and_usage_stays_true(spark, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, "crash")
    lake = Lake(recipe.lake)
    lake.write_arrow("documents_dedup", _docs(1), mode="overwrite", job="test")
    train_tokenizer.run(spark, recipe)
    feed.run(spark, recipe, FeedOptions(until_ready=1))
    usage_before = {r["doc_id"]: r["times_used"] for r in lake.read_arrow("usage").to_pylist()}

    real = _dying_before_ready(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        feed.run(spark, recipe, FeedOptions(until_ready=2))
    monkeypatch.setattr(chunks, "put", real)
    assert [r["status"] for r in chunks.manifest(lake)] == ["ready", "writing"]
    report = feed.run(spark, recipe, FeedOptions())
    assert report.cleaned == ["pretrain-000001"]
    assert [r["status"] for r in chunks.manifest(lake)] == ["ready", "ready"]
    appearances: Counter = Counter()
    for chunk in chunks.manifest(lake):
        for row in _chunk_rows(recipe.lake, chunk["chunk_id"]):
            appearances.update(s["doc_id"] for s in row["spans"] if s["doc_start"] == 0)
    usage = {r["doc_id"]: r["times_used"] for r in lake.read_arrow("usage").to_pylist() if r["times_used"]}
    assert usage == dict(appearances)
    assert sum(usage.values()) > sum(usage_before.values())


def test_one_chunk_id_dying_twice_has_its_usage_taken_back_both_times(spark, tmp_path, monkeypatch):
    """Clean-up frees the id, the next attempt takes it again: each attempt's usage is undone once."""
    recipe = _recipe(tmp_path, "twice")
    lake = Lake(recipe.lake)
    lake.write_arrow("documents_dedup", _docs(1), mode="overwrite", job="test")
    train_tokenizer.run(spark, recipe)
    real = _dying_before_ready(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        feed.run(spark, recipe, FeedOptions(until_ready=1))  # attempt 1 of pretrain-000000 dies
    assert chunks.cleanup_interrupted(lake) == ["pretrain-000000"]
    with pytest.raises(KeyboardInterrupt):
        feed.run(spark, recipe, FeedOptions(until_ready=1))  # attempt 2 of the same id dies too
    assert chunks.cleanup_interrupted(lake) == ["pretrain-000000"]
    monkeypatch.setattr(chunks, "put", real)
    assert not any(r["times_used"] for r in lake.read_arrow("usage").to_pylist())  # nothing was trained on
    jobs = [v.job for v in lake.versions("usage")]
    assert sum(str(j).startswith("usage-undo:pretrain-000000@") for j in jobs) == 2


def test_a_quarantined_chunk_gives_its_usage_back_once(spark, tmp_path):
    recipe = _recipe(tmp_path, "quarantine")
    lake = Lake(recipe.lake)
    lake.write_arrow("documents_dedup", _docs(2), mode="overwrite", job="test")
    train_tokenizer.run(spark, recipe)
    feed.run(spark, recipe, FeedOptions(until_ready=2))
    first, second = chunks.manifest(lake)
    chunks.quarantine(lake, first, "loss kept spiking after rollbacks", job="trainer")
    chunks.quarantine(lake, chunks.manifest(lake)[0], "again", job="trainer")  # a second quarantine changes nothing
    appearances: Counter = Counter()
    for row in _chunk_rows(recipe.lake, second["chunk_id"]):
        appearances.update(s["doc_id"] for s in row["spans"] if s["doc_start"] == 0)
    usage = {r["doc_id"]: r["times_used"] for r in lake.read_arrow("usage").to_pylist() if r["times_used"]}
    assert usage == dict(appearances)  # only the chunk still in training counts


def test_checksum_mismatch_or_missing_file_quarantines(spark, tmp_path):
    recipe = _recipe(tmp_path, "verify", rows_per_file=10)
    lake = Lake(recipe.lake)
    lake.write_arrow("documents_dedup", _docs(2), mode="overwrite", job="test")
    train_tokenizer.run(spark, recipe)
    feed.run(spark, recipe, FeedOptions(until_ready=2))
    first, second = chunks.manifest(lake)
    path = f"{chunks.chunk_dir(recipe.lake, first['chunk_id'])}/{first['files'][0]}"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    import os

    os.remove(f"{chunks.chunk_dir(recipe.lake, second['chunk_id'])}/{second['files'][-1]}")
    report = feed.run(spark, recipe, FeedOptions(until_ready=None, verify=True))
    reasons = dict(report.quarantined)
    assert "sha256" in reasons["pretrain-000000"] and "missing" in reasons["pretrain-000001"]
    statuses = {r["chunk_id"]: (r["status"], r["reason"]) for r in chunks.manifest(lake)}
    assert statuses["pretrain-000000"][0] == "quarantined" and "sha256" in statuses["pretrain-000000"][1]
    assert statuses["pretrain-000002"][0] == "ready"  # and the run still made its chunk


def test_the_trainers_held_out_documents_never_enter_a_chunk(fed):
    recipe, lake, _, _ = fed
    held = held_out(lake)
    assert len(held) == 9  # 10% of each 30-document source: the cap for small sources
    in_chunks = {s["doc_id"] for c in chunks.manifest(lake) for row in _chunk_rows(recipe.lake, c["chunk_id"])
                 for s in row["spans"]}
    assert in_chunks and not (held & in_chunks)


def test_the_trainer_trains_on_the_chunks_feed_wrote_and_never_on_a_held_out_document(fed, tmp_path):
    """Feed's own chunks (not synthetic ones) through the DeepSpeed trainer: every chunk consumed, a loss
    per category of the mix, perplexity per source, and no held-out document in any row it trained on."""
    import math
    import shutil

    from trainer.callbacks import Callback, default_callbacks
    from trainer.loop import Trainer

    recipe, lake, _, _ = fed
    shutil.copytree(recipe.lake, tmp_path / "lake")  # a copy: the other tests read fed's chunks as ready
    recipe = recipe.model_copy(update={"lake": str(tmp_path / "lake"), "trainer": recipe.trainer.model_copy(
        update={"eval_every": 2, "checkpoint_every": 1000, "micro_batch": 4, "batch_ramp": [(0, 4)]})})
    lake = Lake(recipe.lake)
    spans = {c["chunk_id"]: [r["spans"] for r in _chunk_rows(recipe.lake, c["chunk_id"])] for c in chunks.manifest(lake)}

    class Rows(Callback):
        name = "rows"

        def __init__(self):
            self.docs, self.metrics = set(), []

        def on_step_end(self, trainer, step):
            self.docs |= {s["doc_id"] for r in step.rows for s in spans[step.chunk_id][r]}
            self.metrics.append(step.metrics)

    seen = Rows()
    trainer = Trainer(recipe, exit_when_idle=0.1, callbacks=[*default_callbacks(recipe.trainer), seen])
    losses = trainer.run()
    assert [c["status"] for c in chunks.manifest(lake)] == ["consumed"] * 3
    assert losses and all(math.isfinite(x) for x in losses)
    assert set().union(*(m["loss_by_category"] for m in seen.metrics)) == {"zh", "en", "code"}
    evaluated = [m["perplexity_by_source"] for m in seen.metrics if "perplexity_by_source" in m]
    assert evaluated and set(evaluated[-1]) == {"zh", "en", "code"}
    held = held_out(lake)
    assert held and seen.docs and not (held & seen.docs)


def test_status_flags_usage_that_disagrees_with_the_chunks(fed, tmp_path, capsys):
    import shutil

    from lake.status import print_status

    recipe, _, _, _ = fed
    shutil.copytree(recipe.lake, tmp_path / "lake")
    lake = Lake(str(tmp_path / "lake"))
    assert chunks.usage_disagreements(lake) == []
    print_status(lake.root)
    assert "usage agrees with the ready, training and consumed chunks" in capsys.readouterr().out
    doc = next(r["doc_id"] for r in lake.read_arrow("usage").to_pylist() if r["times_used"])
    before = next(r["times_used"] for r in lake.read_arrow("usage").to_pylist() if r["doc_id"] == doc)
    lake.merge_counters("usage", pa.table({"doc_id": [doc], "times_used": [2], "last_chunk_id": pa.nulls(1, pa.string())}),
                        key=["doc_id"], add=["times_used"], job="by hand")
    assert chunks.usage_disagreements(lake) == [(doc, before + 2, before)]
    print_status(lake.root)
    out = capsys.readouterr().out
    assert f"WARNING: usage disagrees with the chunks for 1 document(s): {doc} (usage {before + 2}, chunks {before})" in out
    # a quarantined chunk gives its usage back: still in agreement
    row = chunks.manifest(lake)[0]
    lake.merge_counters("usage", pa.table({"doc_id": [doc], "times_used": [-2], "last_chunk_id": pa.nulls(1, pa.string())}),
                        key=["doc_id"], add=["times_used"], job="by hand")
    chunks.quarantine(lake, row, "test", job="test")
    assert chunks.usage_disagreements(lake) == []


def _lake_copy(spark, fed, tmp_path, **feed_overrides):
    import shutil

    recipe, _, _, _ = fed
    shutil.copytree(recipe.lake, tmp_path / "lake")
    copy = recipe.model_copy(update={"lake": str(tmp_path / "lake"),
                                     "feed": recipe.feed.model_copy(update=feed_overrides)})
    return copy, Lake(copy.lake, spark)


def _misjudged(recipe, factor: float) -> tuple:
    """The tokenizer, and its metadata with every category's bytes per token divided by ``factor``:
    feed then estimates ``factor`` times the tokens a document really has."""
    tok, meta = load_tokenizer(recipe)
    compression = {c: {**v, "bytes_per_token": v["bytes_per_token"] / factor} for c, v in meta["compression"].items()}
    return tok, {**meta, "compression": compression}


def test_a_wrong_token_estimate_is_topped_up_to_each_categorys_budget_exactly(spark, tmp_path, fed):
    recipe, lake = _lake_copy(spark, fed, tmp_path)
    tok, wrong = _misjudged(recipe, 4.0)  # it believes each document is 4x longer: it would choose a quarter
    report = feed.produce_chunk(spark, recipe, lake, tok, wrong)
    assert report.mix == report.target and sum(report.target.values()) == recipe.feed.chunk_tokens
    row = next(r for r in chunks.manifest(lake) if r["chunk_id"] == report.chunk_id)
    assert dict(row["mix"]) == report.target and row["status"] == "ready"


def test_a_category_that_runs_out_below_its_budget_fails_loudly_and_leaves_nothing(spark, tmp_path, fed):
    recipe, lake = _lake_copy(spark, fed, tmp_path, chunk_tokens=200_000)
    tok, wrong = _misjudged(recipe, 200.0)  # the plan believes there is plenty of every category
    before = [r["chunk_id"] for r in chunks.manifest(lake)]
    with pytest.raises(feed.FeedError, match=r"category '(zh|en|code)': its documents in documents_dedup hold "
                                              r"[\d,]+ tokens, below its budget of [\d,]+ .*Retrain the tokenizer"):
        feed.produce_chunk(spark, recipe, lake, tok, wrong)
    assert [r["chunk_id"] for r in chunks.manifest(lake)] == before  # no writing row left behind


def test_the_held_out_set_is_frozen_and_grows_only_with_documents_never_used(spark, tmp_path, fed):
    """A source that grows gets more held-out documents, but never one a chunk already holds: the old
    rule (the first by hash of today's table) would have turned trained-on documents into evaluation ones."""
    recipe, lake = _lake_copy(spark, fed, tmp_path)
    before = held_out(lake)
    in_chunks = {s["doc_id"] for c in chunks.manifest(lake) for row in _chunk_rows(recipe.lake, c["chunk_id"])
                 for s in row["spans"]}
    grown = _docs(seed=1).to_pylist()  # 90 more documents, 30 per source
    for r in grown:
        r["doc_id"] = "new-" + r["doc_id"]
    lake.write_arrow("documents_dedup", pa.Table.from_pylist(grown, schema=table("documents_dedup").schema),
                     mode="append", job="test")
    feed.run(spark, recipe)
    after = held_out(lake)
    assert before < after and len(after) == 18  # 10% of each 60-document source now
    assert not ((after - before) & in_chunks)  # the additions were never trained on
    everything = {s["doc_id"] for c in chunks.manifest(lake) for row in _chunk_rows(recipe.lake, c["chunk_id"])
                  for s in row["spans"]}
    assert not (after & everything)
    # what the old rule would have chosen now includes documents that are in the earlier chunks
    import hashlib
    rows = lake.read_arrow("documents_dedup", columns=["doc_id", "source"]).to_pylist()
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r["doc_id"])
    recomputed = {i for ids in by_source.values() for i in sorted(ids, key=lambda i: (hashlib.sha256(i.encode()).hexdigest(), i))[:6]}
    assert recomputed & in_chunks
