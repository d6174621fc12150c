"""PII detection and replacement as pure functions, run by ``scrub_pii`` inside Spark.

Each detector finds candidate spans with a regular expression and then *verifies* them (ID-number
checksum and birth date, Luhn for cards, address ranges for IPs), so that what only looks similar —
decimals and versions ("9.11", "v3.11.7"), dates, prices, section numbers, "RFC 2119" — is left
alone. Spans are taken in priority order and never overlap.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import date
from typing import Callable, Iterator

Span = tuple[int, int]

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])")
# Chinese resident ID: 6-digit area, 8-digit birth date, 3-digit sequence, checksum digit or X.
_ID_NUMBER = re.compile(r"(?<![\dA-Za-z])\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dA-Za-z])")
_CN_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
_CN_LANDLINE = re.compile(r"(?<![\d.])(?:\(0\d{2,3}\)|0\d{2,3}-)[ ]?[2-9]\d{6,7}(?:-\d{1,4})?(?![\d.])")
_E164 = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ -]?\(?\d{1,4}\)?){2,5}(?![\d-])")
_CARD = re.compile(r"(?<![\d.-])[3-6]\d{3}(?:[ -]?\d{4}){2,3}(?:[ -]?\d{1,3})?(?![\d.])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:.])")
# Words right before a dotted number that make it a version or section, not an address.
_NOT_AN_ADDRESS = re.compile(r"(?i)(version|ver\.?|v|release|section|sec\.?|§|chapter|figure|fig\.?|table|第)\s*$")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_cn_id(number: str) -> bool:
    """18-digit Chinese resident ID: real birth date and ISO 7064 MOD 11-2 check digit."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    try:
        born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if born > date.today():
        return False
    check = _ID_CHECK[sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS)) % 11]
    return number[17].upper() == check


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _find_email(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield m.span()


def _find_id(text: str) -> Iterator[Span]:
    for m in _ID_NUMBER.finditer(text):
        if valid_cn_id(m.group()):
            yield m.span()


def _find_card(text: str) -> Iterator[Span]:
    for m in _CARD.finditer(text):
        digits = _digits(m.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1:
            yield m.span()


def _find_phone(text: str) -> Iterator[Span]:
    yield from (m.span() for m in _CN_MOBILE.finditer(text))
    yield from (m.span() for m in _CN_LANDLINE.finditer(text))
    for m in _E164.finditer(text):
        if 8 <= len(_digits(m.group())) <= 15:
            yield m.span()


def _find_ip(text: str) -> Iterator[Span]:
    for m in _IPV4.finditer(text):
        if _NOT_AN_ADDRESS.search(text[max(0, m.start() - 12) : m.start()]):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield m.span()
    for m in _IPV6.finditer(text):
        candidate = m.group()
        if sum(ch in "0123456789abcdefABCDEF" for ch in candidate) < 6:
            continue  # "a::b", "12:30:45" and other short colon runs are not addresses
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield m.span()


BUILTIN_DETECTORS: list[tuple[str, Callable[[str], Iterator[Span]]]] = [
    ("EMAIL", _find_email),
    ("ID_NUMBER", _find_id),
    ("BANK_CARD", _find_card),
    ("PHONE", _find_phone),
    ("IP", _find_ip),
]


@dataclass(frozen=True)
class Scrubber:
    """Detectors in priority order: built-ins, then the recipe's patterns and word lists."""

    detectors: tuple[tuple[str, Callable[[str], Iterator[Span]]], ...]

    @classmethod
    def build(cls, extra_patterns: dict[str, str] | None = None, word_lists: dict[str, list[str]] | None = None) -> Scrubber:
        detectors = list(BUILTIN_DETECTORS)
        for name, pattern in (extra_patterns or {}).items():
            regex = re.compile(pattern)
            detectors.append((name, lambda text, rx=regex: (m.span() for m in rx.finditer(text))))
        for name, words in (word_lists or {}).items():
            if words:
                alternation = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
                # ASCII word boundaries: Chinese has no spaces, so a name inside a sentence still matches.
                regex = re.compile(rf"(?<![A-Za-z0-9_])(?:{alternation})(?![A-Za-z0-9_])")
                detectors.append((name, lambda text, rx=regex: (m.span() for m in rx.finditer(text))))
        return cls(tuple(detectors))

    def scrub(self, text: str) -> tuple[str, dict[str, int], float]:
        """(text with typed placeholders, count per type, share of characters that were PII)."""
        taken: list[tuple[int, int, str]] = []
        for kind, find in self.detectors:
            for start, end in find(text):
                if all(end <= s or start >= e for s, e, _ in taken):
                    taken.append((start, end, kind))
        if not taken:
            return text, {}, 0.0
        taken.sort()
        out, counts, pos, pii_chars = [], {}, 0, 0
        for start, end, kind in taken:
            out.append(text[pos:start])
            out.append(f"<{kind}>")
            counts[kind] = counts.get(kind, 0) + 1
            pii_chars += end - start
            pos = end
        out.append(text[pos:])
        visible = sum(1 for ch in text if not ch.isspace()) or 1
        return "".join(out), counts, min(1.0, pii_chars / visible)
