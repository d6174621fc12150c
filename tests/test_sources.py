import gzip
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.sources import Split, count_newlines, list_files, plan_splits, read_lines


def _read_all(file: Path, split_bytes: int) -> list[tuple[int, bytes]]:
    splits = plan_splits("s", "jsonl", [str(file)], split_bytes)
    before, out = 0, []
    for split in splits:  # what ingest does on the cluster: count first, then number
        numbered = Split(split.source, split.format, split.file, split.start, split.end, before)
        out.extend(read_lines(numbered))
        if split.end > 0:
            before += count_newlines(split)
    return out


lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=0, max_size=60)


@settings(max_examples=150, deadline=None)
@given(lines=lines, split_bytes=st.integers(min_value=1, max_value=120), crlf=st.booleans(), trailing=st.booleans())
def test_splits_read_every_line_once_with_its_line_number(tmp_path_factory, lines, split_bytes, crlf, trailing):
    end = b"\r\n" if crlf else b"\n"
    data = end.join(lines) + (end if trailing and lines else b"")
    file = tmp_path_factory.mktemp("s") / "f.jsonl"
    file.write_bytes(data)
    got = _read_all(file, split_bytes)
    expected = [(i + 1, ln.rstrip(b"\r")) for i, ln in enumerate(data.split(b"\n"))]
    if expected and expected[-1][1] == b"" and data.endswith(b"\n"):
        expected.pop()
    if data == b"":
        expected = []
    assert got == expected


def test_compressed_files_are_one_split_and_read_whole(tmp_path):
    f = tmp_path / "x.jsonl.gz"
    f.write_bytes(gzip.compress(b"a\nb\r\nc"))
    splits = plan_splits("s", "jsonl", [str(f)], split_bytes=1)
    assert len(splits) == 1
    assert list(read_lines(splits[0])) == [(1, b"a"), (2, b"b"), (3, b"c")]


def test_glob_matches_like_a_shell_with_double_star(tmp_path):
    for rel in ["a/x.jsonl", "a/b/y.jsonl", "a/b/z.txt", "a/b/d/w.jsonl", "c.jsonl"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    assert list_files(f"{tmp_path}/a/*.jsonl") == [f"{tmp_path}/a/x.jsonl"]
    assert list_files(f"{tmp_path}/a/**/*.jsonl") == [
        f"{tmp_path}/a/b/d/w.jsonl", f"{tmp_path}/a/b/y.jsonl", f"{tmp_path}/a/x.jsonl"
    ]
    assert list_files(f"{tmp_path}/c.jsonl") == [f"{tmp_path}/c.jsonl"]
    assert list_files(f"{tmp_path}/nothing/*.jsonl") == []
