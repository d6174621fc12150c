"""Spike mitigations as recipe options: skip-step (a function, then in the daemon on an injected
outlier), the z-loss, the embedding layer's shrunk gradient, Adam's epsilon; and RoPE scaling for
long-context stages, through export."""

from __future__ import annotations

import math
import random

import pytest

from tests.test_trainer import SPIKY, _events, _same, _setup, _weights


def test_skip_step_refuses_an_outlier_and_remembers_only_accepted_steps():
    from trainer.schedule import SkipStep

    rng = random.Random(0)
    rule = SkipStep(z=4.0, window=20, warmup_steps=5)
    verdicts = [rule(3.0 + rng.gauss(0, 0.05), 1.0 + rng.gauss(0, 0.05)) for _ in range(12)]
    assert not any(verdicts)
    remembered = len(rule.losses)
    assert rule(9.0, 1.0) and rule(3.0, 25.0)  # the loss, then the gradient norm, far out
    assert len(rule.losses) == remembered  # an outlier is not remembered
    assert not rule(3.02, 1.01) and len(rule.losses) == remembered + 1
    fresh = SkipStep(z=4.0, window=20, warmup_steps=5)
    assert not any(fresh(x, 1.0) for x in (3.0, 3.0, 50.0))  # during warm-up nothing is refused
    restored = SkipStep(z=4.0, window=20, warmup_steps=5)
    restored.load(rule.state())
    assert restored(9.0, 1.0) and restored.state() == rule.state() | {"seen": rule.seen + 1}


def test_skip_step_leaves_the_weights_of_an_outlier_step_and_rolls_nothing_back(tmp_path, monkeypatch):
    import trainer.step as step_module
    from trainer.callbacks import Callback, default_callbacks
    from trainer.loop import Trainer

    real, calls = step_module.token_losses, {"n": 0}

    def inflated(*args, **kwargs):  # the 14th micro-batch (step 14: one per step) scores 1000× its loss
        loss, cat = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * 1000.0, cat) if calls["n"] == 14 else (loss, cat)

    monkeypatch.setattr(step_module, "token_losses", inflated)

    class Watch(Callback):
        name = "watch"

        def __init__(self):
            self.seen = []

        def on_step_start(self, trainer):
            self.weights = _weights(trainer.engine.module)

        def on_step_end(self, trainer, step):
            self.seen.append((step.number, step.result.skipped, _same(self.weights, _weights(trainer.engine.module))))

    # this tiny model's gradient norm jumps fourfold by itself around step 10 (high learning rate, few
    # steps): verdicts start after that (warmup_steps) and the bar is high (skip_z), so that only the
    # injected step stands out
    recipe, lake = _setup(tmp_path, chunks=1, batch_ramp=[[0, 4]], spike={**SPIKY, "skip_z": 20.0, "warmup_steps": 12})
    watch = Watch()
    trainer = Trainer(recipe, exit_when_idle=0.1, callbacks=default_callbacks(recipe.trainer) + [watch])
    trainer.run()
    skipped = [s for s in watch.seen if s[1]]
    assert [s[0] for s in skipped] == [14], watch.seen[:20]
    assert skipped[0][2]  # the skipped step moved no weight
    # the others did (past the first steps, where the warm-up's learning rate is still about 0)
    assert all(not same for number, was_skipped, same in watch.seen if not was_skipped and number > 2)
    events = _events(lake)
    assert [e["step"] for e in events if e["event"] == "skip_step"] == [14]
    assert not [e for e in events if e["event"] == "rollback"]  # one outlier step: no rollback


def test_z_loss_is_logged_finite_and_adam_epsilon_is_the_recipes(tmp_path):
    import json
    from pathlib import Path

    from trainer.engine import base_optimizer
    from trainer.loop import Trainer

    recipe, _ = _setup(tmp_path, chunks=1, z_loss=1e-4, adam_eps=1e-6)
    trainer = Trainer(recipe, max_steps=8)
    trainer.run()
    assert {g["eps"] for g in base_optimizer(trainer.engine).param_groups} == {1e-6}
    records = [json.loads(x) for x in (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    z = [r["z_loss"] for r in records]
    assert len(z) == 8 and all(math.isfinite(v) and v > 0 for v in z)


def test_z_loss_terms_are_the_squared_log_partition_and_reach_the_gradients():
    import numpy as np
    import torch

    from lake.recipe import ModelCfg
    from trainer.model import build_model, row_layout, token_losses

    torch.manual_seed(0)
    model = build_model(ModelCfg(hidden=32, layers=1, heads=2, kv_heads=1), 100)
    ids = torch.tensor([list(range(3, 23))])
    spans = [[{"doc_id": "a", "pos": 0, "doc_start": 0, "length": 20, "doc_tokens": 20, "category": "en"}]]
    cat, pos, seg = row_layout(spans, 20, ["en"])
    z: list = []
    loss, _ = token_losses(model, ids, cat, pos, seg, doc_mask=False, z=z)
    logits = model(input_ids=ids[:, :-1]).logits.float()
    assert torch.allclose(z[0], torch.logsumexp(logits, -1) ** 2)
    head = model.lm_head.weight
    plain = torch.autograd.grad(loss.mean(), head, retain_graph=True)[0]
    with_z = torch.autograd.grad(loss.mean() + 1e-2 * z[0].mean(), head)[0]
    assert not np.allclose(plain.numpy(), with_z.numpy())


@pytest.mark.parametrize("tied", [False, True])
def test_a_shrunk_embedding_gradient_changes_only_what_reaches_the_embedding_through_its_output(tied):
    import torch

    from lake.recipe import ModelCfg
    from trainer.model import build_model, row_layout, token_losses

    ids = torch.tensor([list(range(3, 23))])
    spans = [[{"doc_id": "a", "pos": 0, "doc_start": 0, "length": 20, "doc_tokens": 20, "category": "en"}]]
    cat, pos, seg = row_layout(spans, 20, ["en"])
    grads, losses = {}, {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = build_model(ModelCfg(hidden=32, layers=1, heads=2, kv_heads=1, tie_embeddings=tied), 100,
                            embedding_grad_scale=scale)
        loss, _ = token_losses(model, ids, cat, pos, seg, doc_mask=False)
        loss.mean().backward()
        losses[scale] = loss.detach()
        grads[scale] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(losses[1.0], losses[0.1])  # the forward pass is the same
    emb = "model.embed_tokens.weight"
    for name, g in grads[1.0].items():
        if name != emb:
            assert torch.allclose(grads[0.1][name], g, atol=1e-7), name
    if not tied:
        assert torch.allclose(grads[0.1][emb], 0.1 * grads[1.0][emb], atol=1e-7)
    else:  # tied: the head's part of the shared matrix's gradient is unchanged, the input's shrinks
        assert not torch.allclose(grads[0.1][emb], grads[1.0][emb])


@pytest.fixture(scope="module")
def tokenizer_meta(tmp_path_factory):
    from jobs.synthetic_lake import make_lake

    folder = tmp_path_factory.mktemp("rope")
    _, tok, meta, _ = make_lake(str(folder / "lake"), n_docs=30)
    tok.save(str(folder / "tokenizer.json"))
    return meta, str(folder / "tokenizer.json")


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_positions": 16},
    {"rope_type": "llama3", "factor": 4.0, "original_max_positions": 16},
], ids=lambda s: s["rope_type"])
def test_each_rope_scaling_round_trips_through_export(tmp_path, tokenizer_meta, scaling):
    """A stage's RoPE scaling reaches the model, and the exported Hugging Face model computes the same
    logits on a sequence longer than the original context (and than max_positions: dynamic NTK)."""
    import torch
    from transformers import LlamaForCausalLM

    from lake.recipe import ModelCfg
    from lake.trainer_sections import RopeScaling
    from trainer.model import build_model, export_hf

    cfg = ModelCfg(hidden=32, layers=2, heads=2, kv_heads=1, max_positions=64)
    params = RopeScaling(**scaling).parameters(cfg.max_positions)
    meta, tokenizer_file = tokenizer_meta
    vocab = meta["model_vocab_size"]
    torch.manual_seed(0)
    ours = build_model(cfg, vocab, 50_000.0, params).eval()
    torch.manual_seed(0)
    plain = build_model(cfg, vocab, 50_000.0).eval()
    out = export_hf(ours.state_dict(), cfg, vocab, 50_000.0, tokenizer_file, meta,
                    str(tmp_path / "hf"), params)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.rope_parameters["rope_type"] == scaling["rope_type"]
    ids = torch.randint(3, vocab, (1, 96))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (ours, hf, plain))
    exported, scaled = float((a - b).abs().max()), float((a - c).abs().max())
    assert exported <= 1e-5, exported  # the Hugging Face model is ours
    assert scaled > 100 * max(exported, 1e-7), (scaled, exported)  # and the scaling changed it


def test_a_stages_rope_scaling_reaches_the_engines_model_settings(tmp_path):
    from trainer.engine import stage_settings

    recipe, _ = _setup(tmp_path, chunks=1, stages={"long": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_positions": 4096}}})
    long = stage_settings(recipe.trainer, "long")
    assert long.rope_theta == 500000.0
    assert long.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert stage_settings(recipe.trainer, "pretrain").rope_scaling is None


def test_fp16_survives_an_overflow_the_step_is_skipped_the_scale_halved_and_training_goes_on(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import trainer.step as step_module
    from trainer.callbacks import Callback, default_callbacks
    from trainer.loop import Trainer

    # DeepSpeed's CPU accelerator refuses fp16 where the processor has no fp16 kernels (oneDNN's check; AMD
    # EPYC has none): torch still computes fp16 there, so the loss scaling under test runs on any CPU
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    real, calls = step_module.token_losses, {"n": 0}

    def overflowing(*args, **kwargs):  # the 10th micro-batch's gradients overflow fp16 (65504) once scaled
        loss, cat = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * 1e9, cat) if calls["n"] == 10 else (loss, cat)

    monkeypatch.setattr(step_module, "token_losses", overflowing)

    class Watch(Callback):
        name = "watch"

        def __init__(self):
            self.seen = []

        def on_step_start(self, trainer):
            self.weights = _weights(trainer.engine.module)

        def on_step_end(self, trainer, step):
            self.seen.append((step.number, step.result.overflow, _same(self.weights, _weights(trainer.engine.module))))

    recipe, lake = _setup(tmp_path, chunks=1, batch_ramp=[[0, 4]], fp16=True, loss_scale_power=8,
                          loss_scale_window=1000, spike=SPIKY)
    watch = Watch()
    trainer = Trainer(recipe, max_steps=16, callbacks=default_callbacks(recipe.trainer) + [watch])
    losses = trainer.run()
    assert [(n, same) for n, overflow, same in watch.seen if overflow] == [(10, True)]  # skipped: no weight moved
    assert all(not same for n, overflow, same in watch.seen if n > 10)  # and training went on
    records = [json.loads(x) for x in (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    scale = {r["step"]: r["loss_scale"] for r in records}
    assert scale[9] == 256.0 and scale[10] == 128.0 and scale[16] == 128.0  # halved once, kept (window 1000)
    events = _events(lake)
    assert [e["step"] for e in events if e["event"] == "overflow"] == [10]
    assert not [e for e in events if e["event"] in ("rollback", "spike")]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    import numpy as np
    import torch

    from lake.recipe import ModelCfg
    from tests.test_trainer import _packed_rows
    from trainer.model import build_model, row_layout, token_losses

    ids, spans = _packed_rows(np.random.default_rng(2), 3, 40, ["en"])
    cat, pos, seg = row_layout(spans, 40, ["en"])
    out = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelCfg(hidden=32, layers=2, heads=2, kv_heads=1, activation_checkpointing=checkpointing), 300)
        model.train()
        loss, target_cat = token_losses(model, torch.as_tensor(ids), cat, pos, seg, doc_mask=True)
        loss[target_cat >= 0].sum().backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert model.is_activation_checkpointing
    assert torch.allclose(out[0][0], out[1][0], atol=1e-6)
    for name, grad in out[0][1].items():
        assert torch.allclose(out[1][1][name], grad, atol=1e-6), name


def test_the_daemon_trains_with_the_document_mask_as_the_dense_mask_would(tmp_path, monkeypatch):
    """``doc_mask: true`` in the daemon: every micro-batch's losses through ``segment_attention`` (with
    the buckets ``trainer.step`` makes from the spans) equal the dense mask's on the same weights."""
    import torch

    import trainer.step as step_module
    from trainer.loop import Trainer

    real, checked = step_module.token_losses, []

    def compared(model, ids, cat, pos, seg, doc_mask, buckets=None, **kwargs):
        loss, target_cat = real(model, ids, cat, pos, seg, doc_mask, buckets, **kwargs)
        assert doc_mask and buckets is not None
        with torch.no_grad():
            dense, _ = real(model, ids, cat, pos, seg, doc_mask, dense=True)
        valid = target_cat >= 0
        checked.append(float((loss.detach()[valid] - dense[valid]).abs().max()))
        return loss, target_cat

    monkeypatch.setattr(step_module, "token_losses", compared)
    recipe, _ = _setup(tmp_path, chunks=1, model={"doc_mask": True})
    losses = Trainer(recipe, max_steps=10).run()
    assert len(checked) >= 10 and max(checked) < 1e-4, checked
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # and it learns


@pytest.mark.parametrize("tied", [True, False])
def test_the_loss_a_piece_at_a_time_gives_the_same_losses_z_terms_and_gradients(tied):
    import numpy as np
    import torch

    from lake.recipe import ModelCfg
    from tests.test_trainer import _packed_rows
    from trainer.model import build_model, row_layout, token_losses

    ids, spans = _packed_rows(np.random.default_rng(3), 3, 40, ["en", "zh"])
    cat, pos, seg = row_layout(spans, 40, ["en", "zh"])
    out = []
    for chunk in (0, 17):  # 17 does not divide the 3 × 39 positions: the last piece is short
        torch.manual_seed(0)
        model = build_model(ModelCfg(hidden=32, layers=2, heads=2, kv_heads=1, tie_embeddings=tied), 300)
        z = []
        loss, target_cat = token_losses(model, torch.as_tensor(ids), cat, pos, seg, doc_mask=True, z=z, loss_chunk=chunk)
        valid = target_cat >= 0
        (loss[valid].sum() + 1e-2 * z[0][valid].sum()).backward()
        out.append((loss.detach(), z[0].detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, zs, grads), (chunked, chunked_z, chunked_grads) = out
    assert loss.shape == chunked.shape == (3, 39) and (loss > 0).sum() > 60
    assert torch.allclose(loss, chunked, atol=1e-6) and torch.allclose(zs, chunked_z, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6), name


def test_fp16_on_a_device_without_it_is_refused_naming_the_key_and_the_way_out(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from lake.trainer_sections import TrainerCfg
    from trainer.engine import build

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(ValueError, match=r"trainer\.fp16: .* no fp16 on this device .* use trainer\.bf16"):
        build(TrainerCfg(fp16=True), "pretrain", 300, 1)


def test_the_chunked_loss_is_refused_under_zero_3_naming_both_keys():
    from lake.trainer_sections import TrainerCfg

    with pytest.raises(ValueError, match=r"model\.loss_chunk needs zero_stage 0, 1 or 2"):
        TrainerCfg(zero_stage=3, model={"loss_chunk": 1024})
    assert TrainerCfg(zero_stage=2, model={"loss_chunk": 1024}).model.loss_chunk == 1024
