"""Adaptive mixing: the rule and its projection (pure), the trainer's slopes, the ``training_signals``
round trip, older ``chunks`` tables, and feed writing a chunk with an adaptive mix end to end."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.adaptive_mix import CategorySignal, adaptive_mix, chunk_mix, learning_speed, project_to_bounds
from lake import chunks
from lake.recipe import RecipeError
from lake.feed_sections import AdaptiveMix, FeedStage
from lake.signals import latest_signals, publish_signals
from lake.tables import Lake
from lake.trainer_sections import SignalsCfg, TrainerCfg
from tests.conftest import make_recipe
from trainer.callbacks import TrainingSignals, default_callbacks, least_squares_slope
from trainer.step import StepResult

TOL = 1e-9


# -- the projection -------------------------------------------------------------------------------------


@st.composite
def weights_and_bounds(draw):
    """Positive weights and feasible bounds: every min ≤ 1/n ≤ every max, so mins ≤ 1 ≤ maxes."""
    n = draw(st.integers(2, 6))
    cats = [f"c{i}" for i in range(n)]
    weights = {c: draw(st.floats(1e-3, 1e3)) for c in cats}
    bounds = {c: (draw(st.floats(0, 1 / n)), draw(st.floats(1 / n, 1))) for c in cats}
    return weights, bounds


def _assert_in_bounds(shares, bounds):
    assert abs(sum(shares.values()) - 1) < TOL
    for c, s in shares.items():
        lo, hi = bounds.get(c, (0.0, 1.0))
        assert lo - TOL <= s <= hi + TOL, (c, s, lo, hi)


@settings(max_examples=300, deadline=None)
@given(weights_and_bounds())
def test_the_projection_sums_to_one_within_bounds_and_scales_the_free_categories_alike(case):
    """The KL projection's optimality conditions: one λ with x = clip(λ·w, min, max) for every category."""
    weights, bounds = case
    x = project_to_bounds(weights, bounds)
    _assert_in_bounds(x, bounds)
    free = [c for c in x if bounds[c][0] + TOL < x[c] < bounds[c][1] - TOL]
    if free:
        lam = max(x[c] / weights[c] for c in free)
        for c, w in weights.items():
            assert x[c] == pytest.approx(min(max(lam * w, bounds[c][0]), bounds[c][1]), rel=1e-6, abs=1e-12), c
    else:  # every category at a bound: some λ puts the ones at their max there and the ones at their min there
        movable = [c for c in x if bounds[c][1] - bounds[c][0] > TOL]
        at_max = [bounds[c][1] / weights[c] for c in movable if x[c] >= bounds[c][1] - TOL]
        at_min = [bounds[c][0] / weights[c] for c in movable if x[c] <= bounds[c][0] + TOL]
        assert max(at_max, default=0.0) <= min(at_min, default=math.inf) * (1 + 1e-6) + 1e-12


def test_the_projection_on_a_worked_example_and_inside_its_bounds():
    # c would take 100/102 of the mix: held at its max, the rest shared by a and b as their weights are
    got = project_to_bounds({"a": 1, "b": 1, "c": 100}, {"a": (0.1, 0.5), "b": (0.2, 0.3), "c": (0.0, 0.5)})
    assert got == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})
    # b's max binds too: a takes the rest
    got = project_to_bounds({"a": 1, "b": 3, "c": 100}, {"a": (0.1, 0.5), "b": (0.2, 0.3), "c": (0.0, 0.5)})
    assert got == pytest.approx({"a": 0.2, "b": 0.3, "c": 0.5})
    # weights whose shares are inside the bounds: just normalised
    got = project_to_bounds({"a": 2, "b": 6}, {"a": (0.1, 0.9), "b": (0.1, 0.9)})
    assert got == pytest.approx({"a": 0.25, "b": 0.75})
    # a min that lifts a tiny category, the others giving in proportion
    got = project_to_bounds({"a": 1e-6, "b": 1, "c": 3}, {"a": (0.2, 1.0)})
    assert got == pytest.approx({"a": 0.2, "b": 0.2, "c": 0.6})


def test_the_projection_refuses_infeasible_bounds_and_non_positive_weights():
    with pytest.raises(ValueError, match="the mins sum to 1.2"):
        project_to_bounds({"a": 1, "b": 1}, {"a": (0.6, 1), "b": (0.6, 1)})
    with pytest.raises(ValueError, match="the maxes to 0.8"):
        project_to_bounds({"a": 1, "b": 1}, {"a": (0, 0.4), "b": (0, 0.4)})
    with pytest.raises(ValueError, match="category 'b' has weight 0"):
        project_to_bounds({"a": 1, "b": 0}, {})


# -- the rule ---------------------------------------------------------------------------------------------

BASE = {"zh": 4.0, "en": 4.0, "code": 2.0}
BOUNDS = FeedStage(adaptive=AdaptiveMix()).adaptive_bounds()  # [0.5, 1.5] × each share


def _curve_signal(loss_at, tokens: int, window: int = 20, per_step: int = 1000) -> CategorySignal:
    """The signal the trainer would publish of a loss curve: its last ``window`` points, fitted."""
    points = [(t, loss_at(t)) for t in range(tokens - (window - 1) * per_step, tokens + 1, per_step)]
    return CategorySignal(sum(y for _, y in points) / window, least_squares_slope(points), tokens, tokens // per_step)


@st.composite
def signals(draw):
    out = {}
    for c in draw(st.lists(st.sampled_from(list(BASE)), unique=True)):
        out[c] = CategorySignal(draw(st.floats(0.01, 20)), draw(st.floats(-1e-2, 1e-2)), draw(st.integers(0, 10**9)), 1)
    return out


@settings(max_examples=300, deadline=None)
@given(signals(), st.floats(0, 20), st.integers(0, 10**9))
def test_the_adaptive_mix_stays_within_its_bounds_whatever_the_signal(signal, strength, min_tokens):
    _assert_in_bounds(adaptive_mix(BASE, BOUNDS, signal, strength, min_tokens), BOUNDS)


def test_the_mix_moves_towards_the_category_whose_loss_still_falls_and_away_from_the_flattened_one():
    """zh's loss still falls at 50k tokens, en's flattened long before (it decays 20x faster), code is
    between: zh gains share, en loses it, more so the stronger the rule, and never past the bounds."""
    now = 50_000
    signal = {"zh": _curve_signal(lambda t: 2.0 + 3.0 * math.exp(-t / 40_000), now),
              "en": _curve_signal(lambda t: 2.5 + 3.0 * math.exp(-t / 2_000), now),
              "code": _curve_signal(lambda t: 1.5 + 2.0 * math.exp(-t / 15_000), now)}
    assert signal["en"].slope < 0 and learning_speed(signal["en"]) < learning_speed(signal["code"]) < learning_speed(signal["zh"])
    weak, strong = (adaptive_mix(BASE, BOUNDS, signal, s) for s in (0.5, 2.0))
    assert weak["zh"] > 0.4 and weak["en"] < 0.4
    assert strong["zh"] > weak["zh"] and strong["en"] < weak["en"]
    extreme = adaptive_mix(BASE, BOUNDS, signal, 50.0)
    assert extreme["zh"] == pytest.approx(BOUNDS["zh"][1]) and extreme["en"] == pytest.approx(BOUNDS["en"][0])
    _assert_in_bounds(extreme, BOUNDS)
    # favour: lagging turns the rule round: towards the slower-falling en, away from zh
    lagging = adaptive_mix(BASE, BOUNDS, signal, 2.0, favour="lagging")
    assert lagging["en"] > 0.4 > lagging["zh"] and lagging["en"] > strong["en"] and lagging["zh"] < strong["zh"]
    _assert_in_bounds(lagging, BOUNDS)
    # the loss falling as fast in relative terms everywhere: no reason to move
    same = {c: CategorySignal(3.0, -3e-5, now, 50) for c in BASE}
    assert adaptive_mix(BASE, BOUNDS, same, 2.0) == pytest.approx({"zh": 0.4, "en": 0.4, "code": 0.2})


def test_without_a_signal_the_base_mix_and_a_category_without_one_keeps_its_base_weight():
    assert adaptive_mix(BASE, BOUNDS, {}, 3.0) == pytest.approx({"zh": 0.4, "en": 0.4, "code": 0.2})
    early = {"zh": CategorySignal(3.0, -1e-3, 500, 1), "en": CategorySignal(3.0, 0.0, 500, 1)}
    assert adaptive_mix(BASE, BOUNDS, early, 3.0, min_tokens=1000) == pytest.approx({"zh": 0.4, "en": 0.4, "code": 0.2})
    # zh falls, en is flat, code has no signal: z = +1/2 and -1/2, code's weight stays its base share
    wide = {c: (0.0, 1.0) for c in BASE}
    later = {"zh": CategorySignal(3.0, -1e-3, 5000, 9), "en": CategorySignal(3.0, 0.0, 5000, 9)}
    got = adaptive_mix(BASE, wide, later, 1.0)
    weights = {"zh": 0.4 * math.exp(0.5), "en": 0.4 * math.exp(-0.5), "code": 0.2}
    assert got == pytest.approx({c: w / sum(weights.values()) for c, w in weights.items()})
    # bounds that exclude the base mix: it is moved into them
    assert adaptive_mix(BASE, {"code": (0.3, 0.5)}, {}, 1.0) == pytest.approx({"zh": 0.35, "en": 0.35, "code": 0.3})


# -- the recipe -------------------------------------------------------------------------------------------


def _adaptive_recipe(tmp_path, **adaptive):
    return make_recipe(tmp_path, [{"name": "t", "path": str(tmp_path / "x.jsonl")}],
                       feed={"stages": {"pretrain": {"mix": BASE, "adaptive": adaptive}}})


def test_the_recipe_checks_the_bounds_and_names_the_key(tmp_path):
    recipe = _adaptive_recipe(tmp_path, bounds={"code": [0.1, 0.5]}, strength=2)
    bounds = recipe.feed.current.adaptive_bounds()
    assert [bounds[c] for c in BASE] == [pytest.approx((0.2, 0.6)), pytest.approx((0.2, 0.6)), (0.1, 0.5)]
    with pytest.raises(RecipeError, match=r"feed\.stages\.pretrain.*adaptive\.bounds names \['math'\]"):
        _adaptive_recipe(tmp_path, bounds={"math": [0.1, 0.2]})
    with pytest.raises(RecipeError, match=r"adaptive\.bounds\.zh = \[0\.6, 0\.5\]"):
        _adaptive_recipe(tmp_path, bounds={"zh": [0.6, 0.5]})
    with pytest.raises(RecipeError, match=r"the mins sum to 1\.2"):
        _adaptive_recipe(tmp_path, bounds={"zh": [0.9, 1.0]})
    with pytest.raises(RecipeError, match=r"adaptive\.strength"):
        _adaptive_recipe(tmp_path, strength=-1)
    assert make_recipe(tmp_path, [{"name": "t", "path": "x"}]).feed.current.adaptive is None  # off by default


def test_signals_are_published_only_where_asked_or_where_the_feed_is_adaptive():
    assert SignalsCfg().steps(adaptive_feed=False) == 0 and SignalsCfg().steps(adaptive_feed=True) == 10
    assert SignalsCfg(every=0).steps(adaptive_feed=True) == 0 and SignalsCfg(every=3).steps(adaptive_feed=False) == 3
    assert "training_signals" not in [cb.name for cb in default_callbacks(TrainerCfg())]
    names = [cb.name for cb in default_callbacks(TrainerCfg(), adaptive_feed=True)]
    assert names.index("spike_guard") < names.index("training_signals") < names.index("metrics")


# -- the trainer's side -------------------------------------------------------------------------------------


def test_least_squares_slope_of_a_line_and_of_too_few_points():
    assert least_squares_slope([(x, 3.0 - 2e-4 * x) for x in range(0, 10_000, 1000)]) == pytest.approx(-2e-4)
    assert least_squares_slope([(0, 1.0), (1, 3.0), (2, 2.0)]) == pytest.approx(0.5)
    assert least_squares_slope([(5, 1.0)]) is None and least_squares_slope([(5, 1.0), (5, 2.0)]) is None


class _Trainer:
    """A stand-in for the loop: a lake, a run name, the tokens so far."""

    def __init__(self, lake, rank=0):
        self.lake, self.rank = lake, rank
        self.cfg = SimpleNamespace(run_name="run-a")
        self.state = SimpleNamespace(step=0, tokens=0)


def _train(callback, trainer, steps, loss_at, verdict=lambda n: "ok"):
    """``steps`` steps of 100 tokens each; category c's loss is ``loss_at(c, tokens)``."""
    for _ in range(steps):
        trainer.state.step += 1
        trainer.state.tokens += 100
        losses = {c: loss_at(c, trainer.state.tokens) for c in ("zh", "en")}
        result = StepResult(loss=1.0, tokens=100, finite=True, grad_norm=1.0, loss_by_category=losses, seconds=0.1,
                            seq_len=8)
        step = SimpleNamespace(number=trainer.state.step, result=result, verdict=verdict(trainer.state.step))
        callback.on_step_end(trainer, step)


def _bent(c, t):
    """zh falls by 1e-3 per token throughout; en falls as fast until 1000 tokens, then stays flat."""
    return 5.0 - 1e-3 * t if c == "zh" else 5.0 - 1e-3 * min(t, 1000)


def test_the_trainer_publishes_each_categorys_windowed_loss_and_slope_and_feed_reads_the_latest(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    callback, trainer = TrainingSignals(every=5, window=4), _Trainer(lake)
    _train(callback, trainer, 20, _bent, verdict=lambda n: "spike" if n == 19 else "ok")
    rows = lake.read_arrow("training_signals").to_pylist()
    assert sorted({r["step"] for r in rows}) == [5, 10, 15, 20] and {r["run_id"] for r in rows} == {"run-a"}
    latest = latest_signals(lake, "run-a")
    assert set(latest) == {"zh", "en"} and {r["step"] for r in latest.values()} == {20}
    # the window holds steps 16, 17, 18 and 20 (19 spiked): en flat since 1000 tokens, zh still falling
    assert latest["zh"]["slope"] == pytest.approx(-1e-3) and latest["en"]["slope"] == pytest.approx(0.0, abs=1e-12)
    assert latest["zh"]["loss"] == pytest.approx(5.0 - 1e-3 * (1600 + 1700 + 1800 + 2000) / 4)
    assert latest["en"]["tokens"] == 2000
    callback.on_run_end(trainer)  # nothing new since step 20: no second row for it
    assert lake.read_arrow("training_signals").num_rows == len(rows)
    # a run that resumes from its checkpoint fits on the same window
    resumed = TrainingSignals(every=5, window=4)
    resumed.load_state_dict(json.loads(json.dumps(callback.state_dict())))
    assert resumed.signals() == callback.signals() and resumed.published == 20
    # another run's later row is the lake's latest, not run-a's
    publish_signals(lake, "run-b", 3, 300, {"zh": (4.0, -2e-3)})
    assert latest_signals(lake)["zh"]["run_id"] == "run-b" and latest_signals(lake, "run-a")["zh"]["step"] == 20
    assert latest_signals(Lake(str(tmp_path / "empty"))) == {}


def test_only_rank_zero_publishes(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    callback = TrainingSignals(every=2, window=4)
    _train(callback, _Trainer(lake, rank=1), 4, _bent)
    assert not lake.exists("training_signals") and set(callback.signals()) == {"zh", "en"}


def test_a_publication_that_fails_is_logged_and_training_goes_on(tmp_path, monkeypatch):
    import trainer.callbacks as callbacks_module

    def broken(*args, **kwargs):
        raise OSError("the object store said 503")

    monkeypatch.setattr(callbacks_module, "publish_signals", broken)
    trainer, said = _Trainer(Lake(str(tmp_path / "lake"))), []
    trainer.log = said.append
    callback = TrainingSignals(every=2, window=4)
    _train(callback, trainer, 4, _bent)
    assert len(said) == 2 and "step 4: training_signals not published (OSError: the object store said 503)" in said[1]
    assert callback.published == 4 and set(callback.signals()) == {"zh", "en"}


def test_feed_reads_the_signal_into_the_chunks_mix(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    stage = FeedStage(mix=BASE, adaptive=AdaptiveMix(strength=1.0, min_tokens=1000))
    fixed = chunk_mix(lake, FeedStage(mix=BASE), "tiny")
    assert fixed.shares == pytest.approx({"zh": 0.4, "en": 0.4, "code": 0.2}) and fixed.signal_json() is None
    assert chunk_mix(lake, stage, "tiny").shares == pytest.approx(fixed.shares)  # no signal yet
    publish_signals(lake, "tiny", 40, 4000, {"zh": (3.0, -1e-4), "en": (3.0, -1e-6), "code": (2.0, -5e-5)})
    publish_signals(lake, "other", 50, 5000, {"en": (3.0, -1e-2)})  # another run's: not this feed's
    mix = chunk_mix(lake, stage, "tiny")
    expected = adaptive_mix(BASE, stage.adaptive_bounds(), {c: CategorySignal.from_row(r) for c, r in
                                                             latest_signals(lake, "tiny").items()}, 1.0)
    assert mix.shares == pytest.approx(expected) and mix.shares["zh"] > 0.4 > mix.shares["en"]
    recorded = json.loads(mix.signal_json())
    assert recorded["run"] == "tiny" and recorded["signals"]["zh"] == {"loss": 3.0, "slope": -1e-4, "tokens": 4000,
                                                                     "step": 40}


@pytest.mark.slow
def test_a_trainer_run_on_an_adaptive_stage_publishes_by_default(tmp_path):
    from lake.feed_sections import Feed
    from tests.test_trainer import _setup
    from trainer.loop import Trainer

    recipe, lake = _setup(tmp_path, chunks=1)
    recipe = recipe.model_copy(update={"feed": Feed(stages={"pretrain": FeedStage(adaptive=AdaptiveMix())})})
    Trainer(recipe, max_steps=12).run()
    rows = lake.read_arrow("training_signals").to_pylist()
    assert sorted({r["step"] for r in rows}) == [10, 12]  # every 10 steps, and at the run's end
    latest = latest_signals(lake, "tiny")
    assert set(latest) == {"zh", "en", "code"} and all(math.isfinite(r["slope"]) and r["loss"] > 0 for r in latest.values())


# -- the manifest ---------------------------------------------------------------------------------------------


def test_a_chunks_table_written_before_the_mix_columns_reads_and_gains_them(tmp_path):
    from deltalake import write_deltalake

    lake = Lake(str(tmp_path / "lake"))
    now = chunks.now()
    old = {"chunk_id": "pretrain-000000", "stage": "pretrain", "status": "ready", "n_tokens": 10, "n_rows": 1,
           "files": [], "sha256": [], "mix": [("zh", 10)], "times_consumed": 0, "recipe_hash": None,
           "tokenizer_version": None, "run_id": None, "reason": None, "created_at": now, "updated_at": now}
    schema = pa.schema([f for f in chunks.table("chunks").schema if f.name not in ("mix_weights", "mix_signal")])
    write_deltalake(lake.uri("chunks"), pa.Table.from_pylist([old, {**old, "chunk_id": "pretrain-000001"}],
                                                             schema=schema))  # as an older tokenmill wrote it
    assert not lake.has_column("chunks", "mix_weights")
    assert [r["chunk_id"] for r in chunks.manifest(lake)] == ["pretrain-000000", "pretrain-000001"]
    claimed = chunks.claim_next(lake, "pretrain", "run-a")  # the trainer's conditional commit: upgrades, re-reads
    assert claimed["chunk_id"] == "pretrain-000000" and claimed["mix_weights"] is None
    assert lake.has_column("chunks", "mix_weights") and lake.has_column("chunks", "mix_signal")
    chunks.put(lake, {**chunks.manifest(lake)[1], "mix_weights": [("zh", 1.0)], "mix_signal": "{}"}, job="test")
    rows = {r["chunk_id"]: r for r in chunks.manifest(lake)}
    assert rows["pretrain-000000"]["status"] == "training" and rows["pretrain-000000"]["mix_signal"] is None
    assert rows["pretrain-000001"]["mix_weights"] == [("zh", 1.0)]


# -- feed, end to end -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_feed_writes_a_chunk_with_the_adaptive_mix_and_its_signal(spark, tmp_path, capsys):
    from jobs import feed, train_tokenizer
    from jobs.packing import split_tokens
    from jobs.stages import FeedOptions
    from tests.test_feed import _chunk_rows, _docs, _recipe

    recipe = _recipe(tmp_path, stages={"pretrain": {"seq_len": 63, "adaptive": {"strength": 2.0}}})
    lake = Lake(recipe.lake)
    lake.write_arrow("documents_dedup", _docs(), mode="overwrite", job="test")
    train_tokenizer.run(spark, recipe)
    publish_signals(lake, recipe.trainer.run_name, 30, 6000, {"zh": (4.0, -2e-4), "en": (4.0, -1e-7), "code": (3.0, -5e-5)})
    feed.run(spark, recipe, FeedOptions(until_ready=1))
    printed = capsys.readouterr().out
    row = chunks.manifest(lake)[0]
    weights = dict(row["mix_weights"])
    assert weights["zh"] > 0.4 > weights["en"] and abs(sum(weights.values()) - 1) < TOL
    signal = json.loads(row["mix_signal"])
    assert signal["run"] == "tiny" and signal["signals"]["zh"]["slope"] == -2e-4
    expected = adaptive_mix(BASE, recipe.feed.current.adaptive_bounds(),
                            {c: CategorySignal(**v) for c, v in signal["signals"].items()}, 2.0)
    assert weights == pytest.approx(expected)
    packed: Counter = Counter()
    for r in _chunk_rows(recipe.lake, row["chunk_id"]):
        for s in r["spans"]:
            packed[s["category"]] += s["length"]
    assert dict(packed) == dict(row["mix"]) == split_tokens(recipe.feed.chunk_tokens, weights)
    assert "adaptive mix (run tiny, strength 2)" in printed and "slope -0.0002/token at step 30" in printed
