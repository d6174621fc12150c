"""The recipe's ``feed`` section: the stages with their mixes (fixed or adaptive), sequence lengths and
curricula, and how chunks are drawn (``jobs/feed.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lake.sections import Section


class Curriculum(Section):
    """How documents are ordered within each chunk (and, with ``across_chunks``, between chunks)."""

    key: Literal["none", "quality", "length"] = "none"
    order: Literal["easy_first", "hard_first"] = "easy_first"  # easy = high quality / short
    buckets: int = Field(default=4, ge=1)
    across_chunks: bool = Field(default=False, description="walk the buckets over the stage's chunks too")


class AdaptiveMix(Section):
    """Each chunk's shares move from the stage's mix towards the categories whose loss the trainer sees
    still falling fastest, each within its bounds (``jobs/adaptive_mix.py``)."""

    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="category → [min, max], its share of a chunk's tokens (0..1); a category "
        "not named: [0.5, 1.5] × its share of the mix, within [0, 1]")
    strength: float = Field(default=1.0, ge=0, description="how far a signal moves the mix: a category's weight is "
                            "multiplied by up to e^strength (the fastest learner) or divided by as much; 0: the base mix")
    min_tokens: int = Field(default=0, ge=0, description="a signal counts once the run has trained this many tokens "
                            "(an early slope is noise); before, the base mix")
    run: str | None = Field(default=None, description="the trainer run whose signals (training_signals) steer the mix; "
                            "unset: trainer.run_name")
    favour: Literal["falling", "lagging"] = Field(
        default="falling", description="falling: towards the categories whose loss still falls fastest (ADO); "
        "lagging: towards those whose loss falls slowest, so none is left behind")


class FeedStage(Section):
    mix: dict[str, float] = Field(default_factory=lambda: {"zh": 4.0, "en": 4.0, "code": 2.0},
                                  description="category → share of tokens")
    seq_len: int = Field(default=2048, ge=8)
    min_quality: float | None = Field(default=None, description="only documents at least this good (anneal)")
    curriculum: Curriculum = Curriculum()
    adaptive: AdaptiveMix | None = Field(default=None, description="re-weight the mix for each chunk by the trainer's "
                                         "per-category loss slope, within bounds; unset: the fixed mix")

    @field_validator("mix")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError("mix needs at least one category with a positive share, and no negative share")
        return value

    @model_validator(mode="after")
    def _feasible_bounds(self) -> "FeedStage":
        if self.adaptive is None:
            return self
        unknown = sorted(set(self.adaptive.bounds) - {c for c, s in self.mix.items() if s > 0})
        if unknown:
            raise ValueError(f"adaptive.bounds names {unknown}, not a category with a share in the mix "
                             f"({', '.join(self.mix)})")
        for c, (lo, hi) in self.adaptive.bounds.items():
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"adaptive.bounds.{c} = [{lo:g}, {hi:g}]: a share's bounds are 0 ≤ min ≤ max ≤ 1")
        lows, highs = zip(*self.adaptive_bounds().values())
        if sum(lows) > 1 or sum(highs) < 1:
            raise ValueError(f"adaptive.bounds: the mins sum to {sum(lows):g} and the maxes to {sum(highs):g}; "
                             f"shares summing to 1 need mins ≤ 1 ≤ maxes")
        return self

    def adaptive_bounds(self) -> dict[str, tuple[float, float]]:
        """[min, max] share of each category with a share: ``adaptive.bounds``, else [0.5, 1.5] × its share."""
        total = sum(self.mix.values())
        given = self.adaptive.bounds if self.adaptive else {}
        return {c: tuple(given.get(c, (0.5 * s / total, min(1.0, 1.5 * s / total)))) for c, s in self.mix.items() if s > 0}


class Feed(Section):
    stage: str = Field(default="pretrain", description="the stage whose chunks feed makes now")
    stages: dict[str, FeedStage] = Field(default_factory=lambda: {"pretrain": FeedStage()})
    chunk_tokens: int = Field(default=1_000_000_000, gt=0)
    decay: float = Field(default=0.5, gt=0, le=1, description="a document's weight × decay ** times_used")
    repeat_cap: int = Field(default=4, ge=1, description="most copies of one document in one chunk")
    when_dry: Literal["repeat", "renormalize"] = Field(
        default="renormalize", description="a category without enough tokens: repeat its documents up to "
        "repeat_cap, or give its share to the others")
    seed: int = 0
    rows_per_file: int = Field(default=8192, gt=0)
    poll_seconds: float = Field(default=30.0, gt=0, description="--follow: how often to check the backlog")

    @model_validator(mode="after")
    def _stage_exists(self) -> "Feed":
        if self.stage not in self.stages:
            raise ValueError(f"feed.stage {self.stage!r} is not one of feed.stages: {', '.join(self.stages)}")
        return self

    @property
    def current(self) -> FeedStage:
        return self.stages[self.stage]
