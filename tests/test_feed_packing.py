"""Feed's Spark phases against the plain functions of ``jobs/packing``.

Feed samples, takes to the budget and packs in Spark SQL (xxhash64 keys, window sums, ``_pieces``).
On random documents with hand-made token ids (the tokenizer bypassed), its phases ``sampling_keys``
→ ``select_documents`` → ``place`` → ``write_files`` must give exactly the tokens
``packing.take_to_budget`` takes from each category's documents in the order of feed's keys, and
exactly the rows (token ids, padding) and spans ``packing.pack`` makes of them; instruction examples
among them are taken whole, packed by ``packing.pack_examples`` and their rows spread among the
text rows by ``packing.interleave_row``.
"""

from __future__ import annotations

import random
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import feed
from jobs.feed_executors import id_dtype
from jobs.packing import Plan, Span, interleave_row, pack, pack_examples, row_pieces, take_to_budget
from tests.conftest import make_recipe

CATEGORIES = ("zh", "en", "code")
ELIGIBLE = ("doc_id string, text string, prompt string, category string, quality double, bytes int, chars int, "
            "times_used long, est long")  # the columns of feed.eligible_documents
CURRICULA = {
    "none": {},
    "quality, across chunks": {"key": "quality", "buckets": 3, "across_chunks": True},
    "length, hard first": {"key": "length", "order": "hard_first", "buckets": 2},
}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feed_packing")
    return {name: make_recipe(tmp, [{"name": "t", "path": str(tmp / "none.jsonl")}],
                              feed={"seed": 11, "decay": 0.5, "stages": {"pretrain": {"seq_len": 63, "curriculum": c}}})
            for name, c in CURRICULA.items()}


@st.composite
def chunks_to_make(draw):
    n_docs = draw(st.integers(min_value=1, max_value=24))
    docs = []
    for i in range(n_docs):
        n_tokens = draw(st.integers(min_value=1, max_value=90))  # rows are 7-33 tokens: many are longer
        docs.append({"doc_id": f"d{i:03d}", "text": f"text of d{i:03d}", "category": draw(st.sampled_from(CATEGORIES)),
                     "quality": draw(st.floats(min_value=0.0, max_value=1.0)), "bytes": 3 * n_tokens,
                     "chars": draw(st.integers(min_value=1, max_value=400)),
                     "times_used": draw(st.integers(min_value=0, max_value=3)),
                     # feed estimates tokens before tokenising: sometimes under, sometimes over
                     "est": draw(st.integers(min_value=max(1, n_tokens // 2), max_value=2 * n_tokens)),
                     "n_tokens": n_tokens,
                     # an instruction example about one time in three: its first tokens are the prompt
                     "prompt_tokens": draw(st.integers(1, n_tokens - 1)) if n_tokens > 1 and draw(
                         st.integers(0, 2)) == 0 else 0})
    budgets = {c: draw(st.integers(min_value=0, max_value=250)) for c in CATEGORIES}
    copies = {c: draw(st.integers(min_value=1, max_value=2)) for c in CATEGORIES}
    return {"docs": docs, "plan": Plan(budgets, copies), "row_len": draw(st.integers(min_value=7, max_value=33)),
            "rows_per_file": draw(st.integers(min_value=1, max_value=4)),
            "vocab": draw(st.sampled_from([1000, 70000])),  # uint16 and uint32 ids
            "chunk_id": f"pretrain-{draw(st.integers(min_value=0, max_value=3)):06d}",
            "curriculum": draw(st.sampled_from(sorted(CURRICULA))), "seed": draw(st.integers(0, 2**32))}


def _expected_takes(keyed: list[dict], budgets: dict[str, int]) -> dict[tuple[str, int], int]:
    """What feed must take: per category, in key order, the documents feed selects for tokenising
    (estimated tokens before them under 110% of the budget + 64), filled by take_to_budget."""
    takes = {}
    for category, budget in budgets.items():
        ordered = sorted((r for r in keyed if r["category"] == category), key=lambda r: (r["key"], r["doc_id"], r["copy"]))
        selected, estimated = [], 0
        for r in ordered:
            if estimated < budget * 1.1 + 64:
                selected.append(r)
            estimated += r["est"]
        whole = [r["prompt_tokens"] > 0 for r in selected]
        for r, take in zip(selected, take_to_budget([r["n_tokens"] for r in selected], budget, whole)):
            if take > 0:
                takes[(r["doc_id"], r["copy"])] = take
    return takes


@settings(max_examples=15, deadline=None)
@given(chunks_to_make())
def test_feeds_spark_phases_take_and_pack_as_the_packing_functions_do(spark, recipes, case):
    recipe, plan, chunk_id = recipes[case["curriculum"]], case["plan"], case["chunk_id"]
    row_len, rows_per_file, vocab = case["row_len"], case["rows_per_file"], case["vocab"]
    rng = random.Random(case["seed"])
    pad_id = vocab - 1  # no document token is the pad id: padding is told apart from tokens
    tokens = {d["doc_id"]: [rng.randrange(vocab - 1) for _ in range(d["n_tokens"])] for d in case["docs"]}
    n_tokens = {d["doc_id"]: d["n_tokens"] for d in case["docs"]}
    prompt_tokens = {d["doc_id"]: d["prompt_tokens"] for d in case["docs"]}
    category = {d["doc_id"]: d["category"] for d in case["docs"]}
    columns = [c.split()[0] for c in ELIGIBLE.split(", ")]
    eligible = spark.createDataFrame([tuple(d.get(c) for c in columns) for d in case["docs"]], ELIGIBLE)
    ids = spark.createDataFrame([(doc_id, prompt_tokens[doc_id], len(t), np.asarray(t, id_dtype(vocab)).tobytes())
                                 for doc_id, t in tokens.items()], "doc_id string, prompt_tokens int, n_tokens long, ids binary")

    keyed = feed.sampling_keys(eligible, plan, recipe, chunk_id)
    chosen = feed.select_documents(keyed, plan.budgets)
    # the shape tokenise gives, with these token ids instead of a tokenizer's
    tokenized = chosen.drop("text", "prompt").join(ids, "doc_id").select(*[c.split()[0] for c in feed.TOKENIZED.split(", ")])
    offsets, total, layout = feed.place(tokenized, plan.budgets, recipe.feed.seed, chunk_id, row_len)

    keys = [{**r.asDict(), "n_tokens": n_tokens[r["doc_id"]], "prompt_tokens": prompt_tokens[r["doc_id"]]}
            for r in keyed.select("doc_id", "copy", "category", "key", "rank", "est").collect()]
    assert sorted((r["doc_id"], r["copy"]) for r in keys) == sorted(
        (d["doc_id"], c) for d in case["docs"] for c in range(plan.copies[d["category"]]))  # the repeat rule
    placed = sorted(offsets.collect(), key=lambda r: r["offset"])
    expected = _expected_takes(keys, plan.budgets)
    assert {(r["doc_id"], r["copy"]): r["take"] for r in placed} == expected
    assert total == sum(expected.values())
    rank = {(r["doc_id"], r["copy"]): r["rank"] for r in keys}
    stream = [r for r in placed if prompt_tokens[r["doc_id"]] == 0]
    order = [rank[(r["doc_id"], r["copy"])] for r in stream]
    assert order == sorted(order)  # the curriculum orders the stream

    # pack the same selection, in feed's order, each document cut to what was taken
    documents = [(r["doc_id"], category[r["doc_id"]], tokens[r["doc_id"]][: r["take"]], n_tokens[r["doc_id"]])
                 for r in stream]
    rows, spans = pack(documents, row_len, pad_id)
    examples = sorted(((r["doc_id"], r["copy"]) for r in placed if prompt_tokens[r["doc_id"]] > 0))
    assert layout.text_rows == len(rows)
    example_rows, spans = _example_rows(examples, tokens, category, prompt_tokens, row_len, pad_id, layout, spans)
    rows += example_rows
    rows = _interleaved(rows, layout)
    spans = _interleaved(spans, layout)
    if total > 0:
        with tempfile.TemporaryDirectory() as directory:
            written = feed.write_files(tokenized, offsets, directory, row_len, rows_per_file, pad_id, vocab, layout)
            files = [pq.read_table(f"{directory}/{w['name']}").to_pylist() for w in written]
        assert [w["name"] for w in written] == [f"part-{i:05d}.parquet" for i in range(len(files))]
        assert [[r["row"] for r in f] for f in files] == [
            list(range(i, min(i + rows_per_file, len(rows)))) for i in range(0, len(rows), rows_per_file)]
        got = [r for f in files for r in f]
        assert [r["input_ids"] for r in got] == rows
        assert [r["spans"] for r in got] == [[s.__dict__ for s in row] for row in spans]
        assert [(w["rows"], w["tokens"]) for w in written] == [
            (len(f), sum(s["length"] for r in f for s in r["spans"])) for f in files]
    else:
        assert rows == []
    offsets.unpersist()


def _example_rows(examples, tokens, category, prompt_tokens, row_len, pad_id, layout, spans):
    """(rows, spans) of the instruction examples, as ``pack_examples`` places them (its rows numbered
    after the text rows); checks that one no longer than a row stays in one row."""
    at = pack_examples([len(tokens[doc_id]) for doc_id, _ in examples], row_len)
    assert layout.example_rows == max((r + -(-(p + len(tokens[d])) // row_len) for (d, _), (r, p) in zip(examples, at)),
                                      default=0)
    rows = [[pad_id] * row_len for _ in range(layout.example_rows)]
    out = [[] for _ in range(layout.example_rows)]
    for (doc_id, _), (row, pos) in zip(examples, at):
        ids = tokens[doc_id]
        pieces = row_pieces(row * row_len + pos, len(ids), row_len)
        assert len(pieces) == 1 or len(ids) > row_len
        for r, p, start, length in pieces:
            rows[r][p : p + length] = ids[start : start + length]
            out[r].append(Span(doc_id, p, start, length, len(ids), category[doc_id], prompt_tokens[doc_id]))
    return rows, [*spans, *[sorted(row, key=lambda s: s.pos) for row in out]]


def _interleaved(rows: list, layout) -> list:
    """The rows in the order ``interleave_row`` gives them."""
    out = [None] * len(rows)
    for i, row in enumerate(rows):
        out[interleave_row(i, layout.text_rows, layout.example_rows)] = row
    return out


def test_interleave_row_is_an_even_permutation():
    for text_rows in range(8):
        for example_rows in range(8):
            moved = [interleave_row(r, text_rows, example_rows) for r in range(text_rows + example_rows)]
            assert sorted(moved) == list(range(text_rows + example_rows))
            assert moved[:text_rows] == sorted(moved[:text_rows]) and moved[text_rows:] == sorted(moved[text_rows:])
    assert [interleave_row(r, 6, 2) for r in range(8)] == [0, 1, 3, 4, 5, 7, 2, 6]  # an example row every 4


def test_pack_examples_never_cuts_one_that_fits_a_row():
    lengths = [5, 12, 3, 20, 4, 16, 1]
    at = pack_examples(lengths, 16)
    assert at == [(3, 0), (1, 4), (3, 9), (0, 0), (3, 5), (2, 0), (3, 12)]
    used = set()
    for n, (row, pos) in zip(lengths, at):
        cells = set(range(row * 16 + pos, row * 16 + pos + n))
        assert not cells & used and (n > 16 or pos + n <= 16)
        used |= cells


def test_sampling_keys_prefer_heavier_and_less_used_documents(spark, recipes):
    """Efraimidis-Spirakis: of two documents, the one of weight a has the smaller key with
    probability a / (a + b); weight = quality × decay ** times_used."""
    pairs = 2000
    docs = [(f"{side}{i:05d}", "t", None, "en", quality, 3, 3, used, 1)
            for i in range(pairs) for side, quality, used in (("heavy", 0.8, 0), ("light", 0.2, 0),
                                                              ("fresh", 0.5, 0), ("used", 0.5, 1))]
    keyed = feed.sampling_keys(spark.createDataFrame(docs, ELIGIBLE), Plan({"en": 1}, {"en": 1}), recipes["none"],
                               "pretrain-000000")
    key = {r["doc_id"]: r["key"] for r in keyed.select("doc_id", "key").collect()}
    heavier_first = sum(key[f"heavy{i:05d}"] < key[f"light{i:05d}"] for i in range(pairs)) / pairs
    fresher_first = sum(key[f"fresh{i:05d}"] < key[f"used{i:05d}"] for i in range(pairs)) / pairs
    assert 0.76 < heavier_first < 0.84  # 0.8 / (0.8 + 0.2)
    assert 0.62 < fresher_first < 0.71  # 0.5 / (0.5 + 0.25), decay 0.5
