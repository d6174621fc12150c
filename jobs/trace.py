"""``tokenmill trace``: one document's journey through the lake, from its raw record to the training
runs that saw it; for a rejected document, where and why, on one screen.

A document is found by its ``doc_id``, by ``--url`` (every ingested document with that URL) or by
``--source-line FILE:LINE`` (the record parsed by ingest's own code, so the id is the one ingest
gave it, and a record ingest refuses shows why). The stages come from ``jobs.stages.REFINE``: each
one's kept table and its rows of ``documents_rejected`` say what it decided. Everything is read with
delta-rs and pyarrow filters on the document's id, never a scan of the corpus's text; the chunks are
found through each chunk's saved usage increments (``lake.chunks.placements``).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field

import pyarrow.compute as pc

from jobs.records import Rejection
from jobs.stages import REFINE, StageError
from lake import chunks as store
from lake.recipe import Recipe
from lake.tables import Lake

PREVIEW_CHARS = 160
MAX_PER_URL = 5  # --url: documents traced at most (the rest are named)


@dataclass(frozen=True)
class Decision:
    stage: str
    outcome: str  # kept | rejected | not reached | not run
    detail: str


@dataclass
class Journey:
    doc_id: str | None
    source: str | None = None
    url: str | None = None
    preview: str | None = None  # the raw text's beginning
    decisions: list[Decision] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)  # the filter's, for a document it kept
    held_out: bool = False
    times_used: int = 0
    placements: list[store.Placement] = field(default_factory=list)
    feed_note: str | None = None  # why a kept document is in no chunk
    training: list[dict] = field(default_factory=list)  # trainer_events of the chunks holding it

    @property
    def rejected(self) -> Decision | None:
        return next((d for d in self.decisions if d.outcome == "rejected"), None)


def trace(recipe: Recipe, doc_id: str | None = None, url: str | None = None,
          source_line: str | None = None) -> list[Journey]:
    """The journeys of the document(s) named one of the three ways."""
    lake = Lake(recipe.lake)
    if source_line is not None:
        return [_from_source_line(recipe, lake, source_line)]
    if url is not None:
        found = lake.read_arrow("documents_raw", ["doc_id"], pc.field("url") == url).column("doc_id").to_pylist()
        if not found:
            raise StageError(f"--url {url}: no document in {lake.uri('documents_raw')} has this URL "
                             f"(ingest keeps the URL from the source's url_field)")
        return [journey(recipe, lake, d) for d in sorted(found)[:MAX_PER_URL]]
    if not doc_id:
        raise StageError("name the document: tokenmill trace DOC_ID, --url URL or --source-line FILE:LINE")
    return [journey(recipe, lake, doc_id)]


def _from_source_line(recipe: Recipe, lake: Lake, source_line: str) -> Journey:
    from jobs.ingest import record_at

    file, _, line = source_line.rpartition(":")
    if not file or not line.isdigit():
        raise StageError(f"--source-line {source_line!r}: expected FILE:LINE, for example data/web/part-0.jsonl:42")
    source, outcome = record_at(recipe, file, int(line))
    if isinstance(outcome, Rejection):
        refused = Journey(outcome.doc_id, source=source, preview=_preview(outcome.text))
        refused.decisions.append(Decision("ingest", "rejected", f"{outcome.reason}: {outcome.detail}"))
        return refused
    return journey(recipe, lake, outcome.doc_id)


def journey(recipe: Recipe, lake: Lake, doc_id: str) -> Journey:
    raw = _one(lake, "documents_raw", doc_id)
    rejections = {r["stage"]: r for r in _rows(lake, "documents_rejected", doc_id)}
    if raw is None and not rejections:
        raise StageError(f"document {doc_id}: in neither documents_raw nor documents_rejected of {lake.root} "
                         f"(check the id, or find it by --url or --source-line FILE:LINE)")
    first = raw or next(iter(rejections.values()))
    found = Journey(doc_id, source=first["source"], url=(raw or {}).get("url"), preview=_preview(first["text"]))
    previous = None
    for stage in REFINE:
        row = raw if stage.name == "ingest" else _one(lake, stage.kept_table, doc_id)
        refused = rejections.get(stage.name)
        if refused is not None and row is None:
            extra = _dedup_survivor(lake, doc_id) if stage.name == "dedup" else ""
            found.decisions.append(Decision(stage.name, "rejected", _why(refused) + extra))
            return found
        if row is None:
            ran = lake.exists(stage.kept_table)
            found.decisions.append(Decision(stage.name, "not reached" if ran else "not run",
                                            f"{stage.name} has not run since this document reached it" if ran
                                            else f"{stage.kept_table} does not exist yet: tokenmill {stage.name}"))
            return found
        detail = _DESCRIBE.get(stage.name, lambda *_: f"kept in {stage.kept_table}")(lake, previous, row)
        if refused is not None:  # ingest: a later record with the same id was refused
            detail += f"; another record with this id was rejected ({refused['detail']})"
        found.decisions.append(Decision(stage.name, "kept", detail))
        if stage.name == "filter":
            found.signals = dict(row.get("signals") or {})
        previous = row
    _fed(recipe, lake, found, previous)
    return found


def _fed(recipe: Recipe, lake: Lake, found: Journey, kept: dict) -> None:
    """Held out, the chunks and rows, usage, the runs; or why feed has not packed it."""
    doc = pc.field("doc_id") == found.doc_id
    found.held_out = lake.read_arrow("holdout", ["doc_id"], doc).num_rows > 0
    used = lake.read_arrow("usage", ["times_used"], doc).column("times_used").to_pylist()
    found.times_used = int(used[0] or 0) if used else 0
    found.placements = store.placements(lake, found.doc_id) if lake.exists("chunks") else []
    if found.placements:
        ids = [p.chunk["chunk_id"] for p in found.placements]
        events = lake.read_arrow("trainer_events", filter=pc.field("chunk_id").isin(ids)).to_pylist()
        found.training = sorted(events, key=lambda e: (e["run_id"], e["at"]))
        return
    current = recipe.feed.current
    if found.held_out:
        found.feed_note = "held out for the trainer's evaluation (the holdout table): never put in a chunk"
    elif not lake.exists("chunks"):
        found.feed_note = "feed has not run on this lake yet: tokenmill feed"
    elif kept.get("category") not in current.mix:
        found.feed_note = (f"its category {kept.get('category')!r} is not in the mix of feed stage "
                           f"{recipe.feed.stage!r} ({', '.join(current.mix)})")
    elif current.min_quality is not None and (kept.get("quality") is None or kept["quality"] < current.min_quality):
        quality = "unscored" if kept.get("quality") is None else f"{kept['quality']:.3f}"
        found.feed_note = f"quality {quality} is under feed.stages.{recipe.feed.stage}.min_quality = {current.min_quality}"
    else:
        found.feed_note = ("not drawn yet: feed draws each chunk's documents by quality × decay ** times_used, "
                           f"and {len(store.manifest(lake))} chunk(s) exist so far")


# -- what each stage did to a document it kept ------------------------------------------------------------

def _ingested(lake: Lake, previous: dict | None, row: dict) -> str:
    fields = len(json.loads(row["meta"])) if row.get("meta") else 0
    return (f"{len(row['text']):,} characters, ingested {row['ingested_at']:%Y-%m-%d %H:%M} UTC"
            + (f", {fields} other field(s) kept in meta" if fields else ""))


SHOWN_SIGNALS = ("n_chars", "n_words", "n_lines", "han_frac", "latin_frac", "symbol_frac", "dup_line_frac")


def _filtered(lake: Lake, previous: dict, row: dict) -> str:
    signals = dict(row.get("signals") or {})
    shown = ", ".join(f"{k} {_number(signals[k])}" for k in SHOWN_SIGNALS if k in signals)
    langs = ", ".join(f"{k[5:]} {_number(v)}" for k, v in sorted(signals.items(), key=lambda kv: -kv[1])
                      if k.startswith("lang_"))
    judged = f"judged as {langs}" + (f" (lid.176 confidence {_number(signals['lid_confidence'])})"
                                     if "lid_confidence" in signals else "") + "; " if langs else ""
    flagged = "".join(f"; shares {_number(v)} n-grams with evaluation set {k[9:]} (flagged)"
                      for k, v in signals.items() if k.startswith("decontam_"))
    return (_length_change(previous, row, "line clean-up")
            + f"{judged}passed every rule; {shown}{flagged} ({len(signals)} signals: --json shows them all)")


def _scrubbed(lake: Lake, previous: dict, row: dict) -> str:
    found = {k: v for k, v in dict(row.get("pii") or {}).items() if v}
    return "replaced: " + ", ".join(f"{k} {v}" for k, v in sorted(found.items())) if found else "no PII found"


def _scored(lake: Lake, previous: dict, row: dict) -> str:
    quality = "unscored" if row.get("quality") is None else f"{row['quality']:.3f}"
    return f"quality {quality} · domain {row.get('domain')} · lang {row.get('lang')} · category {row.get('category')}"


def _deduplicated(lake: Lake, previous: dict, row: dict) -> str:
    cleaned = _length_change(previous, row, "boilerplate lines removed")
    if not row.get("cluster_id"):
        return cleaned + "no near-duplicate above its threshold"
    members = lake.read_arrow("dedup_clusters", filter=pc.field("cluster_id") == row["cluster_id"]).to_pylist()
    others = sorted(m["doc_id"] for m in members if m["doc_id"] != row["doc_id"])
    mine = next((m for m in members if m["doc_id"] == row["doc_id"]), {})
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return (cleaned + f"the survivor of cluster {row['cluster_id']} ({len(members)} documents, Jaccard threshold "
            f"{mine.get('threshold')} for {mine.get('category')}); removed: {shown or 'none'}")


_DESCRIBE = {"ingest": _ingested, "filter": _filtered, "pii": _scrubbed, "score": _scored, "dedup": _deduplicated}


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.3g}"


def _why(refused: dict) -> str:
    """``reason: detail``, the reason once (a filter's detail starts with its rules' names)."""
    detail = refused["detail"] or ""
    return detail if detail.startswith(refused["reason"]) else f"{refused['reason']}: {detail}"


def _dedup_survivor(lake: Lake, doc_id: str) -> str:
    member = _rows(lake, "dedup_clusters", doc_id)
    if not member:
        return ""
    m = member[0]
    similarity = "" if m["similarity"] is None else f", similarity {m['similarity']:.2f}"
    return f" (cluster {m['cluster_id']}: survivor {m['kept_doc_id']}{similarity}, threshold {m['threshold']})"


def _length_change(previous: dict, row: dict, what: str) -> str:
    before, after = len(previous["text"]), len(row["text"])
    return f"{what}: {before:,} → {after:,} characters; " if before != after else ""


# -- reading -------------------------------------------------------------------------------------------------

def _rows(lake: Lake, name: str, doc_id: str) -> list[dict]:
    return lake.read_arrow(name, filter=pc.field("doc_id") == doc_id).to_pylist()


def _one(lake: Lake, name: str, doc_id: str) -> dict | None:
    rows = _rows(lake, name, doc_id)
    return rows[0] if rows else None


def _preview(text: str | None) -> str | None:
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat[:PREVIEW_CHARS] + ("…" if len(flat) > PREVIEW_CHARS else "")


# -- one screen ------------------------------------------------------------------------------------------------

def render(found: Journey) -> str:
    head = " · ".join(x for x in (f"document {found.doc_id or '(no id: ingest refused the record)'}",
                                  found.source and f"source {found.source}", found.url) if x)
    lines = [head] + ([f'  "{found.preview}"'] if found.preview else [])
    for d in found.decisions:
        lines.append(f"  {d.stage:<9} {d.outcome.upper() if d.outcome == 'rejected' else d.outcome:<11} {d.detail}")
    if found.rejected is not None:
        lines.append(f"  {'':<9} {'':<11} it goes no further (documents_rejected, stage {found.rejected.stage})")
        return "\n".join(lines)
    if found.decisions and found.decisions[-1].outcome != "kept":
        return "\n".join(lines)
    lines.append(f"  {'feed':<9} {'in chunks' if found.placements else 'in none':<11} "
                 + (_placed(found) if found.placements else found.feed_note or ""))
    for run, text in _runs(found):
        lines.append(f"  {'train':<9} {run:<11} {text}")
    return "\n".join(lines)


def _placed(found: Journey) -> str:
    parts = [f"{p.chunk['chunk_id']} ({p.chunk['status']}) row{'s' if len(p.rows) > 1 else ''} "
             f"{', '.join(map(str, p.rows[:8]))}{' …' if len(p.rows) > 8 else ''}, {p.tokens:,} tokens"
             for p in found.placements]
    return "; ".join(parts) + f"; used {found.times_used} time(s)"


def _runs(found: Journey) -> list[tuple[str, str]]:
    """Per run: each chunk's claim and end, its rollbacks, and whether this document's rows were skipped."""
    rows = {p.chunk["chunk_id"]: set(p.rows) for p in found.placements}
    out = []
    for run in sorted({e["run_id"] for e in found.training}):
        for cid in sorted(rows):
            events = [e for e in found.training if e["run_id"] == run and e["chunk_id"] == cid]
            if not events:
                continue
            steps = {e["event"]: e["step"] for e in events}
            text = f"{cid}: claimed after step {steps.get('claimed', '?')}"
            if "consumed" in steps:
                text += f", trained through step {steps['consumed']} (consumed)"
            for e in events:
                if e["event"] in ("rollback", "quarantine", "stopped"):
                    skipped = _listed_rows(e["detail"]) & rows[cid]
                    text += f"; {e['event']} at step {e['step']}: {e['detail']}"
                    text += f" (rows of this document among them: {sorted(skipped)})" if skipped else ""
            out.append((f"run {run}", text))
    return out


def _listed_rows(detail: str | None) -> set[int]:
    listed = re.search(r"rows \[([\d, ]*)\]", detail or "")
    return {int(x) for x in listed.group(1).split(",") if x.strip()} if listed else set()


def as_json(found: Journey) -> dict:
    out = asdict(found)
    out["placements"] = [{"chunk_id": p.chunk["chunk_id"], "status": p.chunk["status"], "rows": p.rows,
                          "tokens": p.tokens} for p in found.placements]
    out["training"] = [{**e, "at": e["at"].isoformat()} for e in found.training]
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lake.recipe import recipe_arguments, recipe_from_args

    parser = argparse.ArgumentParser(prog="tokenmill trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("doc_id", nargs="?", help="the document's doc_id")
    parser.add_argument("--url", help="every ingested document with this URL")
    parser.add_argument("--source-line", metavar="FILE:LINE", help="the record at this line (or Parquet row) of a source file")
    parser.add_argument("--json", action="store_true", help="the journey as JSON, one object per document")
    recipe_arguments(parser)
    args = parser.parse_args(argv)
    named = [x for x in (args.doc_id, args.url, args.source_line) if x]
    if len(named) != 1:
        parser.error("name the document one way: DOC_ID, --url URL or --source-line FILE:LINE")
    found = trace(recipe_from_args(args), args.doc_id, args.url, args.source_line)
    for i, j in enumerate(found):
        print(json.dumps(as_json(j), ensure_ascii=False) if args.json else ("\n" if i else "") + render(j))
    return 0


if __name__ == "__main__":
    sys.exit(main())
