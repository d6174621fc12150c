"""The recipe's ``trainer`` section: the model, the spike guard, RoPE scaling per stage, few-shot
evaluation and the run itself, each a pydantic model with its defaults and checks (the refinery's
sections are ``lake/sections.py``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lake.sections import Section


class ModelCfg(Section):
    """A Llama architecture (transformers' LlamaForCausalLM); the vocabulary comes from the tokenizer."""

    hidden: int = Field(default=128, gt=0)
    layers: int = Field(default=2, gt=0)
    heads: int = Field(default=4, gt=0)
    kv_heads: int = Field(default=2, gt=0, description="grouped-query attention: key/value heads")
    ffn: int | None = Field(default=None, description="SwiGLU size; default 8/3 · hidden rounded up to 64")
    rope_theta: float = 10_000.0
    max_positions: int = Field(default=16_384, gt=0)
    tie_embeddings: bool = True
    doc_mask: bool = Field(default=False, description="reset positions and mask attention at document boundaries")
    init_from: str | None = Field(default=None, description="continued pretraining: a Hugging Face model folder")
    activation_checkpointing: bool = Field(default=False, description="recompute each layer's activations in the "
                                           "backward pass: less memory, about a third more compute")
    compile: bool = Field(default=False, description="torch.compile the model (bench/attention measures it)")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelCfg":
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide by heads ({self.heads}), and heads by kv_heads "
                             f"({self.kv_heads})")
        return self

    @property
    def ffn_size(self) -> int:
        return self.ffn or -(-(8 * self.hidden // 3) // 64) * 64


class SpikeCfg(Section):
    window: int = Field(default=50, ge=5, description="recent losses the statistics use")
    z: float = Field(default=4.0, gt=0, description="a loss this many standard deviations above the mean is a spike")
    min_delta: float = Field(default=0.5, ge=0, description="... and at least this much above it")
    patience: int = Field(default=3, ge=1, description="consecutive spiking steps before a rollback")
    warmup_steps: int = Field(default=20, ge=0, description="no spike verdicts before this many steps")
    max_rollbacks_per_chunk: int = Field(default=2, ge=1, description="then the chunk is quarantined")
    max_skipped_share: float = Field(default=0.5, gt=0, le=1, description="a chunk with a larger share of its "
                                     "rows skipped as bad is quarantined whole")
    skip_z: float | None = Field(default=None, gt=0, description="skip-step: a step whose loss or gradient norm is "
                                 "this many standard deviations above the window's gets no update (OLMo-core: 6); "
                                 "off by default")


class RopeScaling(Section):
    """RoPE scaling for a longer context than the model was trained at (transformers' rope parameters)."""

    rope_type: Literal["linear", "dynamic", "yarn", "llama3"] = Field(
        description="linear (position interpolation), dynamic NTK, YaRN, or Llama 3's frequency-dependent scaling")
    factor: float = Field(gt=1, description="how many times longer a context than original_max_positions")
    original_max_positions: int | None = Field(default=None, gt=0, description="the context the model was trained "
                                               "at (yarn, llama3; default the model's max_positions; dynamic NTK "
                                               "scales what is longer than max_positions)")
    low_freq_factor: float = Field(default=1.0, gt=0, description="llama3 only")
    high_freq_factor: float = Field(default=4.0, gt=0, description="llama3 only")

    def parameters(self, max_positions: int) -> dict:
        """As transformers' ``rope_parameters`` (without the base)."""
        out = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type in ("yarn", "llama3"):  # dynamic NTK scales past the model's max_positions
            out["original_max_position_embeddings"] = self.original_max_positions or max_positions
        if self.rope_type == "llama3":
            out |= {"low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor}
        return out


class TrainerStageCfg(Section):
    rope_theta: float | None = Field(default=None, description="e.g. 1000000 for long context")
    rope_scaling: RopeScaling | None = Field(default=None, description="e.g. {rope_type: yarn, factor: 4, "
                                             "original_max_positions: 4096} for a 16k stage after 4k")
    lr_peak: float | None = None
    schedule: Literal["wsd", "cosine"] | None = None
    decay_tokens: int | None = Field(
        default=None, gt=0, description="anneal: from the stage's first step the LR decays (decay_shape) to "
        "final_lr over this many tokens")


class FewShotCfg(Section):
    """Few-shot multiple-choice evaluation (``trainer/fewshot.py``): in the loop every ``every`` steps,
    and on demand for any checkpoint with ``tokenmill eval``."""

    every: int = Field(default=0, ge=0, description="steps between few-shot evaluations in the loop; 0: none "
                       "there (tokenmill eval still runs them)")
    sets: dict[str, str] = Field(default_factory=dict, description="set name → a JSON Lines file (path or URI) of "
                                 "{question, choices, answer: index or the choice's text}")
    shots: int = Field(default=5, ge=0, description="solved examples of the same set (never the item asked) "
                       "before each question of the sets")
    builtin: bool = Field(default=True, description="also the set 'builtin' from the lake's held-out documents: "
                          "which of four continuations is the real one")
    builtin_shots: int = Field(default=0, ge=0, description="solved examples before each item of the built-in set")
    context_tokens: int = Field(default=48, gt=0, description="built-in set: the document's first tokens, at most")
    continuation_tokens: int = Field(default=16, gt=0, description="built-in set: tokens of each continuation; "
                                     "a document needs twice as many")
    max_items: int = Field(default=500, gt=0, description="items per set, at most (a file's first ones)")
    batch_tokens: int = Field(default=8192, gt=0, description="tokens per forward pass while scoring")
    seed: int = Field(default=0, description="chooses the shots and the built-in set's distractors")

    @field_validator("sets")
    @classmethod
    def _set_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name == "builtin" or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"set name {name!r}: letters, digits, '_', '.', '-' only, and not 'builtin' (the "
                                 f"built-in set's name)")
        return value


class SignalsCfg(Section):
    """Per-category loss and its slope, published to ``training_signals`` for an adaptive feed mix
    (``trainer.callbacks.TrainingSignals``). A Delta commit every ``every`` steps is cheap, but a lake
    whose feed never reads them need not grow a table: unset, it publishes only when the stage it
    trains has ``adaptive`` in its feed stage."""

    every: int | None = Field(default=None, ge=0, description="steps between publications (and one at the run's "
                              "end); 0: off; unset: 10 when the stage's feed mix is adaptive, else off")
    window: int = Field(default=20, ge=2, description="a category's last losses (one per step that held it) the "
                        "slope is fitted on, by least squares against the run's tokens")

    def steps(self, adaptive_feed: bool) -> int:
        """Steps between publications; 0: none."""
        return self.every if self.every is not None else (10 if adaptive_feed else 0)


class TrainerCfg(Section):
    run_name: str = Field(default="tiny", pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: str | None = Field(default=None, description="default: <lake>/runs")
    model: ModelCfg = ModelCfg()
    stage: str | None = Field(default=None, description="the feed stage whose chunks are trained on; default feed.stage")
    stages: dict[str, TrainerStageCfg] = Field(default_factory=dict, description="per-stage overrides")
    zero_stage: int = Field(default=0, ge=0, le=3)
    bf16: bool = False
    fp16: bool = Field(default=False, description="fp16 mixed precision with dynamic loss scaling (DeepSpeed's): "
                       "an overflowing step is skipped and the scale halved; it grows after loss_scale_window "
                       "clean steps")
    loss_scale_power: int = Field(default=16, ge=0, le=32, description="fp16: the first loss scale is 2^this")
    loss_scale_window: int = Field(default=1000, gt=0, description="fp16: clean steps before the scale doubles")
    micro_batch: int = Field(default=4, gt=0, description="sequences per process per forward pass")
    batch_ramp: list[tuple[int, int]] = Field(
        default_factory=lambda: [(0, 8)], description="[[tokens consumed, global batch in sequences], ...]")
    lr_peak: float = Field(default=3e-3, gt=0)
    schedule: Literal["wsd", "cosine"] = "wsd"
    warmup: float = Field(default=0.005, ge=0, lt=1, description="share of the planned tokens")
    decay: float = Field(default=0.2, ge=0, le=1, description="WSD: share of the planned tokens in the decay")
    decay_shape: Literal["cosine", "linear", "1-sqrt"] = "1-sqrt"
    final_lr: float = Field(default=0.1, ge=0, le=1, description="of the peak")
    planned_tokens: int = Field(default=2_000_000, gt=0, description="the schedule's length in tokens")
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_eps: float = Field(default=1e-8, gt=0, description="AdamW's epsilon (larger values damp updates of rarely "
                            "seen parameters; a spike mitigation)")
    z_loss: float = Field(default=0.0, ge=0, description="coefficient of the z-loss, mean (log Σ exp logits)² "
                          "(PaLM: 1e-4); logged as z_loss")
    embedding_grad_scale: float = Field(default=1.0, gt=0, le=1, description="the embedding layer's gradient "
                                        "shrunk by this factor (GLM-130B: 0.1); its output is unchanged")
    checkpoint_every: int = Field(default=100, gt=0, description="steps; also at every chunk's end")
    keep_checkpoints: int = Field(default=3, ge=1)
    eval_every: int = Field(default=50, gt=0, description="steps between held-out perplexity evaluations")
    eval_docs: int = Field(default=200, gt=0, description="held-out documents per source")
    fewshot: FewShotCfg = Field(default_factory=FewShotCfg, description="few-shot accuracy on multiple-choice sets")
    peak_flops: float = Field(default=1e12, gt=0, description="per device, for MFU (H100 bf16 dense: 989e12)")
    spike: SpikeCfg = SpikeCfg()
    signals: SignalsCfg = Field(default_factory=SignalsCfg, description="per-category loss slopes for an adaptive "
                                "feed mix (training_signals)")
    poll_seconds: float = Field(default=5.0, gt=0)
    seed: int = 0

    @field_validator("batch_ramp")
    @classmethod
    def _ramp_sorted(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not value or value[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(value, value[1:])):
            raise ValueError("batch_ramp starts at 0 tokens and its token marks increase: [[0, 8], [1000000, 32]]")
        return value

    @model_validator(mode="after")
    def _one_precision(self) -> "TrainerCfg":
        if self.bf16 and self.fp16:
            raise ValueError("trainer.bf16 and trainer.fp16 are both true: choose one mixed precision")
        return self
