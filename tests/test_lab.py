"""``tokenmill lab`` end to end on a small demo corpus: three variants and three sizes × two budgets as
tiny runs (two trainer processes at a time), the laws and the predicted run, the report checked against
the runs' own metrics, then the lab started again: nothing is trained twice."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".tokenmill" / "torch_extensions"))  # built once, kept

PLAN = {
    "name": "tiny", "budget_tokens": 6144, "batch": 4, "parallel": 2, "evaluations": 2,
    "base": {"trainer.model.hidden": 32, "trainer.model.layers": 1, "trainer.model.heads": 2,
             "trainer.model.kv_heads": 1, "trainer.lr_peak": 0.01},
    "variants": {"baseline": {}, "zh_heavy": {"mix": {"zh": 6, "en": 2, "code": 2}},
                 "easy_first": {"curriculum": "easy_first", "lr": 0.005},
                 "adaptive": {"adaptive": {"strength": 2.0}, "overrides": {"trainer.signals.every": 3}}},
    "laws": {"sizes": {"s": {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1},
                       "m": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1},
                       "l": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2}},
             "budgets": {"tokens": [3072, 6144]}, "bootstrap": 50,
             "predict": {"model": {"hidden": 96, "layers": 2, "heads": 4, "kv_heads": 2}, "tokens": 6144}},
}


def _recipe(work: Path) -> Path:
    """The demo recipe (its corpus built small under ``work``), sized for tiny runs."""
    from jobs.demo_corpus import demo_recipe_in

    path = demo_recipe_in(work, {"zh_news": 60, "zh_reviews": 30, "en_docs": 60, "code": 40})
    raw = yaml.safe_load(path.read_text())
    raw["sources"] = [s for s in raw["sources"] if s["name"] != "messy"]
    raw["spark"] = {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g",
                    "conf": {"spark.ui.enabled": "false"}}
    raw["tokenizer"].update(vocab_size=1024, sample_bytes=2_000_000)
    raw["feed"].update(chunk_tokens=20000, rows_per_file=64)
    raw["feed"]["stages"]["pretrain"]["seq_len"] = 64
    raw["trainer"].update(eval_docs=4, checkpoint_every=10, poll_seconds=0.05, warmup=0.05,
                          fewshot={"max_items": 24, "context_tokens": 16, "continuation_tokens": 8})
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _refine(spark, recipe_path: Path) -> None:
    from jobs import dedup, filter_rules, ingest, score, scrub_pii, train_tokenizer
    from jobs.cli import main as cli
    from lake.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    for job in (ingest, filter_rules, scrub_pii):
        job.run(spark, recipe)
    assert cli(["models", "label", "--recipe", str(recipe_path)]) == 0
    for task in ("domain", "quality"):
        assert cli(["models", "train", "--recipe", str(recipe_path), "--task", task, "--backend", "fasttext"]) == 0
    score.run(spark, recipe)
    dedup.run(spark, recipe)
    train_tokenizer.run(spark, recipe)


def _metrics(folder: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (folder / "runs" / run / "metrics.jsonl").read_text().splitlines()]


def test_a_small_lab_ranks_variants_fits_laws_predicts_and_resumes(spark, tmp_path, capsys):
    from jobs.cli import main as cli
    from lake.tables import Lake

    recipe_path = _recipe(tmp_path)
    _refine(spark, recipe_path)
    plan_path = tmp_path / "lab.yaml"
    plan_path.write_text(yaml.safe_dump(PLAN))
    capsys.readouterr()
    assert cli(["lab", "--recipe", str(recipe_path), "--plan", str(plan_path)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "lake" / "lab" / "tiny"
    report = (folder / "report.md").read_text()
    table = report.split("## Runs")[1]  # one row per run: name, group, N, batch, steps, tokens, held-out loss

    # the report's numbers are the runs' own: tokens, last step, held-out loss from the final evaluation
    runs = ["baseline", "zh_heavy", "easy_first", "adaptive"] + [f"law-{s}-{t}" for s in "sml" for t in (3072, 6144)] + ["predict"]
    trained = [run for run in runs if run != "law-m-6144"]  # the base size at the variants' budget: baseline's twin
    assert not (folder / "runs" / "law-m-6144").exists() and "law-m-6144 trains what baseline trains" in out
    for run in runs:
        records = _metrics(folder, "baseline" if run == "law-m-6144" else run)
        steps = math.ceil((6144 if run in PLAN["variants"] or run.endswith("6144") or run == "predict" else 3072)
                          / (4 * 64))
        assert records[-1]["step"] == steps and "perplexity_by_source" in records[-1]  # evaluated at its last step
        loss = sum(math.log(p) for p in records[-1]["perplexity_by_source"].values()) / len(records[-1]["perplexity_by_source"])
        row = next(line for line in table.splitlines() if line.startswith(f"| {run} |"))
        assert f"{records[-1]['tokens']:,}" in row and f"{loss:.4f}" in row
    ranked = [line.split("|")[2].strip() for line in report.split("## Ranking")[1].split("##")[0].splitlines()
              if line.startswith("| ") and line[2].isdigit()]
    losses = {r: float(next(line for line in table.splitlines() if line.startswith(f"| {r} |")).split("|")[-2])
              for r in ranked}
    assert sorted(ranked) == sorted(PLAN["variants"]) and [losses[r] for r in ranked] == sorted(losses.values())

    # each variant trained its own chunks, counted its own usage; the document tables are shared
    lake = tmp_path / "lake"
    for variant in PLAN["variants"]:
        own = Lake(str(lake), namespace=f"lab/tiny/{variant}")
        assert {r["run_id"] for r in own.read_arrow("trainer_events").to_pylist()} == {variant}
        assert own.read_arrow("usage").num_rows > 0
    assert not Lake(str(lake)).exists("chunks") and not Lake(str(lake)).exists("usage")
    zh = Lake(str(lake), namespace="lab/tiny/zh_heavy").read_arrow("chunks").to_pylist()
    base = Lake(str(lake), namespace="lab/tiny/baseline").read_arrow("chunks").to_pylist()
    share = lambda rows: sum(n for r in rows for c, n in r["mix"] if c == "zh") / sum(r["n_tokens"] for r in rows)  # noqa: E731
    assert share(zh) > share(base) + 0.1
    # the adaptive variant's chunks were made while it trained: the later ones mixed by its own run's signals
    adaptive = sorted(Lake(str(lake), namespace="lab/tiny/adaptive").read_arrow("chunks").to_pylist(),
                      key=lambda r: r["chunk_id"])
    assert len(adaptive) >= 4 and any(r["mix_signal"] for r in adaptive[1:])

    # the laws with their intervals, the prediction with its error, the plots and TensorBoard
    assert "L(C): loss_vs_compute" in out and "[" in out.split("L(C): loss_vs_compute")[1].splitlines()[0]
    prediction = next(line for line in out.splitlines() if "predicted held-out loss" in line).removeprefix("[lab] ")
    observed = sum(math.log(p) for p in _metrics(folder, "predict")[-1]["perplexity_by_source"].values()) / \
        len(_metrics(folder, "predict")[-1]["perplexity_by_source"])
    assert f"observed {observed:.4f}" in prediction and "error" in prediction and prediction in report
    plots = sorted(p.name for p in (folder / "plots").glob("*.png"))
    assert "loss_variants.png" in plots and "law_l_c.png" in plots and any(p.startswith("loss_zh") for p in plots)
    assert all((folder / "plots" / p).stat().st_size > 1000 for p in plots)
    assert all(f"plots/{p}" in (folder / "report.html").read_text() for p in plots)
    assert all(list((folder / "tensorboard" / run).glob("events.out.tfevents.*")) for run in runs)
    state = json.loads((folder / "lab.json").read_text())
    assert {name for name, r in state["runs"].items() if r["status"] == "done"} == set(trained)
    assert state["runs"]["law-m-6144"]["status"] == "same as baseline"

    # started again, the lab trains nothing: every run reached its budget
    before = {run: (folder / "runs" / run / "metrics.jsonl").stat().st_mtime_ns for run in trained}
    assert cli(["lab", "--recipe", str(recipe_path), "--plan", str(plan_path)]) == 0
    again = capsys.readouterr().out
    assert again.count("not run again") == len(trained) and "started" not in again
    assert before == {run: (folder / "runs" / run / "metrics.jsonl").stat().st_mtime_ns for run in trained}
