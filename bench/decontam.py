"""Benchmark: benchmark decontamination and URL blocklists in the filter, against a naive set intersection.

Same documents (~1 KB pieces of the demo corpus's real zh / en / code text; one in fifty has an
evaluation item pasted in), same evaluation set (``--eval-items`` passages of a tenth of the pieces
held out from the documents: the same vocabulary, so chance matches of common phrases happen as in
real data), same process, one core:
- naive: every document's 13-grams as tuples of tokens looked up in a Python set of the evaluation
  set's 13-grams (the obvious implementation; datatrove's ``NGramsDecontFilter`` does this with
  hashes of the n-gram strings), on the same tokens;
- tokenmill: ``jobs.decontam.contamination`` (64-bit n-gram hashes, one ``searchsorted`` per set);
- the filter function the Spark job runs, without and with decontamination and a URL blocklist (the
  issue's bound: at most 25% slower).
Both decontaminations must find the same documents. Rounds alternate the sides; medians and the
spread (min-max) of ``--rounds`` rounds are printed.

    python bench/decontam.py [--docs 20000] [--eval-items 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import kilobyte_pieces  # noqa: E402
from jobs import filter_rules  # noqa: E402
from jobs.decontam import Tokens, build_eval_set, contamination  # noqa: E402
from jobs.demo_corpus import build_demo_corpus  # noqa: E402
from lake.recipe import parse_recipe  # noqa: E402

N = 13


def corpus(work: Path, docs: int, eval_items: int) -> tuple[list[str], list[str], set[int]]:
    texts = []
    for built in build_demo_corpus(work / "demo"):
        if built.name == "messy":  # broken records on purpose
            continue
        raw = built.path.read_bytes()
        raw = gzip.decompress(raw) if built.path.suffix == ".gz" else raw
        texts += [json.loads(line)["text"] for line in raw.decode().splitlines()]
    pieces = kilobyte_pieces(texts)
    rnd = random.Random(0)
    rnd.shuffle(pieces)
    held, pieces = pieces[: len(pieces) // 10], pieces[len(pieces) // 10:]  # evaluation items come from these
    items = []
    for _ in range(eval_items):  # a passage of 20-60 words (or characters) of held-out text, as an eval item
        piece = rnd.choice(held).split()
        at = rnd.randrange(max(1, len(piece) - 20))
        items.append(" ".join(piece[at: at + rnd.randrange(20, 60)]))
    documents, planted = [], set()
    for i in range(docs):
        text = pieces[i % len(pieces)]
        if i % 50 == 7:
            text += "\n\n" + rnd.choice(items)
            planted.add(i)
        documents.append(text)
    return documents, items, planted


def _words(text: str) -> list[str]:
    tokens = Tokens.of(text)
    return [tokens.text[a:b] for a, b in zip(tokens.starts, tokens.ends)]


def naive(documents: list[str], items: list[str]) -> tuple[set[int], float, float]:
    started = time.perf_counter()
    held = set()
    for item in items:
        words = _words(item)
        held.update(tuple(words[i: i + N]) for i in range(len(words) - N + 1))
    built = time.perf_counter()
    found = set()
    for d, text in enumerate(documents):
        words = _words(text)
        if any(tuple(words[i: i + N]) in held for i in range(len(words) - N + 1)):
            found.add(d)
    return found, built - started, time.perf_counter() - built


def ours(documents: list[str], items: list[str]) -> tuple[set[int], float, float]:
    started = time.perf_counter()
    eval_set = build_eval_set("bench", items, N)
    built = time.perf_counter()
    found = {d for d, text in enumerate(documents) if contamination(text, [eval_set], N)}
    return found, built - started, time.perf_counter() - built


def filter_seconds(documents: list[str], recipe) -> float:
    fn = filter_rules.make_filter(recipe)()
    started = time.perf_counter()
    for i, text in enumerate(documents):
        fn({"text": text, "url": f"https://site{i % 97}.example.org/page/{i}"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--eval-items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-decontam-") as tmp:
        work = Path(tmp)
        documents, items, planted = corpus(work, args.docs, args.eval_items)
        (work / "eval.jsonl").write_text("".join(json.dumps({"question": t}, ensure_ascii=False) + "\n" for t in items))
        (work / "domains.txt").write_text("".join(f"blocked{i}.example.com\n" for i in range(10000)))
        (work / "words.txt").write_text("casino\nviagra\nporn\n")
        base = {"lake": str(work / "lake"), "sources": [{"name": "demo", "path": str(work / "x.jsonl")}]}
        plain = parse_recipe(base, work)
        full = parse_recipe({**base, "filter": {
            "decontaminate": {"sets": {"bench": {"path": "eval.jsonl"}}},
            "url_blocklist": {"domains": ["domains.txt"], "words": ["words.txt"]}}}, work)
        times: dict[str, list[float]] = {k: [] for k in ("naive", "ours", "naive_build", "ours_build", "plain", "full")}
        for _ in range(args.rounds):
            found_naive, build, look = naive(documents, items)
            times["naive_build"].append(build)
            times["naive"].append(look)
            found_ours, build, look = ours(documents, items)
            times["ours_build"].append(build)
            times["ours"].append(look)
            assert found_ours == found_naive, (len(found_ours), len(found_naive))
            times["plain"].append(filter_seconds(documents, plain))
            times["full"].append(filter_seconds(documents, full))
        med = {k: statistics.median(v) for k, v in times.items()}
        spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
        print(f"{len(documents)} documents (~1 KB), {len(items)} evaluation items, {N}-grams; "
              f"{len(found_ours)} contaminated ({len(planted)} planted, the rest share a passage by chance); "
              f"{args.rounds} rounds, one core")
        print(f"{'':46} {'s (median)':>11} {'min-max':>12} {'docs/s':>9} {'vs naive':>9}")
        for key, label in (("naive", "naive set of 13-gram tuples: look-ups"), ("ours", "tokenmill contamination(): look-ups")):
            print(f"{label:46} {med[key]:11.2f} {spread[key]:>12} {len(documents) / med[key]:9,.0f} "
                  f"{med['naive'] / med[key]:9.2f}")
        for key, label in (("naive_build", "naive: building the set"), ("ours_build", "tokenmill: building the index")):
            print(f"{label:46} {med[key]:11.2f} {spread[key]:>12}")
        print(f"{'filter function, no decontamination':46} {med['plain']:11.2f} {spread['plain']:>12} "
              f"{len(documents) / med['plain']:9,.0f}")
        print(f"{'filter function + decontamination + URL lists':46} {med['full']:11.2f} {spread['full']:>12} "
              f"{len(documents) / med['full']:9,.0f}")
        print(f"filter slowed by {100 * (med['full'] / med['plain'] - 1):.1f}% (bound: 25%)")


if __name__ == "__main__":
    main()
