"""The streaming trainer: tails the chunk store and trains a Llama model with DeepSpeed.

    tokenmill train --recipe R [--max-steps N] [--exit-when-idle S]
    deepspeed --num_gpus N -m trainer.daemon --recipe R        torchrun --nproc-per-node N -m trainer.daemon ...

Each loop: claim the next ready chunk of the stage (conditional commit; rank 0 claims, every rank
learns which), verify its checksums (a bad chunk is quarantined), stream this rank's rows, take
optimizer steps whose size follows the batch ramp (gradient accumulation), log metrics, guard
against loss spikes (roll back to the last good checkpoint, skip and quarantine the offending rows;
quarantine the chunk if it keeps spiking), checkpoint every N steps and at each chunk's end, and
mark the chunk consumed. With nothing ready it waits and counts starvation seconds. Everything it
does to chunks goes to ``trainer_events``.

A run's folder (``<lake>/runs/<run_name>`` by default) holds ``checkpoints/``, ``metrics.jsonl``
and ``tensorboard/``. Restarted, a run resumes from its latest checkpoint exactly: model,
optimizer, scheduler, data cursor (chunk, row), step, tokens, RNG and the spike guard's state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lake import chunks as store
from lake.artifacts import load_tokenizer
from lake.holdout import holdout_ids
from lake.recipe import Recipe, parse_with_recipe
from lake.tables import Lake
from trainer.model import build_model, parameter_count, parameter_groups, row_layout, token_losses
from trainer.schedule import (SpikeGuard, accumulation_steps, batch_at, decay_drop, lr_factor,
                              model_flops_per_token)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world): from the launcher's environment, or a single local process (gloo on CPU)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class TokenSchedule(torch.optim.lr_scheduler.LRScheduler):
    """The learning rate as a function of consumed tokens (WSD or cosine); checkpointed with the engine."""

    def __init__(self, optimizer, cfg, peak: float):
        self.cfg, self.peak, self.tokens = cfg, peak, 0
        super().__init__(optimizer)

    anneal: tuple[int, int] | None = None  # (tokens at the stage's start, tokens to decay over)

    def factor(self, tokens: int) -> float:
        c = self.cfg
        base = lr_factor(tokens / c.planned_tokens, c.schedule, c.warmup, c.decay, c.decay_shape, c.final_lr)
        if self.anneal is None:
            return base
        start, length = self.anneal
        at_start = lr_factor(start / c.planned_tokens, c.schedule, c.warmup, c.decay, c.decay_shape, c.final_lr)
        # an anneal: from the stage's start, a decay of its own down to final_lr
        t = min(1.0, max(0.0, (tokens - start) / length))
        return at_start - (at_start - c.final_lr) * decay_drop(t, c.decay_shape)

    def get_lr(self):
        return [self.peak * self.factor(self.tokens) for _ in self.optimizer.param_groups]

    def state_dict(self):
        # the peak and the anneal come from the recipe's stage, not from the checkpoint
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "cfg", "anneal", "peak")}


@dataclass
class State:
    """What a checkpoint carries besides model, optimizer and scheduler."""

    step: int = 0
    tokens: int = 0
    chunk_id: str | None = None
    row: int = 0  # next local row of the chunk
    skip: dict[str, list[int]] = field(default_factory=dict)  # chunk → quarantined local rows
    rollbacks: dict[str, int] = field(default_factory=dict)
    starved_seconds: float = 0.0
    stage: str | None = None  # the stage the run is in, and the tokens it had when it began
    stage_start_tokens: int = 0
    guard: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)


def _grad_norm(module) -> float | None:
    """The global L2 norm of the gradients held on this process (None when ZeRO-2/3 sharded them away)."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng(state: dict) -> None:
    if state:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


class Trainer:
    def __init__(self, recipe: Recipe, max_steps: int | None = None, exit_when_idle: float | None = None,
                 log=print):
        self.recipe, self.cfg = recipe, recipe.trainer
        self.max_steps, self.exit_when_idle, self.log = max_steps, exit_when_idle, log
        self.stage = self.cfg.stage or recipe.feed.stage
        self.stage_cfg = self.cfg.stages.get(self.stage)
        self.lake = Lake(recipe.lake)
        self.run_dir = Path(self.cfg.runs_dir or f"{recipe.lake}/runs") / self.cfg.run_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = State()
        self.categories: list[str] = list(recipe.feed.current.mix)
        self.losses: list[float] = []  # every step's loss, for callers (tests, the demo)
        self.step_ends: list[float] = []  # perf_counter at the end of every step (bench/trainer)

    # -- setup -----------------------------------------------------------------------------------
    def _setup(self) -> None:
        import deepspeed

        self.rank, self.world = init_distributed()
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        self.tokenizer, self.meta = load_tokenizer(self.recipe)
        theta = (self.stage_cfg.rope_theta if self.stage_cfg and self.stage_cfg.rope_theta else None)
        self.rope_theta = theta or self.cfg.model.rope_theta
        model = build_model(self.cfg.model, self.meta["model_vocab_size"], theta)
        self.n_params = parameter_count(model)
        peak = (self.stage_cfg.lr_peak if self.stage_cfg and self.stage_cfg.lr_peak else self.cfg.lr_peak)
        schedule_cfg = self.cfg.model_copy(update={"schedule": self.stage_cfg.schedule}) \
            if self.stage_cfg and self.stage_cfg.schedule else self.cfg
        optimizer = torch.optim.AdamW(parameter_groups(model, self.cfg.weight_decay), lr=peak, betas=(0.9, 0.95),
                                      eps=1e-8)
        scheduler = TokenSchedule(optimizer, schedule_cfg, peak)
        self.gas = accumulation_steps(batch_at(0, self.cfg.batch_ramp), self.cfg.micro_batch, self.world)
        ds_config = {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch,
            "gradient_accumulation_steps": self.gas,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "bf16": {"enabled": self.cfg.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=ds_config)
        self.guard = SpikeGuard(self.cfg.spike.window, self.cfg.spike.z, self.cfg.spike.min_delta,
                                self.cfg.spike.patience, self.cfg.spike.warmup_steps)
        self.events = store.Events(self.lake, self.cfg.run_name, enabled=self.rank == 0)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._resume()
        if self.state.stage != self.stage:  # a new stage starts here (or the run does)
            self.state.stage, self.state.stage_start_tokens = self.stage, self.state.tokens
        if self.stage_cfg and self.stage_cfg.decay_tokens:
            self.scheduler.anneal = (self.state.stage_start_tokens, self.stage_cfg.decay_tokens)
        self._holdout = None

    def _resume(self) -> None:
        tags = self._checkpoints()
        if not tags:
            return
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tags[-1])
        self._load_client(client)
        self.log(f"[train] resumed {self.cfg.run_name} from checkpoint {tags[-1]} (step {self.state.step}, "
                 f"{self.state.tokens:,} tokens, chunk {self.state.chunk_id} row {self.state.row})")

    def _load_client(self, client: dict) -> None:
        self.state = State(**client["state"])
        self.guard.load(self.state.guard) if self.state.guard else None
        _set_rng(self.state.rng)
        self.scheduler.tokens = self.state.tokens

    def _checkpoints(self) -> list[str]:
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p.name for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def checkpoint(self, why: str) -> None:
        self.state.guard = self.guard.state()
        self.state.rng = _rng_state()
        tag = f"step-{self.state.step:09d}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"state": self.state.__dict__})
        if self.rank == 0:
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
            self.events(self.state.step, "checkpoint", self.state.chunk_id, f"{tag} ({why})")

    # -- data ------------------------------------------------------------------------------------
    def _broadcast(self, value):
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def _next_chunk(self) -> dict | None:
        row = None
        if self.rank == 0:
            row = store.find_claimed(self.lake, self.stage, self.cfg.run_name)
            if row is None:
                row = store.claim_next(self.lake, self.stage, self.cfg.run_name)
                if row is not None:
                    self.events(self.state.step, "claimed", row["chunk_id"], f"{row['n_tokens']:,} tokens")
            if row is not None:
                problem = store.verify(self.lake.root, row)
                if problem:
                    store.quarantine(self.lake, row, problem, job="trainer")
                    self.events(self.state.step, "quarantine", row["chunk_id"], problem)
                    row = {"retry": True}
        return self._broadcast(row)

    # -- evaluation ------------------------------------------------------------------------------
    def _holdout_docs(self) -> dict[str, list[list[int]]]:
        """Token ids of the held-out documents per source (feed never puts them in chunks)."""
        if self._holdout is None:
            name = self.lake.kept_documents()
            docs = self.lake.read_arrow(name, columns=["doc_id", "source"]).to_pylist()
            chosen = holdout_ids(docs, self.cfg.eval_docs)
            texts = self.lake.read_arrow(name, columns=["doc_id", "source", "text"]).to_pylist()
            width = self._seq_len or 512
            by_source: dict[str, list[list[int]]] = {}
            for r in texts:
                if r["doc_id"] in chosen:
                    ids = self.tokenizer.encode(r["text"], add_special_tokens=False).ids[: width]
                    if len(ids) > 1:
                        by_source.setdefault(r["source"], []).append(ids)
            self._holdout = by_source
        return self._holdout

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Perplexity per source on the held-out documents."""
        model = self.engine.module
        model.eval()
        out = {}
        for source, docs in sorted(self._holdout_docs().items()):
            total, count = 0.0, 0
            for ids in docs:
                t = torch.tensor([ids])
                logits = model(input_ids=t[:, :-1]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum")
                total += float(loss)
                count += len(ids) - 1
            out[source] = math.exp(total / max(count, 1))
        model.train()
        return out

    # -- training --------------------------------------------------------------------------------
    def _metrics(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key.replace(".", "/"), value, record["step"])
            elif isinstance(value, dict):
                for k, v in value.items():
                    self.tb.add_scalar(f"{key}/{k}", v, record["step"])
        self.tb.flush()

    def _train_chunk(self, chunk: dict) -> str:
        """Train on this rank's rows of the chunk from the cursor; returns 'done', 'quarantined' or 'stop'."""
        ids_all, spans_all = store.read_rows(self.lake, chunk)
        n_local = len(ids_all) // self.world
        ids_all, spans_all = ids_all[self.rank :: self.world][:n_local], spans_all[self.rank :: self.world][:n_local]
        self._seq_len = ids_all.shape[1] - 1 if len(ids_all) else None
        cid = chunk["chunk_id"]
        self.state.chunk_id = cid
        skip = set(self.state.skip.get(cid, []))
        micro = self.cfg.micro_batch
        step_rows: list[list[int]] = []  # the rows of recent steps, to quarantine after a rollback
        while True:
            order = [r for r in range(self.state.row, n_local) if r not in skip]
            if not order:
                break
            gas = accumulation_steps(batch_at(self.state.tokens, self.cfg.batch_ramp), micro, self.world)
            take = order[: micro * gas]
            gas_now = math.ceil(len(take) / micro)
            if gas_now != self.engine.gradient_accumulation_steps():
                self.engine.set_train_batch_size(micro * gas_now * self.world)
            started = time.perf_counter()
            total_loss, total_tokens = 0.0, 0
            per_cat = np.zeros(len(self.categories) + 8)
            per_cat_n = np.zeros(len(self.categories) + 8)
            finite = True
            for m in range(gas_now):
                rows = take[m * micro : (m + 1) * micro]
                ids = torch.from_numpy(ids_all[rows])
                cat, pos, seg = row_layout([spans_all[r] for r in rows], ids.shape[1], self.categories)
                loss_tok, target_cat = token_losses(self.engine, ids, cat, pos, seg, self.cfg.model.doc_mask)
                valid = target_cat >= 0
                n = int(valid.sum())
                loss = loss_tok.sum() / max(n, 1)  # the engine divides by the accumulation steps itself
                if not torch.isfinite(loss):
                    # no update from this micro-batch, but the engine still counts it: a zero loss
                    finite = False
                    loss = sum(p.sum() for p in self.engine.module.parameters()) * 0.0
                self.engine.backward(loss)
                if m == gas_now - 1:
                    own_norm = _grad_norm(self.engine.module)  # before the step clips and applies it
                self.engine.step()
                with torch.no_grad():
                    lt = loss_tok.detach().numpy()
                    tc = target_cat.numpy()
                    total_loss += float(lt[valid.numpy()].sum()) if finite else float("nan")
                    total_tokens += n
                    if len(per_cat) < len(self.categories):
                        per_cat = np.resize(per_cat, len(self.categories) + 8)
                        per_cat_n = np.resize(per_cat_n, len(self.categories) + 8)
                    per_cat += np.bincount(tc[valid.numpy()], weights=lt[valid.numpy()], minlength=len(per_cat))[: len(per_cat)]
                    per_cat_n += np.bincount(tc[valid.numpy()], minlength=len(per_cat_n))[: len(per_cat_n)]
            # every rank agrees on the step's loss and token count
            agg = torch.tensor([total_loss, float(total_tokens), *per_cat, *per_cat_n], dtype=torch.float64)
            torch.distributed.all_reduce(agg)
            total_loss, total_tokens = float(agg[0]), int(agg[1])
            k = len(per_cat)
            per_cat, per_cat_n = agg[2 : 2 + k].numpy(), agg[2 + k : 2 + 2 * k].numpy()
            step_loss = total_loss / max(total_tokens, 1)
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else own_norm
            self.state.step += 1
            self.state.row = take[-1] + 1
            seconds = time.perf_counter() - started
            self.state.tokens += total_tokens
            self.scheduler.tokens = self.state.tokens
            self.losses.append(step_loss)
            step_rows.append(take)
            self.step_ends.append(time.perf_counter())
            verdict = self.guard.observe(step_loss if finite else float("nan"), grad_norm)
            flops = model_flops_per_token(self.n_params, self.cfg.model.layers, self.cfg.model.hidden, ids.shape[1] - 1)
            tokens_per_s = total_tokens / max(seconds, 1e-9)
            record = {
                "step": self.state.step, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, "tokens": self.state.tokens, "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops / (self.cfg.peak_flops * self.world),
                "batch_sequences": len(take) * self.world, "starved_seconds": self.state.starved_seconds,
                "loss_by_category": {c: float(per_cat[i] / per_cat_n[i]) for i, c in enumerate(self.categories)
                                     if i < len(per_cat_n) and per_cat_n[i] > 0},
                "chunk": cid, "guard": verdict,
            }
            if self.state.step % self.cfg.eval_every == 0:
                record["perplexity_by_source"] = self.evaluate()
            self._metrics({k: v for k, v in record.items() if v is not None})
            if self.rank == 0 and (self.state.step % 25 == 0 or "perplexity_by_source" in record):
                cats = " ".join(f"{c} {v:.2f}" for c, v in sorted(record["loss_by_category"].items()))
                self.log(f"[train] step {self.state.step}: loss {step_loss:.3f} ({cats}), lr {record['lr']:.2e}, "
                         f"{tokens_per_s:,.0f} tokens/s, {self.state.tokens:,} tokens, {cid}")
            if verdict == "spike" and self.rank == 0:
                self.events(self.state.step, "spike", cid, f"loss {step_loss:.3f}")
            if verdict == "rollback":
                return self._rollback(cid, step_rows)
            if verdict == "ok":
                step_rows = []
                if self.state.step % self.cfg.checkpoint_every == 0:
                    self.checkpoint("every N steps")
            if self.max_steps is not None and self.state.step >= self.max_steps:
                return "stop"
        return "done"

    def _rollback(self, cid: str, step_rows: list[list[int]]) -> str:
        """Back to the last good checkpoint; the rows of the spiking steps are skipped from now on."""
        bad = sorted({r for rows in step_rows for r in rows})
        skip = dict(self.state.skip)
        skip[cid] = sorted(set(skip.get(cid, [])) | set(bad))
        rollbacks = dict(self.state.rollbacks)
        rollbacks[cid] = rollbacks.get(cid, 0) + 1
        spiked_at = self.state.step
        tags = self._checkpoints()
        if tags:
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tags[-1])
            self._load_client(client)
        self.state.skip, self.state.rollbacks = skip, rollbacks
        if self.rank == 0:
            self.events(spiked_at, "rollback", cid, f"to {tags[-1] if tags else 'the start'} (step {self.state.step})")
            self.events(spiked_at, "quarantine", cid, f"rows {bad[:20]}{'…' if len(bad) > 20 else ''} ({len(bad)} rows)")
        self.log(f"[train] loss spike at step {spiked_at} in {cid}: rolled back to step {self.state.step}, "
                 f"skipping {len(bad)} rows")
        if self.state.chunk_id != cid:
            self.state.chunk_id, self.state.row = cid, 0
        if rollbacks[cid] > self.cfg.spike.max_rollbacks_per_chunk:
            return "quarantined"
        return "retry"

    def run(self) -> list[float]:
        self._setup()
        self._seq_len = None
        idle_since = None
        self.log(f"[train] {self.cfg.run_name}: {self.n_params:,} parameters, stage {self.stage}, "
                 f"{self.world} process(es), ZeRO-{self.cfg.zero_stage}, run folder {self.run_dir}")
        while self.max_steps is None or self.state.step < self.max_steps:
            chunk = self._next_chunk()
            if chunk is not None and chunk.get("retry"):
                continue
            if chunk is not None and chunk["chunk_id"] != self.state.chunk_id:
                self.state.chunk_id, self.state.row = chunk["chunk_id"], 0  # a new chunk starts at its first row
            if chunk is None:
                now = time.perf_counter()
                idle_since = idle_since or now
                if self.exit_when_idle is not None and now - idle_since >= self.exit_when_idle:
                    self.log(f"[train] no ready chunk for {self.exit_when_idle:g} s: stopping")
                    break
                if self.rank == 0:
                    self.events(self.state.step, "starved", None, f"waiting {self.cfg.poll_seconds:g} s")
                time.sleep(self.cfg.poll_seconds)  # the daemon polls the chunk store
                self.state.starved_seconds += self.cfg.poll_seconds
                continue
            idle_since = None
            outcome = "retry"
            while outcome == "retry":
                outcome = self._train_chunk(chunk)
            if outcome == "stop":
                break
            if self.rank == 0:
                if outcome == "quarantined":
                    store.quarantine(self.lake, chunk, "loss kept spiking after rollbacks", job="trainer")
                    self.events(self.state.step, "quarantine", chunk["chunk_id"], "loss kept spiking after rollbacks")
                else:
                    store.set_status(self.lake, chunk, store.CONSUMED, job="trainer", consumed=True)
                    self.events(self.state.step, "consumed", chunk["chunk_id"], f"{self.state.tokens:,} tokens so far")
            self.state.chunk_id, self.state.row = None, 0
            self.checkpoint("chunk end")
        if self.rank == 0:
            self.jsonl.close()
            self.tb.close()
        return self.losses


def export(recipe: Recipe, out: str, tag: str | None = None) -> str:
    """A checkpoint (default: the latest) of the recipe's run → a Hugging Face folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.model import export_hf

    cfg = recipe.trainer
    ckpt_dir = Path(cfg.runs_dir or f"{recipe.lake}/runs") / cfg.run_name / "checkpoints"
    tags = sorted(p.name for p in ckpt_dir.glob("step-*")) if ckpt_dir.is_dir() else []
    if not tags:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first: tokenmill train --recipe {recipe.origin}")
    tag = tag or tags[-1]
    if cfg.zero_stage == 3:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    _, meta = load_tokenizer(recipe)
    stage = cfg.stage or recipe.feed.stage
    stage_cfg = cfg.stages.get(stage)
    theta = stage_cfg.rope_theta if stage_cfg and stage_cfg.rope_theta else cfg.model.rope_theta
    return export_hf(state, cfg.model, meta["model_vocab_size"], theta, f"{meta['folder']}/tokenizer.json", meta, out)


def main(argv: list[str] | None = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (in all)")
        parser.add_argument("--exit-when-idle", type=float, help="stop after this many seconds with no ready chunk")
        parser.add_argument("--export", metavar="FOLDER", help="export the latest checkpoint to a Hugging Face folder")
        parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher

    args, recipe = parse_with_recipe("tokenmill train", __doc__.split("\n\n")[0], argv, arguments)
    if recipe is None:
        return 2
    if args.export:
        print(f"exported to {export(recipe, args.export)}")
        return 0
    Trainer(recipe, args.max_steps, args.exit_when_idle).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
