"""The Spark-free half of dedup: what ``jobs/dedup.py`` computes on each Arrow batch of documents.

Signing (exact-text key, threshold, MinHash signature, LSH band keys), the similarity of candidate
pairs, and the line keys and line removal of line dedup. Plain functions over Arrow and NumPy, so a test runs them
without Spark; the MinHash itself is ``jobs/minhash.py``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jobs.minhash import (ShingleSpec, band_keys, jaccard_estimate, normalize_for_dedup, optimal_params,
                          shingle_hashes, signatures, text_key)
from lake.recipe import Recipe

# The schema of sign_batch's output, as Spark DDL for mapInArrow.
SIGNATURE_DDL = ("doc_id string, text_key long, dkey string, threshold double, quality double, length long, "
                 "sig binary, bands array<long>")


def survivor_order(quality: str = "quality", length: str = "length", doc_id: str = "doc_id") -> list:
    """The order of a cluster's members, best first: the highest quality (missing or NaN ranks as -1),
    then the longer text, then the smaller doc_id; one total order for near and semantic dedup."""
    from pyspark.sql import functions as F

    score = F.coalesce(F.nanvl(F.col(quality), F.lit(-1.0)), F.lit(-1.0))
    return [score.desc(), F.col(length).desc(), F.col(doc_id).asc()]


def lsh_shape(recipe: Recipe) -> tuple[int, int, float]:
    """(bands, rows, loosest threshold): the banding every document gets."""
    cfg = recipe.dedup
    loosest = min([cfg.default_threshold, *cfg.thresholds.values()])
    bands, rows = optimal_params(loosest, cfg.num_perm, cfg.fp_weight, 1.0 - cfg.fp_weight)
    return bands, rows, loosest


def sign_batch(batch: pa.RecordBatch, recipe: Recipe, bands: int, rows: int) -> pa.RecordBatch:
    """Exact-text key, threshold, signature and band keys of each document of a batch."""
    cfg = recipe.dedup
    texts = batch.column("text").to_pylist()
    langs = batch.column("lang").to_pylist()
    specs = [ShingleSpec(s.unit, s.n) for s in (cfg.shingling(lang or "") for lang in langs)]
    normalized = normalize_for_dedup(texts, [s.unit for s in specs])
    sigs = signatures([shingle_hashes(t, s) for t, s in zip(normalized, specs)], cfg.num_perm, cfg.seed)
    keys = band_keys(sigs, bands, rows)
    chosen = [cfg.threshold_for(d, c) for d, c in zip(batch.column("domain").to_pylist(),
                                                       batch.column("category").to_pylist())]
    quality = batch.column("quality").to_numpy(zero_copy_only=False)
    return pa.RecordBatch.from_pydict({
        "doc_id": batch.column("doc_id"),
        "text_key": pa.array([text_key(t) for t in normalized], pa.int64()),
        "dkey": pa.array([key for _, key in chosen], pa.string()),
        "threshold": pa.array([th for th, _ in chosen], pa.float64()),
        "quality": pa.array(np.nan_to_num(quality.astype(np.float64), nan=-1.0), pa.float64()),
        "length": pa.array([len(t) for t in texts], pa.int64()),
        "sig": pa.array([row.tobytes() for row in sigs], pa.binary()),
        "bands": pa.array(list(keys), pa.list_(pa.int64())),
    })


def _sig_matrix(column: pa.Array) -> np.ndarray:
    return np.frombuffer(b"".join(column.to_pylist()), np.uint32).reshape(len(column), -1)


def similarity_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Estimated Jaccard of each (sig_a, sig_b) row, appended as ``similarity``."""
    sim = jaccard_estimate(_sig_matrix(batch.column("sig_a")), _sig_matrix(batch.column("sig_b")))
    names = [n for n in batch.schema.names if n not in ("sig_a", "sig_b")]
    return pa.RecordBatch.from_arrays([batch.column(n) for n in names] + [pa.array(sim, pa.float64())],
                                      names=names + ["similarity"])


def line_keys(text: str, unit: str, min_chars: int) -> list[tuple[int, str]]:
    """(key, piece) for each line or paragraph of a text; blank and short pieces get no key (0)."""
    pieces = text.split("\n\n") if unit == "paragraph" else text.split("\n")
    out = []
    for piece in pieces:
        norm = " ".join(piece.split()).lower()
        out.append((text_key(norm) if len(norm) >= max(min_chars, 1) else 0, piece))
    return out


def remove_lines(text: str, boilerplate: set[int], unit: str, min_chars: int) -> tuple[str, int]:
    """The text without its boilerplate lines (or paragraphs), and how many were removed."""
    kept, removed = [], 0
    for key, piece in line_keys(text, unit, min_chars):
        if key and key in boilerplate:
            removed += 1
        else:
            kept.append(piece)
    return ("\n\n" if unit == "paragraph" else "\n").join(kept).strip(), removed


def strip_batch(batch: pa.RecordBatch, boilerplate: set[int], unit: str, min_chars: int) -> pa.RecordBatch:
    """The batch with the boilerplate lines removed from its texts, and ``_lines_removed`` appended."""
    out_text, removed = [], []
    for text in batch.column("text").to_pylist():
        t, n = remove_lines(text, boilerplate, unit, min_chars)
        out_text.append(t)
        removed.append(n)
    names = batch.schema.names
    cols = [pa.array(out_text, pa.string()) if n == "text" else batch.column(n) for n in names]
    return pa.RecordBatch.from_arrays(cols + [pa.array(removed, pa.int64())], names=names + ["_lines_removed"])
