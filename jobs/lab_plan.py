"""The lab's plan (``lab.yaml``): which runs ``tokenmill lab`` makes, each a set of recipe overrides.

A plan names **variants** (a mix, a curriculum order, ``min_quality``, usage decay, learning rate,
batch size, model size, or any recipe key), compared at one token budget; and the **laws**: model
sizes × budgets (tokens, or compute C = 6·N·D), optionally batch sizes, and the larger run the fitted
laws predict. Every run becomes the base recipe plus its overrides (dotted keys, as ``load_recipe``
applies them) and the lab's own: the run's namespace in the lake (its chunks, usage and trainer tables
apart, the refined tables shared), its run folder, its batch and its schedule's length.
Validated on load: an error names the plan file and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lake.recipe import Recipe, RecipeError, explain, load_recipe, read_mapping
from lake.sections import Section
from lake.trainer_sections import ModelCfg

NAME = r"^[A-Za-z0-9_.-]+$"
ADAPTIVE_CHUNKS = 4  # an adaptive variant's budget comes in this many chunks (or more), made as it trains


class ModelSize(Section):
    """A Llama size: what of ``trainer.model`` a size changes."""

    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    ffn: int | None = Field(default=None, gt=0, description="default 8/3 · hidden rounded up to 64")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSize":
        ModelCfg(**self.model_dump())  # the trainer's own check: hidden divides by heads, heads by kv_heads
        return self

    def overrides(self) -> dict[str, Any]:
        return {f"trainer.model.{k}": v for k, v in self.model_dump().items() if v is not None}

    def parameters(self) -> int:
        """Non-embedding parameters (attention with grouped KV heads, SwiGLU MLP, RMSNorms): the N of the
        laws, as Kaplan et al. count it (embeddings dominate a tiny model and scale with the vocabulary)."""
        h, ffn = self.hidden, ModelCfg(**self.model_dump()).ffn_size
        attention = 2 * h * h + 2 * h * self.kv_heads * (h // self.heads)
        return self.layers * (attention + 3 * h * ffn + 2 * h) + h


class Variant(Section):
    """One variant of the comparison: each key unset keeps the base recipe's value."""

    stage: str | None = Field(default=None, description="the feed stage it trains (default the recipe's feed.stage)")
    mix: dict[str, float] | None = Field(default=None, description="category → share of the stage's tokens")
    adaptive: dict[str, Any] | None = Field(default=None, description="the stage's adaptive mix "
                                            "(feed.stages.<stage>.adaptive: bounds, strength)")
    curriculum: Literal["none", "easy_first", "hard_first"] | None = None
    curriculum_key: Literal["quality", "length"] = Field(default="quality", description="what easy and hard mean")
    min_quality: float | None = None
    decay: float | None = Field(default=None, gt=0, le=1, description="feed.decay: usage decay of a document's weight")
    lr: float | None = Field(default=None, gt=0, description="trainer.lr_peak")
    batch: int | None = Field(default=None, gt=0, description="sequences per step (the whole run)")
    model: ModelSize | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="any other recipe key, dotted: value")

    def recipe_overrides(self, base_stage: str) -> dict[str, Any]:
        stage = self.stage or base_stage
        at = f"feed.stages.{stage}"
        out: dict[str, Any] = {"feed.stage": stage} if self.stage else {}
        if self.mix is not None:
            out[f"{at}.mix"] = self.mix
        if self.adaptive is not None:
            out[f"{at}.adaptive"] = self.adaptive
        if self.curriculum == "none":
            out[f"{at}.curriculum.key"] = "none"
        elif self.curriculum is not None:
            out |= {f"{at}.curriculum.key": self.curriculum_key, f"{at}.curriculum.order": self.curriculum}
        if self.min_quality is not None:
            out[f"{at}.min_quality"] = self.min_quality
        if self.decay is not None:
            out["feed.decay"] = self.decay
        if self.lr is not None:
            out["trainer.lr_peak"] = self.lr
        return out | (self.model.overrides() if self.model else {}) | self.overrides


class Budgets(Section):
    """Each size's budgets: tokens, or compute (FLOPs, C = 6·N·D, so tokens D = C / 6N per size)."""

    tokens: list[int] | None = Field(default=None, min_length=2)
    compute: list[float] | None = Field(default=None, min_length=2)

    @model_validator(mode="after")
    def _one_kind(self) -> "Budgets":
        return _tokens_or_compute(self, "the budgets as tokens: [...] or as compute: [...]")


class Predict(Section):
    """The larger run the laws predict, then run: a size and a budget."""

    model: ModelSize
    tokens: int | None = Field(default=None, gt=0)
    compute: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_budget(self) -> "Predict":
        return _tokens_or_compute(self, "the predicted run's budget as tokens: N or as compute: C")


def _tokens_or_compute(section, what: str):
    if (section.tokens is None) == (section.compute is None):
        raise ValueError(f"give {what} (FLOPs), one of the two")
    return section


class Laws(Section):
    sizes: dict[str, ModelSize] = Field(min_length=3, description="name → model size; at least three")
    budgets: Budgets
    batch_sizes: list[int] = Field(default_factory=list, description="sequences per step: the largest budget "
                                   "run at each with batch_model, for the batch-size law (three or more; at the "
                                   "plan's batch it is the grid's run)")
    batch_model: str | None = Field(default=None, description="the size the batch runs use (default the middle one)")
    predict: Predict | None = None
    bootstrap: int = Field(default=200, ge=20, description="bootstrap resamples of each fit's confidence intervals")
    accuracy: bool = Field(default=True, description="few-shot accuracy at every evaluation, for loss → accuracy")

    @field_validator("sizes")
    @classmethod
    def _size_names(cls, value: dict[str, ModelSize]) -> dict[str, ModelSize]:
        _check_names(value, "laws.sizes")
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if value and (len(set(value)) < 3 or min(value) <= 0):
            raise ValueError(f"batch_sizes {value}: three or more different positive sizes (sequences per step)")
        return sorted(set(value))

    @model_validator(mode="after")
    def _batch_model_known(self) -> "Laws":
        if self.batch_model is not None and self.batch_model not in self.sizes:
            raise ValueError(f"batch_model {self.batch_model!r} is not one of sizes: {', '.join(self.sizes)}")
        return self

    @property
    def batch_size_name(self) -> str:
        return self.batch_model or sorted(self.sizes, key=lambda s: self.sizes[s].parameters())[len(self.sizes) // 2]


class Plan(Section):
    name: str = Field(default="lab", pattern=NAME, description="the lab's folder: <lake>/lab/<name>/")
    budget_tokens: int = Field(gt=0, description="every variant trains on this many tokens")
    batch: int = Field(default=8, gt=0, description="sequences per step, unless a variant sets its own")
    parallel: int = Field(default=2, ge=1, description="trainer processes at a time")
    threads_per_run: int = Field(default=1, ge=1, description="torch threads of each trainer process")
    evaluations: int = Field(default=4, ge=1, description="held-out evaluations per run; the last at its final step")
    base: dict[str, Any] = Field(default_factory=dict, description="recipe overrides (dotted keys) of every run")
    variants: dict[str, Variant] = Field(min_length=1)
    laws: Laws | None = None
    # where the plan came from, for messages; not a key a user writes
    origin: str = Field(default="<memory>", exclude=True)

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, Variant]) -> dict[str, Variant]:
        _check_names(value, "variants")
        return value


def _check_names(named: dict, key: str) -> None:
    import re

    bad = [n for n in named if not re.fullmatch(NAME[1:-1], n)]
    if bad:
        raise ValueError(f"{key} names {bad}: letters, digits, '_', '.', '-' only (they name folders)")


class PlanError(RecipeError):
    """A plan that cannot be used; the message names the plan file and the key."""


@dataclass(frozen=True)
class Run:
    """One trainer run of the lab: its name, what it is for, its recipe overrides and its budget."""

    name: str
    group: Literal["variant", "law", "batch", "predict"]
    overrides: dict[str, Any]
    tokens: int
    batch: int
    size: str | None = None  # laws: the size's name
    parameters: int | None = None  # laws: non-embedding parameters
    adaptive: bool = False  # its mix follows the trainer's signals: chunks are made while it trains


def load_plan(path: str | Path, name: str | None = None) -> Plan:
    """Read and validate a plan file (``--name`` replaces its name); PlanError names the key."""
    path = Path(path)
    raw = read_mapping(path, "plan", "at least budget_tokens: and variants: (see configs/lab.yaml)", PlanError)
    if name is not None:
        raw["name"] = name
    try:
        return Plan(**raw, origin=str(path))
    except ValidationError as err:
        raise PlanError(explain(err, str(path), Plan, what="lab plan")) from None


def plan_runs(plan: Plan, base: Recipe) -> list[Run]:
    """Every run of the plan, in the order the lab starts them: variants, the laws' grid, the batch runs,
    then the predicted run (which needs the laws fitted first)."""
    runs = [Run(name, "variant", variant.recipe_overrides(base.feed.stage), plan.budget_tokens, variant.batch or plan.batch,
                parameters=_size_of(variant.model, base).parameters(), adaptive=variant.adaptive is not None)
            for name, variant in plan.variants.items()]
    laws = plan.laws
    if laws is None:
        return runs
    for size_name, size in laws.sizes.items():
        for tokens in law_budgets(laws.budgets, size):
            runs.append(Run(f"law-{size_name}-{tokens}", "law", size.overrides(), tokens, plan.batch, size_name,
                            size.parameters()))
    batch_size = laws.sizes[laws.batch_size_name]
    most = max(law_budgets(laws.budgets, batch_size))
    for batch in (b for b in laws.batch_sizes if b != plan.batch):  # at plan.batch: the grid's run of that size
        runs.append(Run(f"batch-{batch}", "batch", batch_size.overrides(), most, batch, laws.batch_size_name,
                        batch_size.parameters()))
    if laws.predict is not None:
        target = laws.predict
        tokens = target.tokens or int(target.compute / (6 * target.model.parameters()))
        runs.append(Run("predict", "predict", target.model.overrides(), tokens, plan.batch, "predict",
                        target.model.parameters()))
    return runs


def law_budgets(budgets: Budgets, size: ModelSize) -> list[int]:
    """A size's token budgets: as given, or D = C / 6N of each compute budget."""
    if budgets.tokens is not None:
        return sorted(budgets.tokens)
    return sorted(int(c / (6 * size.parameters())) for c in budgets.compute)


def _size_of(model: ModelSize | None, base: Recipe) -> ModelSize:
    m = base.trainer.model
    return model or ModelSize(hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads, ffn=m.ffn)


def run_settings(plan: Plan, run: Run, recipe: Recipe) -> dict[str, Any]:
    """The lab's own overrides of a run (``recipe``: its recipe before them): its namespace, run folder,
    batch, schedule length, chunks whose rows are whole steps (a chunk's last step is never short, so
    every step trains ``batch`` rows; an adaptive run's budget in ``ADAPTIVE_CHUNKS`` chunks at least, each
    mixed by the signals of the steps before it), and when it is evaluated (``plan.evaluations`` times, the last at
    its final step; few-shot too, for the accuracy law)."""
    seq_len = recipe.feed.current.seq_len
    steps = steps_for(run.tokens, run.batch, seq_len)
    every = max(1, steps // plan.evaluations)
    steps_per_chunk = max(1, min(math.ceil(steps / ADAPTIVE_CHUNKS) if run.adaptive else steps,
                                 recipe.feed.chunk_tokens // ((seq_len + 1) * run.batch)))
    fewshot = every if plan.laws is not None and plan.laws.accuracy else 0
    return {"namespace": f"lab/{plan.name}/{run.name}",
            "trainer.runs_dir": f"{recipe.lake.rstrip('/')}/lab/{plan.name}/runs", "trainer.run_name": run.name,
            "trainer.batch_ramp": [[0, run.batch]], "trainer.micro_batch": max(d for d in range(1, 9) if run.batch % d == 0),
            "trainer.planned_tokens": steps * run.batch * seq_len, "feed.chunk_tokens": steps_per_chunk * run.batch * (seq_len + 1),
            "trainer.eval_every": every, "trainer.fewshot.every": fewshot}


def steps_for(tokens: int, batch: int, seq_len: int) -> int:
    """Optimizer steps that train ``tokens`` at ``batch`` rows of ``seq_len`` targets each (rounded up)."""
    return max(1, math.ceil(tokens / (batch * seq_len)))


def run_recipe(plan: Plan, run: Run, recipe_path: str | Path, lake: str | None = None) -> Recipe:
    """The run's recipe: the base file (its lake replaced by ``lake``) with the plan's, the run's and the
    lab's overrides; a PlanError names the run and the key at fault."""
    overrides = {**({"lake": lake} if lake else {}), **plan.base, **run.overrides}
    try:
        first = load_recipe(recipe_path, overrides)
        return load_recipe(recipe_path, overrides | run_settings(plan, run, first))
    except RecipeError as err:
        where = f"variants.{run.name}" if run.group == "variant" else f"laws ({run.name})"
        raise PlanError(f"lab plan {plan.origin}, {where}: its recipe is not valid with the overrides "
                        f"{sorted(overrides)}:\n{err}") from None
