"""Benchmark: ``tokenmill lab`` on three variants next to the same runs started by hand, one after another.

On one refined demo lake (built once), each round times, in turn:
- by hand: per variant ``tokenmill feed --until-ready N`` then ``tokenmill train --max-steps S`` on the
  very recipe the lab writes for that variant (same data, same steps), one process after another;
- the lab, ``--parallel 1`` with 2 torch threads per run: the same work in the same order, so the
  difference is the lab's overhead (target under 10%);
- the lab, ``--parallel 2`` with 1 thread per run: what two processes at a time gain on two cores.
Each lab round gets a fresh name, so it trains everything again. Medians of the rounds with their
spread; the lab's overhead is against the by-hand median.

    python bench/lab.py [--rounds 2] [--budget 16384] [--work DIR]

A ``--work`` folder whose lake is refined already is reused (its refinement is not timed anyway).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_rounds  # noqa: E402

VARIANTS = {"baseline": {}, "zh_heavy": {"mix": {"zh": 6, "en": 2, "code": 2}}, "easy_first": {"curriculum": "easy_first"}}


def plan_for(name: str, budget: int, parallel: int, threads: int):
    from jobs.lab_plan import Plan

    return Plan(name=name, budget_tokens=budget, batch=8, parallel=parallel, threads_per_run=threads, evaluations=2,
                base={"feed.stages.pretrain.seq_len": 128, "feed.chunk_tokens": 50000, "trainer.model.hidden": 64,
                      "trainer.model.layers": 2, "trainer.model.heads": 4, "trainer.model.kv_heads": 2,
                      "trainer.eval_docs": 10, "trainer.poll_seconds": 0.1},
                variants=VARIANTS)


def refine(recipe_path: Path) -> None:
    """The demo lake, refined once: every stage up to the tokenizer, and the classifiers."""
    from jobs.cli import main as cli

    for stages in ("ingest,filter,pii", None, "score,dedup"):
        if stages is None:
            assert cli(["models", "label", "--recipe", str(recipe_path)]) == 0
            for task in ("domain", "quality"):
                assert cli(["models", "train", "--recipe", str(recipe_path), "--task", task]) == 0
            continue
        assert cli(["refine", "--recipe", str(recipe_path), "--stages", stages]) == 0
    assert cli(["tokenizer", "--recipe", str(recipe_path)]) == 0


def by_hand(recipe_path: Path, name: str, budget: int) -> None:
    """Each variant's feed, then its trainer, as a user types them, one after another."""
    from jobs.lab import prepare
    from jobs.lab_plan import plan_runs
    from lake.recipe import load_recipe

    plan = plan_for(name, budget, 1, os.cpu_count() or 1)
    for run in plan_runs(plan, load_recipe(recipe_path, plan.base)):
        p = prepare(plan, run, str(recipe_path), None)
        chunk_rows = p.recipe.feed.chunk_tokens // (p.recipe.feed.current.seq_len + 1)
        tool = [sys.executable, "-m", "jobs.cli"]
        subprocess.run([*tool, "feed", "--recipe", str(p.recipe_file), "--until-ready",
                        str(math.ceil(p.rows / chunk_rows))], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*tool, "train", "--recipe", str(p.recipe_file), "--max-steps", str(p.steps),
                        "--exit-when-idle", "5"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lab(recipe_path: Path, name: str, budget: int, parallel: int, threads: int) -> None:
    subprocess.run([sys.executable, "-m", "jobs.lab", "--recipe", str(recipe_path), "--plan",
                    str(_plan_file(recipe_path, name, budget, parallel, threads))], check=True, stdout=subprocess.DEVNULL)


def _plan_file(recipe_path: Path, name: str, budget: int, parallel: int, threads: int) -> Path:
    import yaml

    path = recipe_path.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan_for(name, budget, parallel, threads).model_dump(mode="json")))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=16384, help="tokens per variant")
    parser.add_argument("--work", help="folder for the lake (default: a temporary one)")
    args = parser.parse_args()
    from jobs.demo_corpus import demo_recipe_in

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-lab-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))
    recipe_path = work / "recipe.yaml"
    if (work / "lake" / "tables" / "documents_dedup").is_dir() and (work / "lake" / "models").is_dir():
        print(f"reusing the refined lake {work / 'lake'}")
    else:
        recipe_path = demo_recipe_in(work, {"zh_news": 200, "zh_reviews": 100, "en_docs": 200, "code": 100})
        started = time.perf_counter()
        refine(recipe_path)
        print(f"demo lake refined in {time.perf_counter() - started:.0f} s: {work / 'lake'}")
    stamp = int(time.time())  # each lab and each by-hand set of runs gets folders of its own
    times: dict[str, list[float]] = {"hand": [], "lab1": [], "lab2": []}
    for i in range(args.rounds):
        for key, run in (("hand", lambda n: by_hand(recipe_path, n, args.budget)),
                         ("lab1", lambda n: lab(recipe_path, n, args.budget, 1, 2)),
                         ("lab2", lambda n: lab(recipe_path, n, args.budget, 2, 1))):
            began = time.perf_counter()
            run(f"{key}-{stamp}-{i}")
            times[key].append(time.perf_counter() - began)
            print(f"round {i + 1} {key}: {times[key][-1]:.1f} s", flush=True)
    tokens = args.budget * len(VARIANTS)
    print(f"\n{len(VARIANTS)} variants × {args.budget:,} tokens, {args.rounds} rounds, {os.cpu_count()} cores")
    print_rounds(times, {"hand": "by hand: feed + train per variant, in turn", "lab1": "tokenmill lab --parallel 1 (2 threads)",
                         "lab2": "tokenmill lab --parallel 2 (1 thread each)"}, tokens, "tok")
    import statistics

    hand = statistics.median(times["hand"])
    for key in ("lab1", "lab2"):
        print(f"{key}: {100 * (statistics.median(times[key]) - hand) / hand:+.1f}% against by hand")


if __name__ == "__main__":
    main()
