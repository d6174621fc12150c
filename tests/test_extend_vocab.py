"""Vocabulary extension: the check passes deliberate uses of new tokens and refuses, naming the token,
one that splits an old token; learned merges keep every old id and save tokens; the model's
embeddings grow with mean rows and load with ``init_from``; the tokenizer stage on real text."""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from tokenizers import pre_tokenizers

from jobs import extend_vocab as ev
from jobs import train_tokenizer
from jobs.stages import StageError, TokenizerOptions, add_option_flags, options_from
from jobs.train_tokenizer import EOS, PAD, build_tokenizer, pad_to_multiple
from lake.artifacts import TOKENIZER, load_tokenizer, versions
from lake.errors import ArtifactError
from lake.tables import Lake
from schemas import table
from tests.conftest import make_recipe

NATION = "中华人民共和国"


@pytest.fixture(scope="module")
def small():
    """A byte-level BPE that has learnt 中华人民共和国 as one token."""
    texts = [f"{NATION}成立了。{NATION}万岁。the river and the riverbank in 2026"] * 50
    tok = build_tokenizer(texts, 300, [EOS, PAD], [], 1)
    pad_to_multiple(tok)
    assert tok.encode(NATION).tokens == [ev.byte_level(NATION)]
    return tok


def test_the_byte_table_is_byte_level_bpes_alphabet():
    assert set(ev.BYTE_CHARS.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert ev.byte_level(" 中") == "Ġä¸Ń" and ev.readable("Ġä¸Ń") == " 中"


def test_a_token_that_splits_an_old_token_is_refused_naming_both(small):
    new, ids = ev.add_tokens(small, ["中华人民"])
    assert list(ids) == [ev.vocab_size(small)]  # appended after the old vocabulary
    texts = {"zh": [f"今天{NATION}成立了", "万岁"], "en": ["the river"]}
    check = ev.check_extension(small, new, ids, texts, added=set(ids))
    assert not check.passed and check.changed == 1
    [harm] = check.harms
    assert (harm.token, harm.token_id, harm.texts, harm.category) == ("中华人民", ids.popitem()[0], 1, "zh")
    assert harm.lost == [NATION] and NATION in harm.example
    message = ev.refusal(check, "leave it out")
    assert "'中华人民'" in message and f"'{NATION}'" in message and "nothing was written" in message


def test_deliberate_uses_of_an_added_token_pass_and_are_counted(small):
    new, ids = ev.add_tokens(small, [" 中华人民共和国成立"])  # longer than the old token: it joins, splits nothing
    [i] = ids
    texts = {"zh": [f"今天 {NATION}成立了，{NATION}万岁", "万岁"]}
    check = ev.check_extension(small, new, ids, texts, added={i})
    assert check.passed and check.changed == 1
    old_len = len(small.encode(" 中华人民共和国成立").ids)
    assert check.per_token[i] == {"texts": 1, "uses": 1, "tokens_saved": old_len - 1}
    p = check.per_category["zh"]
    assert p["tokens_before"] - p["tokens_after"] == old_len - 1
    assert p["bytes_per_token_after"] > p["bytes_per_token_before"]


def test_a_word_without_its_space_changes_the_space_before_it_and_is_refused(small):
    """'riverbank' added bare: ' riverbank' becomes ' ' + 'riverbank', and the old token that held the space
    (' river') is not produced there any more."""
    new, ids = ev.add_tokens(small, ["riverbank"])
    check = ev.check_extension(small, new, ids, {"en": ["the river and the riverbank"]}, added=set(ids))
    first = ev.readable(small.encode(" riverbank").tokens[0])
    assert first == " river" and [h.token for h in check.harms] == ["riverbank"] and check.harms[0].lost == [first]


def test_learned_merges_keep_every_old_id_and_save_the_tokens_they_promise(small):
    rng = random.Random(0)
    words = "aspirin ibuprofen paracetamol dosage tablet".split()
    domain = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(30)]
    learned = ev.learn_merges(small, domain, 12)
    assert len(learned) == 12 and [s for *_, s in learned] == sorted((s for *_, s in learned), reverse=True)
    new, ids = ev.add_merges(small, [(a, b) for a, b, _ in learned])
    size = ev.vocab_size(small)
    assert sorted(ids) == list(range(size, size + 12))
    assert all(new.token_to_id(t) == i for t, i in small.get_vocab(with_added_tokens=True).items())
    held = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(5)]
    check = ev.check_extension(small, new, ids, {"domain": held, "zh": [f"{NATION}万岁"]})
    assert check.passed and check.changed == 5
    p = check.per_category["domain"]
    assert p["tokens_before"] - p["tokens_after"] == sum(s["tokens_saved"] for s in check.per_token.values()) > 0
    assert check.per_category["zh"]["tokens_before"] == check.per_category["zh"]["tokens_after"]
    for text in held:  # the new encoding decodes to the same text
        assert new.decode(new.encode(text).ids) == text


def test_learning_stops_when_no_pair_repeats(small):
    assert ev.learn_merges(small, ["qz"], 5) == []


def test_inputs_are_checked_with_errors_that_say_what_to_do(small, tmp_path):
    with pytest.raises(ArtifactError, match="no such folder"):
        ev.load_base(str(tmp_path / "missing"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(ArtifactError, match="no tokenizer.json there"):
        ev.load_base(str(tmp_path / "hf"))
    with pytest.raises(ArtifactError, match="no such file"):
        ev.read_token_file(str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ArtifactError, match="no token in it"):
        ev.read_token_file(str(tmp_path / "empty.txt"))
    (tmp_path / "t.txt").write_text(" aspirin\nibuprofen\n# x\n aspirin\n")
    assert ev.read_token_file(str(tmp_path / "t.txt")) == [" aspirin", "ibuprofen"]
    with pytest.raises(ArtifactError, match=r"'中华人民共和国' is already in the vocabulary \(id \d+\)"):
        ev.add_tokens(small, [NATION])


def test_the_extension_flags_become_options():
    parser = argparse.ArgumentParser()
    add_option_flags(parser, TokenizerOptions)
    args = parser.parse_args(["--extend-from", "hf", "--learn", "8", "--category", "en"])
    assert options_from(args, TokenizerOptions) == TokenizerOptions(extend_from="hf", learn=8, category="en")


def _hf_folder(small, tmp_path, tied: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=ev.vocab_size(small) + 64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    folder = tmp_path / f"hf-{tied}"
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=small, eos_token=EOS, pad_token=PAD).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_the_grown_model_has_mean_rows_and_loads_with_init_from(small, tmp_path, tied):
    from transformers import LlamaForCausalLM

    from trainer.model import build_model

    source = _hf_folder(small, tmp_path, tied)
    base = LlamaForCausalLM.from_pretrained(source)
    old, (new, ids) = ev.vocab_size(small), ev.add_tokens(small, [" 中华人民共和国成立", " aspirin"])
    sizes = ev.grow_model(source, str(tmp_path / "grown"), new, old, old + 2, old + 256, EOS, PAD)
    assert sizes == {"before": old + 64, "after": old + 256}
    cfg = make_recipe(tmp_path, [{"name": "t", "path": str(tmp_path / "x.jsonl")}]).trainer.model
    model = build_model(cfg.model_copy(update={"init_from": str(tmp_path / "grown"), "tie_embeddings": tied}),
                        old + 256)
    for grown, before in [(model.get_input_embeddings().weight, base.get_input_embeddings().weight),
                          (model.get_output_embeddings().weight, base.get_output_embeddings().weight)]:
        assert grown.shape[0] == old + 256
        assert torch.equal(grown[:old], before[:old])  # old rows untouched
        mean = before[:old].mean(0)
        assert torch.allclose(grown[old], mean) and torch.allclose(grown[old + 1], mean) and torch.allclose(grown[-1], mean)
        assert torch.equal(grown[old + 2:old + 64], before[old + 2:old + 64])  # the old reserve keeps its rows
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    text = "今天 中华人民共和国成立了 aspirin"
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(str(tmp_path / "grown"))(text, return_tensors="pt").input_ids
    assert set(ids) <= set(encoded[0].tolist())
    logits = model(input_ids=encoded).logits
    assert logits.shape == (1, encoded.shape[1], old + 256) and torch.isfinite(logits).all()


# -- the stage on real text -------------------------------------------------------------------------------


CATEGORY = {"zh_news": "zh", "zh_reviews": "zh", "en_docs": "en", "code": "code"}


@pytest.fixture(scope="module")
def real(spark, tmp_path_factory):
    """A lake whose documents are the demo corpus (People's Daily, reviews, English docs, stdlib code), a
    tokenizer trained on it and a tiny model exported with it (``trainer.model.export_hf``)."""
    from datetime import datetime, timezone

    from jobs.demo_corpus import build_demo_corpus
    from trainer.model import build_model, export_hf

    tmp = tmp_path_factory.mktemp("extend")
    rows = []
    for built in build_demo_corpus(tmp / "corpus", {"zh_news": 80, "zh_reviews": 60, "en_docs": 80, "code": 60}):
        if built.name in CATEGORY:
            for k, text in enumerate(built.texts()):
                c = CATEGORY[built.name]
                rows.append({"doc_id": f"{built.name}-{k}", "text": text, "source": built.name, "url": None, "meta": None,
                             "ingested_at": datetime(2026, 1, 1, tzinfo=timezone.utc), "signals": None, "pii": None,
                             "quality": 0.5, "domain": c, "lang": c, "category": c, "cluster_id": None})
    recipe = make_recipe(tmp, [{"name": "t", "path": str(tmp / "none.jsonl")}],
                         tokenizer={"vocab_size": 1024, "holdout_docs": 20, "embedding_buffer": 200},
                         trainer={"model": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1}})
    Lake(recipe.lake).write_arrow("documents_dedup", pa.Table.from_pylist(rows, schema=table("documents_dedup").schema),
                                  mode="overwrite", job="test")
    train_tokenizer.run(spark, recipe)
    _, meta = load_tokenizer(recipe)
    model = build_model(recipe.trainer.model, meta["model_vocab_size"])
    folder = export_hf(model.state_dict(), recipe.trainer.model, meta["model_vocab_size"], 10_000.0,
                       f"{meta['folder']}/tokenizer.json", meta, str(tmp / "hf"))
    return recipe, folder, meta, tmp


def test_learning_merges_on_real_text_passes_the_check_and_grows_the_model(spark, real, capsys):
    from trainer.model import build_model

    recipe, folder, base_meta, tmp = real
    report = train_tokenizer.run(spark, recipe, TokenizerOptions(extend_from=folder, learn=24, category="zh"))
    print(report)
    shown = capsys.readouterr().out
    assert "check on" in shown and "bytes/token before" in shown
    assert report.check.passed and report.check.changed > 0 and len(report.new_tokens) == 24
    tok, meta = load_tokenizer(recipe)
    assert meta["version"] == "v2" and meta["extended_from"] == str(Path(folder).resolve())
    assert meta["vocab_size"] == base_meta["vocab_size"] + 24 == tok.get_vocab_size()
    assert meta["model_vocab_size"] % 128 == 0 and meta["model_vocab_size"] - meta["vocab_size"] >= 200
    zh = meta["compression"]["zh"]["bytes_per_token"]
    assert zh > meta["compression_before"]["zh"]["bytes_per_token"]  # measured on held-out zh documents
    assert sorted(int(i) for i in meta["check"]["per_token"]) == sorted(report.new_tokens)
    model = build_model(recipe.trainer.model.model_copy(update={"init_from": report.model_folder}),
                        meta["model_vocab_size"])
    ids = torch.tensor([sorted(report.new_tokens)[:8]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert model.get_input_embeddings().weight.shape[0] == meta["model_vocab_size"]


def test_a_harmful_extension_on_real_text_is_refused_and_writes_nothing(spark, real):
    """The prefix of a token held-out text uses most (of the tokens of 3 characters or more whose prefix
    is no token), added as a token: the old token can no longer be produced, and the stage names both."""
    recipe, folder, _, tmp = real
    old, _ = ev.load_base(folder)
    _, held, _ = train_tokenizer.sample_by_mix(spark, recipe, Lake(recipe.lake, spark))
    used = Counter(t for e in old.encode_batch(held["zh"] + held["en"], add_special_tokens=False) for t in e.tokens)
    victim, prefix = max(((ev.readable(t), ev.readable(t)[:-1]) for t in used if len(ev.readable(t)) >= 3
                          and "�" not in ev.readable(t) and len(old.encode(ev.readable(t)[:-1]).ids) > 1),
                         key=lambda vp: (used[ev.byte_level(vp[0])], vp))
    (tmp / "harm.txt").write_text(prefix + "\n", encoding="utf-8")
    before = versions(recipe.lake, TOKENIZER)
    out = tmp / "never"
    with pytest.raises(StageError) as refused:
        train_tokenizer.run(spark, recipe, TokenizerOptions(extend_from=folder, add_tokens=str(tmp / "harm.txt"),
                                                            out=str(out)))
    message = str(refused.value)
    assert f"new token {prefix!r}" in message and repr(victim) in message and "nothing was written" in message
    assert versions(recipe.lake, TOKENIZER) == before and not out.exists()


def test_extension_flags_without_a_base_are_refused(spark, real):
    recipe, *_ = real
    with pytest.raises(StageError, match="--extend-from"):
        train_tokenizer.run(spark, recipe, TokenizerOptions(learn=3))
    with pytest.raises(StageError, match="--add-tokens FILE"):
        train_tokenizer.run(spark, recipe, TokenizerOptions(extend_from=real[1]))


def test_a_base_without_the_end_of_text_and_pad_tokens_is_refused_before_any_work(tmp_path):
    texts = ["the river and the riverbank"] * 20
    bare = build_tokenizer(texts, 300, ["<s>"], [], 1)  # another family's specials
    folder = tmp_path / "foreign"
    folder.mkdir()
    bare.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text("{}")
    recipe = make_recipe(tmp_path, [{"name": "t", "path": str(tmp_path / "x.jsonl")}])
    with pytest.raises(StageError, match=r"has no <\|endoftext\|> and no <\|pad\|>"):
        train_tokenizer.extend(None, recipe, TokenizerOptions(extend_from=str(folder), learn=4))
