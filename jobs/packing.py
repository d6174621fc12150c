"""Mixing and packing as plain functions: budgets per category, taking documents up to a budget,
curriculum order, and packing token streams into fixed-length rows.

The feed job (``jobs/feed.py``) calls ``plan_budgets`` (on the driver) and ``curriculum_rank`` (in a
UDF) as they are. Its sampling keys (``sampling_keys``), taking documents to the budget and packing
them it computes in Spark SQL (xxhash64 keys, window sums, ``_pieces``): ``take_to_budget`` (over
the documents in the order of those keys), ``row_pieces`` and ``pack`` say what the taking and the
packing must give, and ``tests/test_feed_packing.py`` runs feed's phases on random documents and
checks that they do. ``jobs/synthetic_lake.py`` packs its chunks with ``pack``.

A chunk's token stream is the chosen documents in order, each followed by EOS. It is cut into rows
of ``row_len`` tokens (``seq_len + 1``: the trainer shifts labels inside a row); the last row is
padded. Every row lists its spans: ``(doc_id, pos, doc_start, length, doc_tokens, category)`` —
``length`` tokens of the document starting at its token ``doc_start`` sit at ``pos`` in the row;
``doc_tokens`` is the document's full length (EOS included), so a document cut at a budget
boundary still accounts for its remainder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Plan:
    budgets: dict[str, int]  # tokens per category in this chunk
    copies: dict[str, int]  # how many times a category's documents may appear (repeat rule)
    warnings: list[str] = field(default_factory=list)


def split_tokens(total: int, shares: dict[str, float]) -> dict[str, int]:
    """``total`` split by ``shares`` into integers that sum to exactly ``total`` (largest remainder)."""
    positive = {c: s for c, s in shares.items() if s > 0}
    norm = sum(positive.values())
    exact = {c: total * s / norm for c, s in positive.items()}
    out = {c: int(math.floor(v)) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: (-(exact[c] - out[c]), c))[: total - sum(out.values())]:
        out[c] += 1
    return out


def plan_budgets(mix: dict[str, float], chunk_tokens: int, available: dict[str, int], when_dry: str,
                 repeat_cap: int) -> Plan:
    """Tokens per category for one chunk, given the tokens each category has available.

    A category with fewer tokens than its share is dry: with ``repeat`` its documents may appear up
    to ``repeat_cap`` times; whatever is still missing (and everything, with ``renormalize``) is
    given to the other categories in proportion to their shares, as far as they have tokens.
    """
    budgets = split_tokens(chunk_tokens, mix)
    copies = {c: 1 for c in budgets}
    warnings: list[str] = []
    capacity = {c: available.get(c, 0) for c in budgets}
    for c in budgets:
        if capacity[c] < budgets[c]:
            if when_dry == "repeat" and capacity[c] > 0:
                copies[c] = min(repeat_cap, math.ceil(budgets[c] / capacity[c]))
                capacity[c] *= copies[c]
            warnings.append(
                f"category {c!r} has {available.get(c, 0):,} tokens for a share of {budgets[c]:,}"
                + (f": its documents repeat up to {copies[c]}x" if copies[c] > 1 else "")
            )
    # give what a dry category cannot fill to the others, in proportion to their shares
    for _ in range(len(budgets)):
        missing = sum(max(0, budgets[c] - capacity[c]) for c in budgets)
        if missing == 0:
            break
        for c in budgets:
            budgets[c] = min(budgets[c], capacity[c])
        open_ = {c: mix[c] for c in budgets if capacity[c] > budgets[c]}
        if not open_:
            warnings.append(f"the data has only {sum(budgets.values()):,} tokens for a chunk of {chunk_tokens:,}")
            break
        extra = split_tokens(missing, open_)
        for c, more in extra.items():
            budgets[c] += more
        if any(budgets[c] > capacity[c] for c in budgets):
            continue
        warnings.append("shares renormalised: " + ", ".join(f"{c} {budgets[c]:,}" for c in sorted(budgets)))
        break
    return Plan(budgets, copies, warnings)


def take_to_budget(token_counts: list[int], budget: int, whole: list[bool] | None = None) -> list[int]:
    """Tokens taken from each document, in order, to fill ``budget`` exactly where the data allows:
    whole documents, then the first tokens of the one that crosses the budget, then none. A document
    marked ``whole`` (an instruction example) is never cut: taken whole while the budget is not full."""
    out, used = [], 0
    for n, keep_whole in zip(token_counts, whole or [False] * len(token_counts)):
        take = (n if used < budget else 0) if keep_whole else max(0, min(n, budget - used))
        out.append(take)
        used += take
    return out


def curriculum_rank(value: float, edges: list[float], key: str, order: str) -> int:
    """Where a document goes in a chunk's curriculum: rows are ordered by this rank (0 first).

    ``edges`` are the ascending inner bucket edges of the key's values. Easy means high quality or
    a short text; ``easy_first`` puts the easiest bucket first, ``hard_first`` the hardest.
    """
    bucket = sum(1 for e in edges if value > e)  # 0 = lowest values
    easiness = bucket if key == "quality" else len(edges) - bucket  # higher = easier
    return len(edges) - easiness if order == "easy_first" else easiness


def row_pieces(offset: int, n_tokens: int, row_len: int) -> list[tuple[int, int, int, int]]:
    """Where a document of ``n_tokens`` starting at stream ``offset`` lands:
    ``(row, pos_in_row, doc_start, length)`` per row it touches."""
    out, start = [], 0
    while start < n_tokens:
        at = offset + start
        row, pos = divmod(at, row_len)
        length = min(n_tokens - start, row_len - pos)
        out.append((row, pos, start, length))
        start += length
    return out


def pack_examples(lengths: list[int], row_len: int) -> list[tuple[int, int]]:
    """(row, pos) of each instruction example of ``lengths`` tokens, so that none is cut across rows
    unless it is longer than a row: best fit, longest first (ties by index, so it is deterministic).

    An example longer than a row starts a fresh row and runs on into the rows after it; the room left
    in its last row takes shorter examples. Rows are numbered from 0 in the order they are opened.
    """
    import bisect

    placed: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    free: dict[int, list[int]] = {}  # room left → rows with that much room (the latest last)
    rooms: list[int] = []  # the distinct rooms in ``free``, ascending
    used: dict[int, int] = {}  # row → tokens in it
    n_rows = 0

    def give_back(row: int, room: int) -> None:
        if room > 0:
            if room not in free:
                bisect.insort(rooms, room)
                free[room] = []
            free[room].append(row)

    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(rooms, n) if n <= row_len else len(rooms)
        if at < len(rooms):  # the tightest row it fits in
            room = rooms[at]
            row = free[room].pop()
            if not free[room]:
                del free[room]
                rooms.pop(at)
            placed[i] = (row, used[row])
            used[row] += n
            give_back(row, room - n)
            continue
        whole, tail = divmod(n, row_len)
        placed[i] = (n_rows, 0)
        for r in range(n_rows, n_rows + whole):
            used[r] = row_len
        n_rows += whole
        if tail:
            used[n_rows] = tail
            give_back(n_rows, row_len - tail)
            n_rows += 1
    return placed


def interleave_row(row: int, text_rows: int, example_rows: int) -> int:
    """Where row ``row`` of a chunk goes when its ``example_rows`` instruction rows (numbered after the
    ``text_rows`` rows of the text stream) are spread evenly among them: a permutation of the rows that
    keeps each kind in its order. Row k of a kind with n rows sits at (2k + 1) / 2n of the chunk; the
    text rows go first on a tie. ``jobs/feed._interleaved_row`` is the same arithmetic in Spark SQL."""
    if example_rows == 0 or text_rows == 0:
        return row
    if row < text_rows:  # + the example rows j with (2j + 1) · text_rows < (2 · row + 1) · example_rows
        before = ((2 * row + 1) * example_rows - 1 - text_rows) // (2 * text_rows) + 1
        return row + min(example_rows, max(0, before))
    j = row - text_rows  # + the text rows r with (2r + 1) · example_rows <= (2j + 1) · text_rows
    before = ((2 * j + 1) * text_rows - example_rows) // (2 * example_rows) + 1
    return j + min(text_rows, max(0, before))


@dataclass(frozen=True)
class Span:
    doc_id: str
    pos: int
    doc_start: int
    length: int
    doc_tokens: int
    category: str
    prompt_tokens: int = 0


def pack(documents: list[tuple], row_len: int, pad_id: int) -> tuple[list[list[int]], list[list[Span]]]:
    """Pack ``(doc_id, category, tokens)`` into rows of ``row_len``; the last row is padded with
    ``pad_id`` (pad positions belong to no span). ``tokens`` are what is taken of the document (EOS
    already appended); a fourth item, ``doc_tokens``, is its full length when it was cut (default
    ``len(tokens)``)."""
    rows: list[list[int]] = []
    spans: list[list[Span]] = []
    offset = 0
    for doc_id, category, tokens, *cut in documents:
        doc_tokens = cut[0] if cut else len(tokens)
        for row, pos, doc_start, length in row_pieces(offset, len(tokens), row_len):
            while len(rows) <= row:
                rows.append([])
                spans.append([])
            rows[row].extend(tokens[doc_start : doc_start + length])
            spans[row].append(Span(doc_id, pos, doc_start, length, doc_tokens, category))
        offset += len(tokens)
    if rows and len(rows[-1]) < row_len:
        rows[-1].extend([pad_id] * (row_len - len(rows[-1])))
    return rows, spans
