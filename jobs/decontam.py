"""Benchmark decontamination and URL blocklists: plain functions the filter stage calls per document.

**Decontamination** (as GPT-3 and datatrove do): a document that shares an n-gram (13 tokens by
default) with an evaluation set is contaminated by it. Tokens are the lower-cased runs between
punctuation, symbols and spaces, and every Han character is a token of its own, so 13 tokens are 13 words of English or 13 characters of Chinese. Each n-gram is
a 64-bit hash (``jobs.minhash.ngram_hashes64``); an evaluation set is the sorted array of its
n-grams' hashes, built once on the driver from its files (JSONL or Parquet, the given text fields or
every string field; a list of strings counts as separate texts, n-grams never cross two texts), and
a document's n-grams are looked up with one ``searchsorted``. The match names the set and the
document's own n-gram text.

**URL blocklists** (as datatrove's and dolma's URL filters): a document whose URL's host is a listed
domain or a subdomain of one, or whose URL contains a banned word as one of its alphanumeric parts,
is blocked.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import numpy as np

from jobs.minhash import ngram_hashes64, span_hashes
from quality_models.arrowtext import HAN_RANGES

_URL_PARTS = re.compile(r"[^0-9a-z]+")


# -- n-grams ---------------------------------------------------------------------------------------


_WORD, _SEPARATOR, _HAN_CHAR = 0, 1, 2


@lru_cache(maxsize=1)
def _classes() -> np.ndarray:
    """Per code point: a separator (Unicode punctuation, symbols, separators, whitespace), a Han
    character, or a word character (built once per process)."""
    table = np.zeros(0x110000, np.uint8)
    for cp in range(0x110000):
        ch = chr(cp)
        if unicodedata.category(ch)[0] in "PSZ" or ch.isspace():
            table[cp] = _SEPARATOR
    for lo, hi in HAN_RANGES:
        table[lo: hi + 1] = _HAN_CHAR
    return table


@dataclass(frozen=True)
class Tokens:
    """A text's tokens: lower-cased runs of word characters, and each Han character by itself."""

    text: str  # lower-cased
    starts: np.ndarray
    ends: np.ndarray
    hashes: np.ndarray  # one 64-bit hash per token

    @classmethod
    def of(cls, text: str) -> "Tokens":
        lowered = text.lower()
        cp = np.frombuffer(lowered.encode("utf-32-le", "surrogatepass"), np.uint32)
        kind = _classes()[cp]
        word, han = kind == _WORD, kind == _HAN_CHAR
        starts = np.flatnonzero(word & ~np.concatenate([[False], word[:-1]]) | han)
        ends = np.flatnonzero(word & ~np.concatenate([word[1:], [False]]) | han) + 1
        return cls(lowered, starts, ends, span_hashes(cp, starts, ends))

    def words(self, first: int, n: int) -> str:
        return " ".join(self.text[a:b] for a, b in zip(self.starts[first: first + n], self.ends[first: first + n]))

    def ngram_hashes(self, n: int) -> np.ndarray:
        """The 64-bit hashes of the n-grams, in order (none when there are fewer than n tokens)."""
        return ngram_hashes64(self.hashes, n)


# -- evaluation sets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set's n-grams: ``hashes`` sorted and unique."""

    name: str
    hashes: np.ndarray
    texts: int

    def matches(self, doc_hashes: np.ndarray) -> np.ndarray:
        """Positions of the document's n-grams that the set holds."""
        if len(self.hashes) == 0 or len(doc_hashes) == 0:
            return np.zeros(0, np.int64)
        at = np.minimum(np.searchsorted(self.hashes, doc_hashes), len(self.hashes) - 1)
        return np.nonzero(self.hashes[at] == doc_hashes)[0]


def build_eval_set(name: str, texts: list[str], n: int) -> EvalSet:
    parts = [Tokens.of(t).ngram_hashes(n) for t in texts]
    hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    return EvalSet(name, hashes, len(texts))


def eval_texts(records: list[dict], fields: list[str] | None, origin: str) -> list[str]:
    """The texts of an evaluation set's records: the named fields (each string, or each string of a
    list), or every string field when none are named."""
    texts: list[str] = []
    for i, record in enumerate(records):
        names = fields if fields is not None else [k for k, v in record.items() if isinstance(v, (str, list))]
        for name in names:
            if fields is not None and name not in record:
                raise ValueError(f"{origin}: record {i + 1} has no field {name!r} (it has {sorted(record)}); "
                                 f"fix decontaminate.sets' fields")
            value = record[name]
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{origin}: record {i + 1}: field {name!r} is {type(value).__name__}, not text; "
                                 f"name only text fields in decontaminate.sets' fields")
            texts += [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
    return texts


def read_eval_records(path: str) -> list[dict]:
    """An evaluation file's records: Parquet by its extension, JSON Lines otherwise."""
    from lake import fs

    if path.endswith(".parquet"):
        return fs.read_parquet(path).to_pylist()
    records = []
    for number, line in enumerate(fs.read_bytes(path).decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg}); fix or remove the line") from None
    return records


@dataclass(frozen=True)
class Contamination:
    eval_set: str
    ngram: str  # the first matching n-gram, from the document
    matched: int  # how many of the document's n-grams the set holds
    of: int

    def __str__(self) -> str:
        return f"{self.matched} of {self.of} {self.ngram.count(' ') + 1}-grams in {self.eval_set}, e.g. {self.ngram!r}"


def contamination(text: str, sets: list[EvalSet], n: int) -> list[Contamination]:
    """The evaluation sets sharing an n-gram with the text, each with its first match."""
    tokens = Tokens.of(text)
    hashes = tokens.ngram_hashes(n)
    found = []
    for eval_set in sets:
        at = eval_set.matches(hashes)
        if len(at):
            found.append(Contamination(eval_set.name, tokens.words(int(at[0]), n), len(at), len(hashes)))
    return found


# -- URL blocklists --------------------------------------------------------------------------------


def url_block(url: str | None, domains: frozenset[str], words: frozenset[str]) -> str | None:
    """Why the URL is blocked (its listed domain, or its banned word), or None."""
    if not url:
        return None
    try:
        host = (urlsplit(url if "//" in url else "//" + url).hostname or "").rstrip(".")
    except ValueError:  # not a URL one can split (an unclosed IPv6 bracket): its words still count
        host = ""
    labels = host.split(".")
    for i in range(len(labels)):
        if ".".join(labels[i:]) in domains:
            return f"domain {'.'.join(labels[i:])}" + (f" (host {host})" if i else "")
    for word in _URL_PARTS.split(url.lower()):
        if word in words:
            return f"banned word {word!r} in the URL"
    return None
