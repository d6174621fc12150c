"""``tokenmill lab``: small proxy runs choose the mix, the order and the size; scaling laws predict the big run.

    tokenmill lab --recipe R --plan lab.yaml [--name N] [--parallel K]

The plan (``jobs/lab_plan.py``) names the runs: variants compared at one token budget, and sizes ×
budgets for the laws. Each run gets the lake namespace ``lab/<name>/<run>`` (its own chunks, usage
and trainer tables; the refined document tables and the held-out set shared, nothing refined twice)
and its run folder ``<lake>/lab/<name>/runs/<run>``. Feed makes exactly the chunks a run's budget
needs, in this process on one Spark session; the trainer runs as child processes (``trainer.daemon``,
``--max-steps`` from the budget), ``parallel`` at a time. Killed and started again, the lab keeps what
it has: a run that reached its budget is not run again, a partial one resumes from its checkpoint
(its chunks stay claimed by it). Then the results, the laws and the prediction, the predicted run,
and the report (``jobs/lab_report.py``) in ``<lake>/lab/<name>/``; ``lab.json`` there records each
run's state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.lab_plan import Plan, Run, load_plan, plan_runs, run_recipe, steps_for
from jobs.lab_results import RunResult, read_metrics, run_result
from lake import chunks
from lake.errors import LakeError
from lake.recipe import Recipe, load_recipe, parse_with_recipe
from lake.tables import Lake

LIVE = (chunks.READY, chunks.TRAINING, chunks.CONSUMED)  # a run's chunks that still count towards its budget
MAX_REFEEDS = 3  # a run that keeps running dry (its rows keep being skipped) fails after this many refeeds
TOP_UP_SECONDS = 2.0  # how often the lab checks whether a training adaptive run has a ready chunk
ADAPTIVE_IDLE_SECONDS = 600  # an adaptive run waits for the lab to make its next chunk
IDLE_SECONDS = 5  # a lab run's chunks are made before it starts: a trainer without one has run dry


def _say(message: str) -> None:
    print(f"[lab] {message}", flush=True)


@dataclass(frozen=True)
class Prepared:
    """A run with its recipe, written to a file for the trainer process, and its number of steps."""

    run: Run
    recipe: Recipe
    recipe_file: Path
    steps: int

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.trainer.runs_dir) / self.run.name

    @property
    def rows(self) -> int:
        return self.steps * self.run.batch


def lab_folder(lake: str, name: str) -> Path:
    return Path(lake) / "lab" / name


def prepare(plan: Plan, run: Run, recipe_path: str, lake: str | None) -> Prepared:
    recipe = run_recipe(plan, run, recipe_path, lake)
    folder = lab_folder(recipe.lake, plan.name) / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False))
    return Prepared(run, recipe, path, steps_for(run.tokens, run.batch, recipe.feed.current.seq_len))


def training_key(p: Prepared) -> tuple[str, int]:
    """What a run trains, apart from its name and folders: two runs with one key (a law run at the
    variants' size and budget, say) would train the same model on the same chunks, step for step."""
    recipe = p.recipe.model_copy(update={"namespace": None, "trainer": p.recipe.trainer.model_copy(
        update={"run_name": "run", "runs_dir": None})})
    return recipe.fingerprint(), p.steps


def twins(prepared: list[Prepared]) -> dict[str, Prepared]:
    """Each run that another, earlier run of the plan already trains → that run (trained once, read twice)."""
    first: dict[tuple[str, int], Prepared] = {}
    out = {}
    for p in prepared:
        key = training_key(p)
        if key in first:
            out[p.run.name] = first[key]
        else:
            first[key] = p
    return out


def progress(metrics: Path) -> int:
    """The last step a run logged (0 before its first)."""
    records = read_metrics(metrics)
    return records[-1]["step"] if records else 0


def rows_to_feed(manifest: list[dict], rows: int, counted: tuple[str, ...] = LIVE) -> int:
    """Rows of chunks a run still lacks for ``rows`` rows, counting its chunks of the ``counted`` statuses
    (by default its ready, claimed and trained ones)."""
    return max(0, rows - sum(r["n_rows"] for r in manifest if r["status"] in counted))


def feed_run(spark, prepared: Prepared, tokenizer, meta: dict, starved_at: int | None = None,
             most: int | None = None) -> int:
    """Make the chunks the run's budget still needs (``most`` of them at most), in its namespace (an
    interrupted chunk cleaned up first); how many were made. A run that ran dry at step ``starved_at``
    (the trainer skipped rows around a loss spike) gets ready chunks for the steps it still lacks."""
    from jobs.feed import produce_chunk

    lake = Lake.of(prepared.recipe, spark)
    chunks.cleanup_interrupted(lake)
    stage = prepared.recipe.feed.stage
    rows, counted = prepared.rows, LIVE
    if starved_at is not None:
        rows, counted = (prepared.steps - starved_at) * prepared.run.batch, (chunks.READY,)
    made = 0
    while (most is None or made < most) and \
            rows_to_feed(chunks.manifest(lake, stage) if lake.exists("chunks") else [], rows, counted) > 0:
        report = produce_chunk(spark, prepared.recipe, lake, tokenizer, meta)
        if report.n_rows == 0:
            raise LakeError(f"feed made an empty chunk {report.chunk_id} for lab run {prepared.run.name}: "
                            f"the mix of stage {stage!r} has no documents; check the variant's mix")
        made += 1
    return made


class Journal:
    """``lab.json``: what each run reached, for the report and for whoever watches the lab; the runs'
    own metrics and checkpoints are the truth a restart goes by."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"runs": {}}

    def record(self, name: str, **fields) -> None:
        self.data["runs"][name] = {**self.data["runs"].get(name, {}), **fields}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


class Trainers:
    """Trainer processes, at most ``parallel`` at a time, each with ``threads`` torch threads; a line as
    each starts and ends (with its throughput)."""

    def __init__(self, parallel: int, threads: int, journal: Journal, logs: Path, top_up=None):
        """``top_up(running)``: called every few seconds while the lab waits, with the running adaptive
        runs (their chunks are made as they train, each mixed by the signals so far)."""
        self.parallel, self.threads, self.journal, self.logs, self.top_up = parallel, threads, journal, logs, top_up
        self.active: dict[str, tuple[subprocess.Popen, Prepared, float, object]] = {}
        self.failed: list[str] = []
        self.starved: list[tuple[Prepared, int]] = []  # runs that ran out of chunks, with the step they reached
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, prepared: Prepared) -> None:
        while len(self.active) >= self.parallel:
            self.wait_one()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads)}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(prepared.recipe.lake).parent / "torch_extensions"))
        log = open(self.logs / f"{prepared.run.name}.log", "a", encoding="utf-8")
        args = [sys.executable, "-m", "trainer.daemon", "--recipe", str(prepared.recipe_file),
                "--max-steps", str(prepared.steps), "--exit-when-idle",
                str(ADAPTIVE_IDLE_SECONDS if prepared.run.adaptive else IDLE_SECONDS)]
        self.active[prepared.run.name] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env),
                                          prepared, time.perf_counter(), log)
        self.journal.record(prepared.run.name, status="training", steps=prepared.steps)
        _say(f"started {prepared.run.name}: {prepared.steps} steps of {prepared.run.batch} × "
             f"{prepared.recipe.feed.current.seq_len} tokens ({len(self.active)} running)")

    def wait_one(self) -> None:
        topped = time.perf_counter()
        while True:
            for name, (proc, prepared, started, log) in list(self.active.items()):
                if proc.poll() is not None:
                    log.close()
                    del self.active[name]
                    self._finished(prepared, proc.returncode, time.perf_counter() - started)
                    return
            adaptive = [p for _, p, _, _ in self.active.values() if p.run.adaptive]
            if self.top_up and adaptive and time.perf_counter() - topped > TOP_UP_SECONDS:
                self.top_up(adaptive)
                topped = time.perf_counter()
            time.sleep(0.2)  # the lab waits on child processes it started

    def wait_all(self) -> None:
        while self.active:
            self.wait_one()

    def stop_all(self) -> None:
        """Stop the running trainers (the lab itself is stopping): each saves nothing more, and resumes
        from its last checkpoint when the lab is started again."""
        for name, (proc, _, _, log) in list(self.active.items()):
            proc.terminate()
            proc.wait()
            log.close()
            self.journal.record(name, status="stopped")
            del self.active[name]

    def _finished(self, prepared: Prepared, code: int, seconds: float) -> None:
        records = read_metrics(prepared.run_dir / "metrics.jsonl")
        step = records[-1]["step"] if records else 0
        if code == 0 and step < prepared.steps:
            self.starved.append((prepared, step))
            _say(f"{prepared.run.name} ran out of chunks at step {step} of {prepared.steps} (rows skipped around a "
                 f"loss spike): feeding it more")
            return
        if code != 0:
            self.failed.append(prepared.run.name)
            self.journal.record(prepared.run.name, status="failed", step=step, exit_code=code)
            _say(f"run {prepared.run.name} stopped at step {step} of {prepared.steps} (exit code {code}); its "
                 f"output: {self.logs / (prepared.run.name + '.log')}")
            return
        tokens = records[-1]["tokens"]
        self.journal.record(prepared.run.name, status="done", step=step, tokens=tokens, seconds=round(seconds, 2))
        _say(f"finished {prepared.run.name}: {tokens:,} tokens in {seconds:.1f} s, start-up included "
             f"({records[-1].get('tokens_per_s', 0):,.0f} tokens/s in its last step), loss {records[-1]['loss']:.3f}")


def run_lab(recipe_path: str, plan: Plan, lake: str | None = None, parallel: int | None = None) -> list[RunResult]:
    """Every run of the plan to its budget (the predicted one once the laws are fitted), then the report."""
    from jobs.lab_report import write_report

    started = time.perf_counter()
    base = load_recipe(recipe_path, {**({"lake": lake} if lake else {}), **plan.base})
    folder = lab_folder(base.lake, plan.name)
    folder.mkdir(parents=True, exist_ok=True)
    journal = Journal(folder / "lab.json")
    journal.data["plan"] = plan.model_dump(mode="json")
    runs = plan_runs(plan, base)
    prepared = [prepare(plan, run, recipe_path, lake) for run in runs]  # every run's recipe checked first
    same = twins(prepared)
    for name, twin in same.items():
        _say(f"{name} trains what {twin.run.name} trains: its results are {twin.run.name}'s")
        journal.record(name, status=f"same as {twin.run.name}")
    trainers = Trainers(parallel or plan.parallel, plan.threads_per_run, journal, folder / "logs")
    first = [p for p in prepared if p.run.group != "predict"]
    _train([p for p in first if p.run.name not in same], trainers, journal, base)
    results = [_result(p, same.get(p.run.name, p)) for p in first]
    outcome = None
    predicted = [p for p in prepared if p.run.group == "predict"]
    if plan.laws is not None:
        from jobs.lab_scaling import fit_laws

        outcome = fit_laws(results, plan.laws, predicted[0].run if predicted else None)
        for line in outcome.lines():
            _say(line)
        if predicted:
            _train(predicted, trainers, journal, base)
            results.append(_result(predicted[0], predicted[0]))
            outcome = outcome.with_observed(results[-1])
            _say(outcome.prediction_line())
    report = write_report(folder, plan, results, outcome)
    journal.data["seconds"] = round(time.perf_counter() - started, 2)
    journal.save()
    _say(f"report: {report} (and report.html, plots/, tensorboard/); {len(results)} runs in "
         f"{time.perf_counter() - started:.1f} s")
    return results


def _train(prepared: list[Prepared], trainers: Trainers, journal: Journal, base: Recipe) -> None:
    """Feed, then start, each run that has not reached its budget; wait for them all."""
    from jobs.spark import get_spark
    from lake.artifacts import load_tokenizer

    todo = []
    for p in prepared:
        step = progress(p.run_dir / "metrics.jsonl")
        if step >= p.steps:
            _say(f"{p.run.name} reached its budget before ({step} steps): not run again")
            journal.record(p.run.name, status="done", step=step)
        else:
            todo.append((p, step))
    if not todo:
        return
    spark = get_spark("tokenmill-lab", base)
    tokenizer, meta = load_tokenizer(base)

    def top_up(running: list[Prepared]) -> None:  # the next chunk of an adaptive run, once it took its last
        for p in running:
            if chunks.backlog(Lake.of(p.recipe, spark), p.recipe.feed.stage) == 0:
                feed_run(spark, p, tokenizer, meta, most=1)

    trainers.top_up = top_up
    try:
        for p, step in todo:
            made = feed_run(spark, p, tokenizer, meta, most=1 if p.run.adaptive else None)
            _say(f"{p.run.name}: {made} chunk(s) made" + (f"; resuming at step {step}" if step else ""))
            trainers.start(p)
        trainers.wait_all()
        for _ in range(MAX_REFEEDS):
            starved, trainers.starved = trainers.starved, []
            if not starved:
                break
            for p, step in starved:
                feed_run(spark, p, tokenizer, meta, starved_at=step)
                trainers.start(p)
            trainers.wait_all()
        trainers.failed += [p.run.name for p, _ in trainers.starved]
    finally:
        trainers.stop_all()  # only where the lab is stopped by an error or an interrupt
    if trainers.failed:
        raise LakeError(f"lab run(s) {', '.join(trainers.failed)} did not reach their budget; their output is "
                        f"in {trainers.logs}. Run tokenmill lab again to resume them")


def _result(p: Prepared, trained: Prepared) -> RunResult:
    """``p``'s results from the metrics of the run that trained it (itself, or its twin)."""
    return run_result(p.run, read_metrics(trained.run_dir / "metrics.jsonl"), p.recipe.feed.current.seq_len)


def main(argv: list[str] | None = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--plan", required=True, help="the lab's plan: a YAML file (see configs/lab.yaml)")
        parser.add_argument("--name", help="the lab's name (its folder <lake>/lab/<name>/); default the plan's name:")
        parser.add_argument("--parallel", type=int, help="trainer processes at a time; default the plan's parallel:")

    args, recipe = parse_with_recipe("tokenmill lab", __doc__.split("\n\n")[0], argv, arguments)
    if recipe is None:
        return 2
    plan = load_plan(args.plan, args.name)
    run_lab(args.recipe, plan, args.lake, args.parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
