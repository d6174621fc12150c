"""quality_models/ and the scoring job, on the demo corpus's weak labels."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from jobs import filter_rules, ingest, score, scrub_pii
from jobs.demo_corpus import build_demo_corpus
from lake.tables import Lake
from lake.recipe import parse_recipe
from quality_models.labels import weak_domain, weak_quality
from quality_models.metrics import classification_report
from lake.artifacts import ModelError, ModelRef, resolve
from quality_models.train import derive_weak_labels, train_model

from conftest import write_jsonl

WEAK = {
    "source_domains": {"zh_news": "news", "zh_reviews": "forum", "en_docs": "knowledge", "code": "code"},
    "curated_sources": ["zh_news", "en_docs", "code"],
    "low_quality_sources": ["zh_reviews"],
}


def test_classification_report_counts_by_hand():
    r = classification_report(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"], ["a", "b", "c"])
    assert r.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert r.per_class["a"]["precision"] == 0.5 and r.per_class["b"]["recall"] == 1.0
    assert r.per_class["b"]["f1"] == pytest.approx(0.8)
    assert r.macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert "confusion matrix" in str(r) and r.accuracy == pytest.approx(0.6)


def test_weak_labels_follow_source_url_then_structure():
    assert weak_domain("zh_news", None, "x", {"zh_news": "news"}) == "news"
    assert weak_domain("web", "https://baike.example.com/item/1", "x", {}) == "knowledge"
    assert weak_domain("web", None, "def f(x):\n    return x\n\nclass A:\n    pass\n", {}) == "code"
    assert weak_domain("web", None, "plain words here", {}) is None
    assert weak_quality("zh_news", True, {"zh_news"}) == "low"
    assert weak_quality("zh_news", False, {"zh_news"}) == "high"
    assert weak_quality("web", False, {"zh_news"}, {"web"}) == "low"
    assert weak_quality("other", False, {"zh_news"}) is None


def _english_prose() -> list[dict]:
    """Paragraphs of Python's own licence and history: English prose shipped with every Python."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    paras = [" ".join(p.split()) for p in text.split("\n\n") if len(p) > 250 and p.count(".") >= 2]
    return [{"id": f"license-{i}", "text": p} for i, p in enumerate(paras[:8])]


@pytest.fixture(scope="module")
def scored(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    build_demo_corpus(tmp / "demo")  # the embedded default's corpus, as the demo builds it
    prose = write_jsonl(tmp / "prose" / "p.jsonl", _english_prose())
    sources = [{"name": n, "path": str(tmp / "demo" / n / "*"), "id_field": "id", "url_field": "url"}
               for n in ("zh_news", "zh_reviews", "en_docs", "code")]
    sources.append({"name": "prose", "path": str(prose), "id_field": "id"})
    recipe = parse_recipe({"lake": str(tmp / "lake"), "sources": sources, "score": {"weak_labels": WEAK}}, tmp)
    for stage in (ingest, filter_rules, scrub_pii):
        stage.run(spark, recipe)
    with pytest.raises(ModelError, match="tokenmill models train --recipe .* --task quality --backend fasttext"):
        score.run(spark, recipe)
    labels = derive_weak_labels(recipe)
    # Trained as a user trains them: `tokenmill models train`, in its own process.
    recipe_file = tmp / "recipe.yaml"
    recipe_file.write_text(json.dumps({"lake": recipe.lake, "sources": sources, "score": {"weak_labels": WEAK}}))
    results = {}
    for task in ("domain", "quality"):
        proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "tokenmill"), "models", "train",
                               "--recipe", str(recipe_file), "--task", task, "--backend", "fasttext"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "macro-F1" in proc.stdout and "confusion matrix" in proc.stdout
        results[task] = resolve(recipe.lake, ModelRef(task, "fasttext", "latest"))
    report = score.run(spark, recipe)
    return recipe, labels, results, report


def test_models_reach_macro_f1_on_held_out_weak_labels(scored):
    recipe, labels, results, _ = scored
    assert set(labels["domain"][1]) == {"news", "forum", "knowledge", "code"}
    for task, (folder, meta) in results.items():
        assert meta["metrics"]["macro_f1"] >= 0.9, (task, meta["metrics"])
        assert meta["backend"] == "fasttext" and meta["version"] == "v1" and meta["task"] == task
        assert meta["n_holdout"] > 0 and len(meta["training_data_sha256"]) == 64
        assert (folder / "model.bin").stat().st_size < 20_000_000


def test_quality_is_the_probability_of_the_label_named_good_never_the_last_alphabetically(scored, tmp_path):
    """clean/spam: "spam" sorts last; the score must still be P(clean)."""
    import shutil

    from quality_models.train import LoadedModels, score_batch

    recipe = scored[0]
    rows = [json.loads(line) for line in (Path(recipe.lake) / "labels" / "quality.jsonl").read_text().splitlines()]
    renamed = write_jsonl(tmp_path / "quality.jsonl", [{"text": r["text"], "label": {"high": "clean", "low": "spam"}[r["label"]]}
                                                       for r in rows])
    other = recipe.model_copy(update={"lake": str(tmp_path / "lake")})
    shutil.copytree(Path(recipe.lake) / "models" / "domain-fasttext", Path(other.lake) / "models" / "domain-fasttext")
    with pytest.raises(ModelError, match=r"quality labels \['clean', 'spam'\]: which one is good text\? Pass --positive"):
        train_model(other, "quality", "fasttext", renamed)
    with pytest.raises(ModelError, match="positive label 'good' is not one of the labels"):
        train_model(other, "quality", "fasttext", renamed, positive="good")
    train_model(other, "quality", "fasttext", renamed, positive="clean")
    good = [r["text"] for r in rows if r["label"] == "high"][:50]
    bad = [r["text"] for r in rows if r["label"] == "low"][:50]
    quality, _, _ = score_batch(LoadedModels(other), good + bad)
    assert quality[:50].mean() > 0.7 and quality[50:].mean() < 0.3, (quality[:50].mean(), quality[50:].mean())
    reference, _, _ = score_batch(LoadedModels(recipe), good + bad)  # the high/low model agrees on the order
    assert reference[:50].mean() > 0.7 and reference[50:].mean() < 0.3


def test_every_scored_document_has_quality_domain_lang_and_category(spark, scored):
    recipe, *_ , report = scored
    lake = Lake(recipe.lake, spark)
    rows = lake.read("documents_scored").collect()
    assert len(rows) == lake.read("documents_clean").count() == report.documents
    for r in rows:
        assert 0.0 <= r.quality <= 1.0 and r.domain and r.lang and r.category
    by_source = {}
    for r in rows:
        by_source.setdefault(r.source, []).append(r)
    for source in ("zh_news", "zh_reviews"):
        assert all(r.lang == "zh" and r.category == "zh" for r in by_source[source]), source
    assert all(r.lang == "en" and r.category == "en" for r in by_source["prose"])
    # A few stdlib chunks are almost all docstring: those read as English, and that is fair.
    assert sum(r.category == "code" for r in by_source["code"]) >= 0.95 * len(by_source["code"])
    mean = {s: sum(r.quality for r in rs) / len(rs) for s, rs in by_source.items()}
    assert mean["zh_news"] > mean["zh_reviews"] + 0.3  # the quality model learned something real


def test_pinned_versions_and_mismatches_fail_with_the_fix(scored):
    recipe = scored[0]
    folder, meta = resolve(recipe.lake, ModelRef("domain", "fasttext", "v1"))
    assert meta["version"] == "v1"
    with pytest.raises(ModelError, match="v7 .* does not exist; available: v1"):
        resolve(recipe.lake, ModelRef("domain", "fasttext", "v7"))
    with pytest.raises(ModelError, match="no domain-bert model.*--task domain --backend bert"):
        resolve(recipe.lake, ModelRef("domain", "bert", "latest"))


@pytest.mark.slow
def test_bert_heads_share_one_encoder_and_the_cascade_uses_them(spark, scored, tmp_path):
    from quality_models.train import LoadedModels, score_batch

    recipe = scored[0]
    small = recipe.model_copy(update={"score": recipe.score.model_copy(update={"max_tokens": 64})})
    # A small labelled subset keeps the encoder pass short on CI.
    for task in ("domain", "quality"):
        rows = [json.loads(line) for line in (Path(recipe.lake) / "labels" / f"{task}.jsonl").read_text().splitlines()]
        per_label = {}
        for row in rows:
            per_label.setdefault(row["label"], []).append(row)
        subset = [r for label_rows in per_label.values() for r in label_rows[:40]]
        write_jsonl(tmp_path / f"{task}.jsonl", subset)
        result = train_model(small, task, "bert", tmp_path / f"{task}.jsonl")
        assert result.report.macro_f1 >= 0.8, str(result.report)
    both_bert = small.model_copy(update={"score": small.score.model_copy(update={
        "quality": small.score.quality.model_copy(update={"backend": "bert"}),
        "domain": small.score.domain.model_copy(update={"backend": "bert"})})})
    models = LoadedModels(both_bert)
    assert models.quality.encoder is models.domain.encoder  # one encoder, two heads
    import inspect
    import textwrap

    texts = ["今天的新闻：国务院召开常务会议，研究部署经济工作。", inspect.getsource(textwrap.TextWrapper._wrap_chunks)]
    calls = []
    original = models.encoder.embed
    models.encoder.embed = lambda ts, bs=32: calls.append(len(ts)) or original(ts, bs)
    quality, domains, _ = score_batch(models, texts)
    assert calls == [2]  # both heads read one forward pass
    assert domains == ["news", "code"]
    cascade = parse_recipe({**small.model_dump(exclude={"origin"}), "score": {
        **small.score.model_dump(), "cascade": {"low": 0.0, "high": 1.0}}}, Path(recipe.lake))
    q, _, sent = score_batch(LoadedModels(cascade), texts, 0.0, 1.0)
    assert sent == 2 and all(0 <= x <= 1 for x in q)

    # The cascade in the Spark job, encoder quantised: BERT rescores the uncertain band, nothing else.
    lake = Lake(recipe.lake, spark)
    before = {r.doc_id: r.quality for r in lake.read("documents_scored").select("doc_id", "quality").collect()}
    width = sorted(abs(q - 0.5) for q in before.values())[30]  # a band holding about 30 documents
    low, high = 0.5 - width, 0.5 + width
    job = parse_recipe({**small.model_dump(exclude={"origin"}), "score": {
        **small.score.model_dump(), "quantize": True, "cascade": {"low": low, "high": high}}}, Path(recipe.lake))
    report = score.run(spark, job)
    after = {r.doc_id: r.quality for r in lake.read("documents_scored").select("doc_id", "quality").collect()}
    assert report.documents == len(after) == len(before)
    band = {d for d, q in before.items() if low <= q <= high}
    changed = {d for d in before if abs(before[d] - after[d]) > 1e-9}
    assert 0 < len(changed) and changed <= band
    assert all(0.0 <= q <= 1.0 for q in after.values())
    score.run(spark, recipe)  # back to fastText only, for the tests after this one


def _tiny_language_model(folder: Path, texts: list[str], steps: int = 150) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer, trained for a few steps on ``texts``: the small
    model from curated sources the perplexity filter reads (a Hugging Face folder, as an export is)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from jobs.train_tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(texts, 512, ["<|endoftext|>", "<|pad|>"], []),
                                  eos_token="<|endoftext|>", pad_token="<|pad|>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128))
    ids = torch.tensor([i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=rng)
        batch = torch.stack([ids[s: s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_perplexity_model_that_is_not_there_fails_before_any_work(tmp_path):
    from lake.recipe import RecipeError

    recipe = parse_recipe({"lake": "lake", "sources": [{"name": "s", "path": "x"}],
                           "score": {"perplexity": {"model": "lm"}}}, tmp_path)
    with pytest.raises(RecipeError, match=r"score.perplexity.model: .*lm is not a Hugging Face model folder"):
        score.check_recipe(recipe)


def test_the_perplexity_filter_removes_each_categorys_least_likely_documents(spark, scored, tmp_path):
    import numpy as np

    from quality_models.perplexity import PerplexityModel

    recipe, *_ = scored
    lake = Lake(recipe.lake, spark)
    before = {r["doc_id"]: r for r in lake.read("documents_scored").collect()}
    curated = [r["text"] for r in before.values() if r["source"] in ("en_docs", "zh_news")]
    folder = _tiny_language_model(tmp_path / "lm", curated)
    measured = dict(zip(before, PerplexityModel(str(folder), 128).perplexity([r["text"] for r in before.values()])))
    by_source = {s: np.median([measured[d] for d, r in before.items() if r["source"] == s]) for s in ("en_docs", "zh_reviews")}
    assert by_source["en_docs"] < by_source["zh_reviews"]  # text like its training data is more likely
    raw = recipe.model_dump(exclude={"origin"})
    raw["score"]["perplexity"] = {"model": str(folder), "max_tokens": 128, "percentile": {"default": 80, "code": None}}
    job = parse_recipe(raw, Path(recipe.lake))
    report = score.run(spark, job)
    rejected = {r["doc_id"]: r for r in lake.read("documents_rejected").where("stage = 'score'").collect()}
    kept = {r["doc_id"]: r for r in lake.read("documents_scored").collect()}
    assert set(kept) | set(rejected) == set(before) and not set(kept) & set(rejected)  # in = kept + rejected
    assert rejected and report.perplexity_removed == len(rejected)
    assert not any(before[d]["category"] == "code" for d in rejected)  # null: the category is kept whole
    for category, (p, cutoff) in report.perplexity_cutoffs.items():
        members = [d for d, r in before.items() if r["category"] == category]
        assert {d for d in members if measured[d] > cutoff * (1 + 1e-4)} <= set(rejected)  # (float32 vs the job's)
        assert {d for d in members if measured[d] < cutoff * (1 - 1e-4)}.isdisjoint(rejected)
        assert abs(sum(d in rejected for d in members) / len(members) - (1 - p / 100)) < 0.1
    some = next(iter(rejected.values()))
    assert some["reason"] == "perplexity" and "the 80th percentile of" in some["detail"]
    assert all(abs(r["signals"]["perplexity"] - measured[d]) < 1e-3 * measured[d] for d, r in kept.items()
               if r["signals"] and "perplexity" in r["signals"] and not np.isnan(measured[d]))
    assert "perplexity: " in str(report)
    score.run(spark, recipe)  # back without the filter: its rejections go with it
    assert lake.read("documents_rejected").where("stage = 'score'").count() == 0
    assert lake.read("documents_scored").count() == len(before)


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_the_encoder_runs_where_it_is_placed_with_the_same_embeddings(device):
    """On a GPU in bf16/fp16 with GPU batches, the embeddings stay those of fp32 on the CPU (cosine
    above 0.99); this machine's devices only (CPU always, CUDA when there is one)."""
    import numpy as np

    from quality_models.bert_backend import Encoder, default_backbone

    texts = ["The river council met on Tuesday about the school budget.", "def add(a, b):\n    return a + b",
             "今天的天气很好，我们去公园散步。", "short"] * 3
    reference = Encoder(default_backbone(), 64, device="cpu").embed(texts, batch_size=4)
    placed = Encoder(default_backbone(), 64, device=device, gpu_batch_size=8)
    assert str(next(placed.model.parameters()).device).startswith(device)
    got = placed.embed(texts, batch_size=4)
    assert got.dtype == np.float32 and got.shape == reference.shape
    assert (np.sum(got * reference, axis=1) > 0.99).all()


def test_in_a_spark_task_the_encoder_takes_only_the_gpu_spark_gave_it(spark):
    """A task without a GPU resource runs the encoder on the CPU even where a GPU is visible; outside
    Spark it takes cuda when there is one."""
    import torch

    from quality_models.bert_backend import encoder_device

    in_task = spark.sparkContext.parallelize([0], 1).map(lambda _: encoder_device()).collect()
    assert in_task == ["cpu"]  # the suite's Spark assigns no GPU to its tasks
    assert encoder_device() == ("cuda" if torch.cuda.is_available() else "cpu")
