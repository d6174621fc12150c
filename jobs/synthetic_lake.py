"""Small synthetic lakes for the trainer, made without Spark: a tokenizer, documents, and ready
chunks packed by ``jobs.packing.pack`` into the file layout feed writes (``chunk_row_schema``, zstd
Parquet; one file per chunk). Feed itself packs in Spark SQL; ``tests/test_feed_packing.py`` checks
that its rows and spans are the ones ``pack`` makes. The trainer's tests and ``bench/trainer`` use
these lakes; so can a smoke test of a GPU cluster before the refinery has run."""

from __future__ import annotations

import hashlib
import io
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.packing import pack
from jobs.train_tokenizer import EOS, PAD, build_tokenizer, pad_to_multiple, round_up
from lake.artifacts import TOKENIZER, new_version, tokenizer_hash, write_metadata
from lake.chunks import chunk_dir, tokenizer_id
from lake.tables import Lake
from schemas import chunk_row_schema, table

WORDS = "the river school budget council report station water energy house street train garden music".split()


def text_of(rng: random.Random, kind: str) -> str:
    if kind == "code":
        return "\n".join(f"def f{j}(x):\n    return x + {j}" for j in range(rng.randint(2, 6)))
    if kind == "zh":
        return "".join(rng.choice("的一是不了人我在有他这中大来上个国到说们") for _ in range(rng.randint(20, 60)))
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + "."


def make_lake(root: str, n_docs: int = 120, seed: int = 0) -> tuple[Lake, object, dict, list[dict]]:
    """A lake with ``documents_dedup``, a tokenizer trained on it and a held-out tenth of each source;
    returns (lake, tokenizer, its metadata, the documents that are not held out: those for chunks)."""
    rng = random.Random(seed)
    lake = Lake(root)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    docs = []
    for i in range(n_docs):
        kind = ("zh", "en", "code")[i % 3]
        docs.append({"doc_id": f"{kind}{i:04d}", "text": text_of(rng, kind), "source": f"src_{kind}", "url": None,
                     "meta": None, "ingested_at": now, "signals": None, "pii": None, "quality": 0.5, "domain": kind,
                     "lang": kind, "category": kind, "cluster_id": None})
    lake.write_arrow("documents_dedup", pa.Table.from_pylist(docs, schema=table("documents_dedup").schema),
                     mode="overwrite", job="test")
    tok = build_tokenizer([d["text"] for d in docs] * 3, 384, [EOS, PAD], [], 1)
    pad_to_multiple(tok)
    vocab = tok.get_vocab_size()
    with new_version(root, TOKENIZER) as folder:
        tok.save(str(folder / "tokenizer.json"))
        meta = write_metadata(folder, task="tokenizer", backend="bpe", vocab_size=vocab,
                              model_vocab_size=round_up(vocab + 64), eos_id=tok.token_to_id(EOS),
                              pad_id=tok.token_to_id(PAD), compression={},
                              sha256=tokenizer_hash((folder / "tokenizer.json").read_bytes()))
    held = _hold_out(lake, docs, now)
    return lake, tok, meta, [d for d in docs if d["doc_id"] not in held]


def _hold_out(lake: Lake, docs: list[dict], now: datetime) -> set[str]:
    """A tenth of each source in the lake's ``holdout`` table, as feed would freeze it: the trainer
    evaluates on them, and ``make_lake`` leaves them out of the documents it returns for chunks."""
    by_source: dict[str, list[str]] = {}
    for d in docs:
        by_source.setdefault(d["source"], []).append(d["doc_id"])
    rows = [{"doc_id": i, "source": src, "chosen_at": now}
            for src, ids in by_source.items() for i in sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
            [: len(ids) // 10]]
    lake.write_arrow("holdout", pa.Table.from_pylist(rows, schema=table("holdout").schema), mode="overwrite", job="test")
    return {r["doc_id"] for r in rows}


def add_chunk(lake: Lake, chunk_id: str, docs: list[dict], tok, meta: dict, seq_len: int = 32, stage: str = "pretrain",
              corrupt: bool | range = False, seed: int = 0) -> dict:
    """A ready chunk of these documents; ``corrupt`` (all, or a range of document indices) replaces
    their tokens with random ids: the loss spikes on them."""
    rng = np.random.default_rng(seed)
    packed = []
    for i, d in enumerate(docs):
        ids = tok.encode(d["text"], add_special_tokens=False).ids + [meta["eos_id"]]
        if corrupt is True or (isinstance(corrupt, range) and i in corrupt):
            ids = rng.integers(0, meta["vocab_size"], len(ids)).tolist()
        packed.append((d["doc_id"], d["category"], ids))
    rows, spans = pack(packed, seq_len + 1, meta["pad_id"])
    schema = chunk_row_schema(meta["vocab_size"])
    data = pa.table({"row": pa.array(range(len(rows)), pa.int64()),
                     "input_ids": pa.array(rows, schema.field("input_ids").type),
                     "spans": pa.array([[s.__dict__ for s in row] for row in spans], schema.field("spans").type)},
                    schema=schema)
    folder = Path(chunk_dir(lake.run_root, chunk_id))
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    pq.write_table(data, buffer, compression="zstd")
    (folder / "part-00000.parquet").write_bytes(buffer.getvalue())
    now = datetime.now(timezone.utc)
    mix: dict[str, int] = {}
    for row in spans:
        for s in row:
            mix[s.category] = mix.get(s.category, 0) + s.length
    row = {"chunk_id": chunk_id, "stage": stage, "status": "ready", "n_tokens": sum(mix.values()), "n_rows": len(rows),
           "files": ["part-00000.parquet"], "sha256": [hashlib.sha256(buffer.getvalue()).hexdigest()],
           "mix": list(mix.items()), "times_consumed": 0, "recipe_hash": None, "tokenizer_version": tokenizer_id(meta),
           "run_id": None, "reason": None, "created_at": now, "updated_at": now}
    lake.write_arrow("chunks", pa.Table.from_pylist([row], schema=table("chunks").schema), mode="append", job="test")
    return row
