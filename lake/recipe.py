"""The recipe: one YAML file that describes a whole run, validated before any Spark work.

The minimum a user writes is ``lake:`` and ``sources:``; every other section has documented
defaults (README, "Recipes"). Relative paths are resolved against the recipe file's folder, so a
recipe means the same thing whatever directory a job is started from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lake.feed_sections import Curriculum, Feed, FeedStage  # noqa: F401
from lake.sections import (Cascade, Dedup, Filter, Ingest, LineDedup,  # noqa: F401
                           ModelPin, Pii, Score, Section, Shingling, Source, Spark, TokenizerCfg, WeakLabels)
from lake.trainer_sections import ModelCfg, SpikeCfg, TrainerCfg, TrainerStageCfg  # noqa: F401

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key path and the fix."""


class Recipe(Section):
    lake: str = Field(description="lake root: a local folder or a URI Spark and delta-rs both reach")
    sources: list[Source] = Field(min_length=1)
    ingest: Ingest = Ingest()
    filter: Filter = Filter()
    pii: Pii = Pii()
    score: Score = Score()
    dedup: Dedup = Dedup()
    tokenizer: TokenizerCfg = TokenizerCfg()
    feed: Feed = Feed()
    trainer: TrainerCfg = TrainerCfg()
    spark: Spark = Spark()
    namespace: str | None = Field(default=None, description="a folder under the lake holding this run's own chunks, usage and "
                                  "trainer tables (lake/tables.RUN_TABLES); the document tables stay shared "
                                  "(tokenmill lab gives each of its runs one)")
    # Where the recipe came from, for messages; not a key a user writes.
    origin: str = Field(default="<memory>", exclude=True)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Source]) -> list[Source]:
        seen: set[str] = set()
        for src in sources:
            if src.name in seen:
                raise ValueError(f"source name {src.name!r} is used twice; names must be unique")
            seen.add(src.name)
        return sources

    @field_validator("namespace")
    @classmethod
    def _relative_folder(cls, value: str | None) -> str | None:
        parts = value.split("/") if value is not None else []
        if any(p in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9_.-]+", p) for p in parts):
            raise ValueError(f"namespace {value!r}: folder names of letters, digits, '_', '.', '-' joined by '/', "
                             f"inside the lake (no '..', no leading '/'), e.g. lab/mixes/baseline")
        return value

    @model_validator(mode="after")
    def _rows_split(self) -> "Recipe":
        sp = self.trainer.sequence_parallel
        uneven = {name: st.seq_len for name, st in self.feed.stages.items() if st.seq_len % sp}
        if uneven:
            raise ValueError(f"trainer.sequence_parallel ({sp}) must divide every stage's seq_len: "
                             + ", ".join(f"feed.stages.{n}.seq_len = {v}" for n, v in uneven.items()))
        return self

    @model_validator(mode="after")
    def _known_sources(self) -> "Recipe":
        unknown = set(self.filter.source_thresholds) - {s.name for s in self.sources}
        if unknown:
            raise ValueError(f"filter.source_thresholds names source(s) the recipe does not have: {sorted(unknown)} "
                             f"(sources: {', '.join(s.name for s in self.sources)})")
        return self

    def source(self, name: str) -> Source:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)

    def fingerprint(self) -> str:
        """A short hash of everything that shapes the data (recorded in chunk manifests)."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file (see configs/)")
    parser.add_argument("--lake", help="override the recipe's lake: (a folder or URI)")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, {"lake": args.lake} if args.lake else None)


def parse_with_recipe(prog: str, description: str | None, argv: list[str] | None,
                      add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                      ) -> tuple[argparse.Namespace, Recipe | None]:
    """Parse ``--recipe``/``--lake`` and a command's own arguments; the recipe is None (and the error
    printed, naming the key and the fix) when it cannot be used."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    recipe_arguments(parser)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args, recipe_from_args(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return args, None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key].start_mark.line + 1}, "
                    f"again at line {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def read_mapping(path: Path, what: str, shape: str, error: type[RecipeError] | None = None) -> dict[str, Any]:
    """A YAML file's mapping (no key given twice); ``error`` (RecipeError) names the file and what a
    ``what`` file is (``shape``) when it is missing, not YAML or not a mapping."""
    error = error or RecipeError
    if not path.is_file():
        raise error(f"{what} file {path} does not exist (pass --{what} with a YAML file; see configs/)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: a {what} is a mapping with {shape}")
    return raw


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, resolve and validate a recipe file; raise RecipeError naming the key and the fix."""
    path = Path(path)
    raw = read_mapping(path, "recipe", "at least 'lake:' and 'sources:'")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_recipe(raw, base_dir=path.resolve().parent, origin=str(path))


# Every recipe key that holds a path, as its keys from the top: "*" is each value of a mapping or
# each item of a list. Relative paths are resolved against the recipe file's folder.
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("lake",),
    ("sources", "*", "path"),
    ("filter", "keyword_lists", "*"),
    ("filter", "decontaminate", "sets", "*", "path"),
    ("filter", "language", "model"),
    ("filter", "url_blocklist", "domains", "*"),
    ("filter", "url_blocklist", "words", "*"),
    ("pii", "word_lists", "*"),
    ("score", "perplexity", "model"),
    ("dedup", "semantic", "backbone"),
    ("tokenizer", "domain_tokens_file"),
    ("tokenizer", "extend", "base"),
    ("tokenizer", "extend", "add_tokens"),
    ("tokenizer", "extend", "out"),
    ("trainer", "model", "init_from"),
    ("trainer", "fewshot", "sets", "*"),
)
NOT_PATHS = {"lid176"}  # names a key may hold instead of a path (filter.language.model: lid176)


def parse_recipe(raw: dict[str, Any], base_dir: Path, origin: str = "<memory>") -> Recipe:
    for keys in PATH_KEYS:
        raw = _resolved_at(raw, keys, base_dir)
    try:
        return Recipe(**raw, origin=origin)
    except ValidationError as err:
        raise RecipeError(explain(err, origin)) from None


def _resolved_at(node: Any, keys: tuple[str, ...], base_dir: Path) -> Any:
    """``node`` (a copy where anything changes) with the paths at ``keys`` resolved, where they are
    strings; what does not have the shape is left for validation to explain."""
    if not keys:
        return resolve_path(node, base_dir) if isinstance(node, str) and node not in NOT_PATHS else node
    head, rest = keys[0], keys[1:]
    if head == "*":
        if isinstance(node, dict):
            return {k: _resolved_at(v, rest, base_dir) for k, v in node.items()}
        return [_resolved_at(v, rest, base_dir) for v in node] if isinstance(node, list) else node
    if isinstance(node, dict) and head in node:
        return {**node, head: _resolved_at(node[head], rest, base_dir)}
    return node


def resolve_path(value: str, base_dir: Path) -> str:
    if _URI.match(value) or Path(value).is_absolute():
        return value
    return str((base_dir / value).resolve())


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``a.b.c``, making the mappings on the way."""
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def explain(err: ValidationError, origin: str, root: type[BaseModel] | None = None, what: str = "recipe") -> str:
    """A validation error of ``root`` (the Recipe unless given) read from ``origin``: every key at fault by
    its dotted path, with what is wrong (and, for an unknown key, the keys allowed there)."""
    lines = [f"{what} {origin} is not valid:"]
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        kind = problem["type"]
        if kind == "extra_forbidden":
            parent_model = _model_at(problem["loc"][:-1], root or Recipe)
            allowed = ", ".join(sorted(k for k in parent_model.model_fields if k != "origin"))
            lines.append(f"  {where}: unknown key; allowed here: {allowed}")
        elif kind == "missing":
            lines.append(f"  {where}: required key is missing")
        elif kind == "literal_error":
            lines.append(f"  {where}: {problem['msg']} (got {problem['input']!r})")
        else:
            lines.append(f"  {where}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def _model_at(loc: tuple[Any, ...], model: type[BaseModel]) -> type[BaseModel]:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        candidates = [annotation, *(inner or ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return model
