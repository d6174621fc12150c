"""The continued-pretraining recipe (configs/continued.yaml) end to end on a small demo corpus: a base
model is pretrained and exported, its tokenizer extended with merges learnt from the domain data, and
the run continues from it on general : domain : instruction = 7 : 2 : 1, then anneals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _recipe_file(work: Path, name: str, edit) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "continued.yaml").read_text())
    raw["lake"] = str(work / "lake")
    for src in raw["sources"]:
        src["path"] = str(work / "demo_corpus" / src["name"] / Path(src["path"]).name)
    raw["feed"].update(chunk_tokens=12000, rows_per_file=16)
    for stage in raw["feed"]["stages"].values():
        stage["seq_len"] = 128
    raw["trainer"].update(micro_batch=8, batch_ramp=[[0, 8]], eval_every=10, eval_docs=5, checkpoint_every=10,
                          poll_seconds=0.05, planned_tokens=60000, fewshot={"every": 10, "max_items": 60})
    raw["trainer"]["stages"]["anneal"]["decay_tokens"] = 8000
    edit(raw)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _metrics(recipe) -> list[dict]:
    run = Path(recipe.lake) / "runs" / recipe.trainer.run_name
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_continued_recipe_extends_the_base_and_trains_from_it_then_anneals(spark, tmp_path):
    from jobs import dedup, feed, filter_rules, ingest, score, scrub_pii, train_tokenizer
    from jobs.cli import main as cli
    from jobs.demo_corpus import build_demo_corpus
    from jobs.stages import FeedOptions
    from lake import chunks
    from lake.artifacts import load_tokenizer
    from lake.recipe import load_recipe
    from lake.tables import Lake
    from trainer.checkpoint import export
    from trainer.loop import Trainer

    build_demo_corpus(tmp_path / "demo_corpus", {"zh_news": 80, "zh_reviews": 40, "en_docs": 80, "code": 40,
                                                 "instruct": 80, "chat": 30})
    base_folder, grown = tmp_path / "base_model", tmp_path / "lake" / "exports" / "continued_model"

    def as_base(raw):  # the base: pretrained here on general and domain text, with a tokenizer of its own
        del raw["tokenizer"]["extend"]
        raw["tokenizer"].update(vocab_size=2048, sample_bytes=2_000_000)
        raw["feed"]["stages"]["pretrain"] = {"mix": {"general": 4, "domain": 1}, "seq_len": 128}
        raw["feed"]["stage"] = "pretrain"
        raw["trainer"].update(run_name="base", fewshot={"every": 0}, lr_peak=0.003)
        raw["trainer"]["model"] = {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1, "doc_mask": True}

    def as_continued(raw):
        raw["tokenizer"]["extend"].update(base=str(base_folder), out=str(grown), learn=16)
        raw["trainer"]["model"]["init_from"] = str(grown)

    base = load_recipe(_recipe_file(tmp_path, "base", as_base))
    for job in (ingest, filter_rules, scrub_pii):
        job.run(spark, base)
    where = ["--recipe", base.origin]
    assert cli(["models", "label", *where]) == 0
    for task in ("domain", "quality"):
        assert cli(["models", "train", *where, "--task", task, "--backend", "fasttext"]) == 0
    score.run(spark, base)
    dedup.run(spark, base)
    lake = Lake(base.lake)
    kept = lake.read_arrow("documents_dedup", ["category", "prompt"]).to_pylist()
    assert {r["category"] for r in kept} == {"general", "domain", "instruction"}  # the classifier chose the domain
    assert all((r["prompt"] is not None) == (r["category"] == "instruction") for r in kept)

    train_tokenizer.run(spark, base)
    feed.run(spark, base, FeedOptions(until_ready=2))
    base_losses = Trainer(base, max_steps=24, exit_when_idle=0.1).run()
    export(base, str(base_folder))

    continued = load_recipe(_recipe_file(tmp_path, "continued", as_continued))
    report = train_tokenizer.run(spark, continued)
    assert report.vocab_after == report.vocab_before + len(report.new_tokens) > report.vocab_before
    assert report.check.passed and (grown / "config.json").is_file()
    tok, meta = load_tokenizer(continued)
    assert meta["extended_from"] == str(base_folder.resolve())
    feed.run(spark, continued, FeedOptions(until_ready=2))
    made = [c for c in chunks.manifest(lake) if c["stage"] == "continued"]
    tokens = {}
    for c in made:
        for category, n in c["mix"]:
            tokens[category] = tokens.get(category, 0) + n
    total = sum(tokens.values())
    assert set(tokens) == {"general", "domain", "instruction"}
    assert abs(tokens["general"] / total - 0.7) < 0.05 and abs(tokens["domain"] / total - 0.2) < 0.05
    assert abs(tokens["instruction"] / total - 0.1) < 0.05  # whole examples: a little over or under its share

    # a conversation's reply is closed by <|im_end|>, learnt, before the end of text
    chat = {r["doc_id"] for r in lake.read_arrow("documents_dedup", ["doc_id", "source"]).to_pylist()
            if r["source"] == "chat"}
    ends = [row["input_ids"][s["pos"] + s["length"] - 2 : s["pos"] + s["length"]]
            for c in made for row in pq.read_table(chunks.chunk_dir(continued.lake, c["chunk_id"])).to_pylist()
            for s in row["spans"] if s["doc_id"] in chat and s["doc_start"] + s["length"] == s["doc_tokens"]]
    assert ends and all(e == [tok.token_to_id("<|im_end|>"), meta["eos_id"]] for e in ends)

    losses = Trainer(continued, max_steps=12, exit_when_idle=0.1).run()
    fresh = math.log(meta["model_vocab_size"])
    ended = sum(base_losses[-4:]) / 4
    assert losses[0] < fresh - 1.5 and losses[0] < ended + 1.5  # it starts where the base ended, not from scratch
    # its export has the base's architecture (the recipe's model section names none of it)
    from transformers import LlamaForCausalLM

    exported = LlamaForCausalLM.from_pretrained(export(continued, str(tmp_path / "continued_hf")))
    assert exported.config.hidden_size == 64 and exported.get_input_embeddings().weight.shape[0] == meta["model_vocab_size"]
    records = _metrics(continued)
    assert any("instruction" in r["loss_by_category"] for r in records)
    assert any("fewshot" in r for r in records)

    # the anneal stage: more domain and instruction data, the learning rate decaying from its start
    annealing = load_recipe(_recipe_file(tmp_path, "anneal", lambda raw: (as_continued(raw), raw["feed"].update(
        stage="anneal"))))
    feed.run(spark, annealing, FeedOptions(until_ready=1))
    Trainer(annealing, max_steps=20, exit_when_idle=0.1).run()
    anneal = [r for r in _metrics(annealing) if r["chunk"].startswith("anneal-")]
    assert anneal and anneal[-1]["lr"] < anneal[0]["lr"]
    assert any("instruction" in r["loss_by_category"] for r in anneal)
