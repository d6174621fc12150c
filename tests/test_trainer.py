"""The streaming trainer: schedules and the spike guard as functions; then DeepSpeed on CPU end to
end on small lakes: loss falls, metrics per category and source, claims, resume, spikes, export."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, make_recipe
from trainer.schedule import SpikeGuard, accumulation_steps, batch_at, lr_factor

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".tokenmill" / "torch_extensions"))


# -- pure logic ----------------------------------------------------------------------------------------


def test_wsd_and_cosine_schedules():
    wsd = lambda p, shape="1-sqrt": lr_factor(p, "wsd", 0.01, 0.2, shape, 0.1)  # noqa: E731
    assert wsd(0.0) == 0.0 and abs(wsd(0.005) - 0.5) < 1e-9 and wsd(0.01) == 1.0
    assert wsd(0.5) == 1.0 and wsd(0.79) == 1.0  # stable
    for shape in ("cosine", "linear", "1-sqrt"):
        assert abs(wsd(1.0, shape) - 0.1) < 1e-6 and 0.1 < wsd(0.9, shape) < 1.0
        values = [wsd(0.8 + i / 100, shape) for i in range(21)]
        assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically
    assert abs(wsd(0.9, "linear") - 0.55) < 1e-9
    assert wsd(2.0) == pytest.approx(0.1)  # past the plan: the final rate
    cos = lambda p: lr_factor(p, "cosine", 0.0, 0.0, "cosine", 0.1)  # noqa: E731
    assert cos(0.0) == 1.0 and abs(cos(0.5) - 0.55) < 1e-9 and abs(cos(1.0) - 0.1) < 1e-9


def test_batch_ramp_by_tokens():
    ramp = [(0, 8), (1_000_000, 32), (10_000_000, 128)]
    assert [batch_at(t, ramp) for t in (0, 999_999, 1_000_000, 5e6, 2e7)] == [8, 8, 32, 32, 128]
    assert accumulation_steps(32, 4, 2) == 4 and accumulation_steps(8, 16, 1) == 1


def test_spike_guard_needs_persistence_and_catches_non_finite():
    guard = SpikeGuard(window=20, z=4.0, min_delta=0.5, patience=3, warmup_steps=10)
    for i in range(30):
        assert guard.observe(3.0 + 0.01 * (i % 5)) == "ok"
    assert guard.observe(9.0) == "spike"
    assert guard.observe(3.0) == "ok"  # one spike, then normal: no rollback
    assert [guard.observe(9.0) for _ in range(3)] == ["spike", "spike", "rollback"]
    fresh = SpikeGuard()
    assert fresh.observe(float("nan")) == "rollback"
    assert fresh.observe(2.0, grad_norm=float("inf")) == "rollback"


def test_outlier_rows_stand_out_from_the_accepted_rows_by_their_worst_document():
    import random

    import torch

    from trainer.schedule import outlier_rows
    from trainer.step import MIN_DOC_TOKENS, worst_document_loss

    rng = random.Random(0)
    reference = [rng.gauss(3.0, 0.3) for _ in range(40)]
    rows = {1: 3.2, 2: 7.0, 3: float("nan"), 4: 3.9, 5: float("inf")}
    assert outlier_rows(rows, reference, z=3.0, min_delta=0.5) == [2, 3, 5]
    assert outlier_rows(rows, reference, z=3.0, min_delta=5.0) == [3, 5]  # min_delta bounds the spread's limit
    assert outlier_rows(rows, reference[:7], z=3.0, min_delta=0.5) == []  # too few accepted rows to judge
    # row 0: a clean document (loss 2) and a corrupted one (loss 9) → 9, not their mean; row 1: every
    # document shorter than MIN_DOC_TOKENS → the row's mean; row 2: padding (ignored targets) left out
    n = MIN_DOC_TOKENS
    loss = torch.tensor([[2.0] * (2 * n) + [9.0] * n, [1.0] * (n - 1) + [3.0] * (n - 1) + [0.0] * (n + 2),
                         [4.0] * (2 * n) + [50.0] * n])
    seg = torch.tensor([[0] * (2 * n) + [1] * n, [0] * (n - 1) + [1] * (n - 1) + [-1] * (n + 2),
                        [0] * (2 * n) + [-1] * n])
    worst = worst_document_loss(loss, seg, seg >= 0)
    assert worst.tolist() == [9.0, 2.0, 4.0]


# -- DeepSpeed on CPU ----------------------------------------------------------------------------------


def _setup(tmp_path, name="lake", chunks=2, corrupt_second=False, corrupt_first=False, **trainer):
    """A lake with ``chunks`` ready chunks; ``corrupt_second`` / ``corrupt_first``: True (all of that
    chunk) or a range of its documents, whose tokens become random ids."""
    from jobs.synthetic_lake import add_chunk, make_lake

    lake, tok, meta, docs = make_lake(str(tmp_path / name))
    per = len(docs) // chunks
    for i in range(chunks):
        add_chunk(lake, f"pretrain-{i:06d}", docs[i * per : (i + 1) * per], tok, meta,
                  corrupt={0: corrupt_first, 1: corrupt_second}.get(i, False), seed=i)
    cfg = {"eval_docs": 5, "eval_every": 5, "checkpoint_every": 5, "micro_batch": 4, "batch_ramp": [[0, 4], [3000, 8]],
           "planned_tokens": 20000, "poll_seconds": 0.05, **trainer}
    recipe = make_recipe(tmp_path, [{"name": "t", "path": str(tmp_path / "x.jsonl")}], trainer=cfg)
    return recipe.model_copy(update={"lake": str(tmp_path / name)}), lake


def _events(lake) -> list[dict]:
    return sorted(lake.read_arrow("trainer_events").to_pylist(), key=lambda r: r["at"])


def test_trains_on_the_chunks_with_metrics_per_category_and_source(tmp_path):
    from lake.chunks import manifest
    from trainer.loop import Trainer

    recipe, lake = _setup(tmp_path)
    losses = Trainer(recipe, exit_when_idle=0.1).run()
    assert len(losses) > 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0  # the loss falls
    assert [r["status"] for r in manifest(lake)] == ["consumed", "consumed"]
    assert all(r["times_consumed"] == 1 for r in manifest(lake))
    run = Path(recipe.lake) / "runs" / "tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set().union(*(r["loss_by_category"] for r in records)) == {"zh", "en", "code"}
    assert sum(len(r["loss_by_category"]) == 3 for r in records) > len(records) / 2  # most steps mix all three
    assert all(math.isfinite(v) for r in records for v in r["loss_by_category"].values())
    evals = [r["perplexity_by_source"] for r in records if "perplexity_by_source" in r]
    assert evals and set(evals[-1]) == {"src_zh", "src_en", "src_code"} and evals[-1]["src_en"] < evals[0]["src_en"]
    assert all(k in records[-1] for k in ("lr", "grad_norm", "tokens_per_s", "mfu", "starved_seconds"))
    assert records[-1]["batch_sequences"] <= 8 and records[0]["batch_sequences"] == 4  # the ramp
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    kinds = [e["event"] for e in _events(lake)]
    assert kinds.count("claimed") == 2 and kinds.count("consumed") == 2 and "checkpoint" in kinds
    assert len(list((run / "checkpoints").glob("step-*"))) <= recipe.trainer.keep_checkpoints


def test_killed_and_restarted_the_run_continues_exactly(tmp_path):
    from trainer.loop import Trainer

    recipe, _ = _setup(tmp_path, "whole")
    whole = Trainer(recipe, max_steps=14).run()
    recipe2, lake2 = _setup(tmp_path, "broken")
    first = Trainer(recipe2, max_steps=12).run()  # checkpoints at 5 and 10, and 12 at the stop
    assert first == pytest.approx(whole[:12], rel=1e-6)
    # "killed" while saving step 12: what a kill mid-save leaves (the folder, part of a file, no COMPLETE marker)
    checkpoints = Path(recipe2.lake) / "runs" / "tiny" / "checkpoints"
    shutil.rmtree(checkpoints / "step-000000012")
    (checkpoints / "step-000000012").mkdir()
    (checkpoints / "step-000000012" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
    assert (checkpoints / "step-000000010" / "COMPLETE").exists()
    resumed = Trainer(recipe2, max_steps=14).run()  # resumes from step 10, the last complete save
    assert resumed == pytest.approx(whole[10:14], rel=1e-6, abs=1e-6)
    # metrics.jsonl holds each step once: steps 11 and 12 of the first try gave way to the resumed ones
    records = [json.loads(x) for x in (Path(recipe2.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 15))
    assert [r["loss"] for r in records[10:]] == pytest.approx(resumed, rel=1e-6)
    resumes = [e for e in _events(lake2) if e["event"] == "resumed"]
    assert len(resumes) == 1 and resumes[0]["step"] == 10 and resumes[0]["detail"].startswith("step-")


SPIKY = {"window": 10, "z": 3.0, "min_delta": 0.5, "patience": 2, "warmup_steps": 6, "max_rollbacks_per_chunk": 3}


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _watched_trainer():
    """A Trainer that records, at each rollback, the weights before it, the weights after it and the
    weights of the checkpoint it went back to (read from its files, before any later pruning)."""
    import torch

    from trainer.loop import Trainer

    class Watched(Trainer):
        def setup(self):
            super().setup()
            self.initial, self.rollbacks_seen = _weights(self.engine.module), []

        def rollback(self, cid, recent, *rows):
            self.spiking_steps = [list(r) for r in recent]
            before = _weights(self.engine.module)
            outcome = super().rollback(cid, recent, *rows)
            tag = self.checkpoints.tags()[-1]
            saved = torch.load(self.checkpoints.folder / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=False)["module"]
            self.rollbacks_seen.append({"tag": tag, "before": before, "after": _weights(self.engine.module), "saved": saved,
                                        "row": self.state.row})
            return outcome
    return Watched


def _rows_holding(lake, chunk_id: str, doc_ids: set) -> set[int]:
    from lake.chunks import manifest, read_rows

    _, spans = read_rows(lake, next(r for r in manifest(lake) if r["chunk_id"] == chunk_id))
    return {r for r, row in enumerate(spans) if any(s["doc_id"] in doc_ids for s in row)}


def test_a_loss_spike_rolls_back_skips_the_rows_and_recovers(tmp_path):
    from jobs.synthetic_lake import make_lake
    from lake.chunks import manifest

    # the second chunk's documents 10-19 are random tokens: two or three steps' worth of rows
    recipe, lake = _setup(tmp_path, chunks=2, corrupt_second=range(10, 20), checkpoint_every=2, spike=SPIKY)
    trainer = _watched_trainer()(recipe, exit_when_idle=0.1)
    losses = trainer.run()
    events = _events(lake)
    rollbacks = [e for e in events if e["event"] == "rollback"]
    quarantined = [e for e in events if e["event"] == "quarantine"]
    assert rollbacks and quarantined and quarantined[0]["chunk_id"] == "pretrain-000001"
    assert "rows" in quarantined[0]["detail"] and trainer.state.skip.get("pretrain-000001")
    # each rollback put back exactly the weights of the checkpoint it names, which training had left
    assert len(trainer.rollbacks_seen) == len(rollbacks)
    for seen, event in zip(trainer.rollbacks_seen, rollbacks):
        assert event["detail"].startswith(f"to {seen['tag']}")
        assert _same(seen["after"], seen["saved"]) and not _same(seen["before"], seen["saved"])
    # the skipped rows are exactly the rows holding a corrupted document from the row the rollback went
    # back to: no clean row is lost, and no corrupted row is trained on after the rollback (not those
    # at the edges of the spiking steps). Corrupted rows before it were trained in steps the guard
    # accepted before that checkpoint, which the rollback cannot undo.
    docs = make_lake(str(tmp_path / "same-docs"))[3]
    per = len(docs) // 2
    corrupted = _rows_holding(lake, "pretrain-000001", {d["doc_id"] for d in docs[per:][10:20]})
    skipped = set(trainer.state.skip["pretrain-000001"])
    restored = trainer.rollbacks_seen[0]["row"]
    assert skipped == {r for r in corrupted if r >= restored}, (restored, sorted(corrupted), sorted(skipped))
    assert max(skipped) > max(r for rows in trainer.spiking_steps for r in rows)  # rows after the spike too
    assert f"({len(skipped)} rows)" in quarantined[0]["detail"]
    # the rest of the chunk trained after the bad rows: it is consumed, and the loss is back down
    assert [r["status"] for r in manifest(lake)] == ["consumed", "consumed"]
    spike_peak = max(losses)
    assert losses[-1] < spike_peak - 2.0 and losses[-1] < min(losses[:10])


def test_a_chunk_that_keeps_spiking_is_quarantined(tmp_path):
    from lake.chunks import manifest
    from trainer.loop import Trainer

    recipe, lake = _setup(tmp_path, chunks=2, corrupt_second=True, checkpoint_every=2, spike=SPIKY)
    Trainer(recipe, exit_when_idle=0.1).run()
    statuses = {r["chunk_id"]: (r["status"], r["reason"]) for r in manifest(lake)}
    assert statuses["pretrain-000001"][0] == "quarantined" and "spiking" in statuses["pretrain-000001"][1]
    # the first rollback finds every row bad (the probe reads on to the chunk's end): quarantined at once
    assert len([e for e in _events(lake) if e["event"] == "rollback"]) == 1


def test_a_rollback_before_any_checkpoint_goes_back_to_the_initial_weights(tmp_path):
    # the first chunk's documents 40-51 are random: the spike comes before the first checkpoint (its end)
    recipe, lake = _setup(tmp_path, chunks=2, corrupt_first=range(40, 52), checkpoint_every=1000,
                          spike={**SPIKY, "window": 5})
    trainer = _watched_trainer()(recipe, exit_when_idle=0.1)
    trainer.run()
    rollbacks = [e for e in _events(lake) if e["event"] == "rollback"]
    assert rollbacks and rollbacks[0]["detail"] == "to step-000000000 (step 0)"
    first = trainer.rollbacks_seen[0]
    assert first["tag"] == "step-000000000"
    assert _same(first["after"], trainer.initial) and not _same(first["before"], trainer.initial)


def test_a_step_with_a_non_finite_loss_moves_no_weight_and_rolls_back(tmp_path, monkeypatch):
    import torch

    import trainer.step as step_module
    from trainer.callbacks import Callback, default_callbacks
    from trainer.engine import base_optimizer
    from trainer.loop import Trainer

    real, calls = step_module.token_losses, {"n": 0}

    def poisoned(*args, **kwargs):  # the 9th micro-batch's loss is infinite (an overflow, a bad row)
        loss, cat = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf"), cat) if calls["n"] == 9 else (loss, cat)

    monkeypatch.setattr(step_module, "token_losses", poisoned)

    class Watch(Callback):
        name = "watch"

        def __init__(self):
            self.bad = []

        def on_step_start(self, trainer):
            self.weights = _weights(trainer.engine.module)
            opt = base_optimizer(trainer.engine)
            self.moments = {id(p): opt.state[p]["exp_avg"].clone() for p in opt.state if "exp_avg" in opt.state[p]}

        def on_step_end(self, trainer, step):
            if not step.result.finite:
                opt = base_optimizer(trainer.engine)
                moments = {id(p): opt.state[p]["exp_avg"] for p in opt.state if "exp_avg" in opt.state[p]}
                self.bad.append((step.number, _same(self.weights, _weights(trainer.engine.module)),
                                 moments.keys() == self.moments.keys() and
                                 all(torch.equal(moments[k], self.moments[k]) for k in moments)))

    recipe, lake = _setup(tmp_path, chunks=1, checkpoint_every=3, spike={**SPIKY, "warmup_steps": 2})
    watch = Watch()
    trainer = Trainer(recipe, exit_when_idle=0.1, callbacks=[watch, *default_callbacks(recipe.trainer)])
    trainer.run()
    assert watch.bad and watch.bad[0][1:] == (True, True), watch.bad  # weights and Adam's moments as before the step
    rollbacks = [e for e in _events(lake) if e["event"] == "rollback"]
    assert rollbacks and rollbacks[0]["step"] == watch.bad[0][0]
    assert math.isnan(trainer.losses[watch.bad[0][0] - 1])


def test_stopping_at_max_steps_saves_a_checkpoint_and_keeps_the_chunk_claimed(tmp_path):
    from lake.chunks import manifest
    from trainer.loop import Trainer

    recipe, lake = _setup(tmp_path, chunks=1, checkpoint_every=5)
    Trainer(recipe, max_steps=7).run()
    checkpoints = Path(recipe.lake) / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*"))[-1] == "step-000000007"
    (row,) = manifest(lake)
    assert row["status"] == "training" and row["run_id"] == "tiny"
    stopped = [e for e in _events(lake) if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] == 7 and "stays claimed by tiny" in stopped[0]["detail"]
    Trainer(recipe, max_steps=9).run()  # the restart resumes at step 7, on the same chunk
    resumed = [e for e in _events(lake) if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 7 and resumed[0]["chunk_id"] == row["chunk_id"]
    assert [e["event"] for e in _events(lake)].count("claimed") == 1


def test_export_loads_in_transformers_and_generates(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from trainer.checkpoint import export
    from trainer.loop import Trainer

    recipe, _ = _setup(tmp_path, chunks=1)
    Trainer(recipe, max_steps=6).run()
    out = export(recipe, str(tmp_path / "hf"))
    model = LlamaForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the river", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 5
    # the exported weights are the trained ones: same logits as the checkpoint's model
    state = torch.load(sorted((Path(recipe.lake) / "runs" / "tiny" / "checkpoints").glob("step-*"))[-1]
                       / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    # the export is what the perplexity filter reads (score.perplexity.model)
    from quality_models.perplexity import PerplexityModel

    ppl = PerplexityModel(out, max_tokens=64).perplexity(["the river runs past the old mill and on to the sea", ""])
    assert 1 < ppl[0] < 10 * len(tok) and np.isnan(ppl[1])  # an empty document has none


def test_two_trainers_never_claim_the_same_chunk(tmp_path):
    from lake.chunks import claim_next
    from jobs.synthetic_lake import add_chunk, make_lake

    lake, tok, meta, docs = make_lake(str(tmp_path / "race"), n_docs=30)
    for i in range(4):
        add_chunk(lake, f"pretrain-{i:06d}", docs[i * 6 : (i + 1) * 6], tok, meta)
    barrier = threading.Barrier(2)
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    def worker(name):
        barrier.wait()
        while (row := claim_next(lake, "pretrain", name)) is not None:
            claimed[name].append(row["chunk_id"])

    threads = [threading.Thread(target=worker, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = claimed["a"] + claimed["b"]
    assert sorted(together) == [f"pretrain-{i:06d}" for i in range(4)]  # each exactly once
    owners = {r["chunk_id"]: r["run_id"] for r in lake.read_arrow("chunks").to_pylist()}
    assert all(owners[c] == name for name, cs in claimed.items() for c in cs)


def test_a_chunk_with_a_bad_checksum_is_quarantined_not_trained(tmp_path):
    from lake.chunks import chunk_dir, manifest
    from trainer.loop import Trainer

    recipe, lake = _setup(tmp_path)
    bad = manifest(lake)[0]
    path = Path(chunk_dir(recipe.lake, bad["chunk_id"])) / bad["files"][0]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    Trainer(recipe, exit_when_idle=0.1).run()
    statuses = {r["chunk_id"]: (r["status"], r["reason"]) for r in manifest(lake)}
    assert statuses["pretrain-000000"][0] == "quarantined" and "sha256" in statuses["pretrain-000000"][1]
    assert statuses["pretrain-000001"][0] == "consumed"


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_the_daemon_trains_on_each_device_present(tmp_path, device):
    """The daemon as a user starts it, on DeepSpeed's CPU accelerator, and on its CUDA one where there
    is a GPU (the other trainer tests run on whichever accelerator DeepSpeed picks in this process),
    from a process that has a process group of its own."""
    import yaml

    recipe, lake = _setup(tmp_path, chunks=1)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"lake": recipe.lake, "sources": [{"name": "t", "path": "x.jsonl"}],
                                           "trainer": recipe.trainer.model_dump(mode="json", exclude_none=True)}))
    # started from a process that trains itself (as a test, a notebook or a DAG task may be): the child
    # inherits that process's environment, and must still be a lone process of its own
    from trainer.engine import init_distributed

    init_distributed()
    env = {**os.environ, "DS_ACCELERATOR": device, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer.daemon", "--recipe", str(recipe_file), "--max-steps", "4"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"1 process(es) on {device}" in proc.stdout, proc.stdout[-2000:]
    records = [json.loads(x) for x in (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_two_processes_with_gloo_train_with_zero_2(tmp_path):
    import yaml

    recipe, lake = _setup(tmp_path, zero_stage=2)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "lake": recipe.lake, "sources": [{"name": "t", "path": "x.jsonl"}],
        "trainer": {**recipe.trainer.model_dump(mode="json", exclude_none=True)}}))
    port = str(29500 + os.getpid() % 1000)
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.daemon", "--recipe", str(recipe_file),
                                       "--max-steps", "6"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "2 process(es) on cpu, ZeRO-2" in outs[0]
    records = [json.loads(x) for x in (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["batch_sequences"] == 8  # 4 rows per process, two processes


def test_long_context_stage_continues_the_run_with_a_new_rope_base(tmp_path):
    from jobs.synthetic_lake import add_chunk
    from trainer.loop import Trainer

    from lake.recipe import TrainerStageCfg
    from lake.artifacts import load_tokenizer

    recipe, lake = _setup(tmp_path, chunks=1)

    tok, meta = load_tokenizer(recipe)
    docs = lake.read_arrow("documents_dedup").to_pylist()
    add_chunk(lake, "long-000000", docs[:60], tok, meta, seq_len=96, stage="long")
    pre = Trainer(recipe, exit_when_idle=0.1)
    pre_losses = pre.run()
    long = recipe.model_copy(update={"trainer": recipe.trainer.model_copy(update={
        "stage": "long", "stages": {"long": TrainerStageCfg(rope_theta=1e6)}})})
    trainer = Trainer(long, exit_when_idle=0.1)
    losses = trainer.run()
    model = trainer.engine.module
    assert model.config.rope_theta == 1e6
    expected = 1.0 / (1e6 ** (torch_arange(0, model.config.head_dim, 2) / model.config.head_dim))
    assert abs(float(model.model.rotary_emb.inv_freq[-1]) - float(expected[-1])) < 1e-9
    assert trainer.state.step > len(pre_losses)  # the same run, continued
    assert losses[0] < pre_losses[0] - 1.0  # it starts from the trained weights, not from scratch
    from lake.chunks import manifest

    assert {r["chunk_id"]: r["status"] for r in manifest(lake)}["long-000000"] == "consumed"


def torch_arange(*args):
    import torch

    return torch.arange(*args, dtype=torch.float64)


def test_continued_pretraining_starts_from_a_hugging_face_folder(tmp_path):
    from trainer.checkpoint import export
    from trainer.loop import Trainer

    recipe, _ = _setup(tmp_path, "base", chunks=1)
    base_losses = Trainer(recipe, exit_when_idle=0.1).run()
    folder = export(recipe, str(tmp_path / "hf"))
    cont, _ = _setup(tmp_path, "continued", chunks=1)
    cont = cont.model_copy(update={"trainer": cont.trainer.model_copy(update={
        "run_name": "cpt", "model": cont.trainer.model.model_copy(update={"init_from": folder})})})
    losses = Trainer(cont, max_steps=3).run()
    ended = sum(base_losses[-5:]) / 5  # where the base run ended (its very last step may be a short one)
    assert losses[0] < base_losses[0] - 1.0 and abs(losses[0] - ended) < 1.5


def test_anneal_stage_decays_the_learning_rate_from_its_start(tmp_path):
    from lake.recipe import TrainerStageCfg
    from lake.artifacts import load_tokenizer
    from trainer.loop import Trainer
    from jobs.synthetic_lake import add_chunk

    recipe, lake = _setup(tmp_path, chunks=1, warmup=0.0)
    tok, meta = load_tokenizer(recipe)
    docs = lake.read_arrow("documents_dedup").to_pylist()
    add_chunk(lake, "anneal-000000", docs[:90], tok, meta, stage="anneal")
    Trainer(recipe, exit_when_idle=0.1).run()
    anneal = recipe.model_copy(update={"trainer": recipe.trainer.model_copy(update={
        "stage": "anneal", "stages": {"anneal": TrainerStageCfg(decay_tokens=1500, lr_peak=0.001)}})})
    trainer = Trainer(anneal, exit_when_idle=0.1)
    trainer.run()
    records = [json.loads(x) for x in (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    stage_lrs = [r["lr"] for r in records if r["chunk"] == "anneal-000000"]
    before = [r["lr"] for r in records if r["chunk"] != "anneal-000000"]
    assert before[-1] == pytest.approx(recipe.trainer.lr_peak)  # still stable when the anneal began
    peak, final = 0.001, 0.001 * recipe.trainer.final_lr  # the stage's own peak, not the checkpoint's
    assert stage_lrs[0] == pytest.approx(peak) and stage_lrs[1] < peak  # the decay starts with the stage
    assert all(a >= b for a, b in zip(stage_lrs, stage_lrs[1:]))
    assert stage_lrs[-1] == pytest.approx(final)  # decayed to the floor within the stage's 1500 tokens


def test_document_mask_makes_a_packed_document_see_only_itself():
    import numpy as np
    import torch

    from lake.recipe import ModelCfg
    from trainer.model import build_model, row_layout, token_losses

    torch.manual_seed(0)
    model = build_model(ModelCfg(hidden=64, layers=2, heads=4, kv_heads=2), 300)
    model.eval()
    a, b = list(range(5, 25)), list(range(100, 131))
    row = torch.tensor([a + b + [0] * 4])  # pad at the end
    spans = [[{"doc_id": "a", "pos": 0, "doc_start": 0, "length": len(a), "doc_tokens": len(a), "category": "en"},
              {"doc_id": "b", "pos": len(a), "doc_start": 0, "length": len(b), "doc_tokens": len(b), "category": "zh"}]]
    cats = ["en", "zh"]
    cat, pos, seg = row_layout(spans, row.shape[1], cats)
    with torch.no_grad():
        packed, target_cat = token_losses(model, row, cat, pos, seg, doc_mask=True)
        alone_row = torch.tensor([b])
        c2, p2, s2 = row_layout([[{**spans[0][1], "pos": 0}]], len(b), cats)
        alone, _ = token_losses(model, alone_row, c2, p2, s2, doc_mask=True)
        unmasked, _ = token_losses(model, row, cat, pos, seg, doc_mask=False)
    inside_b = slice(len(a), len(a) + len(b) - 1)  # b's tokens predicting b's next tokens
    assert np.allclose(packed[0, inside_b].numpy(), alone[0].numpy(), atol=1e-5)
    assert not np.allclose(unmasked[0, inside_b].numpy(), alone[0].numpy(), atol=1e-3)  # without: a leaks in
    assert (target_cat[0, -4:] == -1).all() and float(packed[0, -4:].abs().sum()) == 0.0  # padding is ignored


def _packed_rows(rng, rows: int, width: int, cats: list[str]):
    """Rows of documents of random lengths (1 to width), some rows ending in padding."""
    spans, ids = [], []
    for r in range(rows):
        row, at, k = [], 0, 0
        while at < width - (3 if r % 2 else 0):
            n = min(int(rng.integers(1, width // 2)), width - at)
            row.append({"doc_id": f"{r}-{k}", "pos": at, "doc_start": int(rng.integers(0, 5)), "length": n,
                        "doc_tokens": n + 5, "category": cats[k % len(cats)]})
            at, k = at + n, k + 1
        spans.append(row)
        ids.append(rng.integers(3, 300, width))
    return np.array(ids), spans


def test_segment_buckets_cover_each_document_once_in_order():
    from trainer.model import row_layout, segment_buckets

    rng = np.random.default_rng(1)
    _, spans = _packed_rows(rng, 5, 64, ["en"])
    _, _, seg = row_layout(spans, 64, ["en"])
    seen = {}
    for gather, keep, dest in segment_buckets(seg):
        size = gather.shape[1]
        assert size & (size - 1) == 0  # a power of two
        assert (dest == gather.reshape(-1)[keep]).all()
        for g, k in zip(gather, keep.reshape(gather.shape)):
            real = g[k]
            assert (np.diff(real) == 1).all() and len(real) > size // 2 or size == 1  # contiguous, at most 2× padded
            seen[(int(real[0]) // 64, int(seg.reshape(-1)[real[0]]))] = real.tolist()
    want = {(r, k): list(range(r * 64 + s["pos"], r * 64 + s["pos"] + s["length"]))
            for r, row in enumerate(spans) for k, s in enumerate(row)}
    assert seen == want


def test_segment_attention_equals_the_dense_document_mask_in_losses_and_gradients():
    import torch

    from lake.recipe import ModelCfg
    from trainer.model import build_model, row_layout, token_losses

    torch.manual_seed(0)
    model = build_model(ModelCfg(hidden=64, layers=2, heads=4, kv_heads=2), 300)
    rng = np.random.default_rng(0)
    cats = ["en", "zh"]
    ids, spans = _packed_rows(rng, 4, 48, cats)
    cat, pos, seg = row_layout(spans, 48, cats)
    ids = torch.as_tensor(ids)
    results = []
    for dense in (False, True):
        model.zero_grad()
        loss_tok, target_cat = token_losses(model, ids, cat, pos, seg, doc_mask=True, dense=dense)
        valid = target_cat >= 0
        loss_tok[valid].sum().backward()
        results.append((loss_tok.detach()[valid], {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, fast_grads), (dense_loss, dense_grads) = results
    assert len(fast) > 100 and torch.allclose(fast, dense_loss, atol=1e-5), (fast - dense_loss).abs().max()
    for name, grad in dense_grads.items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_a_second_daemon_on_the_same_run_is_refused_and_a_dead_ones_lock_is_no_obstacle(tmp_path):
    from trainer.lease import RunBusyError, RunLock
    from trainer.loop import Trainer

    recipe, lake = _setup(tmp_path, chunks=1)
    run_dir = Path(recipe.lake) / "runs" / "tiny"
    held = RunLock(run_dir)
    held.acquire()  # a daemon training the run (flock: a second open of the file conflicts, as another process's would)
    with pytest.raises(RunBusyError, match=rf"run 'tiny' is being trained by pid {os.getpid()} on .*another trainer.run_name"):
        Trainer(recipe, max_steps=2).run()
    assert not lake.exists("trainer_events") or not _events(lake)  # it claimed nothing
    held.release()
    # a daemon that died holding it: the kernel dropped its lock with the process; the file alone blocks nothing
    code = "import sys; from trainer.lease import RunLock; RunLock(sys.argv[1]).acquire(); import os; os._exit(9)"
    died = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert died.returncode == 9 and "pid" in (run_dir / "LOCK").read_text()
    assert len(Trainer(recipe, max_steps=2).run()) == 2


def test_a_chunk_made_with_another_tokenizer_is_quarantined_with_the_reason_never_trained(tmp_path):
    from jobs.synthetic_lake import add_chunk, make_lake
    from lake.chunks import manifest
    from trainer.loop import Trainer

    recipe, lake = _setup(tmp_path, chunks=1)
    _, tok, meta, docs = make_lake(str(tmp_path / "elsewhere"))  # the same texts, another lake's tokenizer version
    retrained = {**meta, "version": "v2", "sha256": "0" * 64}
    add_chunk(lake, "pretrain-000001", docs[:40], tok, retrained, seed=1)
    trainer = Trainer(recipe, exit_when_idle=0.1)
    trainer.run()
    rows = {r["chunk_id"]: r for r in manifest(lake)}
    assert rows["pretrain-000000"]["status"] == "consumed"
    bad = rows["pretrain-000001"]
    assert bad["status"] == "quarantined" and bad["reason"].startswith(f"tokenized with tokenizer v2:{'0' * 64}, but the run trains with v1:")
    events = [e for e in _events(lake) if e["chunk_id"] == "pretrain-000001"]
    assert [e["event"] for e in events] == ["claimed", "quarantine"]
