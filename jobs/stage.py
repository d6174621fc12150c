"""What every stage entry point shares: arguments, recipe, Spark session, timing.

Each ``jobs/<stage>.py`` runs the same way from ``tokenmill <stage>``, ``python -m jobs.<stage>`` and
``spark-submit jobs/<stage>.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from jobs.recipe import Recipe, RecipeError, load_recipe


def recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file (see configs/)")
    parser.add_argument("--lake", help="override the recipe's lake: (a folder or URI)")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    overrides = {"lake": args.lake} if getattr(args, "lake", None) else None
    return load_recipe(args.recipe, overrides)


def parse_with_recipe(prog: str, description: str | None, argv: list[str] | None,
                      add_arguments: Callable | None = None) -> tuple[argparse.Namespace, Recipe | None]:
    """Parse ``--recipe``/``--lake`` and the command's own arguments; the recipe is None (and the
    error printed, naming the key and the fix) when it cannot be used."""
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


def stage_main(name: str, run: Callable, argv: list[str] | None = None, add_arguments: Callable | None = None) -> int:
    args, recipe = parse_with_recipe(f"tokenmill {name}", run.__doc__, argv, add_arguments)
    if recipe is None:
        return 2
    from jobs.spark import get_spark

    spark = get_spark(f"tokenmill-{name}", recipe)
    started = time.perf_counter()
    report = run(spark, recipe, args)
    print(report)
    print(f"{name} finished in {time.perf_counter() - started:.1f} s")
    return 0
