"""Rule filtering: ``documents_raw`` → ``documents_filtered``; dropped documents → ``documents_rejected``.

    spark-submit jobs/filter_rules.py --recipe R [--dry-run]   |   tokenmill refine --recipe R --stages filter

Per document: remove boilerplate lines, compute every signal (kept in ``signals``), then decide with
the recipe's thresholds for the document's script language (jobs/rules.py). A report of what each
rule removed (alone and in total, per source, with samples) goes to
``<lake>/reports/<run>/filter/report.{json,md}``. ``--dry-run`` writes only the report. A rule that
removed more than ``filter.warn_share`` of a source is a shift warning (``jobs/shifts.py``) with
samples; ``--strict`` fails the stage instead, before anything is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from jobs.decontam import EvalSet, build_eval_set, contamination, eval_texts, read_eval_records, url_block
from jobs.docstage import Outcome, commit_stage, kept_and_rejected, run_document_stage
from lake.fs import read_list
from lake.tables import Lake
from lake.recipe import Recipe, RecipeError
from jobs.rules import (DEFAULT_DROP_LINE_PATTERNS, DEFAULT_TRUNCATE_PATTERNS, LineCleanup, Rule, build_rules, code_signals,
                        clean_lines, compute_signals, count_whole_example, failed_rules)
from lake.sections import Language
from quality_models.labels import DEFAULT_URL_DOMAINS, weak_domain
from quality_models.language import is_data_file, name_of, script_lang
from quality_models.lid import LanguageId, LidMissing, cached_model, model_path
from jobs.shifts import Shift, shifts
from jobs.stages import FilterOptions, StageError, stage_main

STAGE = "filter"
# lid.176's Chinese languages, judged and recorded as zh (character-level rules, character shingles in dedup)
CHINESE = {code: "zh" for code in ("yue", "wuu", "gan", "hak", "nan", "cdo", "lzh", "min")}


def check_recipe(recipe: Recipe) -> None:
    """Unknown rule names in ``filter.thresholds`` (or ``domain_thresholds``, ``source_thresholds``) fail before any Spark work,
    listing the real ones; so does a language-ID model that is not there."""
    try:
        RuleSets(recipe).check()
        known = {d for _, d in DEFAULT_URL_DOMAINS} | set(recipe.score.weak_labels.source_domains.values()) | {"code"}
        unknown = sorted(set(recipe.filter.domain_thresholds) - known)
        if unknown:
            raise ValueError(f"filter.domain_thresholds: no document gets domain(s) {unknown} at the filter; the "
                             f"weak labels give {sorted(known)} (score.weak_labels.source_domains adds more)")
        if recipe.filter.language.model is not None:
            labels = LanguageId.load(model_path(recipe.filter.language.model)).labels()
            odd = sorted(set(recipe.filter.language.keep or ()) - labels - {"zh"})
            if odd:
                raise ValueError(f"filter.language.keep: {odd} are not languages the model knows (ISO 639 codes "
                                 f"such as zh, en, fr, de, ja)")
    except ValueError as err:
        raise RecipeError(f"recipe {recipe.origin} is not valid:\n  {err}") from None
    except LidMissing as err:
        raise RecipeError(f"recipe {recipe.origin}: {err}") from None


class RuleSets:
    """The rules a document is judged by: ``thresholds``, then its domain's (``domain_thresholds``;
    the domain the weak labels give: the source's in ``score.weak_labels.source_domains``, else URL
    patterns, else ``code`` for code, since the classifier runs later), then its source's
    (``source_thresholds``): each overrides the one before, rule by rule."""

    def __init__(self, recipe: Recipe):
        self.cfg = recipe.filter
        self.source_domains = recipe.score.weak_labels.source_domains
        self._built: dict[tuple[str | None, str | None], list[Rule]] = {}

    def domain_of(self, source: str | None, url: str | None, lang: str) -> str | None:
        if not self.cfg.domain_thresholds:
            return None
        return weak_domain(source or "", url, "", self.source_domains, is_code=lang == "code")

    def rules(self, source: str | None = None, domain: str | None = None) -> list[Rule]:
        key = (source if source in self.cfg.source_thresholds else None,
               domain if domain in self.cfg.domain_thresholds else None)
        if key not in self._built:
            merged = dict(self.cfg.thresholds)
            layers = [(f"domain_thresholds.{key[1]}", self.cfg.domain_thresholds.get(key[1], {})),
                      (f"source_thresholds.{key[0]}", self.cfg.source_thresholds.get(key[0], {}))]
            for _, overrides in layers:
                for name, value in overrides.items():
                    base = merged.get(name)
                    if isinstance(value, dict) and base is not None:  # per-language values on top of the others
                        value = {**(base if isinstance(base, dict) else {"default": base}), **value}
                    merged[name] = value
            try:
                self._built[key] = build_rules(merged, self.cfg.limits())
            except ValueError as err:  # name the layer that brought the unknown rule
                known = {r.name for r in build_rules({}, self.cfg.limits())}
                where = next((w for w, o in reversed(layers) if set(o) - known), "thresholds")
                raise ValueError(f"filter.{where}: {str(err).removeprefix('filter.thresholds: ')}") from None
        return self._built[key]

    def check(self) -> None:
        """Build every combination once: an unknown rule name fails here, naming its key."""
        for source in [None, *self.cfg.source_thresholds]:
            for domain in [None, *self.cfg.domain_thresholds]:
                self.rules(source, domain)


def make_filter(recipe: Recipe):
    """A factory (called once per Spark task) of the per-document filter function."""
    cfg = recipe.filter
    rule_sets = RuleSets(recipe)
    keywords = {name: frozenset(w.lower() for w in read_list(path)) for name, path in cfg.keyword_lists.items()}
    drop = list(DEFAULT_DROP_LINE_PATTERNS if cfg.drop_line_patterns is None else cfg.drop_line_patterns)
    truncate = list(DEFAULT_TRUNCATE_PATTERNS if cfg.truncate_patterns is None else cfg.truncate_patterns)

    decon = cfg.decontaminate
    eval_sets = eval_sets_of(recipe)
    domains = frozenset(d.lower().rstrip('.') for path in cfg.url_blocklist.domains for d in read_list(path))
    url_words = frozenset(w.lower() for path in cfg.url_blocklist.words for w in read_list(path))

    lid_model = lid_model_bytes(recipe)

    def make():
        cleanup = LineCleanup.compile(drop, truncate)
        lid = LanguageId.load(cached_model(lid_model)) if lid_model else None

        def filter_document(doc: dict) -> Outcome:
            text, removed_lines = clean_lines(doc["text"], cleanup)
            signals = compute_signals(text, keywords)
            if doc.get("prompt") is not None:
                count_whole_example(signals, doc["prompt"])
            signals["lines_removed"] = float(removed_lines)
            name = name_of(doc.get("url"), doc.get("meta"))
            if is_data_file(name):
                signals["data_file"] = 1.0
            lang, refused = language_of(text, name, signals, lid, cfg.language)
            if lang == "code":
                signals.update(code_signals(text))
            columns = {"text": text, "signals": signals}
            # (rule name, why): the language, the URL blocklist and contamination first, so the report credits them
            failed: list[tuple[str, str]] = [refused] if refused else []
            blocked = url_block(doc.get("url"), domains, url_words) if domains or url_words else None
            if blocked:
                failed.append(("url_blocklist", blocked))
            # an instruction's prompt is where a benchmark question would sit: both parts are checked
            judged = text if doc.get("prompt") is None else f"{doc['prompt']}\n{text}"
            for found in contamination(judged, eval_sets, decon.n) if eval_sets else ():
                signals[f"decontam_{found.eval_set}"] = float(found.matched)
                if decon.action == "remove":
                    failed.append((f"decontam_{found.eval_set}", str(found)))
            failed += [(rule.name, _explain(rule, signals, lang)) for rule in failed_rules(signals, lang, rule_sets.rules(
                doc.get("source"), rule_sets.domain_of(doc.get("source"), doc.get("url"), lang if isinstance(lang, str) else "")))]
            if not failed:
                return Outcome(columns)
            detail = "; ".join(f"{name}: {why}" for name, why in failed)
            return Outcome(columns, failed[0][0], detail, tuple(name for name, _ in failed))

        return filter_document

    return make


def _explain(rule: Rule, signals: dict[str, float], lang: str | tuple[str, ...]) -> str:
    op = "<" if rule.bound == "min" else ">"
    shown = lang if isinstance(lang, str) else "/".join(dict.fromkeys(lang))
    return f"{rule.signal}={signals[rule.signal]:.4g} {op} {rule.threshold(lang):g} ({shown})"


def language_of(text: str, name: str | None, signals: dict[str, float], lid: LanguageId | None,
                cfg: Language) -> tuple[str | tuple[str, str], tuple[str, str] | None]:
    """The language the rules judge a document by, and its ``language`` rejection where
    ``filter.language.keep`` excludes it. Code (by name or line shapes) is code; otherwise lid.176's
    language where it is confident (Chinese languages such as Cantonese and Wu as zh), and for rules
    that do not name it zh's limits for Han text, else ``other``'s, so that English word rules never
    judge French; the script's language where lid.176 is not confident.
    Recorded in ``signals`` as ``lang_<x>`` (the share of the text per language) and ``lid_confidence``."""
    script = script_lang(text, name)
    if lid is not None and script != "code":
        found = lid.identify(text, signals["han_frac"], signals["latin_frac"])
        signals["lid_confidence"] = found.confidence
        lang = CHINESE.get(found.lang, found.lang)
        # a Han-script page (not a mixed one) lid.176 calls a language not written in Han (it says Rusyn for
        # some Cantonese) is the script's; so is any page it is not confident about
        if found.confidence >= cfg.min_confidence and (script != "zh" or lang in ("zh", "ja", "ko")
                                                       or len(found.shares) > 1):
            for key, share in found.shares.items():
                signals[f"lang_{CHINESE.get(key, key)}"] = signals.get(f"lang_{CHINESE.get(key, key)}", 0.0) + share
            refused = None
            if cfg.keep is not None and lang not in cfg.keep:
                refused = ("language", f"{lang} ({found.confidence:.2f}) is not one of filter.language.keep "
                                       f"[{', '.join(cfg.keep)}]")
            # a language the defaults do not name: Chinese limits for Han text (Japanese kanji pages), else
            # other's (never English word rules for French)
            return (lang, lang if lang in ("zh", "en") else "zh" if script == "zh" else "other"), refused
    signals[f"lang_{script}"] = 1.0
    return script, None


def lid_model_bytes(recipe: Recipe) -> bytes | None:
    """The language-ID model the recipe asks for, read on the driver (the tasks get the bytes, so an
    executor needs no copy of the file); None for script statistics only."""
    setting = recipe.filter.language.model
    if setting is None:
        return None
    try:
        return model_path(setting).read_bytes()
    except LidMissing as err:
        raise RecipeError(f"recipe {recipe.origin}: {err}") from None


def eval_sets_of(recipe: Recipe) -> list[EvalSet]:
    """The recipe's evaluation sets, read and hashed (on the driver; the tasks get the arrays)."""
    decon = recipe.filter.decontaminate
    sets = []
    for name, spec in decon.sets.items():
        try:
            texts = eval_texts(read_eval_records(spec.path), spec.fields, spec.path)
        except (OSError, ValueError) as err:
            raise RecipeError(f"recipe {recipe.origin}: filter.decontaminate.sets.{name}: {err}") from None
        sets.append(build_eval_set(name, texts, decon.n))
    return sets


def rule_names(recipe: Recipe) -> list[str]:
    """Every name a filter rejection can carry, in the report's order."""
    cfg = recipe.filter
    names = ["language"] if cfg.language.keep is not None else []
    names += ["url_blocklist"] if cfg.url_blocklist.domains or cfg.url_blocklist.words else []
    if cfg.decontaminate.action == "remove":
        names += [f"decontam_{name}" for name in cfg.decontaminate.sets]
    return names + [r.name for r in build_rules(cfg.thresholds, cfg.limits())]


@dataclass
class FilterReport:
    run_id: str
    documents_in: int
    kept: int
    rules: list[dict]
    by_source: dict[str, dict[str, int]]
    report_dir: str
    dry_run: bool
    seconds: float = 0.0
    version: int | None = None
    shifts: list[Shift] = field(default_factory=list)
    decontamination: dict[str, dict[str, int]] = field(default_factory=dict)  # set → source → documents matched
    decontam_action: str = "remove"

    def __str__(self) -> str:
        removed = self.documents_in - self.kept
        mode = "dry run, nothing written" if self.dry_run else f"documents_filtered version {self.version}"
        lines = [
            f"filter: {self.documents_in} documents in, {self.kept} kept, {removed} removed in {self.seconds:.1f} s "
            f"({self.documents_in / max(self.seconds, 1e-9):,.0f} docs/s; {mode})",
            f"  {'rule':<22} {'removed':>8} {'alone':>6} {'flagged':>8}",
        ]
        for r in self.rules:
            if r["flagged"]:
                lines.append(f"  {r['rule']:<22} {r['removed']:>8} {r['alone']:>6} {r['flagged']:>8}")
        for name, by_source in self.decontamination.items():
            verb = "removed" if self.decontam_action == "remove" else "flagged"
            lines.append(f"  decontamination: {sum(by_source.values())} documents share an n-gram with {name} "
                         f"({verb}: {', '.join(f'{s} {n}' for s, n in sorted(by_source.items())) or 'none'})")
        for shift in self.shifts:
            lines.append(f"  warning: {shift}")
            lines += [f"    e.g. {d['doc_id']}: {d['text'][:120]!r}" for d in self.samples_of(shift)]
        lines.append(f"  report: {self.report_dir}/report.md")
        return "\n".join(lines)

    def samples_of(self, shift: Shift) -> list[dict]:
        """The report's samples of the shift's rule from its source (any source where it has none)."""
        samples = next((r["samples"] for r in self.rules if r["rule"] == shift.key), [])
        return [d for d in samples if d["source"] == shift.source] or samples


def run(spark, recipe: Recipe, options: FilterOptions = FilterOptions()) -> FilterReport:
    """Filter documents_raw by rules into documents_filtered, with a report of what each rule removed."""
    started = time.perf_counter()
    dry_run = options.dry_run
    lake = Lake(recipe.lake, spark)
    processed = run_document_stage(lake, STAGE, "documents_raw", "documents_filtered", make_filter(recipe))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    report = _report(processed, recipe, run_id, dry_run)
    if options.strict and report.shifts:
        processed.unpersist()
        raise StageError("filter --strict: nothing committed, because " + "; ".join(map(str, report.shifts))
                         + ". Look at the samples (tokenmill refine --stages filter --dry-run), then loosen those "
                         "rules' thresholds or raise filter.warn_share")
    if not dry_run:
        kept, rejected = kept_and_rejected(processed, STAGE, "documents_filtered")
        report.version = commit_stage(lake, STAGE, "documents_filtered", kept, rejected)
    processed.unpersist()
    report.report_dir = lake.write_report(
        f"{run_id}/{STAGE}",
        {"report.json": json.dumps(_as_json(report), indent=2, ensure_ascii=False), "report.md": _markdown(report)},
    )
    report.seconds = time.perf_counter() - started
    return report


def _report(processed, recipe: Recipe, run_id: str, dry_run: bool) -> FilterReport:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    totals = processed.groupBy("source").agg(
        F.count("*").alias("n"), F.sum(F.when(F.size("_flags") == 0, 1).otherwise(0)).alias("kept")
    ).collect()
    flagged = processed.select("source", "_reject_reason", "_flags", F.explode("_flags").alias("rule"))
    per_rule_source = flagged.groupBy("rule", "source").agg(
        F.count("*").alias("flagged"),
        F.sum(F.when(F.col("_reject_reason") == F.col("rule"), 1).otherwise(0)).alias("removed"),
        F.sum(F.when(F.size("_flags") == 1, 1).otherwise(0)).alias("alone"),
    ).collect()
    n = recipe.filter.report_samples
    samples = (
        processed.select("doc_id", "source", "text", "_reject_detail", F.explode("_flags").alias("rule"))
        .withColumn("_rn", F.row_number().over(Window.partitionBy("rule").orderBy(F.xxhash64("doc_id"), "doc_id")))
        .where(F.col("_rn") <= n)
        .select("rule", "doc_id", "source", F.substring("text", 1, 400).alias("text"), F.col("_reject_detail").alias("detail"))
        .collect()
    ) if n else []
    rules = {}
    for row in per_rule_source:
        r = rules.setdefault(row["rule"], {"rule": row["rule"], "flagged": 0, "removed": 0, "alone": 0, "by_source": {}, "samples": []})
        r["flagged"] += row["flagged"]
        r["removed"] += row["removed"]
        r["alone"] += row["alone"]
        r["by_source"][row["source"]] = row["removed"]
    for row in samples:
        rules[row["rule"]]["samples"].append(row.asDict())
    all_rules = rule_names(recipe)
    ordered = [rules.get(name, {"rule": name, "flagged": 0, "removed": 0, "alone": 0, "by_source": {}, "samples": []}) for name in all_rules]
    sets = list(recipe.filter.decontaminate.sets)
    matched = processed.groupBy("source").agg(*(
        F.sum(F.when(F.col("signals")[f"decontam_{name}"] > 0, 1).otherwise(0)).alias(name) for name in sets
    )).collect() if sets else []
    inputs = {t["source"]: t["n"] for t in totals}
    removed = {(r["rule"], source): n for r in ordered for source, n in r["by_source"].items()}
    return FilterReport(
        shifts=shifts(inputs, removed, recipe.filter.warn_share),
        run_id=run_id,
        documents_in=sum(t["n"] for t in totals),
        kept=sum(t["kept"] for t in totals),
        rules=ordered,
        by_source={t["source"]: {"in": t["n"], "kept": t["kept"]} for t in totals},
        report_dir="",
        dry_run=dry_run,
        decontamination={name: {row["source"]: row[name] for row in matched if row[name]} for name in sets},
        decontam_action=recipe.filter.decontaminate.action,
    )


def _as_json(report: FilterReport) -> dict:
    return {
        "run_id": report.run_id, "stage": STAGE, "dry_run": report.dry_run, "documents_in": report.documents_in,
        "kept": report.kept, "removed": report.documents_in - report.kept, "by_source": report.by_source,
        "rules": report.rules,
        "decontamination": {"action": report.decontam_action, "matched": report.decontamination},
        "shifts": [{"rule": s.key, "source": s.source, "removed": s.removed, "of": s.of, "share": s.share}
                   for s in report.shifts],
    }


def _markdown(report: FilterReport) -> str:
    out = [
        f"# Filter report {report.run_id}{' (dry run)' if report.dry_run else ''}",
        "",
        f"{report.documents_in} documents in, {report.kept} kept, {report.documents_in - report.kept} removed.",
        "",
        "*removed*: documents this rule rejected (the first rule that objected); *alone*: documents no other "
        "rule objected to; *flagged*: all documents this rule objected to.",
        "",
        "| source | in | kept | kept % |",
        "|---|---:|---:|---:|",
    ]
    for source, c in sorted(report.by_source.items()):
        out.append(f"| {source} | {c['in']} | {c['kept']} | {100 * c['kept'] / max(c['in'], 1):.1f} |")
    for name, by_source in report.decontamination.items():
        out.append(f"\nDecontamination ({report.decontam_action}): {sum(by_source.values())} documents share an "
                   f"n-gram with **{name}**" + "".join(f"; {s} {n}" for s, n in sorted(by_source.items())) + ".")
    for shift in report.shifts:
        out.append(f"\n**Warning**: {shift}.")
    out += ["", "| rule | removed | alone | flagged | removed per source |", "|---|---:|---:|---:|---|"]
    for r in report.rules:
        per_source = ", ".join(f"{s}: {n}" for s, n in sorted(r["by_source"].items()) if n)
        out.append(f"| {r['rule']} | {r['removed']} | {r['alone']} | {r['flagged']} | {per_source} |")
    for r in report.rules:
        if r["samples"]:
            out += ["", f"## {r['rule']}: samples", ""]
            for s in r["samples"]:
                preview = s["text"].replace("\n", " ⏎ ")[:300]
                out.append(f"- `{s['doc_id']}` ({s['source']}): {s['detail'] or ''}  \n  > {preview}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
