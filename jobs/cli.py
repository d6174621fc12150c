"""The ``tokenmill`` command: one subcommand per stage, plus ``status`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jobs.recipe import Recipe, RecipeError
from jobs.stage import recipe_arguments, recipe_from_args

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# stage name → module under jobs/ with run(spark, recipe, args)
REFINE_STAGES = {"ingest": "ingest", "filter": "filter_rules", "pii": "scrub_pii", "score": "score", "dedup": "dedup"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM pretraining data refinery and streaming trainer")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("ingest", help="sources → documents_raw (rejects bad records with their reason)", add_help=False)
    sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the kept documents (a new version)",
                   add_help=False)
    sub.add_parser("feed", help="produce token chunks for the trainer (--until-ready N, --follow)", add_help=False)
    sub.add_parser("plan", help="parameters, FLOPs, days, memory per GPU, batch size of a Llama run", add_help=False)
    sub.add_parser("train", help="the streaming trainer: tails the chunk store and trains (or --export)", add_help=False)
    sub.add_parser("package", help="tokenmill.zip and entry scripts for spark-submit --py-files", add_help=False)

    refine = sub.add_parser("refine", help="run refinery stages in order on one Spark session")
    recipe_arguments(refine)
    refine.add_argument("--stages", default=",".join(REFINE_STAGES),
                        help=f"comma-separated, in pipeline order; any of {', '.join(REFINE_STAGES)}")
    refine.add_argument("--dry-run", action="store_true", help="filter: compute signals and the report only")
    refine.add_argument("--incremental", action="store_true",
                        help="dedup: only documents not seen before, against the documents kept earlier")

    status = sub.add_parser("status", help="every table with its version, rows and last commit; chunk backlog")
    recipe_arguments(status)

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
    listing = models_sub.add_parser("list", help="every saved model with its version and held-out macro-F1")
    recipe_arguments(listing)

    argv = sys.argv[1:] if argv is None else argv
    stage_commands = {"ingest": "jobs.ingest", "tokenizer": "jobs.train_tokenizer", "feed": "jobs.feed",
                      "plan": "trainer.planner", "train": "trainer.daemon", "package": "jobs.package"}
    if argv and argv[0] in stage_commands:  # stage commands parse their own arguments
        import importlib

        module = importlib.import_module(stage_commands[argv[0]])
        return _guarded(lambda: module.main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "models":
        return _guarded(lambda: run_models(recipe_from_args(args), args))
    if args.command == "refine":
        return _guarded(lambda: run_refine(recipe_from_args(args), args))
    if args.command == "status":
        return _guarded(lambda: print_status(recipe_from_args(args)))
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
    from jobs.lake import LakeError
    from jobs.sources import SourceError
    from quality_models.registry import ModelError

    try:
        result = action()
    except (RecipeError, LakeError, SourceError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def print_status(recipe: Recipe) -> None:
    """Print every table of the lake with version, rows and last commit (no Spark needed)."""
    from jobs.lake import Lake
    from schemas import TABLES

    lake = Lake(recipe.lake)
    print(f"lake {recipe.lake}")
    print(f"  {'table':<20} {'version':>7} {'rows':>10} {'files':>6}  last commit")
    missing = []
    for name in TABLES:
        if not lake.exists(name):
            missing.append(name)
            continue
        s = lake.summary(name)
        last = s.last_commit
        by = f" by {last.job}" if last.job else ""
        print(
            f"  {name:<20} {s.version:>7} {s.rows:>10} {s.files:>6}  "
            f"{last.timestamp:%Y-%m-%d %H:%M:%S} UTC {last.operation}{by}"
        )
    if missing:
        print(f"  not written yet: {', '.join(missing)}")
    if lake.exists("documents_rejected"):
        rejected = lake.read_arrow("documents_rejected", columns=["stage", "reason"])
        if rejected.num_rows:
            print("rejected documents by stage and reason:")
            grouped = rejected.group_by(["stage", "reason"]).aggregate([("reason", "count")])
            for row in sorted(grouped.to_pylist(), key=lambda r: (r["stage"], -r["reason_count"])):
                print(f"  {row['stage']:<10} {row['reason']:<22} {row['reason_count']:>8}")
    if lake.exists("chunks"):
        chunks = lake.read_arrow("chunks", columns=["status", "n_tokens"])
        print("chunk backlog by status:")
        grouped = chunks.group_by("status").aggregate([("status", "count"), ("n_tokens", "sum")])
        by_status = {row["status"]: row for row in grouped.to_pylist()}
        for status, row in sorted(by_status.items()):
            print(f"  {status:<12} {row['status_count']:>6} chunks  {row['n_tokens_sum']:>14,} tokens")
        print(f"  ready for the trainer: {by_status.get('ready', {}).get('status_count', 0)}")
    if lake.exists("usage"):
        used = [n for n in lake.read_arrow("usage", columns=["times_used"]).column("times_used").to_pylist() if n]
        if used:
            print(f"usage: {len(used):,} documents in chunks, {sum(used) / len(used):.2f} times each on average, "
                  f"at most {max(used)}")
    if lake.exists("trainer_events"):
        events = sorted(lake.read_arrow("trainer_events").to_pylist(), key=lambda r: r["at"])[-5:]
        if events:
            print("the trainer's last events:")
            for e in events:
                print(f"  {e['at']:%Y-%m-%d %H:%M:%S} run {e['run_id']} step {e['step']:>6} {e['event']:<12} "
                      f"{e['chunk_id'] or ''} {e['detail'] or ''}")


def run_models(recipe: Recipe, args) -> None:
    from quality_models import train as qm

    if args.models_command == "label":
        for task, (path, counts) in qm.derive_weak_labels(recipe).items():
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"{task:<8} {sum(counts.values()):>6} labelled documents ({shown}) → {path}")
    elif args.models_command == "train":
        started = time.perf_counter()
        result = qm.train_model(recipe, args.task, args.backend, Path(args.data) if args.data else None)
        print(f"trained {args.task} ({args.backend}) on {result.n_train} documents in {time.perf_counter() - started:.1f} s; "
              f"held-out evaluation on {result.n_holdout}:")
        print(result.report)
        print(f"saved {result.folder}")
    else:
        from quality_models.registry import model_root

        import json

        root = model_root(recipe.lake)
        for meta_path in sorted(root.glob("*/v*/metadata.json")):
            meta = json.loads(meta_path.read_text())
            if meta.get("task") == "tokenizer":
                print(f"{meta['name']:<18} {meta['version']:<5} {meta['created_at'][:19]}  vocabulary {meta['vocab_size']} "
                      f"(embedding {meta['model_vocab_size']})")
                continue
            print(f"{meta['name']:<18} {meta['version']:<5} {meta['created_at'][:19]}  labels {','.join(meta['labels'])}  "
                  f"macro-F1 {meta['metrics']['macro_f1']:.3f}")


def run_refine(recipe: Recipe, args) -> None:
    """Run the chosen refinery stages in pipeline order on one Spark session."""
    import importlib

    from jobs.spark import get_spark

    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in REFINE_STAGES]
    if unknown:
        raise RecipeError(f"--stages: unknown stage(s) {unknown}; stages are: {', '.join(REFINE_STAGES)}")
    spark = get_spark("tokenmill-refine", recipe)
    for stage in [s for s in REFINE_STAGES if s in chosen]:
        started = time.perf_counter()
        print(f"[refine] {stage}")
        module = importlib.import_module(f"jobs.{REFINE_STAGES[stage]}")
        print(module.run(spark, recipe, args))
        print(f"[refine] {stage} finished in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
