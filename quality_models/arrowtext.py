"""Text work on whole Arrow string arrays: buffers, cuts, code points, and sums per document."""

from __future__ import annotations

import numpy as np

# Han characters, as every stage counts them: CJK Unified Ideographs, Extension A, Compatibility.
HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))
HAN_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in HAN_RANGES)  # a regex character-class body


def is_han(points: np.ndarray) -> np.ndarray:
    """Per code point: whether it is a Han character."""
    out = np.zeros(points.shape, bool)
    for lo, hi in HAN_RANGES:
        out |= (points >= lo) & (points <= hi)
    return out


def as_large_strings(texts):
    """An Arrow ``large_string`` array of a list, an Arrow array or a chunked array."""
    import pyarrow as pa

    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if isinstance(texts, pa.Array):
        return texts.cast(pa.large_string())
    return pa.array(texts, pa.large_string())


def string_buffers(arr) -> tuple[np.ndarray, np.ndarray]:
    """(int64 byte offsets, uint8 data) of a ``large_string``/``large_binary`` array, not copied."""
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    return offsets, (np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8))


def cut_to(arr, max_chars: int):
    """Each string's first ``max_chars`` characters (the array itself when none is longer)."""
    import pyarrow.compute as pc

    offsets, _ = string_buffers(arr)
    if not len(arr) or int(np.diff(offsets).max()) <= max_chars:  # bytes >= characters
        return arr
    if pc.max(pc.utf8_length(arr)).as_py() <= max_chars:
        return arr
    return pc.utf8_slice_codeunits(arr, 0, max_chars)


def code_points(arr) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 code points of all strings one after another, int64 offsets per string into them)."""
    import pyarrow.compute as pc

    offsets, data = string_buffers(arr)
    text = data[offsets[0] : offsets[-1]].tobytes().decode("utf-8")
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    lengths = np.asarray(pc.fill_null(pc.utf8_length(arr), 0), np.int64)
    return points, np.concatenate([[0], np.cumsum(lengths)])


def segment_sums(values: np.ndarray, offsets: np.ndarray, dtype=None) -> np.ndarray:
    """Row sums of ``values`` per segment ``offsets[i]:offsets[i+1]`` (zero for an empty one), in
    ``dtype`` (default: the values' own)."""
    dtype = dtype or values.dtype
    out = np.zeros((len(offsets) - 1,) + values.shape[1:], dtype)
    nonempty = offsets[1:] > offsets[:-1]
    if nonempty.any():
        # Without the empty segments in the way, each non-empty one runs to the next one's start.
        out[nonempty] = np.add.reduceat(values, offsets[:-1][nonempty], axis=0, dtype=dtype)
    return out


def ascii_letters(arr) -> np.ndarray:
    """Per string of an all-ASCII array: how many bytes are letters A-Z or a-z."""
    offsets, data = string_buffers(arr)
    folded = (data[offsets[0] : offsets[-1]] | 0x20) - np.uint8(ord("a"))  # wraps below 'a'
    return segment_sums(folded < 26, offsets - offsets[0], np.int64)
