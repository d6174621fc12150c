"""``tokenmill demo``: the whole system on the embedded default, end to end, in one command.

demo corpus → ingest → filter → pii → weak labels + classifiers → score → dedup → tokenizer →
feed (``--follow``, a process of its own) beside the trainer (another process) → a summary of
every stage with its numbers, the loss curve and where the TensorBoard logs are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lake.recipe import Recipe

MARKER = ".tokenmill-demo-lake"  # the demo wipes only a lake it made itself


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _fresh_lake(recipe: Recipe) -> None:
    lake = Path(recipe.lake)
    if lake.exists() and any(lake.iterdir()) and not (lake / MARKER).exists():
        raise SystemExit(f"error: {lake} is not empty and was not made by the demo; pass --lake with a new folder")
    if lake.exists():
        shutil.rmtree(lake)
    lake.mkdir(parents=True)
    (lake / MARKER).write_text("made by `tokenmill demo`; the next demo run starts it afresh\n")


def _child(name: str, args: list[str], env: dict) -> subprocess.Popen:
    """A child process whose output lines are shown with a ``[name]`` prefix as they come."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)

    def pump():
        for line in proc.stdout:
            line = line.rstrip()
            if line and not any(noise in line for noise in ("WARN", "INFO", "log4j", "setLogLevel", "laio", "collect2")):
                print(f"  [{name}] {line.removeprefix(f'[{name}] ')}", flush=True)

    threading.Thread(target=pump, daemon=True).start()
    return proc


def corpus_folder(recipe: Recipe) -> Path:
    """Where the recipe's sources read the demo corpus (``<folder>/<source>/<files>``), whatever lake
    ``--lake`` names; next to the lake for a recipe whose sources do not share one folder."""
    folders = {Path(s.path).parent.parent for s in recipe.sources}
    return folders.pop() if len(folders) == 1 else Path(recipe.lake).parent / "demo_corpus"


def run_demo(recipe: Recipe, steps: int = 300) -> None:
    from jobs.demo_corpus import INSTRUCTION_DOCS, build_demo_corpus
    from jobs.stages import run_stages
    from lake.artifacts import ModelRef, versions
    from lake.status import print_status

    started = time.perf_counter()
    extend = recipe.tokenizer.extend
    if extend is not None and not (Path(extend.base) / "config.json").is_file():
        raise SystemExit(f"error: tokenizer.extend.base {extend.base} holds no model (config.json): continued "
                         f"pretraining starts from a base. Make it first: tokenmill demo && tokenmill train --recipe "
                         f"configs/demo.yaml --export {extend.base}")
    _fresh_lake(recipe)
    corpus = corpus_folder(recipe)
    _say(f"building the demo corpus in {corpus}")
    wanted = INSTRUCTION_DOCS if any(s.kind == "instruction" for s in recipe.sources) else None
    for built in build_demo_corpus(corpus, wanted):
        print(f"  {built.name:<12} {built.documents:>6} documents", flush=True)
    _say("refinery, stage 1 (Spark local mode): ingest → filter → pii")
    run_stages(recipe, ["ingest", "filter", "pii"])
    # Labels and models are made the way a user makes them: the `tokenmill models` commands.
    base = [sys.executable, "-m", "jobs.cli", "models"]
    where = ["--recipe", recipe.origin, "--lake", recipe.lake]
    _say("weak labels, then the domain and quality classifiers (fastText)")
    subprocess.run([*base, "label", *where], check=True)
    for task in ("domain", "quality"):
        backend = getattr(recipe.score, task).backend
        if not versions(recipe.lake, ModelRef(task, backend, "latest").name):
            subprocess.run([*base, "train", *where, "--task", task, "--backend", backend], check=True)
    _say("refinery, stage 2: score → dedup")
    run_stages(recipe, ["score", "dedup"])
    from jobs.spark import get_spark

    _say("tokenizer")
    run_stages(recipe, ["tokenizer"], log=lambda line: print(line, flush=True))
    get_spark("tokenmill-demo", recipe).stop()  # the feed and the trainer run in processes of their own, as in production

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENMILL_SPARK_LOG_LEVEL": "ERROR"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(recipe.lake).parent / "torch_extensions"))
    recipe_args = ["--recipe", recipe.origin, "--lake", recipe.lake]
    _say(f"feed --follow (keeps {2} chunks ready) and the trainer ({steps} steps), two processes")
    feed = _child("feed", [sys.executable, "-m", "jobs.feed", *recipe_args, "--until-ready", "2", "--follow"], env)
    trainer = _child("train", [sys.executable, "-m", "trainer.daemon", *recipe_args, "--max-steps", str(steps),
                               "--exit-when-idle", "180"], env)
    code = trainer.wait()
    feed.send_signal(signal.SIGINT)
    try:
        feed.wait(timeout=60)
    except subprocess.TimeoutExpired:
        feed.kill()
    if code != 0:
        raise SystemExit(f"error: the trainer exited with {code}; its output is above")
    _say("status")
    print_status(recipe.lake)
    print(summary(recipe), flush=True)
    print(journey_of_one(recipe), flush=True)
    from jobs.card import write_card
    from jobs.report import write_report

    _say(f"dataset card of the chunk set: {write_card(recipe)}")
    _say(f"the lake's report (open it in a browser): {write_report(recipe)}")
    _say(f"finished in {time.perf_counter() - started:.1f} s")


def journey_of_one(recipe: Recipe) -> str:
    """One trained document, traced from its record to the run (``tokenmill trace``)."""
    from jobs.trace import render, trace
    from lake.tables import Lake

    used = Lake(recipe.lake).read_arrow("usage", ["doc_id", "times_used"]).to_pylist()
    trained = sorted(r["doc_id"] for r in used if r["times_used"])
    if not trained:
        return ""
    return (f"\none document's journey (tokenmill trace {trained[0]} --recipe {recipe.origin} --lake {recipe.lake}):\n"
            + render(trace(recipe, trained[0])[0]))


def sparkline(values: list[float], width: int = 60, height: int = 8) -> str:
    """A small terminal plot of a curve (averaged into ``width`` columns)."""
    if not values:
        return "(no values)"
    cols = [values[int(i * len(values) / width): max(int((i + 1) * len(values) / width), int(i * len(values) / width) + 1)]
            for i in range(min(width, len(values)))]
    means = [sum(c) / len(c) for c in cols]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    grid = [[" "] * len(means) for _ in range(height)]
    for x, v in enumerate(means):
        y = int((v - lo) / span * (height - 1))
        grid[height - 1 - y][x] = "•"
    lines = []
    for i, row in enumerate(grid):
        label = hi - i * span / (height - 1)
        lines.append(f"  {label:6.2f} │{''.join(row)}")
    lines.append(f"         └{'─' * len(means)}")
    return "\n".join(lines)


def summary(recipe: Recipe) -> str:
    """Every stage of the demo with its numbers, from the lake and the run's metrics."""
    from collections import Counter

    from lake.tables import Lake

    lake = Lake(recipe.lake)
    out = ["", "=" * 78, "tokenmill demo: summary", "=" * 78]
    raw = lake.summary("documents_raw").rows
    kept = lake.summary("documents_dedup").rows
    rejected = lake.read_arrow("documents_rejected", columns=["doc_id", "stage", "reason"]).to_pylist()
    ingest_rejects = sum(1 for r in rejected if r["stage"] == "ingest")
    out.append(f"documents: {raw + ingest_rejects:,} in, {kept:,} kept, {len(rejected):,} rejected")
    by_stage = Counter(r["stage"] for r in rejected)
    for stage in ("ingest", "filter", "pii", "dedup"):
        reasons = Counter(r["reason"] for r in rejected if r["stage"] == stage)
        shown = ", ".join(f"{k} {v}" for k, v in reasons.most_common(6)) or "none"
        out.append(f"  {stage:<7} {by_stage.get(stage, 0):>5} rejected: {shown}")
    clusters = lake.read_arrow("dedup_clusters").to_pylist()
    removed = Counter(c["category"] for c in clusters if c["doc_id"] != c["kept_doc_id"])
    out.append("duplicates removed per category: " + (", ".join(f"{k} {v}" for k, v in removed.most_common()) or "none"))
    chunks = lake.read_arrow("chunks").to_pylist()
    status = Counter(c["status"] for c in chunks)
    out.append(f"chunks: {len(chunks)} produced ({', '.join(f'{k} {v}' for k, v in sorted(status.items()))})")
    tokens: Counter = Counter()
    for c in chunks:
        tokens.update(dict(c["mix"] or []))
    total = sum(tokens.values()) or 1
    mix = recipe.feed.current.mix
    out.append("tokens per category against the mix:")
    for cat, share in mix.items():
        out.append(f"  {cat:<6} {tokens[cat]:>10,}  {tokens[cat] / total:6.1%}  (target {share / sum(mix.values()):.0%})")
    run = Path(recipe.trainer.runs_dir or f"{recipe.lake}/runs") / recipe.trainer.run_name
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in records]
        out.append(f"training: {len(records)} steps, {records[-1]['tokens']:,} tokens; loss "
                   f"{sum(losses[:5]) / min(5, len(losses)):.3f} (first 5 steps) → "
                   f"{sum(losses[-5:]) / min(5, len(losses)):.3f} (last 5)")
        out.append(sparkline(losses))
        first, last = records[min(4, len(records) - 1)]["loss_by_category"], records[-1]["loss_by_category"]
        out.append("loss per category (step 5 → last): " + ", ".join(
            f"{c} {first.get(c, float('nan')):.2f} → {last.get(c, float('nan')):.2f}" for c in sorted(last)))
        evals = [r for r in records if "perplexity_by_source" in r]
        if evals:
            out.append(f"perplexity per source (held out, step {evals[-1]['step']}): " + ", ".join(
                f"{s} {v:,.1f}" for s, v in sorted(evals[-1]["perplexity_by_source"].items())))
        out.append(f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}")
        out.append(f"metrics: {metrics}; checkpoints: {run / 'checkpoints'}")
        out.append(f"export: tokenmill train --recipe {recipe.origin} --lake {recipe.lake} --export <folder>")
    return "\n".join(out)
