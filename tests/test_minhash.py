"""MinHash, LSH and line-dedup pure functions: datasketch equality, thresholds, determinism."""

from __future__ import annotations

import random
from functools import partial

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.hashfunc import sha1_hash32
from datasketch.lsh import _optimal_param
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.dedup_batches import line_keys, remove_lines
from jobs.minhash import (EMPTY, ShingleSpec, band_keys, candidate_probability, exact_jaccard, jaccard_estimate,
                          normalize_for_dedup, optimal_params, shingle_hash, shingle_hashes, shingles, signatures)

EN = ("The committee met on Tuesday to discuss the annual budget, and after a long debate it approved "
      "the new spending plan for schools, roads and the public library in the north of the city.")
ZH = "国务院总理今天在北京主持召开常务会议，研究部署进一步扩大内需的政策措施，会议指出要加快重点项目建设。"


@pytest.mark.parametrize("text,unit", [(EN, "word"), (ZH, "char"), ("one two", "word"), ("字", "char")])
@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 42)])
def test_signature_is_bit_identical_to_datasketch(text, unit, num_perm, seed):
    norm = normalize_for_dedup([text], [unit])[0]
    spec = ShingleSpec(unit, 5)
    grams = shingles(norm, spec)
    # the vectorised shingle hashes equal the plain per-shingle function given to datasketch
    assert shingle_hashes(norm, spec).tolist() == [shingle_hash(g, unit) for g in grams]
    ours = signatures([shingle_hashes(norm, spec)], num_perm, seed)[0]
    theirs = MinHash(num_perm=num_perm, seed=seed, hashfunc=partial(shingle_hash, unit=unit))
    theirs.update_batch(grams)
    assert ours.dtype == theirs.hashvalues.dtype and np.array_equal(ours, theirs.hashvalues)
    # and with datasketch's own default hash (sha1), fed the same hash values
    default = MinHash(num_perm=num_perm, seed=seed)
    default.update_batch(grams)
    assert np.array_equal(signatures([np.array([sha1_hash32(g) for g in grams], np.uint32)], num_perm, seed)[0],
                          default.hashvalues)


def test_signatures_of_a_batch_equal_one_at_a_time_and_empty_is_max():
    rng = random.Random(3)
    hash_sets = [np.array([rng.getrandbits(32) for _ in range(rng.randint(0, 900))], np.uint32) for _ in range(40)]
    batch = signatures(hash_sets, 128, 5, block=1000)  # forces many blocks
    for hs, row in zip(hash_sets, batch):
        assert np.array_equal(row, signatures([hs], 128, 5)[0])
    empty = [i for i, h in enumerate(hash_sets) if len(h) == 0]
    assert all((batch[i] == EMPTY).all() for i in empty)


def test_normalisation_and_shingle_units():
    assert normalize_for_dedup(["Hello,  WORLD!\n\tNew-line"]) == ["hello world new line"]
    assert normalize_for_dedup(["你好，世界！ 再见"], ["char"]) == ["你好世界再见"]
    assert shingles("a b c", ShingleSpec("word", 5)) == [b"a b c"]  # shorter than n: one shingle
    assert len(shingles("abcdefg", ShingleSpec("char", 5))) == 3


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.85, 0.9])
def test_optimal_params_match_datasketch(threshold):
    assert optimal_params(threshold, 128) == _optimal_param(threshold, 128, 0.5, 0.5)


def test_estimate_tracks_exact_jaccard():
    rng = random.Random(0)
    words = [f"w{rng.randint(0, 5000)}" for _ in range(400)]
    base = " ".join(words)
    spec = ShingleSpec("word", 5)
    for swaps in (5, 20, 60):
        changed = list(words)
        for i in rng.sample(range(len(words)), swaps):
            changed[i] = f"x{i}"
        other = " ".join(changed)
        exact = exact_jaccard(set(shingles(base, spec)), set(shingles(other, spec)))
        sigs = signatures([shingle_hashes(base, spec), shingle_hashes(other, spec)], 256, 1)
        assert abs(float(jaccard_estimate(sigs[0], sigs[1])) - exact) < 0.08


def test_band_keys_collide_exactly_when_band_rows_are_equal():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, size=(1, 128), dtype=np.uint32)
    b = a.copy()
    b[0, 9:18] += 1  # band 1 of 14x9 differs
    keys = band_keys(np.vstack([a, b]), 14, 9)
    same = keys[0] == keys[1]
    assert not same[1] and same[[0, *range(2, 14)]].all()
    assert keys.dtype == np.int64


def test_default_banding_finds_pairs_above_the_threshold_and_few_below():
    from lake.recipe import Dedup

    cfg = Dedup()
    bands, rows = optimal_params(0.7, cfg.num_perm, cfg.fp_weight, 1 - cfg.fp_weight)
    assert bands * rows <= cfg.num_perm
    assert candidate_probability(0.75, bands, rows) > 0.95
    assert candidate_probability(0.8, bands, rows) > 0.99
    assert candidate_probability(0.3, bands, rows) < 0.02


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(alphabet="abc xyz\n", min_size=0, max_size=30), min_size=1, max_size=20))
def test_remove_lines_keeps_every_non_boilerplate_line(lines):
    text = "\n".join(lines)
    keys = [k for k, _ in line_keys(text, "line", 3) if k]
    boiler = set(keys[:1])
    out, removed = remove_lines(text, boiler, "line", 3)
    kept_pieces = [p for k, p in line_keys(text, "line", 3) if not (k and k in boiler)]
    assert removed == len(line_keys(text, "line", 3)) - len(kept_pieces)
    assert out == "\n".join(kept_pieces).strip()
