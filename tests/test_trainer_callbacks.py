"""The trainer's callbacks: each on its own with a stand-in trainer, then a callback of the user's
riding along a real run whose state survives a restart."""

from __future__ import annotations

import os
from types import SimpleNamespace

from lake.trainer_sections import SpikeCfg, TrainerCfg
from tests.conftest import ROOT
from trainer.callbacks import (BatchRamp, Callback, Checkpointing, Evaluation, SpikeGuardCallback, Starvation, Step,
                               default_callbacks)
from trainer.step import StepResult

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".tokenmill" / "torch_extensions"))


class Recorder:
    """A stand-in for the loop: what callbacks ask of it is recorded."""

    def __init__(self, tokens=0, world=1):
        self.state = SimpleNamespace(step=0, tokens=tokens)
        self.world, self.readers, self.rank = world, world, 0
        self.events_seen: list[tuple] = []
        self.checkpoints: list[str] = []

    def events(self, step, event, chunk_id=None, detail=None):
        self.events_seen.append((step, event, chunk_id, detail))

    def checkpoint(self, why):
        self.checkpoints.append(why)


def _step(number, loss, finite=True):
    result = StepResult(loss=loss, tokens=100, finite=finite, grad_norm=1.0, loss_by_category={}, seconds=0.1, seq_len=8)
    return Step(number, "pretrain-000000", [0, 1], result, {"step": number, "loss": loss})


def test_batch_ramp_sets_the_rows_of_the_next_step_by_tokens():
    ramp = BatchRamp([(0, 8), (1000, 32)], micro_batch=4)
    trainer = Recorder(tokens=999, world=2)
    ramp.on_step_start(trainer)
    assert trainer.batch_rows == 4  # 8 sequences over two processes
    trainer.state.tokens = 1000
    ramp.on_step_start(trainer)
    assert trainer.batch_rows == 16


def test_spike_guard_gives_the_verdict_and_its_state_survives_a_reload():
    cfg = SpikeCfg(window=10, z=3.0, min_delta=0.5, patience=2, warmup_steps=6)
    guard, trainer = SpikeGuardCallback(cfg), Recorder()
    for i in range(12):
        step = _step(i + 1, 3.0 + 0.01 * (i % 3))
        guard.on_step_end(trainer, step)
        assert step.verdict == "ok" and step.metrics["guard"] == "ok"
    spike = _step(13, 9.0)
    guard.on_step_end(trainer, spike)
    assert spike.verdict == "spike" and trainer.events_seen == [(13, "spike", "pretrain-000000", "loss 9.000")]
    copy = SpikeGuardCallback(cfg)
    copy.load_state_dict(guard.state_dict())
    again, fresh = _step(14, 9.0), _step(14, 9.0)
    guard.on_step_end(trainer, again)
    copy.on_step_end(trainer, fresh)
    assert again.verdict == fresh.verdict == "rollback"  # the second spike in a row, also for the reloaded copy
    nan = _step(15, float("nan"), finite=False)
    SpikeGuardCallback(cfg).on_step_end(trainer, nan)
    assert nan.verdict == "rollback"


def test_checkpointing_only_after_a_step_the_guard_passed_and_at_each_chunk_end():
    cp, trainer = Checkpointing(every=2), Recorder()
    for number, verdict in [(1, "ok"), (2, "spike"), (3, "ok"), (4, "ok")]:
        step = _step(number, 3.0)
        step.verdict = verdict
        cp.on_step_end(trainer, step)
    cp.on_chunk_end(trainer, {"chunk_id": "pretrain-000000"}, "done")
    assert trainer.checkpoints == ["every N steps", "chunk end"]  # step 2 spiked: no checkpoint there


def test_starvation_counts_the_waits_into_the_metrics():
    starve, trainer = Starvation(), Recorder()
    starve.on_starved(trainer, 0.5)
    starve.on_starved(trainer, 0.5)  # one wait, polled twice: one event
    step = _step(1, 3.0)
    starve.on_step_end(trainer, step)
    assert step.metrics["starved_seconds"] == 1.0 and [e[1] for e in trainer.events_seen] == ["starved"]
    starve.on_starved(trainer, 0.5)  # a new wait after a step
    assert [e[1] for e in trainer.events_seen] == ["starved", "starved"] and starve.seconds == 1.5
    other = Starvation()
    other.load_state_dict(starve.state_dict())
    assert other.seconds == 1.5


def test_evaluation_runs_every_n_steps_and_at_the_last_step(monkeypatch):
    """A run stopped at --max-steps is measured where it stopped, between the every-N evaluations too."""
    import trainer.callbacks as callbacks

    measured = []
    monkeypatch.setattr(callbacks, "perplexity_by_source", lambda model, docs: measured.append(1) or {"s": 2.0})
    trainer = Recorder()
    trainer.max_steps, trainer.engine = 7, SimpleNamespace(module=None)
    evaluation = Evaluation(every=3, docs_per_source=1)
    evaluation.documents = {"s": [([1, 2, 3], 0)]}
    steps = [_step(n, 3.0) for n in range(1, 8)]
    for step in steps:
        evaluation.on_step_end(trainer, step)
    assert [s.number for s in steps if "perplexity_by_source" in s.metrics] == [3, 6, 7] and len(measured) == 3


def test_the_default_callbacks_run_the_guard_before_checkpointing_and_metrics():
    names = [cb.name for cb in default_callbacks(TrainerCfg())]
    assert names == ["batch_ramp", "spike_guard", "starvation", "evaluation", "metrics", "checkpointing"]
    assert len(set(names)) == len(names)  # a callback's state is saved under its name


class Counting(Callback):
    """A user's callback: counts steps and chunk ends; its count is checkpointed."""

    name = "counting"

    def __init__(self):
        self.steps, self.hooks, self.loaded = 0, [], None

    def on_run_start(self, trainer):
        self.hooks.append("run_start")

    def on_step_end(self, trainer, step):
        self.steps += 1
        step.metrics["counted"] = self.steps

    def on_chunk_end(self, trainer, chunk, outcome):
        self.hooks.append(f"chunk_end:{chunk['chunk_id']}:{outcome}")

    def on_run_end(self, trainer):
        self.hooks.append("run_end")

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.steps = state.get("steps", 0)


def _with(callback, cfg):
    """The default callbacks with ``callback`` before metrics, so that what it adds is logged."""
    callbacks = default_callbacks(cfg)
    at = [cb.name for cb in callbacks].index("metrics")
    return callbacks[:at] + [callback] + callbacks[at:]


def test_a_users_callback_rides_along_and_its_state_survives_a_restart(tmp_path):
    import json
    from pathlib import Path

    from tests.test_trainer import _setup
    from trainer.loop import Trainer

    recipe, _ = _setup(tmp_path, chunks=1)
    first = Counting()
    Trainer(recipe, max_steps=7, callbacks=_with(first, recipe.trainer)).run()  # checkpoints at 5 and at the stop, 7
    assert first.steps == 7 and first.hooks == ["run_start", "run_end"]
    records = [json.loads(x) for x in (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["counted"] for r in records] == list(range(1, 8))
    second = Counting()
    trainer = Trainer(recipe, exit_when_idle=0.1, callbacks=_with(second, recipe.trainer))
    trainer.run()
    assert second.loaded == {"steps": 7}  # what it had at the checkpoint the run resumed from
    assert second.steps == 7 + (trainer.state.step - 7)
    assert second.hooks == ["run_start", "chunk_end:pretrain-000000:done", "run_end"]


def test_a_checkpoint_written_before_the_callbacks_still_resumes(tmp_path):
    """Checkpoints of earlier versions kept the guard's state and the starved seconds in the loop's state."""
    from pathlib import Path

    import torch

    from tests.test_trainer import _setup
    from trainer.loop import Trainer

    recipe, _ = _setup(tmp_path, chunks=1)
    Trainer(recipe, max_steps=5).run()  # a checkpoint at step 5
    latest = sorted((Path(recipe.lake) / "runs" / "tiny" / "checkpoints").glob("step-*"))[-1]
    saved = torch.load(latest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    callbacks = saved.pop("callbacks")
    saved["state"].update(guard=callbacks["spike_guard"], starved_seconds=2.5)
    torch.save(saved, latest / "mp_rank_00_model_states.pt")
    trainer = Trainer(recipe, max_steps=6)
    trainer.run()
    by_name = {cb.name: cb for cb in trainer.callbacks}
    assert trainer.state.step == 6 and by_name["starvation"].seconds == 2.5
    assert by_name["spike_guard"].guard.seen == 6  # five from the checkpoint, one more step since
