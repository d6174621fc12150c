"""Decontamination against evaluation sets and URL blocklists: the functions, and the filter job with them."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import filter_rules, ingest
import unicodedata

from jobs.decontam import Tokens, build_eval_set, contamination, eval_texts, url_block
from quality_models.arrowtext import HAN_RANGES
from jobs.demo_corpus import build_demo_corpus
from lake.recipe import RecipeError
from lake.tables import Lake

from conftest import make_recipe, write_jsonl
from test_rules import first_failure

QUESTION = ("Which of the following best explains why the boiling point of water decreases as the altitude "
            "above sea level increases in mountain regions")
ZH_PASSAGE = "阅读下面的材料，根据要求写作。人工智能正在改变我们学习和工作的方式，请谈谈你的看法。"


def _plain_tokens(text: str) -> list[str]:
    """The obvious tokenizer, character by character: each Han character a token, runs of anything but
    Unicode punctuation, symbols, separators and whitespace the others."""
    tokens, word = [], ""
    for ch in text.lower():
        if any(lo <= ord(ch) <= hi for lo, hi in HAN_RANGES) or unicodedata.category(ch)[0] in "PSZ" or ch.isspace():
            tokens += [word] if word else []
            word = ""
            if unicodedata.category(ch)[0] not in "PSZ" and not ch.isspace():
                tokens.append(ch)
        else:
            word += ch
    return tokens + ([word] if word else [])


def _naive_matches(text: str, eval_text: str, n: int) -> int:
    """The reference: the text's n-grams (as tuples of plain tokens) that the evaluation text has."""
    def grams(t):
        words = _plain_tokens(t)
        return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]

    held = set(grams(eval_text))
    return sum(g in held for g in grams(text))


def test_tokens_are_what_the_obvious_tokenizer_finds():
    rnd = random.Random(5)
    alphabet = "abcXYZ01 ,.;-–—!?'\"\n\t\u3000\u00a0人工智能的、。（）ÄéßİΣ😀𠀀_#$€ "
    for _ in range(300):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 60)))
        tokens = Tokens.of(text)
        found = [tokens.text[a:b] for a, b in zip(tokens.starts, tokens.ends)]
        assert found == _plain_tokens(text), text


def test_a_shared_13_gram_contaminates_whatever_the_case_and_punctuation():
    eval_set = build_eval_set("mmlu", [QUESTION, "A. pressure falls  B. heat rises"], 13)
    words = QUESTION.split()
    text = "Some notes. " + " ".join(words[:13]).upper().replace(" ", ", ") + " and then something else entirely."
    [found] = contamination(text, [eval_set], 13)
    assert found.eval_set == "mmlu" and found.matched == 1
    assert found.ngram == " ".join(w.lower() for w in words[:13])
    assert contamination("Some notes. " + " ".join(words[:12]) + " and then something else.", [eval_set], 13) == []


def test_han_characters_are_tokens_of_their_own():
    eval_set = build_eval_set("gaokao", [ZH_PASSAGE], 13)
    [found] = contamination("今天的新闻：人工智能正在改变我们学习和工作的方式。其他内容。", [eval_set], 13)
    assert found.ngram == "人 工 智 能 正 在 改 变 我 们 学 习 和"
    assert found.matched == len("人工智能正在改变我们学习和工作的方式") - 12
    assert contamination("人工智能正在改变我们的生活", [eval_set], 13) == []


def test_hash_lookup_counts_what_a_set_of_word_tuples_counts():
    rnd = random.Random(3)
    vocab = [f"w{i}" for i in range(30)]
    for _ in range(50):
        eval_text = " ".join(rnd.choice(vocab) for _ in range(rnd.randrange(5, 80)))
        text = " ".join(rnd.choice(vocab) for _ in range(rnd.randrange(5, 200)))
        n = rnd.choice([3, 4, 5])
        found = contamination(text, [build_eval_set("s", [eval_text], n)], n)
        assert (found[0].matched if found else 0) == _naive_matches(text, eval_text, n)


def test_evaluation_records_give_their_named_fields_or_every_string_field():
    records = [{"question": "q one", "choices": ["a", "b"], "answer": 2}, {"question": "q two", "choices": []}]
    assert eval_texts(records, ["question", "choices"], "x.jsonl") == ["q one", "a", "b", "q two"]
    assert eval_texts(records, None, "x.jsonl") == ["q one", "a", "b", "q two"]
    with pytest.raises(ValueError, match=r"x.jsonl: record 1 has no field 'prompt'"):
        eval_texts(records, ["prompt"], "x.jsonl")
    with pytest.raises(ValueError, match=r"x.jsonl: record 1: field 'answer' is int, not text"):
        eval_texts(records, ["question", "answer"], "x.jsonl")


def test_url_blocklist_blocks_domains_with_their_subdomains_and_banned_words():
    domains, words = frozenset({"spam.example", "xxx"}), frozenset({"casino"})
    assert url_block("https://spam.example/a", domains, words) == "domain spam.example"
    assert url_block("http://news.Spam.Example:8080/a", domains, words) == "domain spam.example (host news.spam.example)"
    assert url_block("https://site.xxx/", domains, words) == "domain xxx (host site.xxx)"
    assert url_block("https://notspam.example/a", domains, words) is None
    assert url_block("https://blog.org/best-casino-online", domains, words) == "banned word 'casino' in the URL"
    assert url_block("https://blog.org/occasionally", domains, words) is None
    assert url_block(None, domains, words) is None and url_block("", domains, words) is None
    assert url_block("http://[::1/casino", domains, words) == "banned word 'casino' in the URL"  # unsplittable: words


@pytest.fixture(scope="module")
def contaminated(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decontam")
    built = {b.name: b for b in build_demo_corpus(tmp / "demo", {"zh_news": 20, "en_docs": 30})}

    def texts(name):
        return built[name].texts()

    en = [t for t in texts("en_docs") if first_failure(t) is None]
    zh = [t for t in texts("zh_news") if first_failure(t) is None]
    write_jsonl(tmp / "evals" / "mmlu.jsonl", [{"question": QUESTION, "choices": ["pressure", "heat"], "answer": 0}])
    pq.write_table(pa.table({"passage": [ZH_PASSAGE], "id": [1]}), tmp / "evals" / "gaokao.parquet")
    (tmp / "lists").mkdir()
    (tmp / "lists" / "domains.txt").write_text("# blocked\nspam.example\n")
    (tmp / "lists" / "words.txt").write_text("casino\n")
    records = [{"id": f"clean-{i}", "text": t, "url": f"https://good.org/{i}"} for i, t in enumerate(en[:10] + zh[:5])]
    bad = {
        "mmlu": en[10] + "\n\nQuiz: " + QUESTION + "?",
        "gaokao": zh[5] + "\n" + ZH_PASSAGE,
        "near": en[11] + "\n\n" + " ".join(QUESTION.split()[:12]) + ".",  # 12 words: not a 13-gram
    }
    records += [{"id": k, "text": t, "url": f"https://good.org/{k}"} for k, t in bad.items()]
    records += [{"id": "subdomain", "text": en[12], "url": "https://ads.spam.example/page"},
                {"id": "word", "text": en[13], "url": "https://blog.org/best-casino-tips"},
                {"id": "lookalike", "text": en[14], "url": "https://notspam.example/page"}]
    assert all(first_failure(r["text"]) is None for r in records)
    data = write_jsonl(tmp / "in" / "part-0.jsonl", records)
    recipe = make_recipe(tmp, [{"name": "mix", "path": str(data), "id_field": "id", "url_field": "url"}], filter={
        "decontaminate": {"sets": {"mmlu": {"path": "evals/mmlu.jsonl", "fields": ["question", "choices"]},
                                   "gaokao": {"path": "evals/gaokao.parquet"}}},
        "url_blocklist": {"domains": ["lists/domains.txt"], "words": ["lists/words.txt"]},
    })
    ingest.run(spark, recipe)
    report = filter_rules.run(spark, recipe)
    return recipe, records, report


def test_contaminated_and_blocked_documents_are_removed_and_named(spark, contaminated):
    from jobs.records import make_doc_id

    recipe, records, report = contaminated
    lake = Lake(recipe.lake, spark)
    ids = {make_doc_id("mix", r["id"], ""): r["id"] for r in records}
    rejected = {ids[r["doc_id"]]: r for r in lake.read("documents_rejected").where("stage = 'filter'").collect()}
    kept = {ids[r["doc_id"]] for r in lake.read("documents_filtered").select("doc_id").collect()}
    assert set(rejected) == {"mmlu", "gaokao", "subdomain", "word"}
    assert kept == {r["id"] for r in records} - set(rejected)
    assert rejected["mmlu"]["reason"] == "decontam_mmlu"
    assert "decontam_mmlu: " in rejected["mmlu"]["detail"] and "'which of the following best explains" in rejected["mmlu"]["detail"]
    assert rejected["gaokao"]["reason"] == "decontam_gaokao" and "'阅 读 下 面 的 材 料" in rejected["gaokao"]["detail"]
    assert rejected["subdomain"]["reason"] == "url_blocklist"
    assert "domain spam.example (host ads.spam.example)" in rejected["subdomain"]["detail"]
    assert rejected["word"]["detail"].startswith("url_blocklist: banned word 'casino'")
    assert report.decontamination == {"mmlu": {"mix": 1}, "gaokao": {"mix": 1}}
    rules = {r["rule"]: r for r in report.rules}
    assert rules["decontam_mmlu"]["removed"] == 1 and rules["url_blocklist"]["removed"] == 2
    assert "decontamination: 1 documents share an n-gram with mmlu (removed: mix 1)" in str(report)
    assert _report_figure(recipe) == {"mmlu": {"removed": {"mix": 1}, "flagged": {}},
                                      "gaokao": {"removed": {"mix": 1}, "flagged": {}}}
    from jobs.report import _rules_html

    shown = _rules_html({"rules": {}, "shifts": [], "line_cleanup": [], "decontamination": _report_figure(recipe)})
    assert "<h3>Decontamination</h3>" in shown and "<td>mmlu</td><td class='n'>1</td><td class='n'>0</td>" in shown


def test_flag_mode_keeps_contaminated_documents_with_their_matches_as_signals(spark, contaminated):
    from jobs.records import make_doc_id

    recipe, records, _ = contaminated
    flag = recipe.model_copy(update={"filter": recipe.filter.model_copy(update={
        "decontaminate": recipe.filter.decontaminate.model_copy(update={"action": "flag"})})})
    report = filter_rules.run(spark, flag)
    lake = Lake(recipe.lake, spark)
    ids = {make_doc_id("mix", r["id"], ""): r["id"] for r in records}
    signals = {ids[r["doc_id"]]: r["signals"] for r in lake.read("documents_filtered").collect()}
    assert {"mmlu", "gaokao", "near"} <= set(signals) and "subdomain" not in signals
    assert signals["mmlu"]["decontam_mmlu"] >= 1 and "decontam_mmlu" not in signals["near"]
    assert signals["gaokao"]["decontam_gaokao"] >= 1
    assert report.decontamination == {"mmlu": {"mix": 1}, "gaokao": {"mix": 1}} and report.decontam_action == "flag"
    assert _report_figure(flag) == {"mmlu": {"removed": {}, "flagged": {"mix": 1}},
                                    "gaokao": {"removed": {}, "flagged": {"mix": 1}}}
    filter_rules.run(spark, recipe)  # back to the module's lake


def _report_figure(recipe):
    from jobs.report import _decontamination

    return _decontamination(recipe, Lake(recipe.lake))


def test_a_missing_evaluation_file_or_field_is_a_recipe_error_naming_it(tmp_path):
    with pytest.raises(RecipeError, match=r"evaluation set 'mmlu': file .*nope.jsonl does not exist"):
        make_recipe(tmp_path, [{"name": "s", "path": "x.jsonl"}],
                    filter={"decontaminate": {"sets": {"mmlu": {"path": "nope.jsonl"}}}})
    write_jsonl(tmp_path / "e.jsonl", [{"q": "a question"}])
    recipe = make_recipe(tmp_path, [{"name": "s", "path": "x.jsonl"}],
                         filter={"decontaminate": {"sets": {"mmlu": {"path": "e.jsonl", "fields": ["question"]}}}})
    with pytest.raises(RecipeError, match=r"filter.decontaminate.sets.mmlu: .*e.jsonl: record 1 has no field 'question'"):
        filter_rules.eval_sets_of(recipe)
