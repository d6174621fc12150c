import json

from jobs.records import Document, Rejection, SourceSpec, make_doc_id, normalize_text, parse_json_line

SPEC = SourceSpec("web", "text", "id", "url", max_doc_bytes=100)
NO_ID = SourceSpec("web", "text", None, None, max_doc_bytes=100)


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def test_normalize_text_nfc_line_endings_and_controls():
    decomposed = "Cafe\u0301"
    assert normalize_text(decomposed) == "Caf\u00e9"
    assert normalize_text("a\r\nb\rc\u2028d") == "a\nb\nc\nd"
    assert normalize_text("\ufeffbell\x07 tab\tnull\x00 c1\x85") == "bell tab\tnull c1"


def test_doc_id_is_stable_and_depends_on_source_and_id_or_content():
    assert make_doc_id("web", "1", "x") == make_doc_id("web", "1", "other text")
    assert make_doc_id("web", "1", "x") != make_doc_id("news", "1", "x")
    assert make_doc_id("web", None, "x") == make_doc_id("web", None, "x")
    assert make_doc_id("web", None, "x") != make_doc_id("web", None, "y")
    assert len(make_doc_id("web", None, "x")) == 24


def test_good_record_keeps_url_and_other_fields_as_meta():
    out = parse_json_line(line({"id": 7, "text": "héllo\r\nworld", "url": "http://x", "lang": "en"}), SPEC, "f:1")
    assert isinstance(out, Document)
    assert out.text == "héllo\nworld" and out.url == "http://x"
    assert json.loads(out.meta) == {"lang": "en"}
    assert out.doc_id == make_doc_id("web", "7", "")


def test_every_kind_of_bad_line_has_its_reason_and_location():
    cases = {
        b'{"id": 1, "text": "cut': "malformed_json",
        b'{"id": 1, "text": "\xff\xfe"}': "invalid_utf8",
        line([1, 2]): "not_an_object",
        line({"id": 1, "body": "x"}): "missing_text",
        line({"id": 1, "text": None}): "missing_text",
        line({"id": 1, "text": "  \n "}): "empty_text",
        line({"id": 1, "text": {"a": 1}}): "text_not_string",
        line({"id": 1, "text": "é" * 51}): "too_large",
        line({"text": "no id"}): "missing_id",
    }
    for raw, reason in cases.items():
        out = parse_json_line(raw, SPEC, "data/part-0.jsonl:42")
        assert isinstance(out, Rejection), raw
        assert out.reason == reason, (raw, out)
        assert out.detail.startswith("data/part-0.jsonl:42: ")


def test_without_id_field_the_content_decides_the_id():
    a = parse_json_line(line({"text": "same"}), NO_ID, "f:1")
    b = parse_json_line(line({"text": "same", "other": 1}), NO_ID, "f:2")
    assert isinstance(a, Document) and a.doc_id == b.doc_id


def test_a_lone_surrogate_is_rejected_with_its_field_and_place_never_a_crash():
    # valid JSON: "\ud800" is half of a UTF-16 pair, no character; it cannot be hashed or stored as UTF-8
    out = parse_json_line(b'{"id": 1, "text": "abc \\ud800 def"}', SPEC, "part-0.jsonl:3")
    assert isinstance(out, Rejection) and out.reason == "lone_surrogate"
    assert out.detail.startswith("part-0.jsonl:3: field 'text'") and "\\ud800 at character 4" in out.detail
    out.text.encode("utf-8")  # the audit copy is storable text
    in_id = parse_json_line(b'{"id": "a\\udc00", "text": "fine"}', SPEC, "f:1")
    assert isinstance(in_id, Rejection) and "field 'id'" in in_id.detail
    in_meta = parse_json_line(b'{"id": 2, "text": "fine", "tags": ["ok", "x\\udfff"]}', SPEC, "f:2")
    assert isinstance(in_meta, Rejection) and "field 'tags.1'" in in_meta.detail
    pair = parse_json_line(b'{"id": 3, "text": "smile \\ud83d\\ude00"}', SPEC, "f:3")
    assert isinstance(pair, Document) and pair.text == "smile \U0001f600"
