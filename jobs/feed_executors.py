"""The executor side of feed: the ``mapInArrow`` bodies ``jobs/feed.py`` runs on Arrow batches.

``tokenize_batches`` turns documents into token ids (the tokenizer parsed once per Python worker);
``write_files_batches`` turns the pieces of whole files into the chunk's Parquet files, each one's
sha256 computed as it is written. Plain functions over Arrow and NumPy: no Spark here.
"""

from __future__ import annotations

import hashlib
import io
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.records import CHAT_END, CHAT_REPLY
from lake.fs import write_bytes
from schemas import chunk_row_schema

_TOKENIZERS: dict[str, object] = {}  # per Python worker process: tokenizer sha256 → Tokenizer


def _tokenizer(tokenizer_json: str, sha: str):
    if sha not in _TOKENIZERS:
        os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one task per core: no thread pool per task
        from tokenizers import Tokenizer

        _TOKENIZERS[sha] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[sha]


def id_dtype(vocab_size: int):
    """The numpy type of a chunk's token ids: uint16 when the vocabulary fits, else uint32."""
    import numpy as np

    return np.uint16 if vocab_size <= 65536 else np.uint32


def tokenize_batches(batches, tokenizer_json: str, sha: str, eos_id: int, vocab_size: int, batch_size: int = 256):
    """mapInArrow body: each document's token ids (EOS appended) as packed little-endian bytes
    (uint16 or uint32, see ``id_dtype``), and their count; an instruction example's ids are its prompt's
    then its completion's (encoded apart, so the boundary is a token boundary; a ChatML reply closed by
    ``<|im_end|>`` where the tokenizer has it), ``prompt_tokens`` the first. Bytes cross to the JVM as one copy; an
    array of ints would be converted element by element."""
    import numpy as np

    tok = _tokenizer(tokenizer_json, sha)
    dtype = id_dtype(vocab_size)
    end_of_turn = tok.token_to_id(CHAT_END)
    for batch in batches:
        texts = batch.column("text").to_pylist()
        prompts = batch.column("prompt").to_pylist() if "prompt" in batch.schema.names else [None] * len(texts)
        blobs, counts, prompt_counts = [], [], []
        for start in range(0, len(texts), batch_size):
            encoded = tok.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
            part = prompts[start : start + batch_size]
            asked = [p for p in part if p is not None]  # instruction examples: the prompt on its own
            prompt_ids = iter(tok.encode_batch(asked, add_special_tokens=False) if asked else [])
            for e, prompt in zip(encoded, part):
                ids = [] if prompt is None else next(prompt_ids).ids
                prompt_counts.append(len(ids))
                ids += e.ids
                if end_of_turn is not None and prompt is not None and prompt.endswith(CHAT_REPLY):
                    ids.append(end_of_turn)  # a ChatML reply is closed, and the model learns to close it
                ids.append(eos_id)
                blobs.append(np.asarray(ids, dtype).tobytes())
                counts.append(len(ids))
        names = [n for n in batch.schema.names if n not in ("text", "prompt")]
        yield pa.RecordBatch.from_arrays(
            [batch.column(n) for n in names] + [pa.array(prompt_counts, pa.int32()), pa.array(counts, pa.int64()),
                                                pa.array(blobs, pa.binary())],
            names=names + ["prompt_tokens", "n_tokens", "ids"])


def write_files_batches(batches, directory: str, row_len: int, pad_id: int, vocab_size: int):
    """mapInArrow body: the pieces of whole files (sorted by file, row, pos) → one Parquet file each."""
    import numpy as np

    schema = chunk_row_schema(vocab_size)
    id_type = schema.field("input_ids").type.value_type
    dtype = id_dtype(vocab_size)
    pending: list[pa.RecordBatch] = []

    def flush(pieces: pa.Table):
        out = []
        for file_no in sorted(set(pieces.column("file").to_pylist())):
            part = pieces.filter(pc.equal(pieces.column("file"), file_no)).sort_by([("row", "ascending"), ("pos", "ascending")])
            d = {n: part.column(n).to_pylist() for n in ("row", "pos", "doc_id", "doc_start", "length", "doc_tokens",
                                                          "category", "prompt_tokens")}
            rows: list[int] = []
            spans: list[list[dict]] = []
            at = np.empty(part.num_rows, np.int64)  # where each piece starts in the file's flat ids
            for i in range(part.num_rows):
                if not rows or rows[-1] != d["row"][i]:
                    rows.append(d["row"][i])
                    spans.append([])
                at[i] = (len(rows) - 1) * row_len + d["pos"][i]
                spans[-1].append({"doc_id": d["doc_id"][i], "pos": d["pos"][i], "doc_start": d["doc_start"][i],
                                  "length": d["length"][i], "doc_tokens": d["doc_tokens"][i], "category": d["category"][i],
                                  "prompt_tokens": d["prompt_tokens"][i]})
            flat = np.frombuffer(b"".join(part.column("ids").to_pylist()), dtype)
            tokens = len(flat)
            # padding where no piece is: the chunk's last text row, and the room left in rows of instruction examples
            padded = np.full(len(rows) * row_len, pad_id, dtype)
            lengths = np.asarray(d["length"], np.int64)
            starts = np.repeat(at - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
            padded[starts + np.arange(tokens)] = flat
            offsets = pa.array(np.arange(0, len(rows) * row_len + 1, row_len, dtype=np.int32))
            data = pa.table({"row": pa.array(rows, pa.int64()),
                             "input_ids": pa.ListArray.from_arrays(offsets, pa.array(padded, id_type)),
                             "spans": pa.array(spans, pa.list_(schema.field("spans").type.value_type))}, schema=schema)
            name = f"part-{file_no:05d}.parquet"
            buffer = io.BytesIO()
            pq.write_table(data, buffer, compression="zstd")
            payload = buffer.getvalue()
            write_bytes(f"{directory}/{name}", payload)
            out.append({"name": name, "sha256": hashlib.sha256(payload).hexdigest(), "rows": len(rows), "tokens": tokens})
        return out

    for batch in batches:
        pending.append(batch)
    if pending:
        written = flush(pa.Table.from_batches(pending))
        yield pa.RecordBatch.from_pylist(written, schema=pa.schema([("name", pa.string()), ("sha256", pa.string()),
                                                                    ("rows", pa.int64()), ("tokens", pa.int64())]))
