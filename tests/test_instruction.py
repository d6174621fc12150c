"""Instruction sources end to end: records with a prompt and a completion (or a conversation) are
parsed, judged by their completion, scrubbed in both parts, packed whole with their prompt masked,
and trained with loss on the completion only."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.packing import interleave_row
from jobs.records import CHAT_REPLY, Document, Rejection, SourceSpec, parse_json_line, render_chat
from lake.tables import Lake
from schemas import table
from tests.conftest import make_recipe, write_jsonl

PAIRS = SourceSpec("qa", "text", "id", None, 10_000, kind="instruction")
CHAT = SourceSpec("chat", "text", "id", None, 10_000, kind="instruction", messages_field="messages")


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def test_a_prompt_and_completion_record_keeps_both_parts_and_the_completion_is_the_text():
    out = parse_json_line(_line({"id": 1, "prompt": "Name a river.\r\n", "completion": "The Yangtze.", "lang": "en"}),
                          PAIRS, "qa.jsonl:1")
    assert isinstance(out, Document)
    assert (out.prompt, out.text, json.loads(out.meta)) == ("Name a river.\n", "The Yangtze.", {"lang": "en"})
    other = parse_json_line(_line({"prompt": "Name a lake.\n", "completion": "The Yangtze."}),
                            SourceSpec("qa", "text", None, None, 10_000, kind="instruction"), "qa.jsonl:2")
    again = parse_json_line(_line({"prompt": "Name a river.\n", "completion": "The Yangtze."}),
                            SourceSpec("qa", "text", None, None, 10_000, kind="instruction"), "qa.jsonl:3")
    assert other.doc_id != again.doc_id  # without an id field, the prompt is part of the identity


def test_a_conversation_is_chatml_up_to_its_last_assistant_turn():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
             {"role": "assistant", "content": "6"}]
    prompt, completion = render_chat(turns)
    assert completion == "6" and prompt.endswith(CHAT_REPLY)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n")
    out = parse_json_line(_line({"id": 1, "messages": turns}), CHAT, "chat.jsonl:1")
    assert isinstance(out, Document) and (out.prompt, out.text) == (prompt, completion)


def test_bad_instruction_records_are_rejected_with_their_reason_and_location():
    cases = [
        (PAIRS, {"id": 1, "completion": "x"}, "missing_prompt", "field 'prompt' is missing"),
        (PAIRS, {"id": 1, "prompt": "q", "completion": 3}, "missing_completion", "is a int, expected a string"),
        (PAIRS, {"id": 1, "prompt": "  ", "completion": "an answer"}, "empty_prompt", "prompt is empty"),
        (PAIRS, {"id": 1, "prompt": "q", "completion": "\n"}, "empty_text", "completion is empty"),
        (PAIRS, {"id": 1, "prompt": "q" * 6000, "completion": "a" * 6000}, "too_large", "12000 bytes"),
        (CHAT, {"id": 1}, "missing_messages", "'messages' is missing"),
        (CHAT, {"id": 1, "messages": []}, "malformed_messages", "not a non-empty list"),
        (CHAT, {"id": 1, "messages": [{"role": "user"}]}, "malformed_messages", "turn 0 is not an object"),
        (CHAT, {"id": 1, "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]},
         "malformed_messages", "ends with a 'user' turn"),
    ]
    for spec, record, reason, says in cases:
        out = parse_json_line(_line(record), spec, "data.jsonl:7")
        assert isinstance(out, Rejection) and out.reason == reason, (record, out)
        assert out.detail.startswith("data.jsonl:7: ") and says in out.detail, out.detail


# -- the trainer: loss on the completion only ----------------------------------------------------------


def test_prompt_tokens_carry_no_loss_and_no_gradient():
    from lake.trainer_sections import ModelCfg
    from trainer.model import build_model, row_layout, token_losses

    torch.manual_seed(0)
    model = build_model(ModelCfg(hidden=32, layers=1, heads=2, kv_heads=1), vocab_size=64)
    width = 24
    # a text document (0..9), then an instruction example of 12 tokens whose first 5 are its prompt, then
    # padding; a second row holds the example's continuation (doc_start 9): its first positions are
    # still completion, so all of them carry loss
    spans = [[{"doc_id": "t", "pos": 0, "doc_start": 0, "length": 10, "doc_tokens": 10, "category": "en"},
              {"doc_id": "q", "pos": 10, "doc_start": 0, "length": 12, "doc_tokens": 30, "category": "instruction",
               "prompt_tokens": 5}],
             [{"doc_id": "q", "pos": 0, "doc_start": 12, "length": 18, "doc_tokens": 30, "category": "instruction",
               "prompt_tokens": 5}]]
    cat, pos, seg = row_layout(spans, width, ["en", "instruction"])
    assert (cat[0, 10:15] == -1).all() and (cat[0, 15:22] == 1).all() and (cat[0, :10] == 0).all()
    assert (cat[0, 22:] == -1).all() and (cat[1, :18] == 1).all()
    ids = torch.randint(0, 64, (2, width))
    captured = {}

    def keep_logits(module, args, out):
        out.retain_grad()
        captured["logits"] = out

    model.lm_head.register_forward_hook(keep_logits)
    loss, target_cat = token_losses(model, ids, cat, pos, seg, doc_mask=True)
    # the target at input position t is token t + 1: targets 10..14 are the prompt's tokens
    assert (target_cat[0, 9:14] == -1).all() and (loss[0, 9:14] == 0).all()
    assert (loss[0, 14:21] > 0).all()  # the first completion token is learnt from the prompt's last one
    loss.sum().backward()
    grad = captured["logits"].grad
    assert grad[0, 9:14].abs().max() == 0 and grad[0, 21:].abs().max() == 0  # prompt targets and padding
    assert (grad[0, 14:21].abs().amax(dim=-1) > 0).all() and (grad[1, :17].abs().amax(dim=-1) > 0).all()


def test_held_out_perplexity_scores_an_example_on_its_completion_given_its_prompt():
    from lake.trainer_sections import ModelCfg
    from trainer.evaluation import perplexity_by_source
    from trainer.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelCfg(hidden=32, layers=1, heads=2, kv_heads=1), vocab_size=64)
    ids = torch.randint(0, 64, (12,)).tolist()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([ids[:-1]])).logits[0], torch.tensor(ids[1:]),
                                                 reduction="none")
    got = perplexity_by_source(model, {"qa": [(ids, 4)], "web": [(ids, 0)]})
    assert got["qa"] == pytest.approx(math.exp(float(loss[3:].mean())), rel=1e-5)  # targets 4.. : the completion
    assert got["web"] == pytest.approx(math.exp(float(loss.mean())), rel=1e-5)


def test_held_out_documents_of_a_lake_refined_before_the_prompt_column_still_evaluate(tmp_path):
    from deltalake import write_deltalake

    from jobs.synthetic_lake import make_lake
    from trainer.evaluation import holdout_examples

    lake, tok, _, _ = make_lake(str(tmp_path / "lake"))
    docs = lake.read_arrow("documents_dedup")
    write_deltalake(lake.uri("documents_dedup"), docs.drop_columns(["prompt"]), mode="overwrite",
                    schema_mode="overwrite")  # as an older tokenmill wrote it
    assert not lake.has_column("documents_dedup", "prompt")
    examples = holdout_examples(lake, tok, 5, 64)
    assert examples and all(context == 0 and len(ids) > 1 for docs in examples.values() for ids, context in docs)


# -- the refinery: ingest, filter and pii judge and scrub the right parts -----------------------------


@pytest.fixture(scope="module")
def refined(spark, tmp_path_factory):
    from jobs import filter_rules, ingest, scrub_pii
    from jobs.demo_corpus import build_demo_corpus

    tmp = tmp_path_factory.mktemp("instruction")
    built = {b.name: b for b in build_demo_corpus(tmp / "demo", {"zh_news": 5, "zh_reviews": 5, "en_docs": 5,
                                                                   "code": 5, "instruct": 30, "chat": 10})}
    records = built["instruct"].records()
    good = next(r for r in records if r["id"].startswith("howto-") and len(r["completion"]) > 300)
    extra = [
        # PII in the prompt only: scrubbed there, counted with the document
        {"id": "pii-prompt", "prompt": "Mail the answer to li.wei@example.com please.\n" + good["prompt"],
         "completion": good["completion"]},
        # a junk prompt does not decide: the completion is what the rules judge
        {"id": "junk-prompt", "prompt": "!!!! ???? #### " * 3, "completion": good["completion"] + "\nIn short: yes."},
        # a junk completion is rejected whatever the prompt
        {"id": "junk-completion", "prompt": good["prompt"], "completion": "click here " * 40},
        # a short answer: the length rules count the whole example, so it stays
        {"id": "short-answer", "prompt": "Which river is the longest in China, and how long is it? Give the name "
                                         "and the length in kilometres, please.\n", "completion": "The Yangtze, 6,300 km."},
        {"id": "short-list", "prompt": "Name two of the longest rivers of China, with the longest one first, and say nothing else in the answer please.\n",
         "completion": "Yangtze. Yellow River."},
    ]
    write_jsonl(tmp / "extra" / "part-0.jsonl", extra)
    sources = [{"name": "instruct", "path": str(built["instruct"].path), "kind": "instruction", "id_field": "id",
                "url_field": "url"},
               {"name": "chat", "path": str(built["chat"].path), "kind": "instruction", "messages_field": "messages",
                "id_field": "id", "url_field": "url"},
               {"name": "extra", "path": str(tmp / "extra" / "part-0.jsonl"), "kind": "instruction", "id_field": "id"},
               {"name": "en_docs", "path": str(built["en_docs"].path), "id_field": "id"}]
    recipe = make_recipe(tmp, sources)
    ingest.run(spark, recipe)
    filter_rules.run(spark, recipe)
    scrub_pii.run(spark, recipe)
    lake = Lake(recipe.lake)
    return lake, built, extra


def test_instruction_records_travel_with_their_prompt_and_are_judged_by_their_completion(refined):
    lake, built, extra = refined
    raw = {r["doc_id"]: r for r in lake.read_arrow("documents_raw").to_pylist()}
    by_source = {s: [r for r in raw.values() if r["source"] == s] for s in ("instruct", "chat", "en_docs")}
    assert len(by_source["instruct"]) == 30 and len(by_source["chat"]) == 10
    assert all(r["prompt"] for r in by_source["instruct"] + by_source["chat"])
    assert all(r["prompt"] is None for r in by_source["en_docs"])
    assert all(r["prompt"].startswith("<|im_start|>system\n") and r["prompt"].endswith(CHAT_REPLY)
               for r in by_source["chat"])
    rejected = {r["doc_id"]: r for r in lake.read_arrow("documents_rejected").to_pylist() if r["stage"] == "filter"}
    clean = {r["doc_id"]: r for r in lake.read_arrow("documents_clean").to_pylist()}
    extra_docs = {r["prompt"]: r for r in raw.values() if r["source"] == "extra"}
    junk_prompt = extra_docs[extra[1]["prompt"]]
    junk_completion = extra_docs[extra[2]["prompt"]]
    assert junk_prompt["doc_id"] in clean
    assert junk_completion["doc_id"] in rejected and junk_completion["doc_id"] not in clean
    pii = clean[extra_docs[next(p for p in extra_docs if "li.wei@" in p)]["doc_id"]]
    assert "li.wei@example.com" not in pii["prompt"] and "<EMAIL>" in pii["prompt"] and dict(pii["pii"])["EMAIL"] == 1
    assert pii["text"] == extra[0]["completion"]
    # 22 characters, fewer than 2 stop words: kept, the question counts; junk shares still reject one
    assert extra_docs[extra[4]["prompt"]]["doc_id"] in clean
    assert rejected[extra_docs[extra[3]["prompt"]]["doc_id"]]["reason"] == "non_alpha_words"


# -- feed: examples packed whole, with their prompt length --------------------------------------------


def _instruction_docs(rng: random.Random, n: int, now) -> list[dict]:
    from jobs.synthetic_lake import text_of

    out = []
    for i in range(n):
        long = i % 7 == 0  # some are longer than a row: cut across rows, from a fresh row
        prompt = "question " + text_of(rng, "en") + ("\n" + text_of(rng, "en")) * (3 if long else 0) + "\n"
        out.append({"doc_id": f"ins{i:03d}", "text": "answer " + text_of(rng, "en"), "prompt": prompt,
                    "source": "src_ins", "url": None, "meta": None, "ingested_at": now, "signals": None, "pii": None,
                    "quality": 0.5, "domain": "instruction", "lang": "en", "category": "instruction",
                    "cluster_id": None})
    return out


@pytest.fixture(scope="module")
def fed(spark, tmp_path_factory):
    from jobs import feed
    from jobs.stages import FeedOptions
    from jobs.synthetic_lake import make_lake

    tmp = tmp_path_factory.mktemp("instruction_feed")
    lake, tok, meta, docs = make_lake(str(tmp / "lake"))
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    every = lake.read_arrow("documents_dedup").to_pylist() + _instruction_docs(random.Random(1), 60, now)
    lake.write_arrow("documents_dedup", pa.Table.from_pylist(every, schema=table("documents_dedup").schema),
                     mode="overwrite", job="test")
    recipe = make_recipe(tmp, [{"name": "t", "path": str(tmp / "none.jsonl")}],
                         feed={"chunk_tokens": 2500, "rows_per_file": 16, "stages": {"pretrain": {
                             "seq_len": 63, "mix": {"zh": 3, "en": 3, "code": 2, "instruction": 2}}}},
                         trainer={"eval_docs": 3, "eval_every": 1000, "micro_batch": 4, "batch_ramp": [[0, 4]],
                                  "planned_tokens": 20000, "poll_seconds": 0.05,
                                  "model": {"hidden": 64, "layers": 1, "heads": 2, "kv_heads": 1, "doc_mask": True}})
    recipe = recipe.model_copy(update={"lake": str(tmp / "lake")})
    feed.run(spark, recipe, FeedOptions())
    return recipe, lake, tok, meta, {d["doc_id"]: d for d in every}


def test_feed_packs_each_example_whole_with_its_prompt_length_among_the_text_rows(fed):
    from lake import chunks
    from trainer.model import row_layout

    recipe, lake, tok, meta, docs = fed
    (chunk,) = chunks.manifest(lake)
    rows = pq.read_table(chunks.chunk_dir(recipe.lake, chunk["chunk_id"])).sort_by("row").to_pylist()
    assert [r["row"] for r in rows] == list(range(chunk["n_rows"])) and all(len(r["input_ids"]) == 64 for r in rows)
    mix = dict(chunk["mix"])
    assert mix["instruction"] >= 500  # its share (2 of 10) of 2500, taken in whole examples
    kinds, seen = [], {}
    for row in rows:
        cats = {s["category"] for s in row["spans"]}
        assert cats <= {"instruction"} or "instruction" not in cats  # examples have rows of their own
        kinds.append("instruction" in cats)
        for s in row["spans"]:
            d = docs[s["doc_id"]]
            if s["category"] != "instruction":
                assert s["prompt_tokens"] == 0
                continue
            prompt = tok.encode(d["prompt"], add_special_tokens=False).ids
            ids = prompt + tok.encode(d["text"], add_special_tokens=False).ids + [meta["eos_id"]]
            assert s["prompt_tokens"] == len(prompt) and s["doc_tokens"] == len(ids)
            assert row["input_ids"][s["pos"] : s["pos"] + s["length"]] == ids[s["doc_start"] : s["doc_start"] + s["length"]]
            if len(ids) <= 64:
                assert s["doc_start"] == 0 and s["length"] == len(ids)  # never cut when it fits a row
            else:
                assert s["pos"] == 0  # a longer one starts a row, and goes on at the next one's start
            assert s["doc_start"] == seen.get(s["doc_id"], 0)
            seen[s["doc_id"]] = s["doc_start"] + s["length"]
    assert all(seen[d] == len(tok.encode(docs[d]["prompt"], add_special_tokens=False).ids)
               + len(tok.encode(docs[d]["text"], add_special_tokens=False).ids) + 1 for d in seen)  # all of each
    assert any(len(tok.encode(docs[d]["prompt"]).ids) > 64 for d in seen)  # the case of a longer one was met
    # the example rows sit where interleave_row spreads them among the text rows, not at the end
    text_rows, example_rows = kinds.count(False), kinds.count(True)
    assert example_rows >= 2 and sorted(interleave_row(text_rows + j, text_rows, example_rows)
                                        for j in range(example_rows)) == [i for i, k in enumerate(kinds) if k]
    assert kinds.index(True) < len(kinds) - 1 - kinds[::-1].index(False)
    # what the trainer makes of it: exactly the prompt positions are without loss
    cat, _, _ = row_layout([r["spans"] for r in rows], 64, [])
    prompt_positions = sum(max(0, min(s["length"], s["prompt_tokens"] - s["doc_start"]))
                           for r in rows for s in r["spans"])
    padding = sum(64 - sum(s["length"] for s in r["spans"]) for r in rows)
    assert int((cat == -1).sum()) == prompt_positions + padding and prompt_positions > 0


@pytest.mark.slow
def test_the_trainer_reports_instruction_loss_as_its_own_category(fed, tmp_path):
    from trainer.loop import Trainer

    recipe, lake, *_ = fed
    Trainer(recipe, max_steps=4).run()
    records = [json.loads(line) for line in (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert any("instruction" in r["loss_by_category"] for r in records)
    assert all(np.isfinite(v) for r in records for v in r["loss_by_category"].values())
