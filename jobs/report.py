"""``tokenmill report``: one static HTML page of the whole lake, from raw records to training.

The funnel per stage and source, what each rule removed (alone or with others, per source, with
samples; line clean-up before and after), PII per type and source, score distributions, category
shares, dedup clusters side by side, the mix of every chunk against the target, document reuse,
tokenizer compression, and each training run's curves with its spikes, rollbacks and quarantines on
one timeline. Charts are inline SVG drawn here (``jobs/report_charts.py``); the page loads nothing
and runs no script. The figures it shows are also embedded as JSON (``<script type="application/json"
id="figures">``), which the tests compare with the tables.

Every figure is an aggregate DuckDB computes over the tables' files (``Lake.sql``: delta-rs lists them,
DuckDB streams the columns a query names; no Spark, nothing collected); text is read only for the
capped samples, by id.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import pyarrow.compute as pc

from jobs import report_charts as chart
from jobs.card import numbers as card_numbers, write_page
from jobs.shifts import shifts
from jobs.stages import REFINE
from lake.fs import exists, read_bytes
from lake.recipe import Recipe
from lake.tables import Lake, groups

SAMPLES = 3  # per rule, per cluster list, per line clean-up
PREVIEW = 400  # characters of a sample


def figures(recipe: Recipe) -> dict:
    """Every number the page shows (and its samples), from the lake."""
    lake = Lake(recipe.lake)
    card = card_numbers(recipe, need_chunks=False)
    scores, compression, rules = _scores(lake), _compression(recipe), _rules(lake)
    removed = {(name, source): n for name, r in rules.items() for source, n in r["per_source"].items()}
    found = shifts(card.stage_rows.get("documents_raw", {}), removed, recipe.filter.warn_share)
    found += shifts(card.stage_rows.get("documents_scored", {}), _dedup_removed(lake), recipe.dedup.warn_share)
    return {"funnel": card.stage_rows, "volume": _volume(lake, compression, scores.get("main_category", {})),
            "in_chunks": card.documents, "held_out": card.held_out,
            "rejected": {s: dict(c) for s, c in card.rejected.items()},
            "rules": rules, "line_cleanup": _line_cleanup(lake),
            "shifts": [{"rule": x.key, "source": x.source, "removed": x.removed, "of": x.of, "share": x.share,
                        "text": str(x)} for x in found],
            "decontamination": _decontamination(recipe, lake),
            "pii": card.pii, "scores": scores, "dedup": _dedup(lake),
            "chunks": _chunks(recipe, card.chunks, compression), "usage": _usage(lake),
            "training": _training(recipe, lake)}


def _volume(lake: Lake, compression: dict[str, float], main_category: dict[str, str]) -> dict:
    """Per kept table and source: the text's UTF-8 bytes, and tokens estimated at the tokenizer's bytes per
    token of the source's main category (3.0, feed's fallback, where unknown)."""
    out = {}
    for stage in REFINE:
        if lake.exists(stage.kept_table):
            sizes = groups(lake.sql(f"SELECT source, CAST(sum(strlen(text)) AS BIGINT) AS bytes FROM {stage.kept_table} GROUP BY source",
                                    [stage.kept_table]), ["source"], "bytes")
            out[stage.kept_table] = {s: {"bytes": b, "tokens": round(b / compression.get(main_category.get(s), 3.0))}
                                     for s, b in sorted(sizes.items())}
    return out


# The filter's rejections, each rule its detail names ("rule: value; rule: value") a row of its own.
_FAILED_RULES = """SELECT doc_id, source, reason, regexp_extract(part, '^([a-z0-9_]+): ', 1) AS rule, parts
FROM (SELECT doc_id, source, reason, unnest(string_split(coalesce(detail, ''), '; ')) AS part,
             len(string_split(coalesce(detail, ''), '; ')) AS parts
      FROM documents_rejected WHERE stage = 'filter')"""


def _rules(lake: Lake) -> dict:
    """Per rule: documents it failed, those it alone failed, the first-failed count per source, samples."""
    tables = ["documents_rejected"]
    failed = groups(lake.sql(
        f"SELECT rule, count(*) AS n FROM ({_FAILED_RULES}) WHERE rule <> '' GROUP BY rule", tables), ["rule"], "n")
    alone = lake.counts("documents_rejected", ["reason"],
                        where="stage = 'filter' AND len(string_split(coalesce(detail, ''), '; ')) = 1")
    removed = lake.counts("documents_rejected", ["reason", "source"], where="stage = 'filter'")
    picked = lake.sql(f"""SELECT reason, doc_id FROM documents_rejected WHERE stage = 'filter'
                          QUALIFY row_number() OVER (PARTITION BY reason ORDER BY doc_id) <= {SAMPLES}
                          ORDER BY reason, doc_id""", tables).to_pylist()
    samples: dict[str, list[str]] = {}
    for r in picked:
        samples.setdefault(r["reason"], []).append(r["doc_id"])
    texts = _texts(lake, "documents_rejected", [r["doc_id"] for r in picked])
    per_source: dict[str, dict[str, int]] = {}
    for (reason, source), n in removed.items():
        per_source.setdefault(reason, {})[source] = n
    return {name: {"failed": failed[name], "alone": alone[name], "removed": sum(per_source.get(name, {}).values()),
                   "per_source": per_source.get(name, {}),
                   "samples": [{"doc_id": d, "text": texts.get(d, "")} for d in samples.get(name, [])]}
            for name in sorted(failed, key=lambda n: (-failed[n], n))}


def _decontamination(recipe: Recipe, lake: Lake) -> dict:
    """Per evaluation set: documents removed for sharing an n-gram with it, and those kept but flagged
    (``filter.decontaminate.action: flag``), per source."""
    sets = recipe.filter.decontaminate.sets
    if not sets or not lake.exists("documents_filtered"):
        return {}
    removed = groups(lake.sql(f"""SELECT rule AS reason, source, count(*) AS n FROM ({_FAILED_RULES})
                                  WHERE starts_with(rule, 'decontam_') GROUP BY rule, source""",
                              ["documents_rejected"]), ["reason", "source"], "n")  # every set it matched
    flagged = groups(lake.sql("""SELECT key, source, count(*) AS n
                                 FROM (SELECT source, unnest(map_keys(signals)) AS key FROM documents_filtered)
                                 WHERE starts_with(key, 'decontam_') GROUP BY key, source""",
                              ["documents_filtered"]), ["key", "source"], "n")
    return {name: {kind: {s: n for (k, s), n in sorted(found.items()) if k == f"decontam_{name}"}
                   for kind, found in (("removed", removed), ("flagged", flagged))} for name in sets}


def _line_cleanup(lake: Lake) -> list[dict]:
    """A few kept documents whose lines the filter cleaned: the text before and after."""
    cleaned = lake.sql(f"""SELECT doc_id FROM documents_filtered WHERE coalesce(signals['lines_removed'], 0) > 0
                           ORDER BY doc_id LIMIT {SAMPLES}""", ["documents_filtered"]).column("doc_id").to_pylist()
    before, after = _texts(lake, "documents_raw", cleaned), _texts(lake, "documents_filtered", cleaned)
    return [{"doc_id": d, "before": before.get(d, ""), "after": after.get(d, "")} for d in cleaned]


def _scores(lake: Lake) -> dict:
    """Quality histogram (10 bins) per source, domains per source, category shares."""
    if not lake.exists("documents_scored"):
        return {}
    binned = groups(lake.sql(
        """SELECT source, least(CAST(floor(quality * 10) AS BIGINT), 9) AS bin, count(*) AS n FROM documents_scored
           WHERE quality IS NOT NULL GROUP BY ALL""", ["documents_scored"]), ["source", "bin"], "n")
    quality: dict[str, list[int]] = {}
    for (source, b), n in binned.items():
        quality.setdefault(source, [0] * 10)[b] = n
    domains: dict[str, dict] = {}
    for (source, domain), n in lake.counts("documents_scored", ["source", "domain"]).items():
        domains.setdefault(source, {})[domain] = n
    per_source = lake.counts("documents_scored", ["source", "category"])
    categories: Counter = Counter()
    for (_, category), n in per_source.items():
        categories[category] += n
    main = {source: category for (source, category), _ in sorted(per_source.items(), key=lambda kv: (kv[1], str(kv[0])))}
    return {"quality": quality, "domains": domains, "categories": dict(categories), "main_category": main}


def _dedup(lake: Lake) -> dict:
    """Cluster sizes, removals per threshold key, and the largest clusters with their members' text."""
    sizes = lake.counts("dedup_clusters", ["cluster_id"])
    removed = lake.counts("dedup_clusters", ["category", "threshold"], where="doc_id <> kept_doc_id")
    largest = sorted(sizes, key=lambda c: (-sizes[c], c))[:SAMPLES]
    members = lake.read_arrow("dedup_clusters", filter=pc.field("cluster_id").isin(largest)).to_pylist() if largest else []
    ids = [m["doc_id"] for m in members]
    texts = {**_texts(lake, "documents_rejected", ids), **_texts(lake, lake.kept_documents(), ids)}
    examples = [[{**m, "kept": m["doc_id"] == m["kept_doc_id"], "text": texts.get(m["doc_id"], "")}
                 for m in sorted((m for m in members if m["cluster_id"] == c), key=lambda m: m["doc_id"] != m["kept_doc_id"])[:4]]
                for c in largest]
    return {"sizes": {str(k): v for k, v in sorted(Counter(sizes.values()).items())},
            "removed": {f"{category} ≥ {threshold}": n for (category, threshold), n in sorted(removed.items(), key=str)},
            "examples": examples}


def _dedup_removed(lake: Lake) -> dict[tuple[str, str], int]:
    """Documents dedup removed per (``dedup key <category>``, source): the shift warnings' counts."""
    data = lake.sql("""SELECT 'dedup key ' || c.category AS key, r.source, count(*) AS n
                       FROM dedup_clusters c JOIN documents_rejected r ON r.doc_id = c.doc_id AND r.stage = 'dedup'
                       WHERE c.doc_id <> c.kept_doc_id GROUP BY ALL""", ["dedup_clusters", "documents_rejected"])
    return dict(groups(data, ["key", "source"], "n"))


def _chunks(recipe: Recipe, live: list[dict], compression: dict[str, float]) -> dict:
    mix = recipe.feed.current.mix
    rows = sorted(live, key=lambda r: r["created_at"])
    return {"target": {c: v / sum(mix.values()) for c, v in mix.items()},
            "per_chunk": [{"chunk_id": r["chunk_id"], "status": r["status"], "tokens": r["n_tokens"],
                           "mix": dict(r["mix"] or [])} for r in rows],
            "compression": compression}


def _compression(recipe: Recipe) -> dict[str, float]:
    from lake.artifacts import load_tokenizer

    _, meta = load_tokenizer(recipe)
    return {c: v["bytes_per_token"] for c, v in sorted((meta.get("compression") or {}).items()) if v.get("bytes_per_token")}


def _usage(lake: Lake) -> dict[str, int]:
    return {str(k): n for k, n in sorted(lake.counts("usage", ["times_used"]).items())}


def _training(recipe: Recipe, lake: Lake) -> dict:
    """Per run: its metrics (step, tokens, loss, per category, lr, batch, perplexity) and events."""
    runs_dir = recipe.trainer.runs_dir or f"{recipe.lake.rstrip('/')}/runs"
    events = lake.read_arrow("trainer_events").to_pylist()
    out = {}
    for run in sorted({e["run_id"] for e in events}):
        path = f"{runs_dir.rstrip('/')}/{run}/metrics.jsonl"
        records = [json.loads(x) for x in read_bytes(path).decode().splitlines() if x.strip()] if exists(path) else []
        keep = ("step", "tokens", "loss", "lr", "batch_sequences", "loss_by_category", "perplexity_by_source", "guard")
        out[run] = {"metrics": [{k: r[k] for k in keep if k in r} for r in records],
                    "events": [{"step": e["step"], "event": e["event"], "chunk_id": e["chunk_id"], "detail": e["detail"]}
                               for e in sorted(events, key=lambda e: e["at"]) if e["run_id"] == run]}
    return out


def _texts(lake: Lake, name: str, ids: list[str]) -> dict[str, str]:
    if not ids or not lake.exists(name):
        return {}
    rows = lake.read_arrow(name, ["doc_id", "text"], pc.field("doc_id").isin(sorted(set(ids)))).to_pylist()
    return {r["doc_id"]: (r["text"] or "")[:PREVIEW] for r in rows}


# -- the page ------------------------------------------------------------------------------------------------

def page(recipe: Recipe, f: dict, made: datetime) -> str:
    sections = [_funnel_html(recipe, f), _rules_html(f), _pii_scores_html(f), _dedup_html(f), _chunks_html(f),
                _training_html(f)]
    data = json.dumps(f, ensure_ascii=False, default=str).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tokenmill report · {escape(recipe.origin)}</title>
<style>body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:8px 0 16px}}td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left}}
td.n{{text-align:right}}.pair{{display:grid;grid-template-columns:1fr 1fr;gap:8px}}
.sample{{white-space:pre-wrap;font:12px/1.3 ui-monospace,monospace;background:#f6f6f6;padding:6px;max-height:180px;
overflow:auto}}.kept{{border-left:4px solid #54a24b}}.gone{{border-left:4px solid #e45756}}h2{{margin-top:32px}}
.empty{{color:#888}}.warn{{color:#a33;font-weight:600}}</style></head><body>
<h1>tokenmill report</h1><p>Lake <code>{escape(recipe.lake)}</code>, recipe <code>{escape(recipe.origin)}</code>,
made {made:%Y-%m-%d %H:%M} UTC.</p>
{''.join(sections)}
<script type="application/json" id="figures">{data}</script>
</body></html>
"""


def _table(head: list[str], rows: list[list]) -> str:
    cell = (lambda c: f"<td class='n'>{c:,}</td>" if isinstance(c, int) else f"<td>{escape(str(c))}</td>")
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows) + "</table>")


def _funnel_html(recipe: Recipe, f: dict) -> str:
    tables = list(f["funnel"])
    sources = [s.name for s in recipe.sources]
    rows = [[s, *[f["funnel"][t].get(s, 0) for t in tables], f["in_chunks"].get(s, 0), f["held_out"].get(s, 0)]
            for s in sources]
    series = {s: [float(f["funnel"][t].get(s, 0)) for t in tables] + [float(f["in_chunks"].get(s, 0))] for s in sources}
    rejected = [[stage.name, reason, n] for stage in REFINE for reason, n in
                sorted(f["rejected"].get(stage.name, {}).items(), key=lambda kv: -kv[1])]
    return ("<h2>Funnel</h2>" + chart.bars([t.removeprefix("documents_") for t in tables] + ["in chunks"], series,
                                           "documents per stage and source")
            + _table(["source", *tables, "in chunks", "held out"], rows)
            + "<h3>Text per stage and source</h3><p>UTF-8 bytes, and tokens estimated at the tokenizer's bytes per "
              "token of the source's main category; the chunks below hold the exact tokens.</p>"
            + _table(["source", *[f"{t} bytes / ≈tokens" for t in f["volume"]]],
                     [[s, *[_volume_cell(f["volume"][t].get(s)) for t in f["volume"]]] for s in sources])
            + "<h3>Rejections</h3>" + _table(["stage", "reason", "documents"], rejected))


def _volume_cell(v: dict | None) -> str:
    return "0" if not v else f"{v['bytes'] / 1e6:,.2f} MB / {v['tokens']:,}"


def _rules_html(f: dict) -> str:
    rows = [[name, r["failed"], r["alone"], r["removed"], ", ".join(f"{s} {n}" for s, n in sorted(r["per_source"].items()))]
            for name, r in f["rules"].items()]
    out = ["<h2>Filter rules</h2><p>failed: documents the rule failed; alone: the only rule they failed; "
           "removed: documents whose first failed rule it was, per source.</p>",
           *(f"<p class='warn'>⚠ {escape(x['text'])}</p>" for x in f["shifts"]),
           _table(["rule", "failed", "alone", "removed", "removed per source"], rows)]
    for name, r in f["rules"].items():
        if r["samples"]:
            out.append(f"<h4>{escape(name)}</h4><div class='pair'>" + "".join(
                f"<div class='sample gone' title='{escape(s['doc_id'])}'>{escape(s['text'])}</div>" for s in r["samples"])
                + "</div>")
    if f["decontamination"]:
        out += ["<h3>Decontamination</h3><p>documents sharing an n-gram with an evaluation set: removed, or kept "
                "and flagged.</p>", _table(["evaluation set", "removed", "flagged", "per source"], [
                    [name, sum(d["removed"].values()), sum(d["flagged"].values()),
                     ", ".join(f"{s} {n}" for s, n in sorted((d["removed"] | d["flagged"]).items()))]
                    for name, d in f["decontamination"].items()])]
    if f["line_cleanup"]:
        out.append("<h3>Line clean-up: before and after</h3>")
        for s in f["line_cleanup"]:
            out.append(f"<p><code>{escape(s['doc_id'])}</code></p><div class='pair'><div class='sample gone'>"
                       f"{escape(s['before'])}</div><div class='sample kept'>{escape(s['after'])}</div></div>")
    return "".join(out)


def _pii_scores_html(f: dict) -> str:
    pii = [[kind, sum(by.values()), ", ".join(f"{s} {n}" for s, n in sorted(by.items()))] for kind, by in sorted(f["pii"].items())]
    out = ["<h2>PII</h2>", _table(["placeholder", "replaced", "per source"], pii) if pii else "<p class='empty'>none found</p>"]
    scores = f["scores"]
    if scores:
        bins = [f"{i / 10:.1f}" for i in range(10)]
        out.append("<h2>Scores</h2>" + chart.bars(bins, {s: [float(v) for v in h] for s, h in scores["quality"].items()},
                                                   "quality per source (documents per bin)", stacked=False))
        out.append(_table(["source", "domains"], [[s, ", ".join(f"{d} {n}" for d, n in sorted(c.items()))]
                                                  for s, c in sorted(scores["domains"].items())]))
        total = sum(scores["categories"].values()) or 1
        out.append(_table(["category", "documents", "share"], [[c, n, f"{n / total:.1%}"] for c, n in
                                                                sorted(scores["categories"].items(), key=str)]))
    return "".join(out)


def _dedup_html(f: dict) -> str:
    d = f["dedup"]
    out = ["<h2>Near-dedup</h2>", _table(["cluster size", "clusters"], [[k, v] for k, v in d["sizes"].items()]),
           _table(["threshold key", "removed"], [[k, v] for k, v in sorted(d["removed"].items())])]
    for members in d["examples"]:
        out.append("<div class='pair'>" + "".join(
            f"<div class='sample {'kept' if m['kept'] else 'gone'}'><b>{'survivor' if m['kept'] else 'removed'}</b> "
            f"{escape(m['doc_id'])} · similarity {m['similarity'] if m['similarity'] is not None else '–'} · "
            f"threshold {m['threshold']}\n{escape(m['text'])}</div>" for m in members) + "</div>")
    return "".join(out)


def _chunks_html(f: dict) -> str:
    c = f["chunks"]
    cats = sorted({k for r in c["per_chunk"] for k in r["mix"]} | set(c["target"]))
    shares = {k: [r["mix"].get(k, 0) / max(r["tokens"], 1) for r in c["per_chunk"]] for k in cats}
    uses = sorted(f["usage"].items(), key=lambda kv: int(kv[0]))
    return ("<h2>Chunks</h2>" + chart.bars([r["chunk_id"] for r in c["per_chunk"]], shares,
                                           "each chunk's mix (dashed: the target)", target=c["target"])
            + _table(["chunk", "status", "tokens", *cats], [[r["chunk_id"], r["status"], r["tokens"],
                                                             *[r["mix"].get(k, 0) for k in cats]] for r in c["per_chunk"]])
            + "<h3>Reuse</h3>" + _table(["times used", "documents"], [[k, v] for k, v in uses])
            + "<h3>Tokenizer compression</h3>" + _table(["category", "bytes/token"], [[k, f"{v:.2f}"] for k, v in
                                                                                   c["compression"].items()]))


def _training_html(f: dict) -> str:
    out = ["<h2>Training</h2>"]
    if not f["training"]:
        out.append("<p class='empty'>no run has trained on this lake yet</p>")
    for run, t in f["training"].items():
        m, events = t["metrics"], t["events"]
        at_step = {r["step"]: r["tokens"] for r in m}
        marks = [(at_step.get(e["step"], 0), f"{e['event']} at step {e['step']}: {e['detail']}", "#e45756")
                 for e in events if e["event"] in ("spike", "rollback", "quarantine") and e["step"] in at_step]
        cats = sorted({c for r in m for c in r.get("loss_by_category", {})})
        evals = [r for r in m if "perplexity_by_source" in r]
        srcs = sorted({s for r in evals for s in r["perplexity_by_source"]})
        out += [f"<h3>run {escape(run)}</h3>",
                chart.lines({"loss": [(r["tokens"], r["loss"]) for r in m],
                             **{c: [(r["tokens"], r["loss_by_category"][c]) for r in m if c in r.get("loss_by_category", {})]
                                for c in cats}}, "loss and loss per category (red: spikes, rollbacks)", "tokens", marks=marks),
                chart.lines({s: [(r["tokens"], r["perplexity_by_source"][s]) for r in evals if s in r["perplexity_by_source"]]
                             for s in srcs}, "perplexity per held-out source", "tokens", log_y=True),
                chart.lines({"learning rate": [(r["tokens"], r["lr"]) for r in m]}, "learning rate", "tokens"),
                chart.lines({"sequences": [(r["tokens"], float(r["batch_sequences"])) for r in m]}, "batch size", "tokens"),
                _table(["step", "event", "chunk", "detail"], [[e["step"], e["event"], e["chunk_id"] or "", e["detail"] or ""]
                                                              for e in events if e["event"] not in ("starved",)])]
    return "".join(out)


def write_report(recipe: Recipe, out: str | None = None) -> Path:
    """``report.html`` into ``out`` (default ``<lake>/report``, a local lake); returns its path."""
    return write_page(recipe.lake, out, "report", "report.html", page(recipe, figures(recipe), datetime.now(timezone.utc)))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lake.recipe import recipe_arguments, recipe_from_args

    parser = argparse.ArgumentParser(prog="tokenmill report", description=__doc__.split("\n\n")[0])
    recipe_arguments(parser)
    parser.add_argument("--out", help="folder for report.html (default: <lake>/report)")
    args = parser.parse_args(argv)
    print(write_report(recipe_from_args(args), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
