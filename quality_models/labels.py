"""Weak labels, so the embedded default can train its own classifiers without annotators.

Domain: from the source name (the recipe maps sources to domains), else URL patterns, else the
text's structure (code looks like code). Quality: documents the rule filter rejected and documents of
the recipe's low-quality sources are ``low``; documents of curated sources that passed every rule are
``high``; the rest stay unlabelled.
Real labels (an LLM's or people's annotations of a sample) replace these files as they are: JSONL with
``text`` and ``label`` (or ``score``).
"""

from __future__ import annotations

import re

from quality_models.language import script_lang

DEFAULT_URL_DOMAINS = [
    (r"news|xinwen|people\.com|xinhua|reuters|rmrb", "news"),
    (r"wiki|baike|encyclop|docs\.|/docs?/|reference|pydoc", "knowledge"),
    (r"github|gitlab|bitbucket|\.(py|js|java|c|cpp|go|rs)(#|$)|stdlib/", "code"),
    (r"forum|bbs|tieba|reddit|comment|review|zhihu|douban", "forum"),
    (r"law|legal|court|gov\.cn/zhengce|statute", "legal"),
    (r"novel|fiction|gutenberg|literature|poem", "literature"),
]


def weak_domain(source: str, url: str | None, text: str, source_domains: dict[str, str],
                url_domains: list[tuple[str, str]] = DEFAULT_URL_DOMAINS, is_code: bool | None = None) -> str | None:
    """The source's domain, else the URL's, else ``code`` for code (``is_code`` where the caller knows)."""
    if source in source_domains:
        return source_domains[source]
    if url:
        for pattern, domain in url_domains:
            if re.search(pattern, url, re.IGNORECASE):
                return domain
    if is_code if is_code is not None else script_lang(text) == "code":
        return "code"
    return None


def weak_quality(source: str, rejected_by_filter: bool, curated_sources: set[str],
                 low_quality_sources: set[str] = frozenset()) -> str | None:
    if rejected_by_filter or source in low_quality_sources:
        return "low"
    if source in curated_sources:
        return "high"
    return None
