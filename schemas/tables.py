"""One definition per lake table (DESIGN.md, "The lake").

Each table is declared once, as an Arrow schema; the Spark StructType is derived from it, so the
refinery (Spark) and the trainer (delta-rs, no JVM) can never disagree about a column.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    description: str

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def _schema(*fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(name, dtype, nullable=nullable) for name, dtype, nullable in fields])


_TS = pa.timestamp("us", tz="UTC")

_RAW = (
    ("doc_id", pa.string(), False),
    ("text", pa.string(), False),
    ("source", pa.string(), False),
    ("url", pa.string(), True),
    # The source record's other fields, as a JSON object: kept verbatim, never interpreted.
    ("meta", pa.string(), True),
    ("ingested_at", _TS, False),
    # Instruction sources only (recipe `kind: instruction`): what comes before the completion, which is
    # ``text``. Rules and scores judge ``text``; feed packs the prompt with no loss. Null for plain text.
    ("prompt", pa.string(), True),
)
_FILTERED = _RAW + (("signals", pa.map_(pa.string(), pa.float64()), True),)
_CLEAN = _FILTERED + (("pii", pa.map_(pa.string(), pa.int64()), True),)
_SCORED = _CLEAN + (
    ("quality", pa.float64(), True),
    ("domain", pa.string(), True),
    ("lang", pa.string(), True),
    ("category", pa.string(), True),
)
_DEDUP = _SCORED + (("cluster_id", pa.string(), True),)

TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table("documents_raw", _schema(*_RAW), ("doc_id",), "one source document"),
        Table(
            "documents_filtered",
            _schema(*_FILTERED),
            ("doc_id",),
            "a document that passed every rule, after line cleanup",
        ),
        Table("documents_clean", _schema(*_CLEAN), ("doc_id",), "the same document with PII replaced"),
        Table("documents_scored", _schema(*_SCORED), ("doc_id",), "+ model outputs"),
        Table("documents_dedup", _schema(*_DEDUP), ("doc_id",), "a document kept after dedup"),
        Table(
            "documents_rejected",
            _schema(
                ("doc_id", pa.string(), True),
                ("source", pa.string(), True),
                ("stage", pa.string(), False),
                ("reason", pa.string(), False),
                ("detail", pa.string(), True),
                ("text", pa.string(), True),
                ("rejected_at", _TS, False),
            ),
            ("stage", "doc_id"),
            "a document dropped, and why",
        ),
        Table(
            "dedup_clusters",
            _schema(
                ("doc_id", pa.string(), False),
                ("cluster_id", pa.string(), False),
                ("kept_doc_id", pa.string(), False),
                ("similarity", pa.float64(), True),
                ("threshold", pa.float64(), True),
                ("category", pa.string(), True),
            ),
            ("doc_id",),
            "one member of a near-duplicate cluster",
        ),
        Table(
            "chunks",
            _schema(
                ("chunk_id", pa.string(), False),
                ("stage", pa.string(), False),
                ("status", pa.string(), False),
                ("n_tokens", pa.int64(), False),
                ("n_rows", pa.int64(), False),
                ("files", pa.list_(pa.string()), False),
                ("sha256", pa.list_(pa.string()), False),
                # tokens per mixing category actually packed into the chunk
                ("mix", pa.map_(pa.string(), pa.int64()), True),
                # the shares the chunk was planned with (an adaptive stage's, moved by the trainer's signal)
                ("mix_weights", pa.map_(pa.string(), pa.float64()), True),
                # the training signal behind an adaptive mix, as JSON (jobs/adaptive_mix.py); null for a fixed mix
                ("mix_signal", pa.string(), True),
                ("times_consumed", pa.int64(), False),
                ("recipe_hash", pa.string(), True),
                ("tokenizer_version", pa.string(), True),
                ("run_id", pa.string(), True),
                ("reason", pa.string(), True),
                ("created_at", _TS, False),
                ("updated_at", _TS, False),
            ),
            ("chunk_id",),
            "one token chunk: the manifest",
        ),
        Table(
            "usage",
            _schema(
                ("doc_id", pa.string(), False),
                ("times_used", pa.int64(), False),
                ("last_chunk_id", pa.string(), True),
            ),
            ("doc_id",),
            "how often a document went into chunks",
        ),
        Table(
            "holdout",
            _schema(
                ("doc_id", pa.string(), False),
                ("source", pa.string(), False),
                ("chosen_at", _TS, False),
            ),
            ("doc_id",),
            "the trainer's held-out documents: chosen once, never put in a chunk",
        ),
        Table(
            "trainer_events",
            _schema(
                ("run_id", pa.string(), False),
                ("step", pa.int64(), False),
                ("chunk_id", pa.string(), True),
                ("event", pa.string(), False),
                ("detail", pa.string(), True),
                ("at", _TS, False),
            ),
            ("run_id", "step", "event"),
            "claimed / consumed / checkpoint / resumed / stopped / spike / rollback / quarantine",
        ),
        Table(
            "training_signals",
            _schema(
                ("run_id", pa.string(), False),
                ("step", pa.int64(), False),
                ("tokens", pa.int64(), False),  # the run's tokens when the row was published
                ("category", pa.string(), False),
                ("loss", pa.float64(), False),  # the category's mean loss over the trainer's window
                ("slope", pa.float64(), False),  # its least-squares loss change per token (negative while falling)
                ("published_at", _TS, False),
            ),
            ("run_id", "step", "category"),
            "a category's recent loss and its slope, which an adaptive feed mix reads",
        ),
    ]
}


class UnknownTableError(KeyError):
    pass


def table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise UnknownTableError(
            f"unknown lake table {name!r}; the lake has: {', '.join(TABLES)}"
        ) from None


# -- chunk files ---------------------------------------------------------------------------------
# Not a table: the rows of <lake>/chunks/<chunk_id>/part-*.parquet, one packed training sequence each.
SPAN_TYPE = pa.struct([
    ("doc_id", pa.string()),
    ("pos", pa.int32()),  # where the piece starts in the row
    ("doc_start", pa.int32()),  # which token of the document it starts with
    ("length", pa.int32()),
    ("doc_tokens", pa.int32()),  # the document's whole length (EOS included) in this chunk's stream
    ("category", pa.string()),
    # an instruction example's prompt: its first ``prompt_tokens`` tokens carry no loss (0 for plain text)
    ("prompt_tokens", pa.int32()),
])


def chunk_row_schema(vocab_size: int) -> pa.Schema:
    """``input_ids`` are uint16 when every id fits, else uint32."""
    ids = pa.uint16() if vocab_size <= 65536 else pa.uint32()
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(ids), nullable=False),
        pa.field("spans", pa.list_(SPAN_TYPE), nullable=False),
    ])
