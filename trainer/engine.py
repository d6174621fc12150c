"""The DeepSpeed engine, built from the recipe's trainer section and the stage the run is in.

``init_distributed`` joins the launcher's process group (or makes a single local one); ``build``
makes the Llama model (with the stage's RoPE base), AdamW with the stage's peak rate, the
token-based schedule, and hands them to ``deepspeed.initialize``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lake.trainer_sections import TrainerCfg
from trainer.model import build_model, parameter_count, parameter_groups
from trainer.schedule import accumulation_steps, batch_at, decay_drop, lr_factor


_LAUNCHED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what a launcher (deepspeed, torchrun) sets


def init_distributed() -> tuple[int, int]:
    """(rank, world): the launcher's process group, or a single local process. On DeepSpeed's CUDA
    accelerator each process takes GPU ``LOCAL_RANK`` and NCCL; on its CPU accelerator
    (``DS_ACCELERATOR=cpu``, or no GPU) gloo.

    A lone process (no launcher's ``MASTER_ADDR``/``MASTER_PORT``) keeps its group's store in memory:
    no port to pick, and nothing for a child process to inherit. It sets only ``RANK``, ``WORLD_SIZE``
    and ``LOCAL_RANK`` (DeepSpeed's engine reads ``LOCAL_RANK``); a child that inherits those is a lone
    process too. (CI once saw a trainer started by a test inherit the test process's ``MASTER_PORT``,
    whose store that process still held: ``EADDRINUSE``.)"""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() == "cuda"
    backend = "nccl" if on_gpu else "gloo"
    launched = all(k in os.environ for k in _LAUNCHED)
    if not launched and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing = [k for k in _LAUNCHED if k not in os.environ]
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the "
                           f"trainer with a launcher (deepspeed, torchrun) or set all of {', '.join(_LAUNCHED)}")
    if not launched:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        if launched:
            deepspeed.init_distributed(dist_backend=backend)
        else:
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def device_of(engine) -> torch.device:
    """Where the engine's weights live (DeepSpeed moved the module there): batches go there too."""
    return next(engine.module.parameters()).device


class AdamW(torch.optim.AdamW):
    """torch's AdamW that can be told to leave one step out: weights, moments and step count untouched
    (a step whose loss was not finite on some rank must not move anything, not even by momentum or
    weight decay). DeepSpeed calls ``step`` of this optimizer (or of its ZeRO/bf16 wrapper, which calls
    this one) at each accumulation boundary."""

    skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def base_optimizer(engine) -> AdamW:
    """The ``AdamW`` inside the engine's optimizer (DeepSpeed's ZeRO and bf16 wrappers hold it as ``.optimizer``)."""
    opt = engine.optimizer
    while not isinstance(opt, AdamW):
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise TypeError(f"the engine's optimizer {type(engine.optimizer).__name__} does not wrap trainer.engine.AdamW")
    return opt


def loss_scale(engine) -> float | None:
    """fp16's current dynamic loss scale (None without fp16)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    return float(getattr(opt, "loss_scale", None) or getattr(opt, "cur_scale", 1.0))


def skip_next_step(engine) -> None:
    """The engine's next optimizer step changes nothing (see ``AdamW``)."""
    base_optimizer(engine).skip_next = True


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


@dataclass(frozen=True)
class StageSettings:
    """What a stage of ``trainer.stages`` changes; None where the trainer section's value holds."""

    rope_theta: float | None
    rope_scaling: dict | None  # transformers' rope parameters of the stage's scaling
    lr_peak: float
    schedule_cfg: TrainerCfg
    decay_tokens: int | None


def stage_settings(cfg: TrainerCfg, stage: str) -> StageSettings:
    s = cfg.stages.get(stage)
    return StageSettings(
        rope_theta=s.rope_theta if s and s.rope_theta else None,
        rope_scaling=s.rope_scaling.parameters(cfg.model.max_positions) if s and s.rope_scaling else None,
        lr_peak=s.lr_peak if s and s.lr_peak else cfg.lr_peak,
        schedule_cfg=cfg.model_copy(update={"schedule": s.schedule}) if s and s.schedule else cfg,
        decay_tokens=s.decay_tokens if s else None,
    )


@dataclass
class Built:
    engine: object
    scheduler: TokenSchedule
    n_params: int


def build(cfg: TrainerCfg, stage: str, vocab_size: int, readers: int) -> Built:
    """Model, optimizer and schedule of the stage, wrapped by DeepSpeed (ZeRO stage, bf16, clipping);
    ``readers``: the processes that read rows of their own (the data-parallel world)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if cfg.fp16 and not accelerator.is_fp16_supported():
        raise ValueError(f"trainer.fp16: DeepSpeed's {accelerator.device_name()} accelerator has no fp16 on this device "
                         f"(a processor without fp16 kernels): use trainer.bf16, or train on a GPU")
    settings = stage_settings(cfg, stage)
    model = build_model(cfg.model, vocab_size, settings.rope_theta, settings.rope_scaling,
                        embedding_grad_scale=cfg.embedding_grad_scale)
    optimizer = AdamW(parameter_groups(model, cfg.weight_decay), lr=settings.lr_peak, betas=(0.9, 0.95), eps=cfg.adam_eps)
    scheduler = TokenSchedule(optimizer, settings.schedule_cfg, settings.lr_peak)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": accumulation_steps(batch_at(0, cfg.batch_ramp), cfg.micro_batch, readers),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # trainer.engine.AdamW: torch's AdamW with a skippable step
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": cfg.fp16, "loss_scale": 0, "initial_scale_power": cfg.loss_scale_power,
                 "loss_scale_window": cfg.loss_scale_window, "hysteresis": 1, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    n_params = parameter_count(model)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    if cfg.model.compile:
        engine.compile(compile_kwargs={"dynamic": True})  # rows' document buckets vary from batch to batch
    return Built(engine, scheduler, n_params)
