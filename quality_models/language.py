"""Script language from script statistics alone (no model): zh / en / code / other per document.

The rule filter picks its thresholds by this language, scoring falls back to it, and weak labels
use it to recognise code. Letters are counted through one code-point table (``arrowtext.HAN_RANGES``
for Han); a batch is measured with Arrow kernels over all its documents and lines at once.
"""

from __future__ import annotations

import json
import re
from itertools import islice
from urllib.parse import urlsplit
from typing import Literal

import numpy as np

from quality_models.arrowtext import HAN_RANGES, as_large_strings, ascii_letters, code_points, cut_to, segment_sums

# A line shaped like code: it starts with a statement keyword or a comment, or ends in a bracket or
# separator. One template, two spellings: Python's ``re`` (Unicode ``\s``/``\w``) for lines with
# non-ASCII characters, and RE2 (Arrow's regex engine, ASCII-only ``\s``/``\w``) for ASCII lines,
# with the classes spelled as Python's own ASCII part so that both agree.
_CODE_LINE = (
    r"^[{s}]*(def |class |import |from [^{s}]+ import|#include|public |private |function |"
    r"return(?:[^{w}]|$)|if \(|for \(|\}}[{s}]*$|\{{[{s}]*$|[A-Za-z_][{w}.]* = |@[{w}]+|//|/\*|\*/|"
    r"if .*:$|elif |else:|try:|except|raise |with .*:$|for .* in .*:$|while .*:$|#)"
    r"|[:;{{}}()\[\],][{s}]*$"
)
CODE_LINE = re.compile(_CODE_LINE.format(s=r"\s", w=r"\w"))
CODE_LINE_ASCII_RE2 = _CODE_LINE.format(s=r"\t\n\x0b\x0c\r\x1c-\x1f ", w="0-9A-Za-z_")
Lang = Literal["zh", "en", "code", "other"]


_SCRIPT_SAMPLE = 20_000  # characters of a document the script statistics read
_HEAD_LINES = 400  # non-blank lines the code-shape statistic reads
_IS_ALPHA, _IS_LATIN, _IS_HAN = 1, 2, 4
_SCRIPT_TABLE: np.ndarray | None = None
_PACKED_TABLE: np.ndarray | None = None


def _script_table() -> np.ndarray:
    """One flag byte per code point (letter, Latin a-z after lower-casing, Han), built once per process."""
    global _SCRIPT_TABLE
    if _SCRIPT_TABLE is None:
        table = np.zeros(0x110000, np.uint8)
        for cp in range(0x110000):
            ch = chr(cp)
            if ch.isalpha():
                table[cp] = _IS_ALPHA | (_IS_LATIN if "a" <= ch.lower() <= "z" else 0)
        for lo, hi in HAN_RANGES:
            table[lo : hi + 1] |= _IS_HAN
        _SCRIPT_TABLE = table
    return _SCRIPT_TABLE


def script_langs(texts, names=None) -> list[Lang]:
    """``_script_langs``, then code by file name and by a second look at likely code.

    A document whose file name (``names``, parallel to ``texts``; see ``name_of``) has a code (or
    data-file) extension is code. One judged prose but with at least 10% of its lines shaped like code is
    measured again without docstrings and comments (``code_share_without_comments``), so that
    docstring-heavy source is code, not English.
    """
    langs, share = _script_langs(texts)
    for i in np.flatnonzero(share >= _RECHECK_SHARE):
        if langs[i] in ("en", "other") and code_share_without_comments(_text_at(texts, i)) >= 0.35:
            langs[i] = "code"
    for i, name in enumerate(names or ()):
        if langs[i] != "code" and extension_of(name) in _CODE_OR_DATA:
            langs[i] = "code"
    return langs


def _text_at(texts, i: int) -> str:
    value = texts[int(i)]
    return (value.as_py() if hasattr(value, "as_py") else value) or ""


def _script_langs(texts) -> tuple[list[Lang], np.ndarray]:
    """zh / en / code / other per document, from script statistics alone (no model).

    zh when Han characters are at least 30% of the letters; code when at least 35% of the first 400
    non-blank lines are shaped like code (``CODE_LINE``); en when at least 70% of the letters are
    Latin; other otherwise (and for blank text). Letters are counted over the first 20,000
    characters, through one code-point table. A batch (a list or an Arrow string array) is measured
    with Arrow kernels over all its documents and lines at once; a few documents, one by one.
    """
    n = len(texts)
    if n == 0:
        return [], np.zeros(0)
    if n <= 4 and isinstance(texts, list):  # Arrow's per-call costs outweigh a handful of documents
        table = _packed_script_table()
        counts = np.array([table[np.frombuffer((t or "")[:_SCRIPT_SAMPLE].encode("utf-32-le"), np.uint32)].sum()
                           for t in texts], np.int64)
        heads = [list(islice((ln for ln in (t or "").split("\n") if ln and not ln.isspace()), _HEAD_LINES))
                 for t in texts]
        nonblank = np.array([bool(h) for h in heads])
        share = np.array([sum(CODE_LINE.search(ln) is not None for ln in h) / max(len(h), 1) for h in heads])
        return _decide(counts, share, nonblank, np.arange(n)), share
    import pyarrow.compute as pc

    arr = pc.fill_null(as_large_strings(texts), "")
    sample = cut_to(arr, _SCRIPT_SAMPLE)
    # ASCII documents are counted on their bytes (each letter a Latin one); the others by code point.
    ascii = np.asarray(pc.string_is_ascii(sample), bool)
    counts = np.zeros(n, np.int64)
    if ascii.any():
        counts[ascii] = ascii_letters(sample if ascii.all() else sample.filter(ascii)) * (1 + (1 << 20))
    if not ascii.all():
        points, char_offsets = code_points(sample if not ascii.any() else sample.filter(~ascii))
        counts[~ascii] = segment_sums(np.take(_packed_script_table(), points), char_offsets)
    rest = np.flatnonzero(~_is_zh(counts))  # only these need the line statistics
    share, nonblank = _code_line_share(arr if len(rest) == n else arr.take(rest)) if len(rest) else (None, None)
    shares = np.zeros(n)
    if len(rest):
        shares[rest] = share
    return _decide(counts, share, nonblank, rest), shares


def _is_zh(counts: np.ndarray) -> np.ndarray:
    return (counts >> 40) / np.maximum(counts & 0xFFFFF, 1) >= 0.3


def _decide(counts: np.ndarray, share, nonblank, measured: np.ndarray) -> list[Lang]:
    """Languages from packed letter counts per document, and the line statistics of ``measured`` ones."""
    letters = np.maximum(counts & 0xFFFFF, 1)
    langs = np.where(((counts >> 20) & 0xFFFFF) / letters >= 0.7, "en", "other").astype(object)
    if len(measured):
        langs[measured[share >= 0.35]] = "code"
        langs[measured[~nonblank]] = "other"
    langs[_is_zh(counts)] = "zh"  # Han characters imply a non-blank text
    return langs.tolist()


def _packed_script_table() -> np.ndarray:
    """Per code point: 1 if a letter, + 1<<20 if a Latin one, + 1<<40 if a Han character (sums of up
    to 20,000 characters fit each 20-bit field)."""
    global _PACKED_TABLE
    if _PACKED_TABLE is None:
        flags = _script_table()
        _PACKED_TABLE = ((flags & _IS_ALPHA != 0).astype(np.int64) + ((flags & _IS_LATIN != 0).astype(np.int64) << 20)
                         + ((flags & _IS_HAN != 0).astype(np.int64) << 40))
    return _PACKED_TABLE


def _code_line_share(arr) -> tuple[np.ndarray, np.ndarray]:
    """(share of each document's first 400 non-blank lines shaped like code, whether it has any)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lines = pc.split_pattern(arr, "\n")
    line_offsets = np.asarray(lines.offsets, np.int64)
    line_offsets -= line_offsets[0]
    flat = lines.flatten()
    nonblank = ~np.asarray(pc.or_(pc.utf8_is_space(flat), pc.equal(pc.binary_length(flat), 0)), bool)
    seen = np.concatenate([[0], np.cumsum(nonblank)])
    rank = seen[1:] - np.repeat(seen[line_offsets[:-1]], np.diff(line_offsets))  # 1-based among non-blank
    head = nonblank & (rank <= _HEAD_LINES)
    head_offsets = np.concatenate([[0], np.cumsum(head)])[line_offsets]
    heads = flat.filter(pa.array(head))
    # RE2 (compiled per call) pays off on many ASCII lines; Python's cached pattern takes the rest.
    ascii = np.asarray(pc.string_is_ascii(heads), bool) if len(heads) > 256 else np.zeros(len(heads), bool)
    is_code = np.zeros(len(heads), np.int64)
    if ascii.any():
        is_code[ascii] = np.asarray(pc.match_substring_regex(heads.filter(pa.array(ascii)), CODE_LINE_ASCII_RE2))
    if not ascii.all():
        rest = heads if not ascii.any() else heads.filter(pa.array(~ascii))
        is_code[~ascii] = [CODE_LINE.search(line) is not None for line in rest.to_pylist()]
    per_doc = np.diff(head_offsets)
    return segment_sums(is_code, head_offsets) / np.maximum(per_doc, 1), per_doc > 0


def script_lang(text: str, name: str | None = None) -> Lang:
    """``script_langs`` of one document."""
    return script_langs([text], [name])[0]


# -- code -----------------------------------------------------------------------------------------

CODE_EXTENSIONS = frozenset(
    "py pyi pyx ipynb c h cc cpp cxx hpp hh cu cuh java kt kts scala groovy go rs swift m mm cs fs vb js jsx mjs "
    "cjs ts tsx vue svelte php rb pl pm lua r jl dart hs ml mli clj ex exs erl elm zig nim sh bash zsh fish ps1 "
    "bat sql proto thrift graphql cmake mk gradle tf asm s v sv vhd f f90 pas lisp scm rkt sol".split())
# files of data, not code (The Stack keeps them apart): judged as code, removed by ``code_data_file``
DATA_EXTENSIONS = frozenset("json jsonl ndjson csv tsv xml yaml yml toml lock dat svg geojson min.js".split())
_CODE_OR_DATA = CODE_EXTENSIONS | DATA_EXTENSIONS
# the first field of a source record's meta that names the file, where the URL does not
NAME_FIELDS = ("path", "file_path", "filepath", "filename", "file_name", "max_stars_repo_path", "repo_path")
_STRING_BLOCK = re.compile(r'"""[\s\S]*?(?:"""|$)|\'\'\'[\s\S]*?(?:\'\'\'|$)|/\*[\s\S]*?(?:\*/|$)')
_COMMENT_LINE = re.compile(r"^\s*(#|//|\*|--|;;|%)")
_TRAILING_COMMENT = re.compile(r"\s+(#|//)[^'\"]*$")
# a line that is only a literal (a string, a number, a key: value pair of them), as in tables of data in code
_LITERAL_LINE = re.compile(r"""^\s*(?:[rbuf]{0,2}(['"]).*\1|-?(?:0x[0-9a-fA-F]+|\d[\d_.eE+-]*))"""
                           r"""(?:\s*:\s*(?:[rbuf]{0,2}(['"]).*\2|-?(?:0x[0-9a-fA-F]+|\d[\d_.eE+-]*)))?\s*,?\s*$""")
_RECHECK_SHARE = 0.1  # documents this much code-shaped are checked again without their comments


# hosts whose URLs name source files (a web page's URL names a page, whatever it ends in: .php, .pl, a .rs host)
CODE_HOSTS = ("github.com", "raw.githubusercontent.com", "gist.github.com", "gitlab.com", "bitbucket.org",
              "gitee.com", "codeberg.org", "sourceforge.net", "googlesource.com")


def extension_of(name: str | None) -> str:
    """The file extension of a path (of a URL: of its path, never its host), lower-cased ('' without
    one; ``min.js`` for minified)."""
    if not name:
        return ""
    path = name
    if "://" in name:
        try:
            path = urlsplit(name).path
        except ValueError:
            return ""
    base = path.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    if base.endswith(".min.js"):
        return "min.js"
    return base.rsplit(".", 1)[1] if "." in base.strip(".") else ""


def is_data_file(name: str | None) -> bool:
    return extension_of(name) in DATA_EXTENSIONS


def name_of(url: str | None, meta: str | None) -> str | None:
    """The document's file name: a path field of its source record (``NAME_FIELDS``), else its URL
    where that names a file: a path or ``file://`` URL, or a URL on a code host (``CODE_HOSTS``); a web
    page's URL names no file."""
    if meta and any(f'"{field}"' in meta for field in NAME_FIELDS):
        try:
            record = json.loads(meta)
        except ValueError:
            record = {}
        for field in NAME_FIELDS:
            if isinstance(record.get(field), str):
                return record[field]
    if not url or "://" not in url or url.startswith("file://"):
        return url
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return None
    return url if any(host == h or host.endswith("." + h) for h in CODE_HOSTS) else None


def code_share_without_comments(text: str) -> float:
    """The share of non-blank lines shaped like code once docstrings, block comments, comment lines
    and trailing comments are gone (docstring-heavy source is mostly prose lines otherwise)."""
    head = "\n".join(islice(text.split("\n"), 4 * _HEAD_LINES))
    lines = [_TRAILING_COMMENT.sub("", ln) for ln in _STRING_BLOCK.sub("\n", head).split("\n")
             if ln.strip() and not _COMMENT_LINE.match(ln)]
    if len(lines) < 3:
        return 0.0
    return sum(CODE_LINE.search(ln) is not None or _LITERAL_LINE.match(ln) is not None for ln in lines) / len(lines)
