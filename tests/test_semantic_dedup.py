"""Semantic dedup: paraphrases that share few n-grams are found by embedding cosine, and named."""

from __future__ import annotations


import numpy as np

from jobs.demo_corpus import build_demo_corpus
from jobs.minhash import ShingleSpec, normalize_for_dedup, shingles
from jobs.semantic_dedup import survivors

from test_dedup import _run, doc

# (kept: the higher quality, removed: its paraphrase); all-MiniLM-L6-v2 cosines 0.75 and 0.79
PARAPHRASES = [
    ("The city council met on Tuesday evening to review the plan for renovating the railway station. Most members "
     "said the schedule was reasonable, but several residents asked for the work to be postponed until after the "
     "summer so that local shops would suffer less.",
     "Local shop owners and a number of inhabitants want the station works delayed past summertime. On Tuesday night "
     "the municipal assembly examined the proposal to refurbish the train terminal, and the majority of councillors "
     "judged its timetable sensible."),
    ("Researchers found that drinking coffee in moderation is linked to a lower risk of heart disease in adults over "
     "fifty. The study followed twelve thousand people for a decade.",
     "Among people older than fifty, a modest daily intake of coffee was associated with fewer cardiac problems, "
     "according to scientists who tracked 12,000 participants over ten years."),
]
# a paraphrase too far for the threshold (cosine 0.65: below related but different real documents, such as
# the Python reference's pages on "break" and on "continue" at 0.71): both stay
FAR = ("To install the package, create a virtual environment, activate it and run pip install with the requirements "
       "file. Then start the server with the run command and open the browser at port eight thousand.",
       "First set up and switch on an isolated Python environment; next, use pip to add everything listed in the "
       "requirements. Launch the service using its run command and visit port 8000 in a web browser.")
# the same topics, not the same content: they stay (cosines up to 0.45 with the pairs above)
SAME_TOPIC = [
    "The city council met on Monday to discuss the new budget for public libraries and parks, and approved a small "
    "increase for both.",
    "A study of tea drinkers in Japan found no link between green tea and sleep quality among older adults.",
    "To uninstall the package, remove its folder and delete the configuration file from your home directory.",
]


def test_survivors_keep_the_best_ranked_and_compare_with_kept_documents_only():
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.9, np.sqrt(1 - 0.81), 0.0])  # cos(a, b) = 0.9
    c = np.array([0.62, 0.78, 0.1])  # cos(b, c) ≈ 0.90, cos(a, c) ≈ 0.62
    d = np.array([0.0, 0.0, 1.0])
    vectors = np.array([v / np.linalg.norm(v) for v in (a, b, c, d)])
    kept_for, similarity = survivors(vectors, 0.85)
    assert kept_for.tolist() == [-1, 0, -1, -1]  # b goes for a; c is near only b, which is gone: c stays
    assert abs(similarity[1] - 0.9) < 1e-6
    assert survivors(vectors, 0.5)[0].tolist() == [-1, 0, 0, -1]
    rng = np.random.default_rng(0)  # a cluster too large for one similarity matrix: the same answer row by row
    many = rng.normal(size=(4200, 8)).astype(np.float32)
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    big, big_sim = survivors(many, 0.97)
    small, small_sim = survivors(many[:4000], 0.97)
    assert (big[:4000] == small).all() and np.allclose(big_sim[:4000], small_sim) and (big >= 0).sum() > 20


def _real_english(tmp_path, n):
    [built] = [b for b in build_demo_corpus(tmp_path / "demo", {"en_docs": n}) if b.name == "en_docs"]
    return [t[:1500] for t in built.texts()][:n]


def test_paraphrases_with_few_shared_ngrams_are_removed_and_named(spark, tmp_path):
    spec = ShingleSpec("word", 5)
    for kept, gone in PARAPHRASES:  # what near-dedup sees: next to no shared 5-gram
        a, b = (set(shingles(t, spec)) for t in normalize_for_dedup([kept, gone]))
        assert len(a & b) / len(a | b) < 0.05
    rows = [doc(f"para{i}", kept, "knowledge", "en", 0.9) for i, (kept, _) in enumerate(PARAPHRASES)]
    rows += [doc(f"para{i}_copy", gone, "knowledge", "en", 0.5) for i, (_, gone) in enumerate(PARAPHRASES)]
    rows += [doc(f"topic{i}", t, "knowledge", "en", 0.5) for i, t in enumerate(SAME_TOPIC)]
    rows += [doc("far", FAR[0], "knowledge", "en", 0.9), doc("far_copy", FAR[1], "knowledge", "en", 0.5)]
    rows += [doc(f"real{i:02d}", t, "knowledge", "en", 0.5) for i, t in enumerate(_real_english(tmp_path, 24))]
    recipe, lake, report = _run(spark, tmp_path, rows, semantic={"enabled": True, "threshold": 0.74, "cluster_size": 8})
    removed = {r["doc_id"]: r for r in lake.read_arrow("documents_rejected").to_pylist()
               if r["reason"] == "semantic_duplicate"}
    assert set(removed) == {f"para{i}_copy" for i in range(len(PARAPHRASES))}
    for i in range(len(PARAPHRASES)):
        assert removed[f"para{i}_copy"]["detail"].startswith(f"kept para{i}: cosine 0.")
        assert "threshold 0.74 (k-means cluster " in removed[f"para{i}_copy"]["detail"]
    kept = {r["doc_id"]: r for r in lake.read_arrow("documents_dedup").to_pylist()}
    assert set(kept) == {r["doc_id"] for r in rows} - set(removed)
    assert all(kept[f"para{i}"]["cluster_id"] == f"para{i}" for i in range(len(PARAPHRASES)))
    lineage = lake.read_arrow("dedup_clusters").to_pylist()
    assert len({r["doc_id"] for r in lineage}) == len(lineage)  # one row per document
    semantic = {r["doc_id"]: r for r in lineage if r["category"] == "semantic"}
    assert {d: r["kept_doc_id"] for d, r in semantic.items()} == {
        **{f"para{i}_copy": f"para{i}" for i in range(len(PARAPHRASES))}, **{f"para{i}": f"para{i}" for i in range(len(PARAPHRASES))}}
    assert report.semantic_removed == len(PARAPHRASES) and report.kmeans == 5  # ceil(34 / 8)
    assert report.kept == len(rows) - len(PARAPHRASES) and "semantic dedup: 2 removed (5 k-means clusters)" in str(report)
    _, _, plain = _run(spark, tmp_path, rows, name="plain")  # near-dedup alone keeps the paraphrases
    assert plain.kept == len(rows) and plain.semantic_removed is None
