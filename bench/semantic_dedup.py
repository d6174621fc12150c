"""Benchmark: semantic dedup (embeddings → k-means → pairs inside each cluster) against exact all-pairs cosine.

Same documents, same embeddings, same process: ``--docs`` ~1 KB pieces of the demo corpus's real
text, of which one in ten has a lightly edited copy (a sentence dropped, words swapped, a phrase
added: what templated or re-posted text looks like). tokenmill's phase (``jobs.semantic_dedup``:
Spark ML k-means with cosine distance, ``--cluster-size`` documents per cluster, every pair inside a
cluster) is timed in Spark without the encoder (the embeddings are computed once, then reused by both
sides); the reference compares all n² pairs with one matrix product. Printed: the pairs at or above
the threshold each finds, the recall of tokenmill's against the exact ones, the documents each would
remove, and the times (median and min-max of ``--rounds``).

    python bench/semantic_dedup.py [--docs 4000] [--cluster-size 500] [--threshold 0.85] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import demo_texts, kilobyte_pieces  # noqa: E402
from jobs.semantic_dedup import survivors  # noqa: E402
from lake.fs import end_process  # noqa: E402


def corpus(work: Path, docs: int) -> list[str]:
    pieces = list(dict.fromkeys(kilobyte_pieces(demo_texts(work / "demo"))))
    rnd = random.Random(0)
    rnd.shuffle(pieces)
    out = pieces[: docs - docs // 10]
    for text in [t for t in out if t.count(" ") >= 60][: docs // 10]:  # light edits of a tenth (spaced text)
        words = text.split(" ")
        for _ in range(max(1, len(words) // 30)):
            i = rnd.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        out.append(" ".join(words[: int(len(words) * 0.9)]) + " (updated)")
    return out


def pairs_above(embeddings: np.ndarray, threshold: float, groups: np.ndarray | None = None) -> set[tuple[int, int]]:
    """Index pairs (i < j) with cosine ≥ threshold: all pairs, or only those inside one group."""
    found = set()
    members = [np.arange(len(embeddings))] if groups is None else [np.flatnonzero(groups == g) for g in np.unique(groups)]
    for idx in members:
        sims = embeddings[idx] @ embeddings[idx].T
        a, b = np.nonzero(np.triu(sims >= threshold, 1))
        found |= {(int(idx[i]), int(idx[j])) for i, j in zip(a, b)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--cluster-size", type=int, default=500)
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    from jobs.spark import get_spark
    from lake.recipe import parse_recipe
    from quality_models.bert_backend import Encoder, default_backbone

    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-semantic-") as tmp:
        work = Path(tmp)
        texts = corpus(work, args.docs)
        started = time.perf_counter()
        embeddings = Encoder(default_backbone(), max_tokens=128).embed(texts)
        embed_secs = time.perf_counter() - started
        recipe = parse_recipe({"lake": str(work / "lake"), "sources": [{"name": "s", "path": "x"}]}, work)
        spark = get_spark("tokenmill-bench-semantic", recipe)
        frame = spark.createDataFrame([(i, e.tolist()) for i, e in enumerate(embeddings)], "i long, embedding array<float>")
        frame = frame.withColumn("features", array_to_vector("embedding")).localCheckpoint(eager=True)
        k = max(1, -(-len(texts) // args.cluster_size))
        ours_t, exact_t = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            model = KMeans(k=k, seed=1, distanceMeasure="cosine", predictionCol="kmeans").fit(frame)
            groups = np.zeros(len(texts), np.int64)
            for row in model.transform(frame).select("i", "kmeans").collect():
                groups[row["i"]] = row["kmeans"]
            ours = pairs_above(embeddings, args.threshold, groups)
            ours_removed = sum(int((survivors(embeddings[np.flatnonzero(groups == g)], args.threshold)[0] >= 0).sum())
                               for g in np.unique(groups))
            ours_t.append(time.perf_counter() - started)
            started = time.perf_counter()
            exact = pairs_above(embeddings, args.threshold)
            exact_removed = int((survivors(embeddings, args.threshold)[0] >= 0).sum())
            exact_t.append(time.perf_counter() - started)
        recall = len(ours & exact) / max(len(exact), 1)
        print(f"{len(texts)} documents (~1 KB; {args.docs // 10} lightly edited copies), all-MiniLM-L6-v2 embeddings "
              f"in {embed_secs:.1f} s ({len(texts) / embed_secs:,.0f} docs/s); threshold {args.threshold}; "
              f"k-means k = {k}; {args.rounds} rounds")
        print(f"{'':34} {'pairs':>7} {'removed':>8} {'s median':>9} {'min-max':>13}")
        print(f"{'exact all pairs (one matmul)':34} {len(exact):7,} {exact_removed:8,} {statistics.median(exact_t):9.2f} "
              f"{min(exact_t):6.2f}-{max(exact_t):<6.2f}")
        print(f"{'tokenmill: k-means, then inside':34} {len(ours):7,} {ours_removed:8,} {statistics.median(ours_t):9.2f} "
              f"{min(ours_t):6.2f}-{max(ours_t):<6.2f}")
        print(f"recall of the pairs above the threshold: {recall:.3f}; compared pairs: "
              f"{sum(int((groups == g).sum()) ** 2 for g in np.unique(groups)) / len(texts) ** 2:.3f} of all")


if __name__ == "__main__":
    main()
    end_process(0)
