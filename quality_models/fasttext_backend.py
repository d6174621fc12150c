"""fastText classifier (DCLM-style): fast enough to score every document.

Training writes prepared lines and runs fastText's own trainer. Inference does not call fastText
per document: ``tokenize`` splits a whole Arrow batch the way fastText's reader would (shared by
every model), and each model's output is the mean of precomputed per-feature logits
(input matrix × output matrix), gathered with numpy. ``predict_proba`` equals ``fasttext``'s
``predict`` (tested); models it cannot reproduce (quantised, sub-word n-grams, a loss other than
softmax) go through the library instead.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quality_models.arrowtext import HAN_CLASS, as_large_strings, cut_to, is_han, segment_sums, string_buffers

_EOS = "</s>"
_LABEL = "__label__"
_FNV_BASIS, _FNV_PRIME = 2166136261, 16777619
_NGRAM_PRIME = 116049371  # fastText's word n-gram hash multiplier
# fastText 0.9.3 initialises its input matrix in tenths, one per training thread
# (``DenseMatrix::uniformThread``): with fewer than 11 threads part of the matrix keeps whatever the
# allocator handed over, and training on that garbage aborts with "Encountered NaN" (often in a
# process whose heap has seen other work, such as one running Spark). 11 threads cover every tenth
# and the remainder; training is then Hogwild-parallel, so not bit-for-bit repeatable.
INIT_THREADS = 11


def prepare_many(texts, max_chars: int = 4000) -> list[str]:
    """Lines fastText can read: the first ``max_chars`` characters, lower case, each Han character a
    token of its own, newlines turned into spaces.

    Arrow's compute kernels do it for a whole batch (a list or an Arrow string array) at once.
    """
    import pyarrow.compute as pc

    arr = pc.utf8_lower(pc.utf8_slice_codeunits(as_large_strings(texts), 0, max_chars))
    arr = pc.replace_substring_regex(arr, f"[{HAN_CLASS}]", r" \0 ")
    # fastText splits on any ASCII whitespace itself; only a newline would end the example early.
    arr = pc.ascii_trim_whitespace(pc.replace_substring(arr, "\n", " "))
    return arr.to_pylist()


def prepare(text: str, max_chars: int = 4000) -> str:
    """``prepare_many`` of one text."""
    return prepare_many([text], max_chars)[0]


def fnv1a32(strings) -> np.ndarray:
    """fastText's word hash of each string, as the int32 its dictionary keeps.

    FNV-1a over the UTF-8 bytes, each byte sign-extended first (fastText reads ``char``). Computed
    byte position by byte position over all strings at once, longest first; bytes past the 64th
    (rare: long tokens) are finished one string at a time.
    """
    offsets, data = string_buffers(as_large_strings(strings))
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts, lens = offsets[:-1][order], lengths[order]
    signed = data.view(np.int8)
    h = np.full(n, _FNV_BASIS, np.uint32)
    descending = -lens
    for p in range(min(int(lens[0]), 64) if n else 0):
        k = int(np.searchsorted(descending, -p, side="left"))  # strings longer than p
        h[:k] ^= signed[starts[:k] + p].astype(np.int32).view(np.uint32)
        h[:k] *= np.uint32(_FNV_PRIME)
    for i in range(int(np.searchsorted(descending, -64, side="left"))):
        value = int(h[i])
        for byte in signed[starts[i] + 64 : starts[i] + lens[i]].tolist():
            value = ((value ^ (byte & 0xFFFFFFFF)) * _FNV_PRIME) & 0xFFFFFFFF
        h[i] = value
    out = np.empty(n, np.uint32)
    out[order] = h
    return out.view(np.int32)


@dataclass
class FastTextTokens:
    """A batch's tokens as fastText's reader sees them, shared by every model that scores the batch.

    ``vocab`` holds the batch's tokens (lower-cased, Han characters split off; a word can appear
    twice, as "The" and "the" do) followed by the end-of-line token; ``sequence`` indexes it,
    document after document, each ending in end-of-line; ``offsets`` delimit the documents;
    ``hashes`` are fastText's hashes of ``vocab``.
    """

    vocab: object  # pa.LargeStringArray, end-of-line token last
    hashes: np.ndarray  # int32 per vocab entry
    sequence: np.ndarray  # int64 indices into vocab
    offsets: np.ndarray  # int64, len(documents) + 1
    _ngrams: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def word_ngrams(self, n: int, bucket: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """fastText's hashed word n-grams of 2..n words: per length, (bucket index, offsets per document)."""
        key = (n, bucket)
        if key not in self._ngrams:
            # fastText keeps word hashes as int32 and widens them, sign-extended, into a uint64.
            word_hash = self.hashes[self.sequence].astype(np.int64).view(np.uint64)
            lengths = np.diff(self.offsets)
            out, h = [], word_hash
            for gap in range(1, n):
                h = h[:-1] * np.uint64(_NGRAM_PRIME) + word_hash[gap:]
                # n-grams start at a document's positions 0 .. length-gap-1; one starting within gap of
                # its document's end would reach into the next document, and is dropped.
                offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths - gap, 0))])
                inside = np.ones(len(h), bool)
                starts = (self.offsets[1:, None] - np.arange(1, gap + 1)).ravel()
                inside[starts[(starts >= 0) & (starts < len(h))]] = False
                out.append(((h[inside] % np.uint64(bucket)).astype(np.int64), offsets))
            self._ngrams[key] = out
        return self._ngrams[key]


def tokenize(texts, max_chars: int = 4000) -> FastTextTokens:
    """``FastTextTokens`` of a batch: the tokens fastText's reader makes of ``prepare_many``'s lines.

    Splitting on ASCII whitespace first, then lower-casing and splitting Han characters off each
    distinct token, gives the same tokens as splitting the prepared line: both steps act within a
    token. So the per-character work runs once per distinct token, not once per occurrence.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = cut_to(as_large_strings(texts), max_chars)
    offsets, data = string_buffers(arr)
    if (data[offsets[0] : offsets[-1]] == 0).any():
        arr = pc.replace_substring(arr, "\x00", " ")  # fastText splits on NUL too; Arrow does not
    tokens, doc_offsets = _split(arr)
    encoded = pc.dictionary_encode(tokens)
    occurrence = np.asarray(encoded.indices, np.int64)
    pieces, piece_offsets = _lower_and_split_han(encoded.dictionary)
    labels = pc.starts_with(pieces, _LABEL)  # fastText takes these for labels and skips them in text
    if len(pieces) and pc.any(labels).as_py():
        keep = ~np.asarray(labels, bool)
        piece_offsets = np.concatenate([[0], np.cumsum(keep)])[piece_offsets]
        pieces = pieces.filter(pa.array(keep))
    counts = np.diff(piece_offsets)
    if len(counts) and counts.min() == 1 and counts.max() == 1:
        # The pieces are the vocabulary: a word may be in it twice ("The", "the"); both map alike.
        sequence = piece_offsets[:-1][occurrence]
    else:  # expand each occurrence into its token's pieces, and count each distinct piece once
        lengths = counts[occurrence]
        ends = np.cumsum(lengths)
        positions = (np.repeat(piece_offsets[:-1][occurrence] - (ends - lengths), lengths)
                     + np.arange(int(ends[-1]) if len(ends) else 0))
        distinct = pc.dictionary_encode(pieces)
        pieces, sequence = distinct.dictionary, np.asarray(distinct.indices, np.int64)[positions]
        doc_offsets = np.concatenate([[0], ends])[doc_offsets]
    # Every line ends in the end-of-line token, which fastText counts as a word.
    sequence = np.insert(sequence, doc_offsets[1:], len(pieces))
    doc_offsets = doc_offsets + np.arange(len(doc_offsets))
    vocab = pa.concat_arrays([as_large_strings(pieces), pa.array([_EOS], pa.large_string())])
    return FastTextTokens(vocab, fnv1a32(vocab), sequence, doc_offsets)


def _split(strings) -> tuple[object, np.ndarray]:
    """(the non-empty ASCII-whitespace-separated tokens of all strings, offsets per string)."""
    import pyarrow.compute as pc

    trimmed = pc.ascii_trim_whitespace(strings)  # then only an empty string splits into an empty token
    lists = pc.ascii_split_whitespace(trimmed)
    offsets = np.asarray(lists.offsets, np.int64)
    offsets -= offsets[0]
    flat = lists.flatten()
    empty = np.flatnonzero(np.asarray(pc.binary_length(trimmed), np.int64) == 0)
    if not len(empty):
        return flat, offsets
    nonempty = np.ones(len(flat), bool)
    nonempty[offsets[empty]] = False
    return flat.filter(nonempty), np.concatenate([[0], np.cumsum(nonempty)])[offsets]


def _lower_and_split_han(tokens) -> tuple[object, np.ndarray]:
    """(pieces, offsets per token): each token lower-cased, every Han character a piece of its own.

    Works on the code points of all tokens at once; the pieces share the lower-cased tokens' bytes.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    lowered = as_large_strings(pc.utf8_lower(tokens))
    offsets, data = string_buffers(lowered)
    if not len(lowered) or not pc.any(pc.match_substring_regex(lowered, f"[{HAN_CLASS}]")).as_py():
        return lowered, np.arange(len(lowered) + 1, dtype=np.int64)
    text = data[offsets[0] : offsets[-1]].tobytes().decode("utf-8")
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    han = is_han(points)
    char_offsets = np.concatenate([[0], np.cumsum(np.asarray(pc.utf8_length(lowered), np.int64))])
    starts = han.copy()  # a piece starts at a Han character, after one, and where a token starts
    starts[1:] |= han[:-1]
    starts[char_offsets[:-1][np.diff(char_offsets) > 0]] = True
    first = np.flatnonzero(starts)
    utf8_width = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    byte_at = np.concatenate([[0], np.cumsum(utf8_width)]) + offsets[0]
    piece_bytes = np.append(byte_at[first], byte_at[-1])
    pieces = pa.LargeStringArray.from_buffers(len(first), pa.py_buffer(piece_bytes.astype(np.int64)),
                                              lowered.buffers()[2])
    return pieces, np.searchsorted(first, char_offsets, side="left")


class FastTextClassifier:
    backend = "fasttext"

    def __init__(self, model, labels: list[str]):
        self.model = model
        self.labels = labels
        self._features = None

    @classmethod
    def train(cls, texts: list[str], labels: list[str], epoch: int = 15, dim: int = 32, bucket: int = 50_000,
              word_ngrams: int = 2, lr: float = 0.5, seed: int = 0) -> FastTextClassifier:
        import fasttext

        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
            for line, label in zip(prepare_many(texts), labels):
                if line:  # an example without a token makes fastText average over nothing: NaN
                    f.write(f"__label__{label} {line}\n")
            path = f.name
        try:
            # A small bucket keeps the model file in megabytes, not the default 400 MB.
            model = fasttext.train_supervised(input=path, epoch=epoch, dim=dim, bucket=bucket, wordNgrams=word_ngrams,
                                              lr=lr, minCount=1, thread=INIT_THREADS, seed=seed, verbose=0)
        finally:
            Path(path).unlink()
        return cls(model, sorted(lab.removeprefix("__label__") for lab in model.labels))

    def save(self, folder: Path) -> None:
        self.model.save_model(str(folder / "model.bin"))

    @classmethod
    def load(cls, folder: Path, labels: list[str]) -> FastTextClassifier:
        import fasttext

        return cls(fasttext.load_model(str(folder / "model.bin")), labels)

    def supports_vectorised(self) -> bool:
        """Whether ``tokenize`` + per-feature logits reproduce this model (softmax, no sub-words, unpruned)."""
        args = self.model.f.getArgs()
        return (not self.model.is_quantized() and args.maxn <= 0 and args.loss.name == "softmax"
                and args.model.name == "supervised")

    def _tables(self):
        """(vocabulary, word count, logits per input row) of the model, computed once.

        A fastText prediction is softmax(output · mean(input rows)); the mean commutes with the
        product, so each input row's logits are precomputed and a document's are their mean.
        """
        if self._features is None:
            import pyarrow as pa

            words = self.model.get_words()
            out = self.model.get_output_matrix().astype(np.float64)
            logits = self.model.get_input_matrix().astype(np.float64) @ out.T
            label_of_row = [self.labels.index(lab.removeprefix("__label__")) for lab in self.model.get_labels()]
            table = np.zeros(logits.shape, np.float32)  # float32 rows gather and sum twice as fast
            table[:, label_of_row] = logits  # columns in self.labels' (sorted) order
            self._features = (pa.array(words, pa.large_string()), len(words), table)
        return self._features

    def predict_proba(self, texts, tokens: FastTextTokens | None = None) -> np.ndarray:
        """Class probabilities per text, in ``self.labels`` order; ``tokens`` (``tokenize(texts)``)
        is shared between models that score the same texts."""
        n = len(texts)
        if n == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        if not self.supports_vectorised():
            return self._predict_with_library(prepare_many(texts))
        import pyarrow.compute as pc

        tokens = tokens if tokens is not None else tokenize(texts)
        vocab, nwords, table = self._tables()
        args = self.model.f.getArgs()
        word_id = np.asarray(pc.fill_null(pc.index_in(tokens.vocab, value_set=vocab), -1), np.int64)
        ids = word_id[tokens.sequence]
        known = ids >= 0  # an unknown word adds no row of its own; its hash still makes n-grams
        known_offsets = np.concatenate([[0], np.cumsum(known)])[tokens.offsets]
        logits = segment_sums(np.take(table, ids[known], axis=0), known_offsets).astype(np.float64)
        count = np.diff(known_offsets).astype(np.float64)
        for buckets, offsets in tokens.word_ngrams(args.wordNgrams, args.bucket):
            logits += segment_sums(np.take(table, nwords + buckets, axis=0), offsets)
            count += np.diff(offsets)
        logits /= np.maximum(count, 1.0)[:, None]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)

    def _predict_with_library(self, lines: list[str]) -> np.ndarray:
        # Always a list: fastText's single-string path breaks on numpy 2.
        got_labels, got_probs = self.model.predict(lines, k=len(self.labels))
        index = {lab: i for i, lab in enumerate(self.labels)}
        out = np.zeros((len(lines), len(self.labels)), np.float32)
        for row, (labs, probs) in enumerate(zip(got_labels, got_probs)):
            for lab, p in zip(labs, probs):
                out[row, index[lab.removeprefix("__label__")]] = p
        return out
