from pathlib import Path

import pytest

from lake.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_minimum_recipe_gets_documented_defaults_and_resolves_paths(tmp_path):
    r = load_recipe(_write(tmp_path, "lake: lake\nsources:\n  - {name: web, path: data/*.jsonl}\n"))
    assert r.lake == str(tmp_path / "lake")
    assert r.sources[0].path == str(tmp_path / "data/*.jsonl")
    assert r.sources[0].format == "jsonl" and r.sources[0].text_field == "text"
    assert r.sources[0].id_field is None
    assert r.ingest.max_doc_bytes == 1_000_000
    assert r.spark.master == "local[*]"


def test_uris_are_kept_as_they_are(tmp_path):
    r = load_recipe(_write(tmp_path, "lake: s3://bucket/lake\nsources:\n  - {name: a, path: 's3://b/x/*.jsonl'}\n"))
    assert r.lake == "s3://bucket/lake" and r.sources[0].path == "s3://b/x/*.jsonl"


def test_unknown_key_names_the_path_and_what_is_allowed(tmp_path):
    path = _write(tmp_path, "lake: l\nsources:\n  - {name: a, path: x, txt_field: body}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "sources.0.txt_field: unknown key" in msg
    assert "text_field" in msg and "id_field" in msg


def test_bad_value_names_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(RecipeError, match=r"sources\.0\.format: .*'jsonl' or 'parquet'.*got 'csv'"):
        load_recipe(_write(tmp_path, "lake: l\nsources:\n  - {name: a, path: x, format: csv}\n"))
    with pytest.raises(RecipeError, match=r"ingest\.max_doc_bytes: .*greater than 0"):
        load_recipe(_write(tmp_path, "lake: l\nsources: [{name: a, path: x}]\ningest: {max_doc_bytes: 0}\n"))


def test_missing_required_keys_and_duplicate_sources(tmp_path):
    with pytest.raises(RecipeError, match="sources: required key is missing"):
        load_recipe(_write(tmp_path, "lake: l\n"))
    with pytest.raises(RecipeError, match="source name 'a' is used twice"):
        load_recipe(_write(tmp_path, "lake: l\nsources: [{name: a, path: x}, {name: a, path: y}]\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "lake: [unclosed\n"))


def test_a_key_given_twice_is_refused_not_silently_the_last(tmp_path):
    text = "lake: l\nsources: [{name: a, path: x}]\nfeed: {chunk_tokens: 5}\nsources: [{name: b, path: y}]\n"
    with pytest.raises(RecipeError, match=r"key 'sources' appears twice .*first at line 2, again at line 4"):
        load_recipe(_write(tmp_path, text))
    nested = "lake: l\nsources: [{name: a, path: x, name: b}]\n"
    with pytest.raises(RecipeError, match=r"key 'name' appears twice"):
        load_recipe(_write(tmp_path, nested))


def test_overrides_and_the_embedded_default(tmp_path):
    r = load_recipe(ROOT / "configs" / "demo.yaml", {"lake": str(tmp_path / "other")})
    assert r.lake == str(tmp_path / "other")
    assert {s.name for s in r.sources} == {"zh_news", "zh_reviews", "en_docs", "code", "messy"}
    assert len(r.fingerprint()) == 16


def test_the_continued_recipe_resolves_its_base_and_model_folders_and_mixes_7_2_1():
    r = load_recipe(ROOT / "configs" / "continued.yaml")
    assert r.tokenizer.extend.base == str(ROOT / ".tokenmill" / "base_model")
    assert r.trainer.model.init_from == r.tokenizer.extend.out  # the run starts from the grown base
    assert r.feed.current.mix == {"general": 7, "domain": 2, "instruction": 1}
    assert {s.name: s.kind for s in r.sources}["chat"] == "instruction"
    assert r.score.instruction_category in r.feed.current.mix


def test_an_extension_needs_something_to_add_and_a_text_source_no_messages(tmp_path):
    with pytest.raises(RecipeError, match="tokenizer.extend needs tokens to add"):
        load_recipe(_write(tmp_path, "lake: l\nsources: [{name: a, path: x}]\ntokenizer: {extend: {base: b}}\n"))
    with pytest.raises(RecipeError, match="messages_field is for kind: instruction"):
        load_recipe(_write(tmp_path, "lake: l\nsources: [{name: a, path: x, messages_field: m}]\n"))
