"""MinHash near-duplicate detection as plain functions: normalisation, shingles, signatures, LSH.

The Spark dedup job (``jobs/dedup.py``) calls these inside ``mapInArrow``; tests and benchmarks
call them directly.

- **Shingles** are word n-grams (space-separated text) or character n-grams (Chinese), of the text
  normalised by ``normalize_for_dedup``. Each shingle's 32-bit hash (``shingle_hash``) comes from
  64-bit polynomial token hashes combined over the n-gram and finished by the MurmurHash3 64-bit
  finaliser; ``shingle_hashes`` computes the same values for a whole document with numpy.
- **Signatures** follow datasketch's default (``affine32``) scheme exactly: the same seeded
  permutations, the same 32-bit pre-mix and wrap-around, so with the same seed and hash function a
  signature is bit-identical to ``datasketch.MinHash``'s (a test proves it).
- **LSH**: ``optimal_params`` picks bands × rows for a threshold by minimising the weighted false
  positive / false negative areas (the method datasketch's ``MinHashLSH`` uses); ``band_keys`` hashes
  each band of a signature to one 64-bit key.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

Unit = Literal["word", "char"]
EMPTY = np.uint32(0xFFFFFFFF)  # an empty set's signature value (datasketch's max hash)
_TOKEN_BASE = np.uint64(1_000_003)  # odd: invertible modulo 2**64
_NGRAM_BASE = np.uint64(0x100000001B3)
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class ShingleSpec:
    unit: Unit = "word"
    n: int = 5


# -- normalisation ---------------------------------------------------------------------------------


def normalize_for_dedup(texts, unit_of=None) -> list[str]:
    """Lower case, punctuation and symbols to spaces, whitespace runs to one space, trimmed.

    Works on a whole batch with Arrow's kernels. Texts whose shingle unit is ``char`` (per
    ``unit_of``, a list parallel to ``texts``) lose their spaces too: Chinese has no word breaks.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.large_string())
    arr = pc.utf8_lower(arr)
    arr = pc.replace_substring_regex(arr, r"[\p{P}\p{S}\s\p{Z}]+", " ")
    out = pc.utf8_trim_whitespace(arr).to_pylist()
    if unit_of is not None:
        out = [t.replace(" ", "") if u == "char" else t for t, u in zip(out, unit_of)]
    return out


# -- shingle hashes --------------------------------------------------------------------------------


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


_POWERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _powers(length: int, base: np.uint64 = _TOKEN_BASE) -> tuple[np.ndarray, np.ndarray]:
    """base**k and base**-k modulo 2**64 for k < length (an odd base is invertible; grown and kept per
    process)."""
    pw, inv = _POWERS.get(int(base), (np.ones(0, np.uint64), np.ones(0, np.uint64)))
    if len(pw) < length:
        size = max(length, 2 * len(pw), 64)
        with np.errstate(over="ignore"):
            steps = np.full(size, base, np.uint64)
            steps[0] = 1
            pw = np.cumprod(steps, dtype=np.uint64)
            steps = np.full(size, np.uint64(pow(int(base), -1, 1 << 64)), np.uint64)
            steps[0] = 1
            inv = np.cumprod(steps, dtype=np.uint64)
        _POWERS[int(base)] = pw, inv
    return pw[:length], inv[:length]


def word_token_hashes(text: str) -> np.ndarray:
    """Polynomial hash of each space-separated word's UTF-8 bytes: sum byte[k] * B**k, modulo 2**64."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    if len(data) == 0:
        return np.zeros(0, np.uint64)
    is_space = data == 32
    prev_space = np.concatenate([[True], is_space[:-1]])
    next_space = np.concatenate([is_space[1:], [True]])
    starts = np.nonzero(~is_space & prev_space)[0]
    ends = np.nonzero(~is_space & next_space)[0] + 1
    return span_hashes(data, starts, ends)


def span_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Polynomial hash of each span ``values[start:end]``: sum value[k] * B**k, modulo 2**64, from one
    prefix sum (a span's hash does not depend on where it sits)."""
    pw, inv = _powers(len(values) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(values) + 1, np.uint64)
        np.cumsum(values.astype(np.uint64) * pw[: len(values)], dtype=np.uint64, out=prefix[1:])
        return (prefix[ends] - prefix[starts]) * inv[starts]


def _char_token_hashes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.uint64)


def ngram_hashes64(tokens: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per n-gram of token hashes (none when there are fewer than n tokens): the
    polynomial sum_k tokens[i+k] * C**(n-1-k) plus n, finished by fmix64. Computed from one prefix sum
    of tokens[j] * C**-j, so the cost does not grow with n."""
    count = len(tokens)
    if count < n or n < 1:
        return np.zeros(0, np.uint64)
    pw, inv = _powers(count + n, _NGRAM_BASE)
    with np.errstate(over="ignore"):
        prefix = np.zeros(count + 1, np.uint64)
        np.cumsum(tokens * inv[:count], dtype=np.uint64, out=prefix[1:])
        first = np.arange(count - n + 1)
        acc = (prefix[first + n] - prefix[first]) * pw[first + n - 1]
        return _fmix64(acc + np.uint64(n))


def _combine(tokens: np.ndarray, n: int) -> np.ndarray:
    """One 32-bit hash per n-gram of token hashes (one shingle of all tokens when fewer than n)."""
    if len(tokens) == 0:
        return np.zeros(0, np.uint32)
    return (ngram_hashes64(tokens, min(n, len(tokens))) >> np.uint64(32)).astype(np.uint32)


def shingle_hashes(normalized: str, spec: ShingleSpec) -> np.ndarray:
    """The 32-bit hashes of a normalised text's shingles (duplicates kept; MinHash ignores them)."""
    tokens = word_token_hashes(normalized) if spec.unit == "word" else _char_token_hashes(normalized)
    return _combine(tokens, spec.n)


def shingles(normalized: str, spec: ShingleSpec) -> list[bytes]:
    """The shingles themselves, as bytes (words joined by one space): the slow, obvious reference."""
    if spec.unit == "word":
        tokens = normalized.split()
        joiner = " "
    else:
        tokens = list(normalized)
        joiner = ""
    if not tokens:
        return []
    n = min(spec.n, len(tokens))
    return [joiner.join(tokens[i : i + n]).encode("utf-8") for i in range(len(tokens) - n + 1)]


def shingle_hash(shingle: bytes, unit: Unit = "word") -> int:
    """One shingle's 32-bit hash, computed the plain way (the function to give datasketch)."""
    text = shingle.decode("utf-8")
    if unit == "word":
        tokens = []
        for word in text.split(" "):
            h = 0
            for k, byte in enumerate(word.encode("utf-8")):
                h = (h + byte * pow(int(_TOKEN_BASE), k, 1 << 64)) & _M64
            tokens.append(h)
    else:
        tokens = [ord(ch) for ch in text]
    acc = 0
    for t in tokens:
        acc = (acc * int(_NGRAM_BASE) + t) & _M64
    acc = (acc + len(tokens)) & _M64
    return int(_fmix64(np.array([acc], np.uint64))[0] >> np.uint64(32))


# -- signatures ------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a odd, b), drawn in the same order."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures(hash_sets: list[np.ndarray], num_perm: int, seed: int = 1, block: int = 32_768) -> np.ndarray:
    """One MinHash signature (``num_perm`` uint32) per document's shingle hashes.

    Documents are processed in blocks of about ``block`` shingles: one (shingles × permutations)
    matrix per block, reduced per document with ``np.minimum.reduceat``.
    """
    a, b = permutations(num_perm, seed)
    out = np.full((len(hash_sets), num_perm), EMPTY, np.uint32)
    lengths = np.array([len(h) for h in hash_sets], np.int64)
    i = 0
    while i < len(hash_sets):
        j, total = i, 0
        while j < len(hash_sets) and (total == 0 or total + lengths[j] <= block):
            total += lengths[j]
            j += 1
        docs = [k for k in range(i, j) if lengths[k] > 0]
        if docs:
            values = _fmix32(np.concatenate([hash_sets[k] for k in docs]).astype(np.uint32))
            with np.errstate(over="ignore"):
                permuted = values[:, None] * a[None, :] + b[None, :]
            starts = np.concatenate([[0], np.cumsum(lengths[docs])[:-1]])
            out[docs] = np.minimum.reduceat(permuted, starts, axis=0)
        i = j
    return out


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of signature rows: the share of equal positions."""
    return (np.asarray(sig_a) == np.asarray(sig_b)).mean(axis=-1)


def exact_jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# -- LSH -------------------------------------------------------------------------------------------


def _false_positive_area(threshold: float, bands: int, rows: int) -> float:
    from scipy.integrate import quad

    return quad(lambda s: 1 - (1 - s ** float(rows)) ** float(bands), 0.0, threshold)[0]


def _false_negative_area(threshold: float, bands: int, rows: int) -> float:
    from scipy.integrate import quad

    return quad(lambda s: 1 - (1 - (1 - s ** float(rows)) ** float(bands)), threshold, 1.0)[0]


@lru_cache(maxsize=64)
def optimal_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands × rows <= num_perm minimising the weighted FP + FN probability areas."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"a dedup threshold must be between 0 and 1, got {threshold}")
    best, best_error = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            error = (fp_weight * _false_positive_area(threshold, bands, rows)
                     + fn_weight * _false_negative_area(threshold, bands, rows))
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The chance that two documents of this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents × bands) int64 keys: equal keys in a band mean equal signature values in its rows."""
    sigs = np.asarray(sigs, np.uint32)
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"{bands} bands × {rows} rows need {bands * rows} permutations; signatures have {sigs.shape[1]}")
    keys = np.empty((sigs.shape[0], bands), np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            acc = np.full(sigs.shape[0], np.uint64(band + 1), np.uint64)
            for col in sigs[:, band * rows : (band + 1) * rows].T:
                acc = acc * _NGRAM_BASE + col.astype(np.uint64)
            keys[:, band] = _fmix64(acc)
    return keys.view(np.int64)


def text_key(normalized: str) -> int:
    """A 64-bit key of a normalised text, for exact dedup (signed, to fit a Spark long)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def near_copy(normalized: str, target: float, spec: ShingleSpec, rng, pool: list[str] | None = None) -> tuple[str, float]:
    """A copy of a normalised text whose exact shingle Jaccard with it is just at or below ``target``.

    Tokens (words, or characters for ``char``) at random positions are replaced by tokens from
    ``pool`` (default: the text's own tokens reversed) until the similarity drops to the target.
    For tests and benchmarks that need near-duplicates of known similarity.
    """
    tokens = normalized.split() if spec.unit == "word" else list(normalized)
    joiner = " " if spec.unit == "word" else ""
    pool = pool or tokens[::-1]
    base = set(shingles(normalized, spec))
    copy = list(tokens)
    order = list(range(len(tokens)))
    rng.shuffle(order)
    similarity = 1.0
    for position in order:
        copy[position] = f"{rng.choice(pool)}{rng.randint(0, 9)}" if spec.unit == "word" else rng.choice(pool)
        similarity = exact_jaccard(base, set(shingles(joiner.join(copy), spec)))
        if similarity <= target:
            break
    return joiner.join(copy), similarity
