"""The training loop: set up, resume, then chunk after chunk: claim → step → … → consumed → checkpoint.

``Trainer.run`` is the whole daemon. It builds the engine for the recipe's stage (``engine.py``),
resumes from the run's latest checkpoint, then asks the chunk store for the next ready chunk
(``data.py``: rank 0 claims and verifies, every rank learns which) and trains on this rank's rows
from the cursor, one optimizer step (``step.py``) at a time. What watches the run is a callback
(``callbacks.py``): batch ramp, spike guard, starvation, evaluation (held-out perplexity, few-shot
accuracy), metrics, checkpointing. The
loop itself only carries out what a callback decides: a rollback when the spike guard says so
(back to the last good checkpoint, or the initial weights a new run saves first; the chunk's rows
whose documents stand out are skipped from then on, and a chunk that keeps spiking, or whose rows
are mostly bad, is quarantined). Stopped by
``--max-steps`` it saves a checkpoint and keeps its chunk claimed, to resume at the same row.

A run's folder (``<lake>/runs/<run_name>`` by default) holds ``checkpoints/``, ``metrics.jsonl``
and ``tensorboard/`` (and ``fewshot/``, what ``tokenmill eval`` measured of its checkpoints). Restarted, a run resumes exactly: model, optimizer, scheduler, the data
cursor (chunk, row), step, tokens, RNG and every callback's state.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lake import chunks as store
from lake.artifacts import load_tokenizer
from lake.recipe import Recipe
from lake.tables import Lake
from trainer.callbacks import Callback, SpikeGuardCallback, Step, default_callbacks
from trainer.checkpoint import Checkpoints, rng_state, set_rng
from trainer.data import ChunkFeed, any_rank, broadcast
from trainer.engine import build, device_of, init_distributed, stage_settings
from trainer.lease import RunLock
from trainer.model import check_base_tokenizer
from trainer.parallel import data_parallel, sequence_group
from trainer.schedule import model_flops_per_token, outlier_rows
from trainer.step import StepResult, probe_rows, train_step


@dataclass
class State:
    """The loop's part of a checkpoint (model, optimizer, scheduler and callbacks save their own)."""

    step: int = 0
    tokens: int = 0
    chunk_id: str | None = None
    row: int = 0  # next local row of the chunk
    skip: dict[str, list[int]] = field(default_factory=dict)  # chunk → quarantined local rows
    rollbacks: dict[str, int] = field(default_factory=dict)
    stage: str | None = None  # the stage the run is in, and the tokens it had when it began
    stage_start_tokens: int = 0
    rng: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, recipe: Recipe, max_steps: int | None = None, exit_when_idle: float | None = None,
                 log=print, callbacks: list[Callback] | None = None):
        self.recipe, self.cfg = recipe, recipe.trainer
        self.max_steps, self.exit_when_idle, self.log = max_steps, exit_when_idle, log
        self.stage = self.cfg.stage or recipe.feed.stage
        self.lake = Lake.of(recipe)
        self.run_dir = Path(self.cfg.runs_dir or f"{recipe.lake}/runs") / self.cfg.run_name
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", self.cfg.keep_checkpoints)
        fed_by = recipe.feed.stages.get(self.stage)
        adaptive = fed_by is not None and fed_by.adaptive is not None
        self.callbacks = default_callbacks(self.cfg, adaptive) if callbacks is None else callbacks
        self.state = State()
        self.categories: list[str] = list(recipe.feed.current.mix)
        self.batch_rows = self.cfg.micro_batch  # rows of the next step (the batch ramp sets it)
        self.lock = RunLock(self.run_dir)
        self.losses: list[float] = []  # every step's loss, for callers (tests, the demo)
        self.step_ends: list[float] = []  # perf_counter at the end of every step (bench/trainer)
        self.row_seen: dict[int, float] = {}  # the current chunk's trained rows → their worst document's loss
        self.saved_step: int | None = None  # the step of the checkpoint this process last saved or restored

    def run(self) -> list[float]:
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> list[float]:
        self.setup()
        self._fire("on_run_start")
        idle_since = None
        while self.max_steps is None or self.state.step < self.max_steps:
            chunk = self.feed.next_chunk(self.state.step)
            if chunk is None:
                idle_since = idle_since or time.perf_counter()
                if self._idle_too_long(idle_since):
                    break
                self._fire("on_starved", self.cfg.poll_seconds)
                time.sleep(self.cfg.poll_seconds)  # the daemon polls the chunk store
                continue
            idle_since = None
            if chunk.get("retry"):
                continue
            outcome = self.train_chunk(chunk)
            if outcome == "stop":
                self.stop_at_max_steps(chunk)
                break
            self.feed.finish(chunk, outcome, self.state.step, self.state.tokens)
            self.state.chunk_id, self.state.row = None, 0
            self._fire("on_chunk_end", chunk, outcome)
        self._fire("on_run_end")
        return self.losses

    # -- set up and resume ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.rank, self.world = init_distributed()
        self.sp = sequence_group(self.rank, self.world, self.cfg.sequence_parallel)
        self.reader, self.readers = data_parallel(self.rank, self.world, self.cfg.sequence_parallel)
        if self.rank == 0:
            self.lock.acquire()  # before anything is built, claimed or restored: one process per run
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        self.tokenizer, self.meta = load_tokenizer(self.recipe)
        check_base_tokenizer(self.cfg.model.init_from, self.tokenizer, self.meta, self.recipe.origin)
        built = build(self.cfg, self.stage, self.meta["model_vocab_size"], self.readers)
        self.engine, self.scheduler, self.n_params = built.engine, built.scheduler, built.n_params
        self.events = store.Events(self.lake, self.cfg.run_name, enabled=self.rank == 0)
        self.feed = ChunkFeed(self.lake, self.stage, self.cfg.run_name, self.rank, self.world, self.events,
                              store.tokenizer_id(self.meta), (self.reader, self.readers))
        restored = self._restore()
        if restored:
            self.events(self.state.step, "resumed", self.state.chunk_id, f"{restored} (row {self.state.row})")
            self.log(f"[train] resumed {self.cfg.run_name} from checkpoint {restored} (step {self.state.step}, "
                     f"{self.state.tokens:,} tokens, chunk {self.state.chunk_id} row {self.state.row})")
        if self.state.stage != self.stage:  # a new stage starts here (or the run does)
            self.state.stage, self.state.stage_start_tokens = self.stage, self.state.tokens
        decay = stage_settings(self.cfg, self.stage).decay_tokens
        if decay:
            self.scheduler.anneal = (self.state.stage_start_tokens, decay)
        if not restored:  # the initial weights: what a rollback before the first checkpoint goes back to
            self.checkpoint("initial weights")
        shared = f" ({self.cfg.sequence_parallel} per row: sequence parallel)" if self.sp else ""
        self.log(f"[train] {self.cfg.run_name}: {self.n_params:,} parameters, stage {self.stage}, "
                 f"{self.world} process(es){shared} on {device_of(self.engine)}, ZeRO-{self.cfg.zero_stage}, "
                 f"run folder {self.run_dir}")

    def _restore(self) -> str | None:
        """The latest checkpoint into engine, loop state and callbacks; its tag, or None without one."""
        partial = self.checkpoints.partial()
        latest = self.checkpoints.load_latest(self.engine)
        if partial:
            self.log(f"[train] skipped checkpoint(s) {', '.join(partial)} in {self.checkpoints.folder}: their save "
                     f"never completed (the process was stopped while saving)")
            if self.rank == 0:
                self.checkpoints.remove_partial()
        if latest is None:
            return None
        tag, client = latest
        saved = dict(client["state"])
        # checkpoints written before the callbacks kept the guard's state and starvation in the loop's
        legacy = {"spike_guard": saved.pop("guard", {}), "starvation": {"seconds": saved.pop("starved_seconds", 0.0)}}
        self.state = State(**saved)
        states = client.get("callbacks", legacy)
        for cb in self.callbacks:
            cb.load_state_dict(states.get(cb.name, {}))
        set_rng(self.state.rng)
        self.scheduler.tokens = self.state.tokens
        self.saved_step = self.state.step
        return tag

    def stop_at_max_steps(self, chunk: dict) -> None:
        """A clean stop mid-chunk: a checkpoint at this step, and the chunk stays claimed by this run, so
        that a restart resumes at the same row (no other run may take it meanwhile)."""
        if self.saved_step != self.state.step:  # every rank knows it (the folder's view may lag behind rank 0's save)
            self.checkpoint(f"stop at --max-steps {self.max_steps}")
        left = f"stays claimed by {self.cfg.run_name} at row {self.state.row}: a restart resumes there"
        self.events(self.state.step, "stopped", chunk["chunk_id"], f"--max-steps {self.max_steps}; the chunk {left}")
        self.log(f"[train] stopped at step {self.state.step} (--max-steps); chunk {chunk['chunk_id']} {left}")

    def checkpoint(self, why: str) -> None:
        self.state.rng = rng_state()
        client = {"state": asdict(self.state), "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks}}
        tag = self.checkpoints.save(self.engine, self.state.step, client, prune=self.rank == 0)
        self.saved_step = self.state.step
        self.events(self.state.step, "checkpoint", self.state.chunk_id, f"{tag} ({why})")

    # -- one chunk ---------------------------------------------------------------------------------------
    def train_chunk(self, chunk: dict) -> str:
        """This rank's rows of the chunk from the cursor: 'done', 'quarantined' (kept spiking) or 'stop'."""
        cid = chunk["chunk_id"]
        if cid != self.state.chunk_id:
            self.state.chunk_id, self.state.row = cid, 0  # a new chunk starts at its first row
        self.row_seen = {}
        # the chunk's categories (every rank has the same manifest row): the per-category sums line up
        self.categories += [c for c, _ in chunk.get("mix") or [] if c not in self.categories]
        ids, spans = self.feed.rows(chunk)
        outcome = "retry"
        while outcome == "retry":
            outcome = self._train_rows(cid, ids, spans)
        return outcome

    def _train_rows(self, cid: str, ids: np.ndarray, spans: list) -> str:
        skip = set(self.state.skip.get(cid, []))
        recent: list[list[int]] = []  # the rows of the steps since the guard last passed one
        while order := [r for r in range(self.state.row, len(ids)) if r not in skip]:
            self._fire("on_step_start")
            take = order[: self.batch_rows]
            result = train_step(self.engine, ids, spans, take, self.cfg.micro_batch, self.categories,
                                self.cfg.model.doc_mask, self.cfg.z_loss, self._skip_step(), self.sp,
                                self.cfg.model.loss_chunk)
            step = self._advance(cid, take, result)
            recent.append(take)
            self.row_seen.update(zip(take, result.row_loss))
            self._fire("on_step_end", step)
            if step.verdict == "rollback":
                return self.rollback(cid, recent, ids, spans)
            if step.verdict == "ok":
                recent = []
            if self.max_steps is not None and self.state.step >= self.max_steps:
                return "stop"
        return "done"

    def _advance(self, cid: str, take: list[int], r: StepResult) -> Step:
        """The cursor, counters and schedule move past the step; the step's own metrics."""
        self.state.step += 1
        self.state.row = take[-1] + 1
        self.state.tokens += r.tokens
        self.scheduler.tokens = self.state.tokens
        self.losses.append(r.loss)
        self.step_ends.append(time.perf_counter())
        tokens_per_s = r.tokens / max(r.seconds, 1e-9)
        flops = model_flops_per_token(self.n_params, self.cfg.model.layers, self.cfg.model.hidden, r.seq_len)
        metrics = {"step": self.state.step, "loss": r.loss, "lr": self.scheduler.get_last_lr()[0],
                   "grad_norm": r.grad_norm, "tokens": self.state.tokens, "tokens_per_s": tokens_per_s,
                   "mfu": tokens_per_s * flops / (self.cfg.peak_flops * self.world),
                   "batch_sequences": len(take) * self.readers, "loss_by_category": r.loss_by_category, "chunk": cid,
                   **({"z_loss": r.z_loss} if r.z_loss is not None else {}),
                   **({"loss_scale": r.loss_scale} if r.loss_scale is not None else {})}
        return Step(self.state.step, cid, take, r, metrics)

    def rollback(self, cid: str, recent: list[list[int]], ids: np.ndarray, spans: list) -> str:
        """Back to the last good checkpoint; the chunk's bad rows are skipped from now on.

        The bad rows are those whose worst document stands out (``schedule.outlier_rows``) from the
        rows of recent accepted steps: among the rows trained since the checkpoint, and, with the
        restored weights, the rows after the spike, probed forward-only a batch at a time until a
        batch has none (corrupted data rarely ends at a step's edge). Where no row can be judged (too
        few accepted rows yet, or none stands out), every row of the spiking steps is skipped."""
        spiked_at, last = self.state.step, recent[-1][-1]
        guard = self._guard()
        reference = guard.guard.reference_rows() if guard else []  # before the restore rewinds the guard
        skip, rollbacks = set(self.state.skip.get(cid, [])), self.state.rollbacks  # ... and the loop's state
        rollbacks = {**rollbacks, cid: rollbacks.get(cid, 0) + 1}
        other = {c: rows for c, rows in self.state.skip.items() if c != cid}
        tag = self._restore()
        if tag is None:
            raise RuntimeError(f"loss spike at step {spiked_at} in {cid}, and no complete checkpoint in "
                               f"{self.checkpoints.folder} to roll back to (not even the initial weights' one)")
        start = self.state.row if self.state.chunk_id == cid else 0
        z, delta = self.cfg.spike.z, self.cfg.spike.min_delta
        since = {r: v for r, v in self.row_seen.items() if start <= r <= last}
        bad = set(outlier_rows(since, reference, z, delta))
        ahead = [r for r in range(last + 1, len(ids)) if r not in skip]
        probing = any_rank(bool(bad))
        while probing:  # every rank probes as many batches (collectives under ZeRO-3 stay paired)
            probe, ahead = ahead[: self.batch_rows], ahead[self.batch_rows :]
            losses = probe_rows(self.engine, ids, spans, probe or [last], self.cfg.micro_batch, self.categories,
                                self.cfg.model.doc_mask, self.sp, self.cfg.model.loss_chunk)
            found = outlier_rows(dict(zip(probe, losses)), reference, z, delta)
            bad |= set(found)
            probing = any_rank(bool(found and ahead))
        if not bad:
            bad = {r for rows in recent for r in rows}
        bad = sorted(bad)
        self.state.skip, self.state.rollbacks = {**other, cid: sorted(skip | set(bad))}, rollbacks
        self.events(spiked_at, "rollback", cid, f"to {tag} (step {self.state.step})")
        self.events(spiked_at, "quarantine", cid, f"rows {bad[:20]}{'…' if len(bad) > 20 else ''} ({len(bad)} rows)")
        self.log(f"[train] loss spike at step {spiked_at} in {cid}: rolled back to step {self.state.step}, "
                 f"skipping {len(bad)} rows")
        if self.state.chunk_id != cid:
            self.state.chunk_id, self.state.row = cid, 0
        spike = self.cfg.spike
        too_many = any_rank(len(self.state.skip[cid]) > spike.max_skipped_share * len(ids))
        return "quarantined" if rollbacks[cid] > spike.max_rollbacks_per_chunk or too_many else "retry"

    # -- helpers ---------------------------------------------------------------------------------------------
    def _guard(self) -> SpikeGuardCallback | None:
        return next((cb for cb in self.callbacks if isinstance(cb, SpikeGuardCallback)), None)

    def _skip_step(self):
        guard = self._guard()
        return guard.skip_step if guard else None

    def _fire(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _idle_too_long(self, idle_since: float) -> bool:
        """Rank 0 decides (the ranks' clocks differ) whether ``exit_when_idle`` has passed."""
        stop = self.exit_when_idle is not None and time.perf_counter() - idle_since >= self.exit_when_idle
        stop = broadcast(stop)
        if stop:
            self.log(f"[train] no ready chunk for {self.exit_when_idle:g} s: stopping")
        return stop
