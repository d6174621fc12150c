"""``tokenmill card``: a Hugging Face-style dataset card for the chunk set a lake holds.

``README.md`` with the YAML header the Hub reads (languages, size category, sources, licences where
the recipe gives them, task categories), then the numbers behind the chunks: tokens per category
against the mix, documents per source at each stage, what each stage rejected and why, the filter
rules with their thresholds per language, the PII policy and what it replaced, the pinned
classifiers, the dedup thresholds, the tokenizer and its compression, the held-out documents.

Everything comes from the lake's tables (aggregated by DuckDB over their files, ``Lake.sql``; only
small columns are read, never the documents' text), its artifacts and the recipe; nothing is typed
by hand.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from jobs.rules import build_rules
from jobs.stages import REFINE, StageError
from lake import chunks as store
from lake.recipe import Recipe
from lake.tables import Lake, groups

LIVE = (store.READY, store.TRAINING, store.CONSUMED)  # the chunk set: what is, or will be, trained on
# The Hub's size categories, by number of examples (here: documents in the chunk set).
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (10**12, "100B<n<1T")]
NOT_LANGUAGES = {"code", "other", None}  # categories that name no natural language


def size_category(n: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if n < limit), "n>1T")


@dataclass(frozen=True)
class Numbers:
    """What the card states, read from the lake."""

    chunks: list[dict]  # live manifest rows
    tokens: dict[str, int]  # per category, packed
    documents: dict[str, int]  # per source, in the chunk set
    languages: list[str]
    stage_rows: dict[str, dict[str, int]]  # kept table → source → documents
    rejected: dict[str, Counter]  # stage → reason → documents
    pii: dict[str, dict[str, int]]  # placeholder → source → replacements
    held_out: dict[str, int]  # source → documents


def numbers(recipe: Recipe, need_chunks: bool = True) -> Numbers:
    lake = Lake(recipe.lake)
    live = [r for r in store.manifest(lake) if r["status"] in LIVE]
    if not live and need_chunks:
        raise StageError(f"{lake.root} has no ready, training or consumed chunk: a card describes a chunk set "
                         f"(tokenmill feed --recipe {recipe.origin})")
    tokens: Counter = Counter()
    for row in live:
        tokens.update(dict(row["mix"] or []))
    kept = lake.kept_documents()
    in_chunks = lake.sql(f"""SELECT source, lang, count(*) AS n FROM {kept}
                             SEMI JOIN (SELECT doc_id FROM usage WHERE times_used > 0) AS used USING (doc_id)
                             GROUP BY ALL""", [kept, "usage"])
    languages = sorted({x for x in in_chunks.column("lang").to_pylist() if x not in NOT_LANGUAGES})
    rejected: dict[str, Counter] = {}
    for (stage, reason), n in lake.counts("documents_rejected", ["stage", "reason"]).items():
        rejected.setdefault(stage, Counter())[reason] = n
    return Numbers(live, dict(tokens), dict(groups(in_chunks, ["source"], "n")), languages, _stage_rows(lake),
                   rejected, pii_per_source(lake), per_source(lake, "holdout"))


def per_source(lake: Lake, name: str) -> dict[str, int]:
    return dict(sorted(lake.counts(name, ["source"]).items(), key=str))


def pii_per_source(lake: Lake) -> dict[str, dict[str, int]]:
    """Placeholder → source → replacements in ``documents_clean``."""
    found = groups(lake.sql("""SELECT kind, source, CAST(sum(n) AS BIGINT) AS n
                               FROM (SELECT source, unnest(map_keys(pii)) AS kind, unnest(map_values(pii)) AS n
                                     FROM documents_clean)
                               GROUP BY ALL""", ["documents_clean"]), ["kind", "source"], "n")
    out: dict[str, dict[str, int]] = {}
    for (kind, source), n in sorted(found.items()):
        if n:
            out.setdefault(kind, {})[source] = n
    return out


def _stage_rows(lake: Lake) -> dict[str, dict[str, int]]:
    return {s.kept_table: per_source(lake, s.kept_table) for s in REFINE if lake.exists(s.kept_table)}


def header(recipe: Recipe, n: Numbers, name: str) -> dict:
    """The card's YAML header, in the Hub's keys."""
    licences = sorted({s.license for s in recipe.sources if s.license and n.documents.get(s.name)})
    tags = ["pretraining", "tokenmill"] + (["code"] if "code" in n.tokens else [])
    return {"pretty_name": name, "language": n.languages, "license": licences or ["unknown"],
            "size_categories": [size_category(sum(n.documents.values()))],
            "source_datasets": sorted(n.documents), "task_categories": ["text-generation"],
            "task_ids": ["language-modeling"], "tags": tags}


def render(recipe: Recipe, n: Numbers, name: str, made: datetime) -> str:
    from lake.artifacts import load_tokenizer

    _, tok = load_tokenizer(recipe)
    total = sum(n.tokens.values())
    stages = Counter(r["stage"] for r in n.chunks)
    out = ["---", yaml.safe_dump(header(recipe, n, name), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
           f"# {name}", "",
           f"Token chunks for LLM pretraining, made by tokenmill from `{recipe.origin}` "
           f"({made:%Y-%m-%d %H:%M} UTC): {len(n.chunks)} chunk(s) "
           f"({', '.join(f'{k} {v}' for k, v in sorted(stages.items()))}), {total:,} tokens, "
           f"{sum(n.documents.values()):,} documents, tokenizer `{tok['name']}/{tok['version']}`.", ""]
    out += _sources(recipe, n) + _mix(recipe, n, total) + _refinery(recipe, n) + _tokenizer(tok, n)
    return "\n".join(out) + "\n"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(f"{c:,}" if isinstance(c, int) else str(c) for c in row) + " |" for row in rows] + [""]


def _sources(recipe: Recipe, n: Numbers) -> list[str]:
    tables = list(n.stage_rows)
    rows = [[f"`{s.name}`", s.license or "not given", *[n.stage_rows[t].get(s.name, 0) for t in tables],
             n.documents.get(s.name, 0), n.held_out.get(s.name, 0)] for s in recipe.sources]
    return ["## Sources", "", "Documents of each source after each stage, in the chunk set, and held out for "
            "the trainer's evaluation (never in a chunk):", ""] + _table(
        ["source", "licence", *[f"`{t}`" for t in tables], "in chunks", "held out"], rows)


def _mix(recipe: Recipe, n: Numbers, total: int) -> list[str]:
    mix = recipe.feed.current.mix
    rows = [[f"`{c}`", n.tokens.get(c, 0), f"{n.tokens.get(c, 0) / max(total, 1):.1%}",
             f"{mix[c] / sum(mix.values()):.1%}" if c in mix else "not in the mix"]
            for c in sorted(set(n.tokens) | set(mix))]
    return ["## Tokens per category", "", f"Packed tokens against feed stage `{recipe.feed.stage}`'s mix:", ""] + _table(
        ["category", "tokens", "share", "target"], rows)


def _refinery(recipe: Recipe, n: Numbers) -> list[str]:
    out = ["## How it was refined", ""]
    for stage in REFINE:
        reasons = n.rejected.get(stage.name)
        if reasons:
            out.append(f"- **{stage.name}** rejected {sum(reasons.values()):,}: "
                       + ", ".join(f"`{k}` {v:,}" for k, v in reasons.most_common()))
    out += ["", "### Filter rules", "", "A document is kept only if every rule holds for its script language "
            "(`off`: the rule does not judge that language):", ""]
    rules = build_rules(recipe.filter.thresholds, recipe.filter.limits())
    langs = sorted({lang for r in rules for lang in r.per_lang} | set(n.languages))
    rows = [[f"`{r.name}`", f"{r.signal} {'≥' if r.bound == 'min' else '≤'}", _limit(r.default),
             *[_limit(r.threshold(lang)) for lang in langs]] for r in rules if r.default is not None or any(
                 v is not None for v in r.per_lang.values())]
    out += _table(["rule", "signal", "default", *langs], rows)
    for source, overrides in recipe.filter.source_thresholds.items():
        out.append(f"- source `{source}` has its own thresholds: "
                   + ", ".join(f"`{name}` {value}" for name, value in overrides.items()))
    decon = recipe.filter.decontaminate
    if decon.sets:
        out.append(f"- decontaminated ({decon.action}) against evaluation sets by shared {decon.n}-grams: "
                   + ", ".join(f"`{name}`" for name in decon.sets))
    block = recipe.filter.url_blocklist
    if block.domains or block.words:
        out.append(f"- URL blocklists: {len(block.domains)} domain list(s), {len(block.words)} banned-word list(s)")
    from jobs.pii import BUILTIN_DETECTORS

    kinds = [k for k, _ in BUILTIN_DETECTORS] + sorted(recipe.pii.patterns) + sorted(recipe.pii.word_lists)
    replaced = ", ".join(f"`<{k}>` {sum(by.values()):,}" for k, by in sorted(n.pii.items())) or "none"
    out += ["### PII", "", f"Replaced by placeholders: {', '.join(f'`<{k}>`' for k in kinds)}; a document more than "
            f"{recipe.pii.max_pii_fraction:.0%} PII by characters is rejected. Replaced here: {replaced}.", ""]
    from quality_models.train import check_pinned

    out += ["### Quality and domain", "", "Scored by " + ", ".join(f"{role} `{ref}`" for role, ref in
                                                                   check_pinned(recipe).items()) + ".", ""]
    d = recipe.dedup
    keyed = ", ".join(f"`{k}` {v}" for k, v in sorted(d.thresholds.items()))
    out += ["### Deduplication", "", f"{'Exact copies of the normalised text first, then ' if d.exact else ''}MinHash "
            f"({d.num_perm} permutations) with LSH: Jaccard thresholds by domain or category {keyed}, "
            f"{d.default_threshold} otherwise; the survivor of a cluster is kept, the others rejected."
            + (f" Lines in more than {d.line_dedup.min_repeats} documents are removed first." if d.line_dedup else ""), ""]
    return out


def _limit(value: float | None) -> str:
    return "off" if value is None else f"{value:g}"


def _tokenizer(tok: dict, n: Numbers) -> list[str]:
    rows = [[f"`{c}`", f"{v['bytes_per_token']:.2f}" if v.get("bytes_per_token") else "–"]
            for c, v in sorted((tok.get("compression") or {}).items())]
    return ["## Tokenizer", "", f"`{tok['name']}/{tok['version']}`: byte-level BPE, vocabulary {tok['vocab_size']:,} "
            f"(embedding rows {tok['model_vocab_size']:,}); the chunks hold its ids. Bytes per token on held-out "
            "documents:", ""] + _table(["category", "bytes/token"], rows)


def write_page(lake_root: str, out: str | None, default: str, file: str, text: str) -> Path:
    """``text`` into ``out/file``, or ``<lake>/default/file`` for a local lake (a card, a report)."""
    if out is None and "://" in lake_root and not lake_root.startswith("file://"):
        raise StageError(f"the lake {lake_root} is not a local folder: pass --out DIR for {file}")
    folder = Path(out) if out else Path(lake_root.removeprefix("file://")) / default
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text(text, encoding="utf-8")
    return folder / file


def write_card(recipe: Recipe, out: str | None = None, name: str | None = None) -> Path:
    """Write ``README.md`` into ``out`` (default ``<lake>/card``, a local lake) and return its path."""
    title = name or (Path(recipe.origin).stem if recipe.origin != "<memory>" else Path(recipe.lake.rstrip("/")).name)
    text = render(recipe, numbers(recipe), title, datetime.now(timezone.utc))
    return write_page(recipe.lake, out, "card", "README.md", text)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lake.recipe import recipe_arguments, recipe_from_args

    parser = argparse.ArgumentParser(prog="tokenmill card", description=__doc__.split("\n\n")[0])
    recipe_arguments(parser)
    parser.add_argument("--out", help="folder for README.md (default: <lake>/card)")
    parser.add_argument("--name", help="the dataset's name (default: the recipe file's name)")
    args = parser.parse_args(argv)
    print(write_card(recipe_from_args(args), args.out, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
