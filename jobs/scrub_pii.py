"""PII scrubbing: ``documents_filtered`` → ``documents_clean``, PII replaced by typed placeholders.

    spark-submit jobs/scrub_pii.py --recipe R   |   tokenmill refine --recipe R --stages pii

E-mail addresses, phone numbers, Chinese ID numbers, bank cards, IP addresses, and the recipe's
own patterns and word lists become ``<EMAIL>``, ``<PHONE>``, ... (jobs/pii.py). Counts per type go
to the ``pii`` column. A document that is mostly PII is rejected rather than kept as placeholders;
its rejected copy holds the scrubbed text, so no PII reaches the audit table either.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from dataclasses import dataclass

from jobs.docstage import Outcome, commit_stage, kept_and_rejected, run_document_stage
from lake.fs import read_list
from lake.tables import Lake
from jobs.pii import Scrubber
from lake.recipe import Recipe
from jobs.stages import NoOptions, stage_main

STAGE = "pii"


def make_scrubber(recipe: Recipe):
    """A factory (called once per Spark task) of the per-document scrub function."""
    patterns = dict(recipe.pii.patterns)
    word_lists = {name: read_list(path) for name, path in recipe.pii.word_lists.items()}
    max_fraction = recipe.pii.max_pii_fraction

    def make():
        scrubber = Scrubber.build(patterns, word_lists)

        def scrub_document(doc: dict) -> Outcome:
            text, counts, fraction = scrubber.scrub(doc["text"])
            columns = {"text": text, "pii": counts}
            if doc.get("prompt") is not None:  # an instruction's prompt is scrubbed too, and counted with it
                prompt, in_prompt, prompt_fraction = scrubber.scrub(doc["prompt"])
                columns["prompt"] = prompt
                counts = {k: counts.get(k, 0) + in_prompt.get(k, 0) for k in {*counts, *in_prompt}}
                columns["pii"] = counts
                fraction = max(fraction, prompt_fraction)
            if fraction > max_fraction:
                found = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                detail = f"{fraction:.0%} of the characters are PII ({found}), over pii.max_pii_fraction = {max_fraction}"
                return Outcome(columns, "mostly_pii", detail, ("mostly_pii",))
            return Outcome(columns)

        return scrub_document

    return make


@dataclass
class PiiReport:
    documents_in: int
    kept: int
    replaced: dict[str, int]
    documents_with_pii: int
    seconds: float = 0.0
    version: int | None = None

    def __str__(self) -> str:
        found = ", ".join(f"{k} {v}" for k, v in sorted(self.replaced.items(), key=lambda kv: -kv[1])) or "none"
        return (
            f"pii: {self.documents_in} documents in, {self.kept} kept, {self.documents_in - self.kept} rejected as "
            f"mostly PII, in {self.seconds:.1f} s ({self.documents_in / max(self.seconds, 1e-9):,.0f} docs/s); "
            f"documents_clean version {self.version}\n  {self.documents_with_pii} documents had PII; replaced: {found}"
        )


def run(spark, recipe: Recipe, options: NoOptions = NoOptions()) -> PiiReport:
    """Replace PII in documents_filtered with typed placeholders into documents_clean."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    lake = Lake(recipe.lake, spark)
    processed = run_document_stage(lake, STAGE, "documents_filtered", "documents_clean", make_scrubber(recipe))
    totals = processed.agg(
        F.count("*").alias("n"),
        F.sum(F.when(F.col("_reject_reason").isNull(), 1).otherwise(0)).alias("kept"),
        F.sum(F.when(F.size("pii") > 0, 1).otherwise(0)).alias("with_pii"),
    ).first()
    per_type = processed.select(F.explode("pii").alias("kind", "n")).groupBy("kind").agg(F.sum("n").alias("n")).collect()
    kept, rejected = kept_and_rejected(processed, STAGE, "documents_clean")
    version = commit_stage(lake, STAGE, "documents_clean", kept, rejected)
    processed.unpersist()
    return PiiReport(
        documents_in=totals["n"], kept=totals["kept"] or 0, replaced={r["kind"]: r["n"] for r in per_type},
        documents_with_pii=totals["with_pii"] or 0, seconds=time.perf_counter() - started, version=version,
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
