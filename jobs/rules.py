"""Rule filtering as pure functions: line cleanup first, then signals, then threshold decisions.

``clean_lines`` removes reprint notices, navigation lines and trailing reference sections.
``compute_signals`` turns a text into named numbers (Gopher-style repetition, character classes,
URL density, keyword hits, ...). ``failed_rules`` compares them with thresholds that may differ per
script language (``quality_models.language.script_lang``), so that prose rules never silently remove code.
Defaults mirror the Gopher paper (Rae et al., 2021) and C4 where those define a rule.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from quality_models.arrowtext import HAN_CLASS

# -- line cleanup ------------------------------------------------------------------------------

DEFAULT_DROP_LINE_PATTERNS = [
    r"^\s*(转载自|转载于|本文转载|来源[:：]|原标题[:：]|本文来源|文章来源|责任编辑[:：]|编辑[:：]|原文链接[:：])",
    r"^\s*(首页|返回顶部|上一篇|下一篇|上一页|下一页|分享到|点击进入|扫一扫|关注我们)",
    r"^\s*(home|next|previous|prev|share this|skip to (main )?content|back to top|read more|log ?in|sign up|subscribe)\s*[|>»›:]?\s*$",
    r"(?i)^.*\b(we use cookies|cookie policy|all rights reserved|版权所有|未经授权)\b.*$",
]
DEFAULT_TRUNCATE_PATTERNS = [
    r"^\s*(references|bibliography|参考文献|参考资料|注释)\s*[:：]?\s*$",
]


@dataclass(frozen=True)
class LineCleanup:
    drop: tuple[re.Pattern[str], ...]
    truncate: tuple[re.Pattern[str], ...]

    @classmethod
    def compile(cls, drop: list[str], truncate: list[str]) -> LineCleanup:
        return cls(
            tuple(re.compile(p, re.IGNORECASE) for p in drop),
            tuple(re.compile(p, re.IGNORECASE) for p in truncate),
        )


def clean_lines(text: str, cleanup: LineCleanup) -> tuple[str, int]:
    """The text without boilerplate lines and trailing reference sections; and how many lines went."""
    lines = text.split("\n")
    kept: list[str] = []
    removed = 0
    for i, line in enumerate(lines):
        # A references heading in the last part of the document: everything after it goes.
        if i >= len(lines) // 2 and any(p.search(line) for p in cleanup.truncate):
            removed += len(lines) - i
            break
        if any(p.search(line) for p in cleanup.drop):
            removed += 1
            continue
        kept.append(line)
    return "\n".join(kept).strip("\n"), removed


# -- signals -----------------------------------------------------------------------------------

_HAN = re.compile(f"[{HAN_CLASS}]")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'）)]+", re.IGNORECASE)
_WORD = re.compile(r"\S+")
_BULLET = re.compile(r"^\s*([-*•·●○▪■◦‣⁃]|\d{1,2}[.)])\s+")
_ELLIPSIS = re.compile(r"(\.\.\.|…)\s*$")


EN_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])


def _ngram_signals(token_ids: np.ndarray, token_lens: np.ndarray) -> dict[str, float]:
    """Gopher repetition: top n-gram character coverage (n=2..4), duplicated n-gram coverage (5..10).

    N-grams are 64-bit rolling hashes of token-id windows, so each n costs a few numpy passes.
    """
    out: dict[str, float] = {}
    n_tokens = len(token_ids)
    total_chars = float(token_lens.sum()) or 1.0
    prefix = np.concatenate([[0], np.cumsum(token_lens)])
    hashes = token_ids.astype(np.uint64)
    for n in range(1, 11):
        if n > 1:
            if n_tokens < n:
                hashes = np.empty(0, np.uint64)
            else:
                hashes = hashes[:-1] * np.uint64(1_000_003) + token_ids[n - 1 :].astype(np.uint64) + np.uint64(n)
        if n < 2:
            continue
        if len(hashes) == 0:
            out[f"top_{n}gram_frac" if n <= 4 else f"dup_{n}gram_frac"] = 0.0
            continue
        _, first, inverse, counts = np.unique(hashes, return_index=True, return_inverse=True, return_counts=True)
        if n <= 4:
            best = counts.max()
            if best < 2:
                out[f"top_{n}gram_frac"] = 0.0
                continue
            at = first[counts == best].min()  # ties: the n-gram seen first, as Counter.most_common does
            out[f"top_{n}gram_frac"] = best * float(prefix[at + n] - prefix[at]) / total_chars
        else:
            starts = np.nonzero(first[inverse] != np.arange(len(hashes)))[0]  # repeats of an earlier n-gram
            cover = np.zeros(n_tokens + 1, np.int32)
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + n, -1)
            covered = np.cumsum(cover[:-1]) > 0
            out[f"dup_{n}gram_frac"] = float(token_lens[covered].sum()) / total_chars
    return out


def _duplicate_fractions(parts: list[str]) -> tuple[float, float]:
    """(share of parts that repeat an earlier one, share of characters in such repeats)."""
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup, dup_chars = 0, 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / len(parts), dup_chars / (sum(len(p) for p in parts) or 1)


def _class_tables() -> dict[str, np.ndarray]:
    """Per-code-point class lookups for the Basic Multilingual Plane (built once, ~64 KB each)."""
    chars = [chr(i) for i in range(0x10000)]
    return {
        "space": np.array([c.isspace() for c in chars]),
        "symbol": np.array([unicodedata.category(c)[0] in "PS" for c in chars]),
        "printable": np.array([c.isprintable() for c in chars]),
        "digit": np.array([c.isdigit() for c in chars]),
        "han": np.array([bool(_HAN.match(c)) for c in chars]),
    }


_TABLES: dict[str, np.ndarray] | None = None


def _char_classes(text: str) -> dict[str, int]:
    global _TABLES
    if _TABLES is None:
        _TABLES = _class_tables()
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    # Characters beyond the BMP (emoji, rare CJK) count as visible; as Han in the CJK extension blocks.
    astral = cp > 0xFFFF
    bmp = np.where(astral, 0, cp)
    visible = ~_TABLES["space"][bmp] | astral
    lower = cp | 0x20
    return {
        "visible": int(visible.sum()),
        "han": int((_TABLES["han"][bmp] & ~astral).sum() + ((cp >= 0x20000) & (cp <= 0x2FA1F)).sum()),
        "latin": int(((lower >= 0x61) & (lower <= 0x7A) & (cp < 0x80)).sum()),
        "digit": int((_TABLES["digit"][bmp] & visible & ~astral).sum()),
        "symbol": int((_TABLES["symbol"][bmp] & visible & ~astral).sum()),
        "nonprintable": int((~_TABLES["printable"][bmp] & visible & ~astral).sum()),
    }


def compute_signals(text: str, keyword_lists: dict[str, frozenset[str]] | None = None) -> dict[str, float]:
    lines = text.split("\n")
    nonblank = [ln.strip() for ln in lines if ln.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    words = _WORD.findall(text)
    classes = _char_classes(text)
    n_chars = classes["visible"] or 1
    han = classes["han"]
    urls = _URL.findall(text)
    dup_lines, dup_line_chars = _duplicate_fractions(nonblank)
    dup_paras, dup_para_chars = _duplicate_fractions(paragraphs)
    # Chinese has no spaces: repetition is measured on characters there, on words elsewhere.
    if han / n_chars >= 0.3:
        cp = np.frombuffer("".join(text.split()).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        token_ids, token_lens = cp.astype(np.int64), np.ones(len(cp), np.int64)
    else:
        vocab: dict[str, int] = {}
        lowered_words = [w.lower() for w in words]
        token_ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in lowered_words), np.int64, len(words))
        token_lens = np.fromiter((len(w) for w in words), np.int64, len(words))
    alpha_words = sum(1 for w in words if any(ch.isalpha() for ch in w))
    signals = {
        "n_chars": float(len(text)),
        "n_lines": float(len(nonblank)),
        "n_words": float(len(words)),
        "n_tokens": float(len(token_ids)),
        "han_frac": han / n_chars,
        "latin_frac": classes["latin"] / n_chars,
        "digit_frac": classes["digit"] / n_chars,
        "symbol_frac": classes["symbol"] / n_chars,
        "url_count": float(len(urls)),
        "url_char_frac": sum(len(u) for u in urls) / n_chars,
        "dup_line_frac": dup_lines,
        "dup_line_char_frac": dup_line_chars,
        "dup_para_frac": dup_paras,
        "dup_para_char_frac": dup_para_chars,
        "mean_word_len": sum(map(len, words)) / len(words) if words else 0.0,
        "alpha_word_frac": alpha_words / (len(words) or 1),
        "stop_words": float(sum(1 for w in words if w.lower().strip(".,;:!?\"'()") in EN_STOP_WORDS)),
        "bullet_line_frac": sum(bool(_BULLET.match(ln)) for ln in nonblank) / (len(nonblank) or 1),
        "ellipsis_line_frac": sum(bool(_ELLIPSIS.search(ln)) for ln in nonblank) / (len(nonblank) or 1),
        "replacement_char_frac": text.count("\ufffd") / n_chars,
        "nonprintable_frac": classes["nonprintable"] / n_chars,
        "blank_line_frac": (len(lines) - len(nonblank)) / (len(lines) or 1),
        **_ngram_signals(token_ids, token_lens),
    }
    lowered = text.lower()
    for name, words_list in (keyword_lists or {}).items():
        hits = sum(lowered.count(w) for w in words_list)
        signals[f"keywords_{name}"] = hits * 1000.0 / n_chars  # hits per 1000 characters
    return signals


# -- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Keep a document only if ``signal`` is >= ``min`` / <= ``max`` (the value per language)."""

    name: str
    signal: str
    bound: Literal["min", "max"]
    default: float | None
    per_lang: dict[str, float | None] = field(default_factory=dict)

    def threshold(self, lang: str) -> float | None:
        return self.per_lang[lang] if lang in self.per_lang else self.default

    def fails(self, signals: dict[str, float], lang: str) -> bool:
        limit = self.threshold(lang)
        if limit is None or self.signal not in signals:
            return False
        value = signals[self.signal]
        return value < limit if self.bound == "min" else value > limit


# None disables a rule for that language: prose rules do not apply to code, word rules not to Chinese.
_PROSE_ONLY = {"code": None}
DEFAULT_RULES: list[Rule] = [
    Rule("too_short_chars", "n_chars", "min", 50),
    Rule("too_few_words", "n_words", "min", 20, {"zh": None, "code": None}),
    Rule("too_many_words", "n_words", "max", 100_000, {"zh": None}),
    # Off by default (null); set per language in the recipe where a corpus needs them.
    Rule("too_few_lines", "n_lines", "min", None),
    Rule("low_han_share", "han_frac", "min", None),
    Rule("low_latin_share", "latin_frac", "min", None),
    # The most specific rules come first: a document's reason is the first rule it fails.
    Rule("replacement_chars", "replacement_char_frac", "max", 0.01),
    Rule("nonprintable", "nonprintable_frac", "max", 0.01),
    Rule("mostly_blank_lines", "blank_line_frac", "max", 0.5, {"code": 0.6}),
    Rule("url_heavy", "url_char_frac", "max", 0.3),
    Rule("symbol_heavy", "symbol_frac", "max", 0.35, {"code": 0.6}),
    Rule("digit_heavy", "digit_frac", "max", 0.5),
    Rule("dup_lines", "dup_line_frac", "max", 0.30, {"code": 0.5}),
    Rule("dup_line_chars", "dup_line_char_frac", "max", 0.20, {"code": 0.4}),
    Rule("dup_paragraphs", "dup_para_frac", "max", 0.30, {"code": 0.5}),
    Rule("dup_paragraph_chars", "dup_para_char_frac", "max", 0.20, {"code": 0.4}),
    Rule("top_2gram", "top_2gram_frac", "max", 0.20, {"zh": 0.30, "code": None}),
    Rule("top_3gram", "top_3gram_frac", "max", 0.18, {"zh": 0.25, "code": None}),
    Rule("top_4gram", "top_4gram_frac", "max", 0.16, {"zh": 0.20, "code": None}),
    # Chinese is measured in characters, not words: a 5-character n-gram is two or three words.
    *(Rule(f"dup_{n}gram", f"dup_{n}gram_frac", "max", round(0.15 - (n - 5) * 0.01, 2),
           {"code": None, "zh": round(0.25 - (n - 5) * 0.02, 2)})
      for n in range(5, 11)),
    Rule("mean_word_len_low", "mean_word_len", "min", 3, {"zh": None, "code": None, "other": None}),
    Rule("mean_word_len_high", "mean_word_len", "max", 10, {"zh": None, "code": None, "other": None}),
    Rule("non_alpha_words", "alpha_word_frac", "min", 0.8, {"zh": None, "code": None, "other": None}),
    Rule("no_stop_words", "stop_words", "min", 2, {"zh": None, "code": None, "other": None}),
    Rule("bullet_lines", "bullet_line_frac", "max", 0.9, _PROSE_ONLY),
    Rule("ellipsis_lines", "ellipsis_line_frac", "max", 0.3, _PROSE_ONLY),
]


def build_rules(overrides: dict[str, float | None | dict[str, float | None]], keyword_limits: dict[str, float]) -> list[Rule]:
    """Default rules with the recipe's thresholds applied, plus one rule per keyword list."""
    by_name = {r.name: r for r in DEFAULT_RULES}
    unknown = set(overrides) - set(by_name)
    if unknown:
        raise ValueError(f"filter.thresholds: unknown rule(s) {sorted(unknown)}; rules are: {', '.join(by_name)}")
    rules = []
    for rule in DEFAULT_RULES:
        if rule.name in overrides:
            value = overrides[rule.name]
            if isinstance(value, dict):  # per-language values: the languages it names change, the rest stay
                per_lang = {**rule.per_lang, **{k: v for k, v in value.items() if k != "default"}}
                rule = Rule(rule.name, rule.signal, rule.bound, value.get("default", rule.default), per_lang)
            elif value is None:  # null: off for every language
                rule = Rule(rule.name, rule.signal, rule.bound, None, {})
            else:  # a number for every language, except those the rule never judges (``too_few_words: 30``
                # must not start counting words in Chinese or code)
                exempt = {lang: None for lang, limit in rule.per_lang.items() if limit is None}
                rule = Rule(rule.name, rule.signal, rule.bound, value, exempt)
        rules.append(rule)
    for name, limit in keyword_limits.items():
        rules.append(Rule(f"keywords_{name}", f"keywords_{name}", "max", limit))
    return rules


def failed_rules(signals: dict[str, float], lang: str, rules: list[Rule]) -> list[Rule]:
    return [r for r in rules if r.fails(signals, lang)]
