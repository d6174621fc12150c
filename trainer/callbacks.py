"""Everything that watches the run, as callbacks of the loop (``trainer/loop.py``).

The loop calls each callback's hooks in list order: ``on_run_start``, ``on_step_start`` (before a
step chooses its rows), ``on_step_end`` (with the ``Step`` just taken: callbacks read it and add to
its ``metrics``), ``on_starved`` (no ready chunk), ``on_chunk_end``, ``on_run_end``. A callback
that keeps state across a restart returns it from ``state_dict`` (saved in every checkpoint under
its ``name``) and takes it back in ``load_state_dict``, also after a rollback.

``default_callbacks`` is the order the daemon uses: the ramp sizes the step; the spike guard gives
the step its verdict, which the training signals (only a good step's losses), checkpointing (only
after a good step) and metrics read. A callback of
your own goes before ``Metrics`` if what it adds to a step's metrics is to be logged:

    callbacks = default_callbacks(recipe.trainer)
    callbacks.insert([c.name for c in callbacks].index("metrics"), MyCallback())
    Trainer(recipe, callbacks=callbacks).run()
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from lake.signals import publish_signals
from lake.trainer_sections import FewShotCfg, SpikeCfg, TrainerCfg
from trainer.evaluation import holdout_examples, perplexity_by_source
from trainer.schedule import SkipStep, SpikeGuard, accumulation_steps, batch_at
from trainer.step import StepResult


@dataclass
class Step:
    """One optimizer step, as the callbacks see it."""

    number: int  # steps of the run so far, this one included
    chunk_id: str
    rows: list[int]  # this rank's rows of the chunk the step trained on
    result: StepResult
    metrics: dict  # what is logged for the step (metrics.jsonl, TensorBoard); callbacks add to it
    verdict: str = "ok"  # the spike guard's: ok | spike | rollback


class Callback:
    name = "callback"

    def on_run_start(self, trainer) -> None: ...

    def on_step_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, step: Step) -> None: ...

    def on_starved(self, trainer, seconds: float) -> None: ...

    def on_chunk_end(self, trainer, chunk: dict, outcome: str) -> None: ...

    def on_run_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class BatchRamp(Callback):
    """The global batch follows ``trainer.batch_ramp`` by tokens consumed: the rows of the next step."""

    name = "batch_ramp"

    def __init__(self, ramp: list[tuple[int, int]], micro_batch: int):
        self.ramp, self.micro = ramp, micro_batch

    def on_step_start(self, trainer) -> None:
        gas = accumulation_steps(batch_at(trainer.state.tokens, self.ramp), self.micro, trainer.readers)
        trainer.batch_rows = self.micro * gas


class SpikeGuardCallback(Callback):
    """Loss spikes (``trainer.schedule.SpikeGuard``): a spike is logged; one that persists, or a loss or
    gradient that is not finite, makes the step's verdict ``rollback``, which the loop carries out."""

    name = "spike_guard"

    def __init__(self, cfg: SpikeCfg):
        self.guard = SpikeGuard(cfg.window, cfg.z, cfg.min_delta, cfg.patience, cfg.warmup_steps)
        # skip-step, judged inside the step before the update (trainer.step.train_step's ``skip``)
        self.skip_step = SkipStep(cfg.skip_z, cfg.window, cfg.warmup_steps) if cfg.skip_z else None

    def on_step_end(self, trainer, step: Step) -> None:
        r = step.result
        if r.overflow:  # fp16's loss scaler handled it (no update, a smaller scale): not a spike
            step.metrics["guard"] = "overflow"
            trainer.events(step.number, "overflow", step.chunk_id, f"fp16 gradients overflowed: no update, loss scale "
                           f"now {r.loss_scale:g}")
            return
        step.verdict = self.guard.observe(r.loss if r.finite else float("nan"), r.grad_norm, r.row_loss)
        step.metrics["guard"] = step.verdict
        if r.skipped:
            step.metrics["skipped"] = True
            trainer.events(step.number, "skip_step", step.chunk_id,
                           f"loss {r.loss:.3f}, grad norm {r.grad_norm if r.grad_norm is not None else float('nan'):.3g}: "
                           "no update")
        if step.verdict == "spike":
            trainer.events(step.number, "spike", step.chunk_id, f"loss {r.loss:.3f}")

    def state_dict(self) -> dict:
        return {**self.guard.state(), **({"skip_step": self.skip_step.state()} if self.skip_step else {})}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.guard.load(state)
            if self.skip_step and "skip_step" in state:
                self.skip_step.load(state["skip_step"])


class Starvation(Callback):
    """Seconds spent waiting for a ready chunk: one ``starved`` event when a wait begins (not one Delta
    commit per poll), a running total in the metrics."""

    name = "starvation"

    def __init__(self):
        self.seconds = 0.0
        self.waiting = False

    def on_starved(self, trainer, seconds: float) -> None:
        if not self.waiting:
            trainer.events(trainer.state.step, "starved", None, f"no ready chunk: polling every {seconds:g} s")
            self.waiting = True
        self.seconds += seconds

    def on_step_end(self, trainer, step: Step) -> None:
        self.waiting = False
        step.metrics["starved_seconds"] = self.seconds

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = state.get("seconds", 0.0)


def evaluates_at(step: int, every: int, max_steps: int | None) -> bool:
    """Every ``every`` steps, and at a run's last step (``--max-steps``): a run stopped at its budget is
    measured where it stopped (the lab compares runs there)."""
    return step % every == 0 or step == max_steps


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    """The slope of y on x fitted by least squares to ``(x, y)`` points; None without two distinct x."""
    n = len(points)
    if n < 2:
        return None
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else None


class TrainingSignals(Callback):
    """Each category's recent loss and how fast it falls, for an adaptive feed mix (``jobs/adaptive_mix.py``):
    every ``every`` steps and at the run's end, rank 0 publishes to ``training_signals`` one row per
    category, its mean over its last ``window`` losses and their least-squares slope per token of the
    run. A step the spike guard did not pass is left out (a spike is not what the category teaches).
    The windows are in the checkpoint: a resumed or rolled-back run fits on its losses as of then."""

    name = "training_signals"

    def __init__(self, every: int, window: int):
        self.every, self.window = every, window
        self.losses: dict[str, list[tuple[float, float]]] = {}  # category → its last (run tokens, loss)
        self.published = 0  # the step of the last publication

    def on_step_end(self, trainer, step: Step) -> None:
        if step.verdict == "ok":
            for category, loss in step.result.loss_by_category.items():
                if math.isfinite(loss):
                    points = self.losses.setdefault(category, [])
                    points.append((trainer.state.tokens, loss))
                    del points[: -self.window]
        if step.number % self.every == 0:
            self.publish(trainer, step.number)

    def on_run_end(self, trainer) -> None:
        if trainer.state.step != self.published:
            self.publish(trainer, trainer.state.step)

    def signals(self) -> dict[str, tuple[float, float]]:
        """Category → (mean loss, slope per token) over its window, where a slope can be fitted."""
        out = {}
        for category, points in self.losses.items():
            slope = least_squares_slope(points)
            if slope is not None:
                out[category] = (sum(y for _, y in points) / len(points), slope)
        return out

    def publish(self, trainer, step: int) -> None:
        """Rank 0 writes; a write that fails is logged and training goes on (the signal is advice to feed,
        and the other ranks are already waiting at the next step's collectives)."""
        self.published = step
        if trainer.rank != 0:
            return
        try:
            publish_signals(trainer.lake, trainer.cfg.run_name, step, trainer.state.tokens, self.signals())
        except Exception as err:  # noqa: BLE001 - any storage or commit failure
            trainer.log(f"[train] step {step}: training_signals not published ({type(err).__name__}: {err}); "
                        f"an adaptive feed keeps the last signal it read")

    def state_dict(self) -> dict:
        return {"losses": {c: [list(p) for p in points] for c, points in self.losses.items()},
                "published": self.published}

    def load_state_dict(self, state: dict) -> None:
        self.losses = {c: [tuple(p) for p in points] for c, points in state.get("losses", {}).items()}
        self.published = state.get("published", 0)


class Evaluation(Callback):
    """Every ``every`` steps and at the last, perplexity per source on the held-out documents of the
    lake's ``holdout`` table (read once, cut to the chunks' sequence length)."""

    name = "evaluation"

    def __init__(self, every: int, docs_per_source: int):
        self.every, self.docs_per_source = every, docs_per_source
        self.documents: dict[str, list[list[int]]] | None = None

    def on_step_end(self, trainer, step: Step) -> None:
        if not evaluates_at(step.number, self.every, trainer.max_steps):
            return
        if self.documents is None:
            self.documents = holdout_examples(trainer.lake, trainer.tokenizer, self.docs_per_source,
                                              step.result.seq_len)
            if not self.documents:
                trainer.log(f"[train] no held-out documents in {trainer.lake.uri('holdout')} (feed freezes them when "
                            f"it first runs): no perplexity per source")
        if not self.documents:
            return
        step.metrics["perplexity_by_source"] = perplexity_by_source(trainer.engine.module, self.documents)


class FewShotEvaluation(Callback):
    """Every ``trainer.fewshot.every`` steps and at the last, multiple-choice accuracy per set (``trainer/fewshot.py``)
    into the step's metrics as ``fewshot: {<set>/acc, <set>/acc_norm}`` (TensorBoard: fewshot/<set>/acc).
    Every rank scores (under ZeRO-3 a forward pass needs them all); rank 0 logs. Prompts are cut to the
    width of the rows the step trained on."""

    name = "fewshot"

    def __init__(self, cfg: FewShotCfg):
        self.cfg = cfg
        self.sets: list | None = None

    def on_step_end(self, trainer, step: Step) -> None:
        if not evaluates_at(step.number, self.cfg.every, trainer.max_steps):
            return
        from trainer import fewshot

        if not self.sets:  # again while there is none: feed freezes the held-out set when it first runs
            self.sets = fewshot.load_sets(self.cfg, trainer.lake, trainer.tokenizer, [trainer.meta["eos_id"]],
                                          log=trainer.log)
        if not self.sets:
            return
        score = fewshot.model_loglikelihood(trainer.engine.module, self.cfg.batch_tokens, trainer.meta["pad_id"])
        results = fewshot.evaluate(self.sets, score, self.cfg.seed, step.result.seq_len + 1)
        step.metrics["fewshot"] = fewshot.as_metrics(results)
        if trainer.rank == 0:
            trainer.log(f"[train] step {step.number} few-shot: {fewshot.summary(results)}")


class Metrics(Callback):
    """On rank 0: every step's metrics to ``<run>/metrics.jsonl`` and TensorBoard; a console line every
    ``console_every`` steps and with every evaluation."""

    name = "metrics"

    def __init__(self, console_every: int = 25):
        self.console_every = console_every
        self.jsonl = self.tb = None

    def on_run_start(self, trainer) -> None:
        if trainer.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(trainer.run_dir / "tensorboard"))
        path = trainer.run_dir / "metrics.jsonl"
        drop_steps_after(path, trainer.state.step)  # resumed: the steps after the checkpoint are trained again
        self.jsonl = open(path, "a", encoding="utf-8")

    def on_step_end(self, trainer, step: Step) -> None:
        if trainer.rank != 0:
            return
        record = {k: v for k, v in step.metrics.items() if v is not None}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key.replace(".", "/"), value, step.number)
            elif isinstance(value, dict):
                for k, v in value.items():
                    self.tb.add_scalar(f"{key}/{k}", v, step.number)
        self.tb.flush()
        if step.number % self.console_every == 0 or "perplexity_by_source" in record:
            cats = " ".join(f"{c} {v:.2f}" for c, v in sorted(record["loss_by_category"].items()))
            trainer.log(f"[train] step {step.number}: loss {record['loss']:.3f} ({cats}), lr {record['lr']:.2e}, "
                        f"{record['tokens_per_s']:,.0f} tokens/s, {record['tokens']:,} tokens, {step.chunk_id}")

    def on_run_end(self, trainer) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.tb.close()


def drop_steps_after(path: Path, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (the one a run resumed from), so that a resumed
    run's file holds each step once; returns how many were dropped."""
    if not path.exists():
        return 0
    def logged_step(line: str) -> int | None:
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # the line a kill cut short
            return None

    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and (logged_step(line) or 0) <= step
            and logged_step(line) is not None]
    if len(kept) != len(lines):
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, path)
    return len(lines) - len(kept)


class Checkpointing(Callback):
    """A checkpoint every ``every`` steps (only after a step the spike guard passed) and at each chunk's end."""

    name = "checkpointing"

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, step: Step) -> None:
        if step.verdict == "ok" and step.number % self.every == 0:
            trainer.checkpoint("every N steps")

    def on_chunk_end(self, trainer, chunk: dict, outcome: str) -> None:
        trainer.checkpoint("chunk end")


def default_callbacks(cfg: TrainerCfg, adaptive_feed: bool = False) -> list[Callback]:
    """The daemon's callbacks, built from the recipe's trainer section, in the order they must run
    (few-shot evaluation only when ``trainer.fewshot.every`` is set; training signals when
    ``trainer.signals`` asks, by default when the stage's feed mix is ``adaptive_feed``)."""
    every = cfg.signals.steps(adaptive_feed)
    return [BatchRamp(cfg.batch_ramp, cfg.micro_batch), SpikeGuardCallback(cfg.spike), Starvation(),
            *([TrainingSignals(every, cfg.signals.window)] if every else []),
            Evaluation(cfg.eval_every, cfg.eval_docs), *([FewShotEvaluation(cfg.fewshot)] if cfg.fewshot.every else []),
            Metrics(), Checkpointing(cfg.checkpoint_every)]
