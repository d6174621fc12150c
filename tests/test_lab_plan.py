"""The lab's pure parts: the plan and its errors, the runs and their recipes, resume, result assembly,
MiniCPM's batch points and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from jobs.lab_plan import PlanError, Run, load_plan, plan_runs, run_recipe, steps_for
from jobs.lab_results import read_metrics, run_result
from tests.conftest import ROOT

SIZES = {"s": {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1},
         "m": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1},
         "l": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2}}


def _files(tmp_path: Path, plan: dict) -> tuple[Path, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"lake": "lake", "sources": [{"name": "s", "path": "s.jsonl"}],
                                      "feed": {"chunk_tokens": 100000, "stages": {"pretrain": {"seq_len": 64}}}}))
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(plan))
    return recipe, path


def _error(tmp_path: Path, plan: dict) -> str:
    with pytest.raises(PlanError) as err:
        load_plan(_files(tmp_path, plan)[1])
    return str(err.value)


def test_the_documented_plan_loads_and_names_its_runs():
    from lake.recipe import load_recipe

    plan = load_plan(ROOT / "configs" / "lab.yaml")
    runs = plan_runs(plan, load_recipe(ROOT / "configs" / "demo.yaml", plan.base))
    names = [r.name for r in runs]
    assert names[: len(plan.variants)] == list(plan.variants) and names[-1] == "predict"
    assert len([r for r in runs if r.group == "law"]) == len(plan.laws.sizes) * 3
    assert [r.batch for r in runs if r.group == "batch"] == [4, 16]  # at 8 the grid's run serves
    assert len({r.parameters for r in runs if r.group == "law"}) == 3


def test_plan_errors_name_the_key(tmp_path):
    base = {"budget_tokens": 1000, "variants": {"a": {}}}
    assert "variants.a.colour: unknown key; allowed here:" in _error(tmp_path, {**base, "variants": {"a": {"colour": 1}}})
    assert "budget_tokens: required key is missing" in _error(tmp_path, {"variants": {"a": {}}})
    assert "variants.a.curriculum" in _error(tmp_path, {**base, "variants": {"a": {"curriculum": "sideways"}}})
    assert "laws.sizes" in _error(tmp_path, {**base, "laws": {"sizes": {"s": SIZES["s"]}, "budgets": {"tokens": [1, 2]}}})
    both = _error(tmp_path, {**base, "laws": {"sizes": SIZES, "budgets": {"tokens": [1, 2], "compute": [1.0, 2.0]}}})
    assert "laws.budgets" in both and "one of the two" in both
    heads = _error(tmp_path, {**base, "variants": {"a": {"model": {"hidden": 30, "layers": 1, "heads": 4, "kv_heads": 1}}}})
    assert "variants.a.model" in heads and "divide" in heads
    assert "batch_model" in _error(tmp_path, {**base, "laws": {"sizes": SIZES, "budgets": {"tokens": [1, 2]},
                                                               "batch_model": "xl"}})


def test_a_variants_overrides_that_break_the_recipe_name_the_variant(tmp_path):
    recipe, path = _files(tmp_path, {"budget_tokens": 1000, "variants": {"odd": {"overrides": {"feed.colour": 1}}}})
    plan = load_plan(path)
    with pytest.raises(PlanError, match=r"(?s)variants\.odd: .*feed\.colour: unknown key"):
        run_recipe(plan, plan_runs(plan, _base(recipe))[0], recipe)


def _base(recipe_path):
    from lake.recipe import load_recipe

    return load_recipe(recipe_path)


def test_each_run_gets_its_namespace_folder_batch_and_whole_step_chunks(tmp_path):
    recipe, path = _files(tmp_path, {"name": "mixes", "budget_tokens": 10_000, "batch": 8, "evaluations": 3,
                                     "variants": {"zh": {"mix": {"zh": 7, "en": 3}, "curriculum": "hard_first",
                                                         "decay": 0.2, "lr": 0.01, "batch": 6,
                                                         "model": SIZES["m"]}}})
    plan = load_plan(path)
    run = plan_runs(plan, _base(recipe))[0]
    got = run_recipe(plan, run, recipe, lake=str(tmp_path / "other"))
    steps = steps_for(10_000, 6, 64)
    assert steps == math.ceil(10_000 / (6 * 64)) == 27
    assert got.lake == str(tmp_path / "other") and got.namespace == "lab/mixes/zh"
    assert got.trainer.runs_dir == f"{tmp_path / 'other'}/lab/mixes/runs" and got.trainer.run_name == "zh"
    assert got.trainer.batch_ramp == [(0, 6)] and 6 % got.trainer.micro_batch == 0
    assert got.trainer.planned_tokens == steps * 6 * 64 and got.trainer.eval_every == steps // 3
    assert got.feed.chunk_tokens % (6 * 65) == 0 and got.feed.chunk_tokens <= 100000  # whole steps of rows
    stage = got.feed.stages["pretrain"]
    assert stage.mix == {"zh": 7, "en": 3} and stage.curriculum.order == "hard_first" and stage.curriculum.key == "quality"
    assert got.feed.decay == 0.2 and got.trainer.lr_peak == 0.01 and got.trainer.model.hidden == 32


def test_compute_budgets_become_tokens_per_size(tmp_path):
    recipe, path = _files(tmp_path, {"budget_tokens": 1000, "variants": {"a": {}},
                                     "laws": {"sizes": SIZES, "budgets": {"compute": [1e9, 4e9]}}})
    plan = load_plan(path)
    laws = [r for r in plan_runs(plan, _base(recipe)) if r.group == "law"]
    for size in SIZES:
        compute = [6 * r.parameters * r.tokens for r in laws if r.size == size]
        assert compute == [pytest.approx(1e9, rel=1e-3), pytest.approx(4e9, rel=1e-3)]


def test_resume_counts_what_a_run_has(tmp_path):
    from jobs.lab import progress, rows_to_feed

    manifest = [{"status": "consumed", "n_rows": 40}, {"status": "training", "n_rows": 40},
                {"status": "quarantined", "n_rows": 40}, {"status": "ready", "n_rows": 10}]
    assert rows_to_feed(manifest, 100) == 10 and rows_to_feed(manifest, 80) == 0 and rows_to_feed([], 5) == 5
    assert rows_to_feed(manifest, 30, ("ready",)) == 20  # a run that ran dry: only ready chunks count
    metrics = tmp_path / "metrics.jsonl"
    assert progress(metrics) == 0
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0, "tokens": 10 * s}) + "\n" for s in (1, 2, 3)))
    assert progress(metrics) == 3


def _records(n: int, every: int) -> list[dict]:
    out = []
    for step in range(1, n + 1):
        r = {"step": step, "tokens": 100 * step, "loss": 5.0 - step * 0.1,
             "loss_by_category": {"en": 5.0 - step * 0.1, "zh": 6.0 - step * 0.2}}
        if step % every == 0:
            r["perplexity_by_source"] = {"a": math.exp(4.0 - step * 0.01), "b": math.exp(5.0 - step * 0.01)}
            r["fewshot"] = {"builtin/acc": 0.3, "builtin/acc_norm": 0.3, "builtin/nll": 3.0 - step * 0.05,
                            "builtin/chance": 0.25}
        out.append(r)
    return out


def test_results_are_read_from_the_metrics_at_equal_tokens():
    records = _records(20, 10)
    result = run_result(Run("v", "variant", {}, 2000, 4, parameters=1000), records, 64)
    assert result.steps == 20 and result.tokens == 2000 and result.heldout_loss == pytest.approx(4.5 - 0.2)
    assert result.perplexity_by_source == records[-1]["perplexity_by_source"]
    assert result.loss_by_category == {"en": pytest.approx(3.05), "zh": pytest.approx(2.1)}  # steps 19, 20
    assert result.curve[0] == (100, 4.9) and len(result.category_curves["zh"]) == 20
    assert [p.step for p in result.fewshot] == [10, 20] and result.fewshot[-1].nll == pytest.approx(2.0)
    assert result.compute == 6 * 1000 * 2000 and result.batch_tokens == 256
    with pytest.raises(ValueError, match="lab run v has no held-out evaluation"):
        run_result(Run("v", "variant", {}, 2000, 4), _records(5, 10), 64)
    assert read_metrics(Path("/nonexistent/metrics.jsonl")) == []


def test_a_step_trained_again_after_a_rollback_counts_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    steps = [1, 2, 3, 2, 3, 4]  # a spike at 3: rolled back to 1, steps 2 and 3 trained again
    path.write_text("".join(json.dumps({"step": s, "loss": float(i)}) + "\n" for i, s in enumerate(steps)))
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 0.0), (2, 3.0), (3, 4.0), (4, 5.0)]


def test_batch_points_pick_the_batch_that_reaches_each_loss_first():
    from jobs.lab_scaling import batch_points

    # the small batch is ahead early, the large one late: the best batch grows as the loss falls
    small = [(t, 4.0 - 2.0 * (1 - math.exp(-t / 100))) for t in range(10, 1001, 10)]
    large = [(t, 4.0 - 2.6 * (1 - math.exp(-t / 300))) for t in range(10, 1001, 10)]
    points = batch_points({64: small, 512: large}, levels=5)
    levels = [level for level, _ in points]
    assert levels == sorted(levels, reverse=True) and len(points) == 5
    assert points[0][1] == 64 and points[-1][1] == 512


def test_the_report_ranks_variants_and_its_html_keeps_tables_and_figures(tmp_path):
    from jobs.lab_plan import Plan
    from jobs.lab_report import markdown_to_html, report_markdown

    plan = Plan(budget_tokens=2000, variants={"a": {}, "b": {}})
    good = run_result(Run("a", "variant", {}, 2000, 4, parameters=10), _records(20, 10), 64)
    worse = _records(20, 10)
    worse[-1]["perplexity_by_source"] = {"a": math.exp(5.0), "b": math.exp(6.0)}
    bad = run_result(Run("b", "variant", {}, 2000, 4, parameters=10), worse, 64)
    markdown = report_markdown(plan, [bad, good], None, [("loss per variant", Path("plots/loss.png"))])
    assert markdown.index("| 1 | a |") < markdown.index("| 2 | b |")
    assert f"{good.heldout_loss:.4f}" in markdown and "5.5000" in markdown
    page = markdown_to_html(markdown, "lab")
    assert '<img src="plots/loss.png"' in page and page.count("<table>") == 2 and "<th>rank</th>" in page


def _law_result(name: str, n: int, d: int, loss: float, group: str = "law"):
    from jobs.lab_results import RunResult

    return RunResult(name=name, group=group, size=name, parameters=n, batch=8, seq_len=64, budget=d, steps=d // 512,
                     tokens=d, heldout_loss=loss, perplexity_by_source={}, loss_by_category={}, curve=[],
                     category_curves={}, heldout_curve=[])


def test_laws_fitted_to_runs_of_a_known_law_predict_the_larger_run():
    """Runs whose losses follow a Chinchilla law: the lab's prediction of a larger run is that law's value."""
    from jobs.lab_plan import Laws
    from jobs.lab_scaling import fit_laws

    def law(n, d):
        return 2.0 + 400.0 / n ** 0.34 + 1000.0 / d ** 0.28

    grid = [_law_result(f"law-{n}-{d}", n, d, law(n, d)) for n in (100_000, 400_000, 1_600_000)
            for d in (1_000_000, 4_000_000, 16_000_000)]
    laws = Laws(sizes={"s": SIZES["s"], "m": SIZES["m"], "l": SIZES["l"]}, budgets={"tokens": [1, 2]}, bootstrap=20)
    target = Run("predict", "predict", {}, 64_000_000, 8, "predict", 6_400_000)
    outcome = fit_laws(grid, laws, target)
    assert outcome.predicted_by == "L(N, D)"
    assert outcome.predicted_loss == pytest.approx(law(6_400_000, 64_000_000), rel=0.01)
    titles = {item.title: item for item in outcome.laws}
    assert titles["L(C)"].fit is not None and titles["N*(C)"].fit is not None and "Llama 3" in titles["N*(C)"].note
    assert titles["BS(L)"].fit is None and "batch_sizes" in titles["BS(L)"].note  # no batch runs: said, not fitted
    assert titles["acc(NLL)"].fit is None  # no few-shot evaluations
    observed = _law_result("predict", 6_400_000, 64_000_000, law(6_400_000, 64_000_000) * 1.02, "predict")
    done = outcome.with_observed(observed)
    assert done.error == pytest.approx(outcome.predicted_loss / observed.heldout_loss - 1)
    assert f"error {done.error:+.2%}" in done.prediction_line()


def test_a_law_run_that_trains_what_a_variant_trains_is_its_twin(tmp_path):
    """The variants' size at their budget and batch: the law run is read from the variant, not trained again."""
    from jobs.lab import prepare, twins

    recipe, path = _files(tmp_path, {"budget_tokens": 2048, "batch": 4, "base": {"trainer.model.hidden": 32,
                                     "trainer.model.layers": 1, "trainer.model.heads": 2, "trainer.model.kv_heads": 1},
                                     "variants": {"base": {}, "more_zh": {"mix": {"zh": 9, "en": 1}}},
                                     "laws": {"sizes": SIZES, "budgets": {"tokens": [1024, 2048]}}})
    plan = load_plan(path)
    prepared = [prepare(plan, run, str(recipe), None) for run in plan_runs(plan, _base(recipe))]
    assert {name: twin.run.name for name, twin in twins(prepared).items()} == {"law-m-2048": "base"}
    assert (tmp_path / "lake" / "lab" / "lab" / "recipes" / "law-m-2048.yaml").is_file()


def test_tokenmill_lab_with_a_bad_plan_is_one_line_naming_the_key_and_exit_code_2(tmp_path, capsys):
    from jobs.cli import main as cli

    recipe, path = _files(tmp_path, {"budget_tokens": 1000, "variants": {"a": {"lr": -1}}})
    assert cli(["lab", "--recipe", str(recipe), "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lab plan" in err and "variants.a.lr" in err and "Traceback" not in err
    assert cli(["lab", "--recipe", str(recipe), "--plan", str(tmp_path / "none.yaml")]) == 2
    assert "plan file" in capsys.readouterr().err


def test_an_adaptive_run_gets_its_budget_in_chunks_made_while_it_trains(tmp_path):
    """Its chunks hold a quarter of its steps; while it trains, the lab is asked every few seconds to top
    it up; a trainer that ends short of its steps (no metrics here) is counted as run dry, to be fed."""
    import dataclasses
    import subprocess
    import sys

    from jobs.lab import Journal, Trainers, prepare

    recipe, path = _files(tmp_path, {"budget_tokens": 16 * 4 * 64, "batch": 4, "variants": {"a": {}}})
    plan = load_plan(path)
    run = dataclasses.replace(plan_runs(plan, _base(recipe))[0], adaptive=True)
    got = run_recipe(plan, run, recipe)
    assert got.feed.chunk_tokens == 4 * 4 * 65  # 16 steps in 4 chunks of 4 steps
    prepared = prepare(plan, run, str(recipe), None)
    calls = []
    trainers = Trainers(1, 1, Journal(tmp_path / "lab.json"), tmp_path / "logs", top_up=calls.append)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    trainers.active["a"] = (proc, prepared, 0.0, open(tmp_path / "logs" / "a.log", "w"))
    trainers.wait_all()
    assert calls and all(c == [prepared] for c in calls)
    assert trainers.starved == [(prepared, 0)] and not trainers.failed


def test_batch_runs_give_a_batch_size_law_compared_with_minicpm():
    """Three batch runs whose curves cross (a larger batch starts slower and goes lower): the batch that
    reaches each loss first grows as the loss falls, so BS(L) = a / L^b has b > 0, next to MiniCPM's."""
    from jobs.lab_plan import Laws
    from jobs.lab_results import RunResult
    from jobs.lab_scaling import batch_law

    def curve(batch):
        floor, tau = 1.5 + 2.0 / batch ** 0.5, 400.0 * batch ** 0.5
        return [(t, floor + (4.0 - floor) * math.exp(-t / tau)) for t in range(100, 40_001, 100)]

    runs = [RunResult(name=f"batch-{b}", group="batch", size="m", parameters=1000, batch=b, seq_len=64,
                      budget=40_000, steps=400, tokens=40_000, heldout_loss=curve(b)[-1][1], perplexity_by_source={},
                      loss_by_category={}, curve=curve(b), category_curves={}, heldout_curve=[])
            for b in (4, 16, 64)]
    laws = Laws(sizes=SIZES, budgets={"tokens": [1, 2]}, batch_sizes=[4, 16, 64], bootstrap=20)
    law = batch_law(runs, laws, boot=20)
    assert law.fit is not None and law.fit.params["b"] > 0 and len(law.points) >= 3
    assert law.note.startswith("batch_size (BS(L) = a / L^b) vs MiniCPM: a: ours")
    assert [bs for _, bs in law.points] == sorted(bs for _, bs in law.points)  # lower loss, larger batch
    assert batch_law(runs[:2], laws, boot=20).fit is None  # two batches: said, not fitted
