"""Language identification with lid.176: per document and per paragraph, rules per language, offline."""

import socket
import subprocess

import pytest

from jobs import filter_rules, ingest
from jobs.demo_corpus import build_demo_corpus
from jobs.filter_rules import check_recipe, make_filter
from jobs.score import langs_of
from lake.recipe import RecipeError, parse_recipe
from lake.tables import Lake
from quality_models.language import script_lang
from quality_models.lid import LanguageId, fetch_lid

from conftest import make_recipe, write_jsonl

FRENCH = ("Le conseil municipal s'est réuni mardi soir pour examiner le projet de rénovation de la gare. La plupart "
          "des élus ont estimé que le calendrier était raisonnable, mais plusieurs habitants ont demandé que les "
          "travaux soient repoussés après l'été afin de limiter la gêne pour les commerces du quartier.")
GERMAN = ("Der Stadtrat hat am Dienstag über den Umbau des Bahnhofs beraten. Die meisten Mitglieder hielten den "
          "Zeitplan für vernünftig, doch einige Anwohner forderten, die Arbeiten auf den Herbst zu verschieben, "
          "damit die Geschäfte im Viertel weniger leiden.")


@pytest.fixture(scope="module")
def lid_model():
    return fetch_lid()  # once per machine, into the ignored .tokenmill/models (or $TOKENMILL_MODELS)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    built = {b.name: b for b in build_demo_corpus(tmp_path_factory.mktemp("demo"), {"zh_news": 10, "en_docs": 10, "code": 5})}

    def of(name):
        return built[name].texts()

    return {name: of(name) for name in ("zh_news", "en_docs", "code")}


def _recipe(tmp_path, **language):
    return parse_recipe({"lake": "lake", "sources": [{"name": "s", "path": "x"}],
                         "filter": {"language": {"model": "lid176", **language}}}, base_dir=tmp_path)


def test_documents_get_their_language_and_mixed_pages_each_paragraphs(lid_model, texts):
    lid = LanguageId.load(lid_model)
    assert [lid.identify(t).lang for t in texts["zh_news"][:5]] == ["zh"] * 5
    assert [lid.identify(t).lang for t in texts["en_docs"][:5]] == ["en"] * 5
    french, german = lid.identify(FRENCH), lid.identify(GERMAN)
    assert (french.lang, german.lang) == ("fr", "de") and min(french.confidence, german.confidence) > 0.8
    zh, en = texts["zh_news"][0][:300], texts["en_docs"][0][:600]
    mixed = lid.identify(zh + "\n\n" + en + "\n\n" + zh, han_share=0.4, latin_share=0.5)
    assert set(mixed.shares) == {"zh", "en"} and abs(sum(mixed.shares.values()) - 1) < 1e-9
    assert 0.3 < mixed.shares["zh"] < 0.7  # by characters: two Chinese paragraphs of 300, one English of 600
    assert lid.identify(zh + "\n\n" + en).shares.keys() == {"zh"}  # without the script shares: one language


def test_the_filter_keeps_chosen_languages_and_judges_each_by_its_own_thresholds(lid_model, texts, tmp_path):
    check = make_filter(_recipe(tmp_path, keep=["zh", "en"]))()
    french = check({"text": FRENCH})
    assert french.reject_reason == "language" and "fr (" in french.reject_detail
    assert "is not one of filter.language.keep [zh, en]" in french.reject_detail
    english = check({"text": texts["en_docs"][0]})
    assert english.reject_reason is None and english.columns["signals"]["lang_en"] == 1.0
    assert english.columns["signals"]["lid_confidence"] > 0.5
    code = check({"text": texts["code"][0], "url": "https://github.com/o/r/blob/main/x.py"})
    assert code.reject_reason is None and code.columns["signals"]["lang_code"] == 1.0  # code is never a language
    mixed = check({"text": texts["zh_news"][0][:400] + "\n\n" + texts["en_docs"][1][:600]})
    assert {"lang_zh", "lang_en"} <= set(mixed.columns["signals"])
    cantonese = check({"text": "我哋今日去咗飲茶，啲點心好好食。佢話聽日唔得閒，下個禮拜先至再約過。你有冇興趣一齊嚟？"
                               "阿媽話要早啲返屋企食飯，唔好成日喺出面蕩來蕩去，記得帶遮呀。"})
    assert "too_few_words" not in cantonese.flags and cantonese.columns["signals"]["lang_zh"] == 1.0  # yue: as zh
    assert check({"text": "我哋今日去咗飲茶，啲點心好好食。佢話聽日唔得閒，下個禮拜先至再約過。你有冇興趣一齊嚟？" * 2}
                 ).columns["signals"].get("lang_zh") == 1.0  # lid.176 says Rusyn here: Han script says zh
    japanese = make_filter(_recipe(tmp_path))()({"text": "今日は天気がいいので、公園に散歩に行きました。" * 2
                                                      + "桜の花がとてもきれいで、写真をたくさん撮りました。"})
    assert japanese.columns["signals"]["lang_ja"] == 1.0 and "too_few_words" not in japanese.flags  # zh's limits
    strict_de = parse_recipe({"lake": "lake", "sources": [{"name": "s", "path": "x"}], "filter": {
        "language": {"model": "lid176"}, "thresholds": {"too_few_words": {"de": 500}}}}, base_dir=tmp_path)
    judge = make_filter(strict_de)()
    german = judge({"text": GERMAN})
    assert german.reject_reason == "too_few_words" and "(de/other)" in german.reject_detail
    french = judge({"text": FRENCH})  # other's limits: English stop words are not asked of French
    assert french.reject_reason is None and french.columns["signals"]["lang_fr"] == 1.0
    assert make_filter(parse_recipe({"lake": "lake", "sources": [{"name": "s", "path": "x"}]}, base_dir=tmp_path))()(
        {"text": FRENCH}).reject_reason == "no_stop_words"  # script statistics alone: French is judged as English


def test_nothing_is_fetched_while_the_filter_runs(lid_model, texts, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the filter reached for the network or a subprocess")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    check_recipe(recipe)
    check = make_filter(recipe)()
    assert check({"text": texts["zh_news"][1]}).columns["signals"]["lang_zh"] == 1.0


def test_a_missing_model_or_a_bad_setting_fails_before_any_work(lid_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_MODELS", str(tmp_path / "empty"))
    with pytest.raises(RecipeError, match="run `tokenmill models fetch-lid` once"):
        check_recipe(_recipe(tmp_path))
    monkeypatch.delenv("TOKENMILL_MODELS")
    with pytest.raises(RecipeError, match=r"filter.language.keep: \['english'\] are not languages the model knows"):
        check_recipe(_recipe(tmp_path, keep=["zh", "english"]))
    with pytest.raises(RecipeError, match="keep needs a language-ID model"):
        parse_recipe({"lake": "lake", "sources": [{"name": "s", "path": "x"}], "filter": {"language": {"keep": ["zh"]}}},
                     base_dir=tmp_path)
    with pytest.raises(RecipeError, match="nope.ftz is not a file"):
        check_recipe(parse_recipe({"lake": "lake", "sources": [{"name": "s", "path": "x"}],
                                   "filter": {"language": {"model": "nope.ftz"}}}, base_dir=tmp_path))


def test_scoring_takes_the_language_the_filter_judged_by():
    texts = ["def f():\n    return 1\n" * 5, "Le conseil s'est réuni.", "plain words here and there"]
    signals = [{"lang_code": 1.0}, {"lang_fr": 1.0, "lid_confidence": 0.9}, None]
    assert langs_of(texts, signals) == ["code", "fr", "en"]  # the last from script statistics
    assert langs_of(texts[:1], [[("lang_zh", 0.4), ("lang_en", 0.6)]]) == ["en"]  # a map array's rows


def test_the_filter_job_identifies_languages_in_spark(spark, lid_model, texts, tmp_path):
    prose = [t for t in texts["en_docs"] if script_lang(t) == "en"][:3]  # (some of the docs are mostly code)
    records = [{"id": f"en{i}", "text": t} for i, t in enumerate(prose)]
    records += [{"id": f"zh{i}", "text": t} for i, t in enumerate(texts["zh_news"][:3])]
    records += [{"id": "fr", "text": FRENCH}, {"id": "de", "text": GERMAN}]
    data = write_jsonl(tmp_path / "in" / "part-0.jsonl", records)
    recipe = make_recipe(tmp_path, [{"name": "mix", "path": str(data), "id_field": "id"}],
                         filter={"language": {"model": "lid176", "keep": ["zh", "en"]}})
    ingest.run(spark, recipe)
    report = filter_rules.run(spark, recipe)
    lake = Lake(recipe.lake, spark)
    rejected = {r["reason"] for r in lake.read("documents_rejected").collect()}
    kept = lake.read("documents_filtered").collect()
    assert rejected == {"language"} and report.documents_in - report.kept == 2
    assert sorted(max((v, k) for k, v in r["signals"].items() if k.startswith("lang_"))[1] for r in kept) == \
        ["lang_en"] * 3 + ["lang_zh"] * 3
    assert next(r for r in report.rules if r["rule"] == "language")["removed"] == 2
    from jobs.trace import render, trace
    from jobs.records import make_doc_id

    [journey] = trace(recipe, make_doc_id("mix", "zh0", ""))
    shown = render(journey)
    assert "judged as zh 1 (lid.176 confidence " in shown and "passed every rule" in shown
    assert "language: fr (" in render(trace(recipe, make_doc_id("mix", "fr", ""))[0])
