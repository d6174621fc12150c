"""Turning one input record into a document or a rejection: pure functions, run by ingest in Spark.

Every record ends as exactly one of the two, so input = kept + rejected always holds.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

# C0 and C1 control characters except tab and newline.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile("\r\n|\r|\u2028|\u2029")
# Half of a UTF-16 pair: valid in JSON as a \\u escape, but no Unicode character, so not UTF-8 text.
_SURROGATE = re.compile("[\ud800-\udfff]")
REJECT_TEXT_CHARS = 2_000  # how much of a rejected record is kept for audit


@dataclass(frozen=True)
class SourceSpec:
    """What parsing needs to know of a recipe source (a plain, picklable copy)."""

    name: str
    text_field: str
    id_field: str | None
    url_field: str | None
    max_doc_bytes: int
    kind: str = "text"  # or "instruction": a prompt and a completion (or messages)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str | None = None


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    url: str | None
    meta: str | None
    prompt: str | None = None  # instruction sources: what precedes the completion (``text``)


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str
    doc_id: str | None
    text: str | None


def normalize_text(text: str) -> str:
    """Unicode NFC, line endings to ``\\n``, control characters (but tab and newline) removed."""
    text = _LINE_BREAKS.sub("\n", text)
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    return text.lstrip("\ufeff")


def make_doc_id(source: str, record_id: str | None, text: str) -> str:
    """Stable id: from the source name and the record's own id, else from the content."""
    key = f"id\x00{record_id}" if record_id is not None else f"text\x00{text}"
    return hashlib.blake2b(f"{source}\x00{key}".encode("utf-8"), digest_size=12).hexdigest()


def parse_json_line(raw: bytes, spec: SourceSpec, where: str) -> Document | Rejection:
    """One JSONL line (without its newline) → a Document or a Rejection naming ``where``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Rejection(
            "invalid_utf8",
            f"{where}: byte {err.start} of the line is not UTF-8 ({err.reason})",
            None,
            raw.decode("utf-8", "replace")[:REJECT_TEXT_CHARS],
        )
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return Rejection("malformed_json", f"{where}: {err.msg} at column {err.colno}", None, line[:REJECT_TEXT_CHARS])
    if not isinstance(record, dict):
        return Rejection(
            "not_an_object", f"{where}: a JSON {type(record).__name__}, expected an object", None, line[:REJECT_TEXT_CHARS]
        )
    return parse_record(record, spec, where)


def parse_record(record: dict[str, Any], spec: SourceSpec, where: str) -> Document | Rejection:
    """A decoded record (a JSON object or a Parquet row) → a Document or a Rejection."""
    lone = _lone_surrogate(record)
    if lone is not None:
        field, at, char = lone
        return Rejection(
            "lone_surrogate",
            f"{where}: field {field!r} holds a lone UTF-16 surrogate \\u{ord(char):04x} at character {at} "
            f"(half of a \\u escaped pair), which is not text; repair the record at the source",
            None,
            _SURROGATE.sub("\ufffd", _preview(record)),
        )
    record_id = _record_id(record, spec)
    if spec.id_field is not None and record_id is None:
        return Rejection(
            "missing_id", f"{where}: id field {spec.id_field!r} is missing or null", None, _preview(record)
        )
    doc_id_hint = make_doc_id(spec.name, record_id, "") if record_id is not None else None
    if spec.kind == "instruction":
        return _parse_instruction(record, spec, where, record_id, doc_id_hint)
    if spec.text_field not in record or record[spec.text_field] is None:
        return Rejection(
            "missing_text", f"{where}: text field {spec.text_field!r} is missing or null", doc_id_hint, _preview(record)
        )
    raw_text = record[spec.text_field]
    if not isinstance(raw_text, str):
        return Rejection(
            "text_not_string",
            f"{where}: text field {spec.text_field!r} is a {type(raw_text).__name__}, expected a string",
            doc_id_hint,
            _preview(record),
        )
    size = len(raw_text.encode("utf-8"))
    if size > spec.max_doc_bytes:
        return Rejection(
            "too_large",
            f"{where}: text is {size} bytes, over ingest.max_doc_bytes = {spec.max_doc_bytes}",
            doc_id_hint,
            raw_text[:REJECT_TEXT_CHARS],
        )
    text = normalize_text(raw_text)
    if not text.strip():
        return Rejection("empty_text", f"{where}: text is empty after normalisation", doc_id_hint, raw_text[:REJECT_TEXT_CHARS])
    url = record.get(spec.url_field) if spec.url_field else None
    rest = {k: v for k, v in record.items() if k not in (spec.text_field, spec.id_field, spec.url_field)}
    return Document(
        doc_id=make_doc_id(spec.name, record_id, text),
        text=text,
        url=str(url) if url is not None else None,
        meta=json.dumps(rest, ensure_ascii=False, sort_keys=True, default=str) if rest else None,
    )


# ChatML, with the tokenizer's <|im_start|> / <|im_end|> special tokens: each turn before the completion
# is rendered so; the prompt ends with the assistant's header and the completion follows it.
CHAT_END = "<|im_end|>"  # feed closes the completion of a prompt ending in CHAT_REPLY with it (learnt)
CHAT_TURN = "<|im_start|>{role}\n{content}" + CHAT_END + "\n"
CHAT_REPLY = "<|im_start|>assistant\n"


def render_chat(messages: list[dict]) -> tuple[str, str]:
    """(prompt, completion) of a conversation: the last assistant turn is the completion, every turn
    before it the prompt (in ChatML). Raises ValueError naming what is wrong with the turns."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("is not a non-empty list of turns")
    for k, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise ValueError(f"turn {k} is not an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"ends with a {messages[-1]['role']!r} turn; the last turn must be the assistant's (the "
                         f"completion)")
    prompt = "".join(CHAT_TURN.format(role=t["role"], content=t["content"]) for t in messages[:-1]) + CHAT_REPLY
    return prompt, messages[-1]["content"]


def _parse_instruction(record: dict[str, Any], spec: SourceSpec, where: str, record_id: str | None,
                       doc_id_hint: str | None) -> Document | Rejection:
    """An instruction record → a Document whose ``text`` is the completion and ``prompt`` the rest."""
    if spec.messages_field is not None:
        turns = record.get(spec.messages_field)
        if turns is None:
            return Rejection("missing_messages", f"{where}: messages field {spec.messages_field!r} is missing or null",
                             doc_id_hint, _preview(record))
        try:
            raw_prompt, raw_completion = render_chat(turns)
        except ValueError as err:
            return Rejection("malformed_messages", f"{where}: messages field {spec.messages_field!r} {err}",
                             doc_id_hint, _preview(record))
        used = (spec.messages_field,)
    else:
        for field, reason in ((spec.prompt_field, "missing_prompt"), (spec.completion_field, "missing_completion")):
            value = record.get(field)
            if not isinstance(value, str):
                what = "missing or null" if value is None else f"a {type(value).__name__}, expected a string"
                return Rejection(reason, f"{where}: field {field!r} is {what}", doc_id_hint, _preview(record))
        raw_prompt, raw_completion = record[spec.prompt_field], record[spec.completion_field]
        used = (spec.prompt_field, spec.completion_field)
    size = len(raw_prompt.encode("utf-8")) + len(raw_completion.encode("utf-8"))
    if size > spec.max_doc_bytes:
        return Rejection("too_large", f"{where}: prompt and completion are {size} bytes, over ingest.max_doc_bytes = "
                         f"{spec.max_doc_bytes}", doc_id_hint, (raw_prompt + raw_completion)[:REJECT_TEXT_CHARS])
    prompt, text = normalize_text(raw_prompt), normalize_text(raw_completion)
    if not text.strip():
        return Rejection("empty_text", f"{where}: the completion is empty after normalisation", doc_id_hint,
                         raw_prompt[:REJECT_TEXT_CHARS])
    if not prompt.strip():
        return Rejection("empty_prompt", f"{where}: the prompt is empty after normalisation (a record without one "
                         f"belongs in a text source)", doc_id_hint, text[:REJECT_TEXT_CHARS])
    url = record.get(spec.url_field) if spec.url_field else None
    rest = {k: v for k, v in record.items() if k not in (*used, spec.id_field, spec.url_field)}
    return Document(
        doc_id=make_doc_id(spec.name, record_id, prompt + "\x00" + text),
        text=text,
        url=str(url) if url is not None else None,
        meta=json.dumps(rest, ensure_ascii=False, sort_keys=True, default=str) if rest else None,
        prompt=prompt,
    )


def _record_id(record: dict[str, Any], spec: SourceSpec) -> str | None:
    if spec.id_field is None:
        return None
    value = record.get(spec.id_field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def _lone_surrogate(value: Any, field: str = "") -> tuple[str, int, str] | None:
    """(field, character index, the surrogate) of the first lone surrogate in any string of the record."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (field, found.start(), found.group()) if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        key_found = _lone_surrogate(key, field) if isinstance(key, str) else None
        found = key_found or _lone_surrogate(item, f"{field}.{key}" if field else str(key))
        if found:
            return found
    return None


def _preview(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)[:REJECT_TEXT_CHARS]
