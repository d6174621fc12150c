"""Property tests of the pure mixing and packing functions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.packing import Span, curriculum_rank, pack, plan_budgets, row_pieces, split_tokens, take_to_budget

docs_strategy = st.lists(
    st.tuples(st.sampled_from(["zh", "en", "code"]), st.integers(min_value=1, max_value=300)), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(docs_strategy, st.integers(min_value=2, max_value=97))
def test_every_token_traces_to_a_document_span_and_nothing_is_lost(docs, row_len):
    documents = [(f"d{i}", cat, [1000 * i + t for t in range(n)]) for i, (cat, n) in enumerate(docs)]
    rows, spans = pack(documents, row_len, pad_id=-1)
    assert all(len(r) == row_len for r in rows)
    rebuilt: dict[str, list[int]] = {}
    covered = 0
    for row, row_spans in zip(rows, spans):
        pos = 0
        for s in row_spans:
            assert s.pos == pos  # spans tile the row from its start, in order
            piece = row[s.pos : s.pos + s.length]
            rebuilt.setdefault(s.doc_id, []).extend(piece)
            pos += s.length
            covered += s.length
        assert all(t == -1 for t in row[pos:])  # what no span covers is padding
    assert covered == sum(n for _, n in docs)
    assert rebuilt == {doc_id: tokens for doc_id, _, tokens in documents}


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=500), max_size=30), st.integers(min_value=0, max_value=5000))
def test_take_to_budget_fills_exactly_with_whole_documents_and_one_cut(counts, budget):
    takes = take_to_budget(counts, budget)
    assert sum(takes) == min(budget, sum(counts))
    partial = [i for i, (t, n) in enumerate(zip(takes, counts)) if 0 < t < n]
    assert len(partial) <= 1
    first_zero = next((i for i, t in enumerate(takes) if t == 0), len(takes))
    assert all(t == 0 for t in takes[first_zero:])  # a prefix of the order, never a gap


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=10**9),
       st.dictionaries(st.sampled_from(["zh", "en", "code", "math"]), st.floats(min_value=0.1, max_value=10), min_size=1))
def test_split_tokens_sums_exactly_and_follows_the_shares(total, shares):
    out = split_tokens(total, shares)
    assert sum(out.values()) == total
    norm = sum(shares.values())
    assert all(abs(out[c] - total * s / norm) <= 1 for c, s in shares.items())


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=100, max_value=10**6),
       st.dictionaries(st.sampled_from(["zh", "en", "code"]), st.integers(min_value=0, max_value=10**6), min_size=3),
       st.sampled_from(["repeat", "renormalize"]), st.integers(min_value=1, max_value=4))
def test_budgets_never_exceed_the_data_and_fill_the_chunk_when_they_can(chunk, available, rule, cap):
    mix = {"zh": 4.0, "en": 4.0, "code": 2.0}
    plan = plan_budgets(mix, chunk, available, rule, cap)
    for c, b in plan.budgets.items():
        assert 0 <= b <= available[c] * plan.copies[c]
        assert 1 <= plan.copies[c] <= cap
    capacity = sum(available[c] * plan.copies[c] for c in mix)
    assert sum(plan.budgets.values()) == min(chunk, capacity)
    if all(available[c] >= share for c, share in split_tokens(chunk, mix).items()):
        assert plan.budgets == split_tokens(chunk, mix) and not plan.warnings


def test_a_dry_category_repeats_up_to_the_cap_or_gives_its_share_away():
    mix = {"zh": 4.0, "en": 4.0, "code": 2.0}
    plan = plan_budgets(mix, 1000, {"zh": 10_000, "en": 10_000, "code": 50}, "repeat", 3)
    assert plan.copies["code"] == 3 and plan.budgets["code"] == 150 and sum(plan.budgets.values()) == 1000
    assert any("code" in w for w in plan.warnings)
    plan = plan_budgets(mix, 1000, {"zh": 10_000, "en": 10_000, "code": 50}, "renormalize", 3)
    assert plan.budgets == {"zh": 475, "en": 475, "code": 50}


def test_a_cut_document_keeps_its_full_length_in_its_spans():
    rows, spans = pack([("a", "en", [1, 2, 3]), ("b", "zh", [4, 5, 6], 9)], 4, pad_id=0)
    assert rows == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert spans == [[Span("a", 0, 0, 3, 3, "en"), Span("b", 3, 0, 1, 9, "zh")], [Span("b", 0, 1, 2, 9, "zh")]]


def test_row_pieces_and_curriculum_rank():
    assert row_pieces(5, 10, 4) == [(1, 1, 0, 3), (2, 0, 3, 4), (3, 0, 7, 3)]
    edges = [0.3, 0.6]
    # quality: high is easy; easy_first puts it first
    assert curriculum_rank(0.9, edges, "quality", "easy_first") == 0
    assert curriculum_rank(0.1, edges, "quality", "easy_first") == 2
    assert curriculum_rank(0.1, edges, "quality", "hard_first") == 0
    # length: short is easy
    assert curriculum_rank(0.1, edges, "length", "easy_first") == 0
