"""The refinery's stages, declared once: what each reads and writes, and its typed options.

Everything that lists stages comes from ``STAGES``: the ``tokenmill`` subcommands and ``tokenmill
refine``, both Airflow DAGs, ``tokenmill package``'s entry scripts and the README's stage table
(``python -m jobs.stages`` prints it; a test keeps the README equal to it).

A stage is the module ``jobs/<module>.py`` with ``run(spark, recipe, options) -> report``; it runs
the same way from ``tokenmill <name>``, ``python -m jobs.<module>`` and ``spark-submit
jobs/<module>.py``. Its options are a dataclass whose fields become command-line flags
(``until_ready`` → ``--until-ready``), so the CLI, the demo and the benchmarks pass the same typed
object.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lake.recipe import Recipe, RecipeError, parse_with_recipe


class StageError(RuntimeError):
    """A stage that cannot go on; the message names the table, document or key and what to do."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can act on: shown as one line and exit code 2, not a traceback."""
    from jobs.sources import SourceError
    from lake.errors import LakeError
    from quality_models.lid import LidError

    return RecipeError, LakeError, SourceError, StageError, LidError


def _flag(help: str) -> Any:
    return field(default=False, metadata={"help": help})


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class FilterOptions:
    dry_run: bool = _flag("compute signals and the report only; write no table")
    strict: bool = _flag("fail, committing nothing, when a rule removes more than filter.warn_share of a source")


@dataclass(frozen=True)
class DedupOptions:
    incremental: bool = _flag("only documents not seen before, against the documents kept earlier")
    strict: bool = _flag("fail, committing nothing, when a threshold key removes more than dedup.warn_share of a source")


@dataclass(frozen=True)
class FeedOptions:
    until_ready: int | None = field(default=None, metadata={"help": "produce chunks until N are ready and unconsumed"})
    follow: bool = _flag("keep the backlog topped up (polling; Ctrl-C stops)")
    verify: bool = _flag("check every ready chunk's files; quarantine bad ones")


@dataclass(frozen=True)
class TokenizerOptions:
    extend_from: str | None = field(default=None, metadata={
        "metavar": "FOLDER", "help": "extend the tokenizer of this Hugging Face model folder (tokenmill train --export) instead of "
                "training one; also writes the model with its embeddings grown (--out)"})
    add_tokens: str | None = field(default=None, metadata={
        "metavar": "FILE", "help": "with --extend-from: a file of tokens to add, one per line"})
    learn: int | None = field(default=None, metadata={
        "metavar": "N", "help": "with --extend-from: learn the N merges that save the most tokens on the kept documents"})
    category: str | None = field(default=None, metadata={
        "metavar": "CATEGORY", "help": "with --learn: learn from this category's documents (default: every category of the mix)"})
    out: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "with --extend-from: the grown model's folder (default: <lake>/exports/extended-<version>)"})


@dataclass(frozen=True)
class Stage:
    name: str  # the command: tokenmill <name>
    module: str  # jobs/<module>.py holds run() and is the spark-submit entry script
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    summary: str
    options: type = NoOptions
    refine: bool = False  # one of `tokenmill refine`'s stages (and the refine DAG's), in pipeline order
    check: str | None = None  # a function of the module that checks the recipe before any Spark work

    @property
    def kept_table(self) -> str | None:
        """The documents table a document the stage keeps lands in (its rejections go to documents_rejected)."""
        return next((t for t in self.writes if t.startswith("documents_") and t != "documents_rejected"), None)

    def run(self, spark, recipe: Recipe, options=None):
        """A refinery stage first repairs what a stage killed between its commits left (``lake.atomic``)."""
        if self.refine:
            from lake.atomic import repair
            from lake.tables import Lake

            repair(Lake(recipe.lake))
        return self._module().run(spark, recipe, options if options is not None else self.options())

    def check_recipe(self, recipe: Recipe) -> None:
        """What can be checked before any Spark work: the lake can be written, and the stage's own check."""
        from lake.fs import check_lake_writable

        check_lake_writable(recipe.lake)
        if self.check:
            getattr(self._module(), self.check)(recipe)

    def _module(self):
        return importlib.import_module(f"jobs.{self.module}")


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest", ("sources",), ("documents_raw", "documents_rejected"),
          "sources → documents_raw (bad records rejected with their reason and file:line)", refine=True),
    Stage("filter", "filter_rules", ("documents_raw",), ("documents_filtered", "documents_rejected"),
          "line clean-up, signals and rules per script language, with a report", FilterOptions, refine=True,
          check="check_recipe"),
    Stage("pii", "scrub_pii", ("documents_filtered",), ("documents_clean", "documents_rejected"),
          "e-mails, phones, ID and card numbers, IPs replaced by placeholders", refine=True),
    Stage("score", "score", ("documents_clean",), ("documents_scored", "documents_rejected"),
          "quality, domain, language and category from the pinned classifiers; optionally the perplexity filter",
          refine=True, check="check_recipe"),
    Stage("dedup", "dedup", ("documents_scored",), ("documents_dedup", "dedup_clusters", "documents_rejected"),
          "exact, then MinHash-LSH near-dedup with thresholds per category; optionally semantic dedup", DedupOptions,
          refine=True, check="check_recipe"),
    Stage("tokenizer", "train_tokenizer", ("documents_dedup",), ("models/tokenizer",),
          "a new byte-level BPE tokenizer version from a mix-weighted sample, or an exported model's "
          "tokenizer extended, checked on held-out documents (--extend-from)", TokenizerOptions),
    Stage("feed", "feed", ("documents_dedup", "usage", "holdout", "training_signals"), ("chunks", "usage", "holdout", "chunks/<chunk_id>/"),
          "mixed, curriculum-ordered, packed token chunks for the trainer", FeedOptions),
)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise RecipeError(f"unknown stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


REFINE = tuple(s for s in STAGES if s.refine)


# -- options as command-line flags -------------------------------------------------------------------------


def add_option_flags(parser: argparse.ArgumentParser, options: type, seen: set[str] | None = None) -> None:
    """One flag per field of an options dataclass (skipping names in ``seen``, which it extends)."""
    for f in dataclasses.fields(options):
        if seen is not None and f.name in seen:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata.get("help"))
        elif f.type in (str, "str", "str | None"):
            parser.add_argument(flag, dest=f.name, type=str, metavar=f.metadata.get("metavar"), help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, dest=f.name, type=int, metavar=f.metadata.get("metavar"), help=f.metadata.get("help"))
        if seen is not None:
            seen.add(f.name)


def options_from(args: argparse.Namespace, options: type):
    return options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options) if hasattr(args, f.name)})


# -- running stages ------------------------------------------------------------------------------------------


def run_stages(recipe: Recipe, names: list[str], options: dict[str, Any] | None = None, spark=None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the named stages in pipeline order on one Spark session; returns each stage's report.
    Every stage's recipe check runs before any Spark work."""
    chosen = [stage(n) for n in names]
    ordered = [s for s in STAGES if s in chosen]
    for s in ordered:
        s.check_recipe(recipe)
    if spark is None:
        from jobs.spark import get_spark

        spark = get_spark("tokenmill-" + "-".join(s.name for s in ordered), recipe)
    log(f"[refine] Spark master {spark.sparkContext.master}")
    reports = {}
    for s in ordered:
        started = time.perf_counter()
        log(f"[refine] {s.name}")
        reports[s.name] = s.run(spark, recipe, (options or {}).get(s.name))
        log(str(reports[s.name]))
        log(f"[refine] {s.name} finished in {time.perf_counter() - started:.1f} s")
    return reports


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """The entry point of one stage: ``--recipe``/``--lake`` and its options, then run and report."""
    from lake.fs import end_process

    code = _stage_main(name, argv)
    return code if argv is not None else end_process(code)


def _stage_main(name: str, argv: list[str] | None) -> int:
    s = stage(name)
    args, recipe = parse_with_recipe(f"tokenmill {s.name}", s.summary, argv,
                                     lambda parser: add_option_flags(parser, s.options))
    if recipe is None:
        return 2
    from jobs.spark import get_spark

    try:
        s.check_recipe(recipe)
        spark = get_spark(f"tokenmill-{s.name}", recipe)
        print(f"[{s.name}] Spark master {spark.sparkContext.master}", flush=True)
        started = time.perf_counter()
        print(s.run(spark, recipe, options_from(args, s.options)))
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"[{s.name}] stopped; nothing half-written is visible, and the next run cleans up after it",
              file=sys.stderr)
        return 130
    print(f"{s.name} finished in {time.perf_counter() - started:.1f} s")
    return 0


def markdown_table() -> str:
    """The README's stage table."""
    rows = ["| stage | module | reads | writes | what it does |", "|---|---|---|---|---|"]
    for s in STAGES:
        rows.append(f"| `{s.name}` | `jobs/{s.module}.py` | {', '.join(f'`{t}`' for t in s.reads)} | "
                    f"{', '.join(f'`{t}`' for t in s.writes)} | {s.summary} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
